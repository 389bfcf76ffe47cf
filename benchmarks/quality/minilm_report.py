"""Reporting for the MiniLM quality benchmark (``minilm.py``): tables, paired claims, figure.

A row holds per-task lists of per-example 0/1 outcomes (``correct``) on the test split. The SE of a
row's mean over T tasks is sqrt(sum_t se_t^2) / T with se_t the binomial SE of task t; a difference
between two rows is paired (same examples): per task, SE = std(a_i - b_i) / sqrt(n).
"""
from __future__ import annotations

import statistics

import minilm_train as mt


def log(msg):
    import time
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def row_of(name, correct, **kw):
    return {"row": name, "correct": correct, "accs": [sum(c) / len(c) for c in correct], **kw}


def avg_se(row):
    """(mean accuracy over tasks, its standard error) from the per-example outcomes."""
    ses = [mt.se(c) for c in row["correct"]]
    return statistics.mean(row["accs"]), (sum(s * s for s in ses) ** 0.5) / len(ses)


def diff(a, b):
    """Mean over tasks of acc(a) - acc(b), paired standard error (same test examples)."""
    ds = [sum(x) / len(x) - sum(y) / len(y) for x, y in zip(a["correct"], b["correct"])]
    ses = [mt.paired_se(x, y) for x, y in zip(a["correct"], b["correct"])]
    return statistics.mean(ds), (sum(s * s for s in ses) ** 0.5) / len(ses)


def markdown(rows, names, title):
    lines = [f"### {title}", "", "| method | λ | " + " | ".join(names) + " | avg ± SE | norm. |",
             "|---|---|" + "---|" * len(names) + "---|---|"]
    for r in rows:
        if r.get("accs") is None:
            lines.append(f"| {r['row']} | | " + " | ".join("" for _ in names) + f" | {r['note']} | |")
            continue
        accs = " | ".join(f"{100 * a:.1f}" for a in r["accs"])
        lam = "" if r.get("lambda") is None else f"{r['lambda']}"
        norm = "" if r.get("norm") is None else f"{100 * r['norm']:.1f}"
        m, s = avg_se(r)
        lines.append(f"| {r['row']} | {lam} | {accs} | {100 * m:.1f} ± {100 * s:.1f} | {norm} |")
    return lines + [""]


def gains_table(names, probe, ft, lora, base_ft):
    """Per task: base probe, base with the FT head, full FT, LoRA; gains with paired SE."""
    lines = ["### Fine-tunes vs the base (per task, test accuracy %, ± SE; gains ± paired SE)", "",
             "| task | base, linear probe | base, FT head | full FT | FT − probe | LoRA | LoRA − probe |",
             "|---|---|---|---|---|---|---|"]
    for i, n in enumerate(names):
        p, b, f, l = probe["correct"][i], base_ft["correct"][i], ft["correct"][i], lora["correct"][i]
        acc = lambda c: f"{100 * sum(c) / len(c):.1f} ± {100 * mt.se(c):.1f}"    # noqa: E731
        g = lambda c: f"{100 * (sum(c) - sum(p)) / len(c):+.1f} ± {100 * mt.paired_se(c, p):.1f}"  # noqa: E731
        lines.append(f"| {n} (n={len(p)}) | {acc(p)} | {acc(b)} | {acc(f)} | {g(f)} | {acc(l)} | {g(l)} |")
    return lines + [""]


