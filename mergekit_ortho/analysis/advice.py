"""The recommendation rules of `merge analyze`: data, one row each, evaluated on the overall
statistics. Each names the benchmark file that supports it and how strong that evidence is; a
rule with no benchmark of ours behind it says so (``strength: weak``).

Measures (from :func:`measures`): ``mean_abs_cosine``, ``sign_conflict``, ``dropped_mass``,
``top_energy`` (mean over models), ``norm_ratio`` (largest / smallest model norm), ``loras``
(LoRA inputs, 0 or 1).
"""
from __future__ import annotations

import operator

QUALITY = "benchmarks/quality/results/results.md"
QUALITY_README = "benchmarks/quality/README.md"
MINILM = "benchmarks/quality/results/minilm.md"
# the real-model run: weak fine-tunes, every merge within noise of the others (its README reading)
MINILM_NULL = (f"; on a real model ({MINILM}, all-MiniLM-L6-v2, weak fine-tunes) every method lay within "
               "noise of the others (69.5-71.5), so that run neither confirms nor refutes it")

RULES = (
    {"id": "near_orthogonal", "when": ("mean_abs_cosine", "<", 0.2),
     "advice": "task vectors are nearly orthogonal: task arithmetic (tuned lambda, about 0.3 for 6 tasks) "
               "loses little to interference; TIES / DARE did not beat it there, TSV did (+4.6 points)",
     "evidence": f"{QUALITY} section 1 (full fine-tunes, mean cosine about 0.12: TA 75.2, TIES 74.3, "
                 "DARE 74.7-74.9, TSV 79.8)" + MINILM_NULL + " (TA 70.1, TIES 71.0, TSV 70.9)",
     "strength": "weak to moderate: one synthetic 107k-parameter MLP, one training seed; not "
                 "reproduced on the real model"},
    {"id": "aligned", "when": ("mean_abs_cosine", ">", 0.5),
     "advice": "task vectors point the same way: a plain sum overshoots; average them (linear) or use "
               "task arithmetic with lambda about 1 / number of models",
     "evidence": f"{QUALITY_README} caveats (an earlier configuration with larger task vectors had "
                 "lambda* about 1/T and averaging about equal to TA); no benchmark measures aligned vectors",
     "strength": "weak"},
    {"id": "heavy_sign_conflict", "when": ("sign_conflict", ">", 0.3),
     "advice": "many kept entries disagree in sign: TIES's sign election (or TSV's decorrelation) "
               "removes that interference; compare against task arithmetic",
     "evidence": f"{QUALITY} section 1 (TSV best on full fine-tunes); sign conflict itself is not "
                 "measured by any benchmark here, the rule is the TIES paper's (arXiv 2306.01708)",
     "strength": "weak"},
    {"id": "low_sign_conflict", "when": ("sign_conflict", "<", 0.1),
     "advice": "little sign conflict at this density: TIES's election changes little; its trimming "
               "is what remains of it",
     "evidence": "none of ours (follows from the definition of the election)",
     "strength": "weak"},
    {"id": "low_rank", "when": ("top_energy", ">", 0.5),
     "advice": "most of each task vector's energy lies in a few singular directions: TSV and core_space "
               "keep each task at low rank with little loss",
     "evidence": f"{QUALITY} sections 1 and 3 (TSV 79.8 vs TA 75.2 on full fine-tunes; core TSV = full "
                 "TSV 77.5 on LoRAs)" + MINILM_NULL,
     "strength": "weak to moderate: one toy model; not reproduced on the real model"},
    {"id": "norm_imbalance", "when": ("norm_ratio", ">", 3.0),
     "advice": "one model's task vector is several times larger than another's: it dominates a sum; "
               "balance the weights, or check it did not diverge (the continual gate's test)",
     "evidence": "none of ours",
     "strength": "weak"},
    {"id": "loras", "when": ("loras", ">", 0.5),
     "advice": "LoRA inputs: core_space with task_arithmetic equals full-space task arithmetic and is "
               "cheaper; core-space against full-space TIES went both ways in our runs: compare them "
               "(merge sweep) before choosing",
     "evidence": f"{QUALITY} section 3 (core TA = full TA 76.8, max weight diff 7.2e-07; core TIES "
                 f"71.9 vs full 76.4 at density 0.2) and {MINILM} (core TA = full TA 69.4; core TIES "
                 "70.7 vs full 69.2, within noise)",
     "strength": "strong for the equality (exact, both runs); weak for TIES (toy model, untuned density; "
                 "the real-model run within noise)"},
)

_OPS = {"<": operator.lt, ">": operator.gt}


def measures(result: dict) -> dict:
    o = result["overall"]
    cos = [abs(v) for v in o["cosine"].values() if v is not None]
    top = [v for v in o["top_energy"].values() if v is not None]
    norms = [v for v in o["norm"].values() if v is not None]
    return {
        "mean_abs_cosine": sum(cos) / len(cos) if cos else None,
        "sign_conflict": o["sign_conflict"],
        "dropped_mass": o["dropped_mass"],
        "top_energy": sum(top) / len(top) if top else None,
        "norm_ratio": (max(norms) / min(norms)) if norms and min(norms) > 0 else None,
        "loras": 1.0 if result.get("loras") else 0.0,
    }


def recommend(result: dict, rules=RULES) -> list[dict]:
    """The rules whose condition holds, each with the measured value."""
    got = measures(result)
    out = []
    for r in rules:
        key, op, threshold = r["when"]
        value = got.get(key)
        if value is not None and _OPS[op](value, threshold):
            out.append({**r, "when": f"{key} {op} {threshold:g}", "measured": value})
    return out