CLAIMS = [   # (claim, section, row a, row b): reported as acc(a) - acc(b), paired SE
    ("TIES > task arithmetic (full FT)", "ft", "ties", "task_arithmetic"),
    ("TIES > task arithmetic (LoRA)", "lora", "ties", "task_arithmetic"),
    ("DARE drop 70 % + rescale ≈ task arithmetic", "ft", "dare_linear", "task_arithmetic"),
    ("DARE + TIES ≈ TIES", "ft", "dare_ties", "ties"),
    ("DELLA ≥ DARE", "ft", "della_linear", "dare_linear"),
    ("Breadcrumbs > task arithmetic", "ft", "breadcrumbs", "task_arithmetic"),
    ("TSV > task arithmetic (full FT)", "ft", "tsv", "task_arithmetic"),
    ("TSV > task arithmetic (LoRA)", "lora", "tsv", "task_arithmetic"),
    ("MagMax > task arithmetic", "ft", "magmax", "task_arithmetic"),
    ("OPCM (no λ) ≥ task arithmetic (λ tuned)", "ft", "opcm", "task_arithmetic"),
    ("Model Stock ≥ average", "ft", "model_stock", "linear"),
    ("task arithmetic > average", "ft", "task_arithmetic", "linear"),
    ("Core Space[TA] ≥ TA (LoRA)", "lora", "core_space[task_arithmetic]", "task_arithmetic"),
    ("Core Space[TIES] ≥ TIES (LoRA)", "lora", "core_space[ties]", "ties"),
    ("Core Space[TSV] ≥ TSV (LoRA)", "lora", "core_space[tsv]", "tsv"),
    ("LoRA-LEGO ≥ LoRA average", "lora", "lora_lego", "linear"),
    ("best merge of full FTs > base (FT heads)", "ft", "*best", "base (FT heads)"),
    ("best merge of full FTs vs individual FTs", "ft", "*best", "individual full fine-tunes"),
    ("RMM p=2 reverted ≈ individual LoRAs", "lora", "rmm p=2 (reverted per task)", "individual LoRAs"),
]


def claims_table(sections):
    lines = ["### Paper claims, paired differences (mean over tasks of acc(a) − acc(b), points ± paired SE)",
             "", "| claim | a − b | ± SE | reading |", "|---|---|---|---|"]
    out = []
    for claim, sec, a, b in CLAIMS:
        rows = {r["row"]: r for r in sections[sec] if r.get("correct")}
        if a == "*best":
            cand = [r for r in sections[sec] if r.get("correct") and not r.get("ref")]
            if not cand:
                continue
            ra = max(cand, key=lambda r: statistics.mean(r["accs"]))
            claim = claim.replace("best merge", f"best merge ({ra['row']})")
        else:
            ra = rows.get(a)
        rb = rows.get(b)
        if ra is None or rb is None:
            continue
        d, s = diff(ra, rb)
        z = d / s if s > 0 else 0.0
        reading = "a > b (> 2 SE)" if z > 2 else "a < b (> 2 SE)" if z < -2 else "no difference within 2 SE"
        lines.append(f"| {claim} | {100 * d:+.1f} | {100 * s:.1f} | {reading} |")
        out.append({"claim": claim, "a": ra["row"], "b": rb["row"], "diff": d, "se": s})
    return lines + [""], out


def figure(sections, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no figure")
        return
    fig, axes = plt.subplots(1, len(sections), figsize=(7 * len(sections), 7))
    axes = axes if len(sections) > 1 else [axes]
    for ax, (title, rows) in zip(axes, sections):
        rows = [r for r in rows if r.get("accs") is not None]
        ms = [avg_se(r) for r in rows]
        colors = ["0.6" if r.get("ref") else "tab:blue" for r in rows]
        ax.barh(range(len(rows)), [100 * m for m, _ in ms], xerr=[100 * s for _, s in ms], color=colors,
                error_kw={"elinewidth": 0.8, "capsize": 2})
        ax.set_yticks(range(len(rows)), [r["row"] for r in rows], fontsize=8)
        ax.invert_yaxis()
        lo = min(100 * m for m, _ in ms)
        ax.set_xlim(max(0, lo - 8), 100)
        ax.set_xlabel("mean test accuracy over tasks (%), bar = ±1 SE")
        ax.set_title(title)
        for i, (m, _) in enumerate(ms):
            ax.text(100 * m + 1.2, i, f"{100 * m:.1f}", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
