"""Accuracy benchmark for every merge operator of mergekit-ortho, trained and evaluated on CPU.

    python benchmarks/quality/run_quality.py            # full run (<= 15 min on 2 idle cores)
    python benchmarks/quality/run_quality.py --quick    # smoke run, ~1-2 min (3 tasks, tiny grids)
    python benchmarks/quality/run_quality.py --rebuild  # retrain the checkpoints even if cached

Everything is synthetic and deterministic (no download): a hierarchical Gaussian mixture in R^32
(24 super-clusters x 4 sub-clusters). A 3-layer MLP "body" (32-256-256-128) is pretrained on a broad
objective (8 random labelings of the super-clusters); every downstream task lives on its own subset
of 8 super-clusters and labels the *sub-clusters* (10 classes), so it needs features the
pretraining did not ask for. Each task gets a frozen linear head (a linear probe on the pretrained
features, like CLIP's zero-shot heads); only the body is fine-tuned, LoRA-adapted and merged, and
every model is evaluated on task t with head t, so merged and individual models are comparable.

All merging goes through the public CLI (`merge run`, `merge continual init|add|export`,
`merge revert`) in subprocesses, driven by YAML recipes written here; nothing from mergekit_ortho is
imported. The only merge computed in this script is the "factor averaging" LoRA baseline (mean of the
A's and of the B's), which the toolkit does not offer. See README.md next to this file.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RESULTS = HERE / "results"

# ---------------------------------------------------------------------------------------------------
# configuration

D_IN, HIDDEN, FEAT, N_CLASSES = 32, 256, 128, 10
N_SUPER, N_SUB, SUPERS_PER_TASK = 24, 4, 8
SUB_SCALE, NOISE = 0.3, 0.45
N_PRE_TASKS = 8
LORA_R, LORA_ALPHA = 8, 16
TARGETS = ["layers.0", "layers.1", "layers.2"]
LAYER_SHAPES = [(HIDDEN, D_IN), (HIDDEN, HIDDEN), (FEAT, HIDDEN)]  # (out, in) of layers.0/1/2

CONFIGS = {
    "full": dict(tasks=6, pre_steps=800, probe_steps=300, ft_steps=600, lora_steps=500, ft_lr=1e-4,
                 lora_lr=1e-3, n_train=4000, n_val=500, n_test=2000, orders=3,
                 grid=[0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0], rmm_p=[1, 2, 3]),
    "quick": dict(tasks=3, pre_steps=300, probe_steps=150, ft_steps=300, lora_steps=200, ft_lr=1e-4,
                  lora_lr=1e-3, n_train=1500, n_val=300, n_test=600, orders=2,
                  grid=[0.3, 1.0], rmm_p=[1, 2]),
}
SEED = 0
TIES_DENSITY = 0.2      # TIES paper: keep the top 20 % of each task vector
DARE_DENSITY = 0.3      # DARE: drop 70 %, rescale
TA_SEQ_LAMBDA = 0.3     # task arithmetic in the sequential setting (no validation set): FusionBench default
LAMBDA_NAMES = ("lambda", "alpha", "scaling", "scale")


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


T0 = time.perf_counter()

# ---------------------------------------------------------------------------------------------------
# data: hierarchical Gaussian mixture, one labeling per task


class World:
    def __init__(self, n_tasks: int, seed: int = SEED):
        g = torch.Generator().manual_seed(seed)
        self.super_c = torch.randn(N_SUPER, D_IN, generator=g)
        self.sub_c = self.super_c[:, None, :] + SUB_SCALE * torch.randn(N_SUPER, N_SUB, D_IN, generator=g)
        self.pre_tables = [torch.randint(0, N_CLASSES, (N_SUPER,), generator=g) for _ in range(N_PRE_TASKS)]
        self.tasks = []
        for _ in range(6):  # always draw 6 so that --quick's tasks are the full run's first tasks
            supers = torch.randperm(N_SUPER, generator=g)[:SUPERS_PER_TASK]
            table = torch.randint(0, N_CLASSES, (N_SUPER, N_SUB), generator=g)
            self.tasks.append((supers, table))
        self.tasks = self.tasks[:n_tasks]

    def sample(self, n: int, g: torch.Generator, supers: torch.Tensor | None = None):
        if supers is None:
            sup = torch.randint(0, N_SUPER, (n,), generator=g)
        else:
            sup = supers[torch.randint(0, len(supers), (n,), generator=g)]
        sub = torch.randint(0, N_SUB, (n,), generator=g)
        return self.sub_c[sup, sub] + NOISE * torch.randn(n, D_IN, generator=g), sup, sub

    def task_split(self, t: int, split: str, n: int):
        supers, table = self.tasks[t]
        g = torch.Generator().manual_seed(10_000 + 100 * t + {"train": 0, "val": 1, "test": 2}[split])
        x, sup, sub = self.sample(n, g, supers)
        return x, table[sup, sub]


class Body(nn.Module):
    """The merged network. Tensor names: layers.{0,1,2}.{weight,bias} (PEFT keys map onto them)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(D_IN, HIDDEN), nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, FEAT)])

    def forward(self, x):
        for layer in self.layers:
            x = F.relu(layer(x))
        return x


def features(sd: dict, x: torch.Tensor) -> torch.Tensor:
    for i in range(3):
        x = F.relu(F.linear(x, sd[f"layers.{i}.weight"], sd[f"layers.{i}.bias"]))
    return x


# ---------------------------------------------------------------------------------------------------
# training (cached under WORK/models, keyed by the configuration)


def save_checkpoint(d: Path, sd: dict) -> None:
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().float() for k, v in sd.items()}, str(d / "model.safetensors"),
              metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps({
        "architectures": ["ToyMLPBody"], "model_type": "toy_mlp", "torch_dtype": "float32",
        "d_in": D_IN, "hidden": HIDDEN, "features": FEAT}, indent=2))



def _train(model, params, x, y, hw, hb, lr: float, steps: int, g) -> None:
    """Adam on ``params`` through the frozen head (hw, hb): batches of 128 drawn from ``g``."""
    o = torch.optim.Adam(params, lr)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=g)
        loss = F.cross_entropy(F.linear(model(x[idx]), hw, hb), y[idx])
        o.zero_grad()
        loss.backward()
        o.step()

def build_models(world: World, cfg: dict, mdir: Path) -> None:
    from peft import LoraConfig, get_peft_model

    n = cfg["tasks"]
    g = torch.Generator().manual_seed(SEED + 1)
    torch.manual_seed(SEED)
    body = Body()
    pre_heads = nn.Linear(FEAT, N_CLASSES * N_PRE_TASKS)
    opt = torch.optim.Adam(list(body.parameters()) + list(pre_heads.parameters()), 1e-3)
    tables = torch.stack(world.pre_tables, 1)
    for _ in range(cfg["pre_steps"]):
        x, sup, _ = world.sample(256, g)
        logits = pre_heads(body(x)).view(-1, N_PRE_TASKS, N_CLASSES)
        loss = F.cross_entropy(logits.reshape(-1, N_CLASSES), tables[sup].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    log(f"pretrained the body ({cfg['pre_steps']} steps, loss {loss.item():.3f})")
    base_sd = {k: v.detach().clone() for k, v in body.state_dict().items()}
    save_checkpoint(mdir / "base", base_sd)

    heads = {}
    for t in range(n):
        x, y = world.task_split(t, "train", cfg["n_train"])
        with torch.no_grad():
            f = body(x)
        torch.manual_seed(SEED + 100 + t)
        head = nn.Linear(FEAT, N_CLASSES)
        o = torch.optim.Adam(head.parameters(), 1e-2)
        for _ in range(cfg["probe_steps"]):
            idx = torch.randint(0, len(x), (256,), generator=g)
            loss = F.cross_entropy(head(f[idx]), y[idx])
            o.zero_grad()
            loss.backward()
            o.step()
        heads[f"heads.{t}.weight"] = head.weight.detach().clone()
        heads[f"heads.{t}.bias"] = head.bias.detach().clone()
    save_file(heads, str(mdir / "heads.safetensors"))
    log(f"fitted {n} frozen linear-probe heads")

    for t in range(n):
        x, y = world.task_split(t, "train", cfg["n_train"])
        hw, hb = heads[f"heads.{t}.weight"], heads[f"heads.{t}.bias"]
        # full fine-tune of the body, head frozen
        torch.manual_seed(SEED + 200 + t)
        ft = Body()
        ft.load_state_dict(base_sd)
        _train(ft, list(ft.parameters()), x, y, hw, hb, cfg["ft_lr"], cfg["ft_steps"], g)
        save_checkpoint(mdir / f"ft_{t}", ft.state_dict())
        # LoRA (PEFT) on the three linear layers of the same base
        torch.manual_seed(SEED + 300 + t)
        lb = Body()
        lb.load_state_dict(base_sd)
        pm = get_peft_model(lb, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=TARGETS,
                                           lora_dropout=0.0, bias="none"))
        _train(pm, [p for p in pm.parameters() if p.requires_grad], x, y, hw, hb, cfg["lora_lr"],
               cfg["lora_steps"], g)
        pm.peft_config["default"].base_model_name_or_path = str(mdir / "base")
        pm.save_pretrained(str(mdir / f"lora_{t}"))
        log(f"task {t}: full fine-tune and LoRA r{LORA_R} trained")


# ---------------------------------------------------------------------------------------------------
# evaluation


def load_dir(d: Path) -> dict:
    files = sorted(p for p in d.glob("*.safetensors") if not p.name.startswith("adapter"))
    if not files:
        raise FileNotFoundError(f"no safetensors in {d}")
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    return {k: v.float() for k, v in sd.items()}


class Evaluator:
    def __init__(self, world: World, cfg: dict, heads: dict):
        self.n = cfg["tasks"]
        self.heads = heads
        self.data = {s: [world.task_split(t, s, cfg["n_" + s]) for t in range(self.n)] for s in ("val", "test")}

    @torch.no_grad()
    def acc(self, sd: dict, t: int, split: str = "test") -> float:
        x, y = self.data[split][t]
        logits = F.linear(features(sd, x), self.heads[f"heads.{t}.weight"], self.heads[f"heads.{t}.bias"])
        return (logits.argmax(1) == y).float().mean().item() * 100

    def all(self, sd: dict, split: str = "test") -> list[float]:
        return [self.acc(sd, t, split) for t in range(self.n)]


def factor_average(base: dict, lora_dirs: list[Path]) -> dict:
    """Baseline the toolkit does not offer: mean of the A's and mean of the B's, delta = s * B_bar A_bar."""
    sd = {k: v.clone() for k, v in base.items()}
    adapters = [load_file(str(d / "adapter_model.safetensors")) for d in lora_dirs]
    scale = LORA_ALPHA / LORA_R
    for i in range(3):
        a = torch.stack([ad[f"base_model.model.layers.{i}.lora_A.weight"] for ad in adapters]).mean(0)
        b = torch.stack([ad[f"base_model.model.layers.{i}.lora_B.weight"] for ad in adapters]).mean(0)
        sd[f"layers.{i}.weight"] = sd[f"layers.{i}.weight"] + scale * (b @ a)
    return sd


def truncated_lora(base: dict, lora_dir: Path, k: int) -> dict:
    """Baseline at equal storage: one adapter's delta truncated to rank k (best rank-k approximation)."""
    sd = {kk: v.clone() for kk, v in base.items()}
    ad = load_file(str(lora_dir / "adapter_model.safetensors"))
    for i in range(3):
        delta = (LORA_ALPHA / LORA_R) * (ad[f"base_model.model.layers.{i}.lora_B.weight"]
                                         @ ad[f"base_model.model.layers.{i}.lora_A.weight"])
        u, sv, vh = torch.linalg.svd(delta.double(), full_matrices=False)
        sd[f"layers.{i}.weight"] = sd[f"layers.{i}.weight"] + ((u[:, :k] * sv[:k]) @ vh[:k]).float()
    return sd


# ---------------------------------------------------------------------------------------------------
# the CLI


class CliError(RuntimeError):
    pass


def merge_exe() -> list[str]:
    exe = Path(sys.executable).with_name("merge")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("merge")
    return [found] if found else [sys.executable, "-m", "mergekit_ortho.cli"]


MERGE = merge_exe()
CALLS = {"n": 0, "seconds": 0.0}
_calls_lock = threading.Lock()


def cli(*args, quiet: bool = True) -> str:
    cmd = MERGE + (["-q"] if quiet else []) + [str(a) for a in args]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", COLUMNS="2000", NO_COLOR="1",
               TERM="dumb")
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
    with _calls_lock:
        CALLS["n"] += 1
        CALLS["seconds"] += time.perf_counter() - t0
    if p.returncode != 0:
        last = (p.stderr.strip() or p.stdout.strip() or "?").splitlines()[-1]
        raise CliError(f"`merge {' '.join(str(a) for a in args[:2])}` exit {p.returncode}: {last[:300]}")
    return p.stdout


def detect_methods() -> dict[str, dict]:
    """Parse `merge methods` (wide table): name -> {inputs, params, per_model}."""
    out = cli("methods", quiet=False)
    methods = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) < 6 or not cells[1]:
            continue
        name = cells[1].split()[0]          # "linear (average)" -> "linear"
        if not re.fullmatch(r"[a-z0-9_]+", name) or name == "method":
            continue
        names = lambda s: re.findall(r"(?:^|,\s*)([a-z_][a-z0-9_]*)=", s)  # noqa: E731
        methods[name] = {"inputs": cells[2], "params": names(cells[3]), "per_model": names(cells[4])}
    if not methods:
        raise SystemExit("could not parse `merge methods` output")
    return methods


def write_recipe(path: Path, recipe: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------------
# result bookkeeping


@dataclass
class Row:
    name: str
    accs: list | None = None          # per task, test
    note: str = ""
    ref: str = "ft"                   # normalisation reference: "ft" (full fine-tunes) or "lora"
    std: list | None = None           # per-task std over orders (continual)
    avg_std: float | None = None
    status: str = "ok"                # ok | not available | failed
    extra: dict = field(default_factory=dict)


class Bench:
    def __init__(self, args):
        self.args = args
        self.mode = "quick" if args.quick else "full"
        self.cfg = CONFIGS[self.mode]
        self.n = self.cfg["tasks"]
        self.work = REPO / "benchmarks" / "_work" / "quality" / self.mode
        self.mdir = self.work / "models"
        self.mergedir = self.work / "merged"
        self.recdir = self.work / "recipes"
        self.pool = ThreadPoolExecutor(max_workers=args.jobs)
        self.timings = {}

    # -- paths
    def ft(self, t):
        return self.mdir / f"ft_{t}"

    def lora(self, t):
        return self.mdir / f"lora_{t}"

    @property
    def base(self):
        return self.mdir / "base"

    # -- merges
    def run_merge(self, key: str, method: str, models: list[Path], params: dict, per_model: dict | None = None,
                  fmt: str | None = None, base: bool = True) -> Path:
        out = self.mergedir / key
        recipe = {"merge_method": method}
        if base:
            recipe["base_model"] = str(self.base)
        recipe["models"] = [{"model": str(m), "name": f"task{self._task_of(m)}", **(
            {"parameters": dict(per_model)} if per_model else {})} for m in models]
        if params:
            recipe["parameters"] = params
        recipe["output"] = {"path": str(out), **({"format": fmt} if fmt else {})}
        rp = write_recipe(self.recdir / f"{key}.yaml", recipe)
        cli("run", rp, "--out", out, "--overwrite")
        return out

    @staticmethod
    def _task_of(p: Path) -> int:
        return int(p.name.rsplit("_", 1)[1])

    def submit(self, fn, *a, **kw):
        return self.pool.submit(fn, *a, **kw)

    # -- main
    def run(self):
        torch.set_num_threads(2)
        cfg = self.cfg
        log(f"mode {self.mode}: {self.n} tasks, merge CLI = {' '.join(MERGE)}")
        self.methods = detect_methods()
        log("methods registered: " + ", ".join(self.methods))
        world = World(self.n)
        self.world = world

        t0 = time.perf_counter()
        key = hashlib.sha256(json.dumps([cfg, SEED, D_IN, HIDDEN, FEAT, SUB_SCALE, NOISE, LORA_R, LORA_ALPHA],
                                        sort_keys=True).encode()).hexdigest()[:16]
        stamp = self.mdir / "built.json"
        if self.args.rebuild or not stamp.exists() or json.loads(stamp.read_text()).get("key") != key:
            shutil.rmtree(self.mdir, ignore_errors=True)
            self.mdir.mkdir(parents=True)
            build_models(world, cfg, self.mdir)
            stamp.write_text(json.dumps({"key": key}))
        else:
            log(f"reusing checkpoints in {self.mdir} (--rebuild to retrain)")
        self.timings["train"] = time.perf_counter() - t0
        shutil.rmtree(self.mergedir, ignore_errors=True)
        shutil.rmtree(self.work / "continual", ignore_errors=True)
        shutil.rmtree(self.recdir, ignore_errors=True)

        heads = load_file(str(self.mdir / "heads.safetensors"))
        ev = Evaluator(world, cfg, heads)
        self.ev = ev
        self.base_sd = load_dir(self.base)

        t0 = time.perf_counter()
        dense = self.dense_section()
        seq = self.sequential_section()
        lora = self.lora_section()
        rmm = self.rmm_section()
        dense_rows, lam_dense = dense()
        seq_rows, curves, opcm_run_check = seq()
        lora_rows, lam_lora, checks = lora()
        rmm_rows = rmm()
        self.timings["merge+eval"] = time.perf_counter() - t0
        checks["opcm_run_vs_continual"] = opcm_run_check
        self.pool.shutdown()
        self.report(dense_rows, lam_dense, seq_rows, curves, lora_rows, lam_lora, checks, rmm_rows)

    # -----------------------------------------------------------------------------------------------
    # lambda search: every grid value is a real `merge run`; the value with the best mean validation
    # accuracy is reported on the test split

    def lam_param(self, method: str) -> str | None:
        params = self.methods[method]["params"]
        return next((p for p in LAMBDA_NAMES if p in params), None)

    def tuned(self, key: str, method: str, models, params, per_model=None, fmt=None):
        """Submit the grid; returns a function producing (test accs, chosen lambda, val curve)."""
        lp = self.lam_param(method)
        grid = self.cfg["grid"] if lp else [None]
        futs = []
        for lam in grid:
            p = dict(params)
            if lp:
                p[lp] = lam
            k = f"{key}_lam{lam}" if lp else key
            futs.append((lam, self.submit(self.run_merge, k, method, models, p, per_model, fmt)))

        def finish():
            best, curve = None, {}
            for lam, fut in futs:
                out = fut.result()
                sd = load_dir(out)
                v = statistics.mean(self.ev.all(sd, "val"))
                curve[lam] = v
                if best is None or v > best[0] + 1e-9:
                    best = (v, lam, sd)
            return self.ev.all(best[2]), best[1], curve
        return finish

    def guarded(self, rows: list, name: str, method: str | None, fn, ref="ft", note=""):
        """Run fn() -> (accs, extra) with availability / failure handling."""
        if method is not None and method not in self.methods:
            rows.append(Row(name, status="not available", ref=ref, note=f"`{method}` not registered"))
            return None
        try:
            accs, extra = fn()
            rows.append(Row(name, accs, note=note, ref=ref, extra=extra or {}))
            return rows[-1]
        except CliError as e:
            log(f"FAILED {name}: {e}")
            rows.append(Row(name, status="failed", ref=ref, note=str(e)))
            return None

    # -----------------------------------------------------------------------------------------------
    # 1. full fine-tunes, batch setting

    def dense_section(self):
        n = self.n
        fts = [self.ft(t) for t in range(n)]
        pending = []
        have = self.methods
        if "linear" in have:
            f_lin = self.submit(self.run_merge, "dense_linear", "linear", fts, {}, base=False)
        jobs = [
            ("Task arithmetic", "task_arithmetic", {}, None),
            (f"TIES (density {TIES_DENSITY})", "ties", {}, {"density": TIES_DENSITY}),
            (f"DARE-TIES (density {DARE_DENSITY})", "dare_ties", {}, {"density": DARE_DENSITY}),
            (f"DARE-linear (density {DARE_DENSITY})", "dare_linear", {}, {"density": DARE_DENSITY}),
            ("MagMax", "magmax", {}, None),
            ("TSV (TSV-M, full space)", "tsv", {}, None),
        ]
        for name, method, params, pm in jobs:
            if method in have:
                pending.append((name, method, self.tuned(f"dense_{method}", method, fts, params, pm)))
            else:
                pending.append((name, method, None))
        if "widen" in have:
            f_widen = self.submit(self.run_merge, "dense_widen", "widen", fts, {})

        def finish():
            ev = self.ev
            rows = [Row("Pretrained base (zero-shot heads)", ev.all(self.base_sd)),
                    Row("Individual fine-tunes (upper bound)", [ev.acc(load_dir(self.ft(t)), t) for t in range(n)])]
            lams = {}
            self.guarded(rows, "Weight averaging (linear)", "linear",
                         lambda: (ev.all(load_dir(f_lin.result())), None))
            for name, method, fin in pending:
                def go(fin=fin, method=method):
                    accs, lam, curve = fin()
                    lams[method] = (lam, curve)
                    return accs, {"lambda": lam}
                self.guarded(rows, name, method, go)
            self.guarded(rows, "WIDEN (defaults)", "widen", lambda: (ev.all(load_dir(f_widen.result())), None))
            return rows, lams
        return finish

    # -----------------------------------------------------------------------------------------------
    # 2. sequential setting through `merge continual`

    def orders(self):
        g = torch.Generator().manual_seed(SEED + 7)
        out = [list(range(self.n))]
        while len(out) < self.cfg["orders"]:
            o = torch.randperm(self.n, generator=g).tolist()
            if o not in out:
                out.append(o)
        return out

    def chain(self, method: str, params: dict, order: list[int], tag: str) -> list[Path]:
        state = self.work / "continual" / tag
        shutil.rmtree(state, ignore_errors=True)
        state.parent.mkdir(parents=True, exist_ok=True)
        recipe = {"merge_method": method, "base_model": str(self.base)}
        if params:
            recipe["parameters"] = params
        rp = write_recipe(self.recdir / f"continual_{tag}.yaml", recipe)
        cli("continual", "init", state, "--recipe", rp)
        outs = []
        for k, t in enumerate(order):
            cli("continual", "add", state, self.ft(t), "--name", f"task{t}")
            out = self.mergedir / f"continual_{tag}_step{k + 1}"
            cli("continual", "export", state, "--out", out, "--overwrite")
            outs.append(out)
        return outs

    def sequential_section(self):
        orders = self.orders()
        self.order_list = orders
        specs = [("OPCM", "opcm", {}), ("MagMax (lambda 0.5)", "magmax", {"lambda": 0.5}),
                 ("Weight averaging", "linear", {}),
                 (f"Task arithmetic (lambda {TA_SEQ_LAMBDA})", "task_arithmetic", {"lambda": TA_SEQ_LAMBDA})]
        futs = {}
        for name, method, params in specs:
            if method in self.methods:
                futs[name] = [self.submit(self.chain, method, params, o, f"{method}_o{i}") for i, o in enumerate(orders)]
        run_fut = None
        if "opcm" in self.methods:
            run_fut = self.submit(self.run_merge, "opcm_run_order0", "opcm", [self.ft(t) for t in orders[0]], {})

        def finish():
            rows, curves = [], {}
            for name, method, params in specs:
                if name not in futs:
                    rows.append(Row(name, status="not available", note=f"`{method}` not registered"))
                    continue
                try:
                    per_order, curve = [], []
                    for order, fut in zip(orders, futs[name]):
                        outs = fut.result()
                        seen_curve = []
                        for k, out in enumerate(outs):
                            sd = load_dir(out)
                            accs = self.ev.all(sd)
                            seen_curve.append(statistics.mean(accs[t] for t in order[:k + 1]))
                        per_order.append(accs)   # after the last step: all tasks
                        curve.append(seen_curve)
                    mean = [statistics.mean(a[t] for a in per_order) for t in range(self.n)]
                    std = [statistics.pstdev(a[t] for a in per_order) for t in range(self.n)]
                    avgs = [statistics.mean(a) for a in per_order]
                    rows.append(Row(name, mean, std=std, avg_std=statistics.pstdev(avgs),
                                    extra={"per_order_avg": avgs}))
                    curves[name] = curve
                except CliError as e:
                    log(f"FAILED {name}: {e}")
                    rows.append(Row(name, status="failed", note=str(e)))
            check = None
            if run_fut is not None:
                try:
                    a = load_dir(run_fut.result())
                    b = load_dir(self.mergedir / f"continual_opcm_o0_step{self.n}")
                    check = max((a[k] - b[k]).abs().max().item() for k in a)
                except (CliError, FileNotFoundError) as e:
                    check = f"failed: {e}"
            return rows, curves, check
        return finish

    # -----------------------------------------------------------------------------------------------
    # 3. LoRA merging

    def lora_section(self):
        n = self.n
        loras = [self.lora(t) for t in range(n)]
        have = self.methods
        futs = {}
        if "linear" in have:
            futs["linear"] = self.submit(self.run_merge, "lora_linear", "linear", loras, {}, fmt="full")
        tuned = {}
        if "task_arithmetic" in have:
            tuned["ta_full"] = self.tuned("lora_ta_full", "task_arithmetic", loras, {}, None, "full")
        if "ties" in have:
            tuned["ties_full"] = self.tuned("lora_ties_full", "ties", loras, {"trim_rule": "topk"},
                                            {"density": TIES_DENSITY}, "full")
        if "tsv" in have:
            tuned["tsv_full"] = self.tuned("lora_tsv_full", "tsv", loras, {}, None, "full")
        cs = have.get("core_space")
        if cs:
            for inner in ("task_arithmetic", "ties", "tsv"):
                params, pm = {"inner_method": inner}, None
                if inner == "ties":
                    # the same trimming as the full-space `ties` run: density, exactly int(density*n) kept
                    if "density" in cs["params"]:
                        params["density"] = TIES_DENSITY
                    elif "density" in cs["per_model"]:
                        pm = {"density": TIES_DENSITY}
                    if "trim_rule" in cs["params"]:
                        params["trim_rule"] = "topk"
                tuned[f"core_{inner}"] = self.tuned(f"lora_core_{inner}", "core_space", loras, params, pm, "full")
        if "lora_lego" in have:
            futs["lego"] = self.submit(self.run_merge, "lora_lego", "lora_lego", loras, {}, fmt="full")

        def finish():
            ev = self.ev
            base = self.base_sd
            indiv = []
            for t in range(n):
                sd = {k: v.clone() for k, v in base.items()}
                ad = load_file(str(self.lora(t) / "adapter_model.safetensors"))
                for i in range(3):
                    sd[f"layers.{i}.weight"] += (LORA_ALPHA / LORA_R) * (
                        ad[f"base_model.model.layers.{i}.lora_B.weight"] @ ad[f"base_model.model.layers.{i}.lora_A.weight"])
                indiv.append(ev.acc(sd, t))
            self.lora_indiv = indiv
            rows = [Row("Individual LoRAs (upper bound)", indiv, ref="lora")]
            lams, checks = {}, {}
            self.guarded(rows, f"Delta averaging (linear, rank {n}r)", "linear",
                         lambda: (ev.all(load_dir(futs["linear"].result())), None), ref="lora")
            rows.append(Row("Factor averaging (mean A, mean B; in script)", ev.all(factor_average(base, loras)),
                            ref="lora", note="computed by this script; the toolkit has no such operator"))

            results = {}
            for k, fin in tuned.items():
                try:
                    results[k] = fin()
                except CliError as e:
                    log(f"FAILED {k}: {e}")
                    results[k] = e

            def concat():
                # task arithmetic at lambda 1 == the exact sum of all deltas == concatenated ranks
                if isinstance(results["ta_full"], CliError):
                    raise results["ta_full"]
                return ev.all(load_dir(self.mergedir / "lora_ta_full_lam1.0")), None
            if "task_arithmetic" in have and 1.0 in self.cfg["grid"]:
                self.guarded(rows, f"Concatenation (task_arithmetic lambda 1, rank {n}r)", "task_arithmetic",
                             concat, ref="lora")
            self.guarded(rows, "LoRA-LEGO (defaults, rank r)", "lora_lego",
                         lambda: (ev.all(load_dir(futs["lego"].result())), None), ref="lora")
            pairs = [("Task arithmetic", "ta_full", "core_task_arithmetic", "task_arithmetic"),
                     (f"TIES (density {TIES_DENSITY})", "ties_full", "core_ties", "ties"),
                     ("TSV", "tsv_full", "core_tsv", "tsv")]
            for label, kf, kc, m in pairs:
                for space, k, meth in (("full space", kf, m), ("core space", kc, "core_space")):
                    name = f"{label}, {space}"
                    if k not in tuned:
                        rows.append(Row(name, status="not available", ref="lora", note=f"`{meth}` not registered"))
                        continue

                    def go(k=k):
                        if isinstance(results[k], CliError):
                            raise results[k]
                        accs, lam, curve = results[k]
                        lams[k] = (lam, curve)
                        return accs, {"lambda": lam}
                    self.guarded(rows, name, None, go, ref="lora")
            # exactness check: core-space TA == full-space TA at every lambda of the grid
            if "ta_full" in lams and "core_task_arithmetic" in lams:
                diffs = []
                for lam in self.cfg["grid"]:
                    a = load_dir(self.mergedir / f"lora_ta_full_lam{lam}")
                    b = load_dir(self.mergedir / f"lora_core_task_arithmetic_lam{lam}")
                    diffs.append(max((a[k] - b[k]).abs().max().item() for k in a))
                checks["core_ta_vs_full_ta_max_abs_diff"] = max(diffs)
            return rows, lams, checks
        return finish

    # -----------------------------------------------------------------------------------------------
    # 4. RMM: bundle, revert each task, storage

    def rmm_bundle(self, p: int):
        out = self.run_merge(f"rmm_p{p}", "rmm", [self.lora(t) for t in range(self.n)], {"basis_size": p})
        revs = []
        for t in range(self.n):
            rev = self.mergedir / f"rmm_p{p}_revert_task{t}"
            cli("revert", out, "--model", f"task{t}", "--format", "full", "--base", self.base, "--out", rev,
                "--overwrite")
            revs.append(rev)
        return out, revs

    def rmm_section(self):
        futs = {}
        if "rmm" in self.methods:
            futs = {p: self.submit(self.rmm_bundle, p) for p in self.cfg["rmm_p"]}

        def finish():
            rows = []
            if not futs:
                return [Row("RMM", status="not available", ref="lora", note="`rmm` not registered")]
            for p, fut in futs.items():
                name = f"RMM p={p}, each task reverted"
                try:
                    bundle, revs = fut.result()
                    accs = [self.ev.acc(load_dir(r), t) for t, r in enumerate(revs)]
                    manifest = json.loads((bundle / "rmm_manifest.json").read_text())
                    ratio = manifest.get("storage_ratio", find_key(manifest, "storage_ratio"))
                    rows.append(Row(name, accs, ref="lora", extra={"storage_ratio": ratio, "p": p}))
                except (CliError, FileNotFoundError) as e:
                    rows.append(Row(name, status="failed", ref="lora", note=str(e)))
            # equal-storage baseline (computed here): keep each adapter at rank k < r (truncated SVD of
            # its delta); storage ratio k / r
            ratios = sorted({r.extra["storage_ratio"] for r in rows if r.extra.get("storage_ratio")})
            for k in sorted({max(1, min(LORA_R, round(x * LORA_R))) for x in ratios if x < 1}):
                accs = [self.ev.acc(truncated_lora(self.base_sd, self.lora(t), k), t) for t in range(self.n)]
                rows.append(Row(f"Each LoRA truncated to rank {k} (SVD, in script)", accs, ref="lora",
                                extra={"storage_ratio": k / LORA_R},
                                note="baseline computed by this script at comparable storage"))
            return rows
        return finish

    # -----------------------------------------------------------------------------------------------
    # report

    def norm(self, row: Row) -> float | None:
        if row.accs is None:
            return None
        ref = self.ft_accs if row.ref == "ft" else self.lora_indiv
        return statistics.mean(a / r for a, r in zip(row.accs, ref)) * 100

    def table(self, rows: list[Row], lam_col: bool = False, extra_cols=()) -> list[str]:
        n = self.n
        head = ["method"] + [f"T{t + 1}" for t in range(n)] + ["avg", "norm. %"]
        head += [c for c, _ in extra_cols]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            if r.accs is None:
                cells = [r.name] + ["–"] * (n + 2) + ["–"] * len(extra_cols)
                cells[1] = f"*{r.status}*"
                lines.append("| " + " | ".join(cells) + " |")
                continue
            avg = statistics.mean(r.accs)
            if r.std is not None:
                cells = [r.name] + [f"{a:.1f}±{s:.1f}" for a, s in zip(r.accs, r.std)]
                cells.append(f"**{avg:.1f}±{r.avg_std:.1f}**")
            else:
                cells = [r.name] + [f"{a:.1f}" for a in r.accs] + [f"**{avg:.1f}**"]
            cells.append(f"{self.norm(r):.1f}")
            cells += [fmt(r) for _, fmt in extra_cols]
            lines.append("| " + " | ".join(cells) + " |")
        return lines

    def report(self, dense_rows, lam_dense, seq_rows, curves, lora_rows, lam_lora, checks, rmm_rows):
        self.ft_accs = dense_rows[1].accs
        RESULTS.mkdir(parents=True, exist_ok=True)
        suffix = "" if self.mode == "full" else "_quick"
        cfg = self.cfg
        lamfmt = lambda r: "–" if r.extra.get("lambda") is None else f"{r.extra['lambda']:g}"  # noqa: E731
        opcm = next((r for r in seq_rows if r.name == "OPCM"), None)
        main_rows = list(dense_rows)
        if opcm is not None:
            main_rows.append(Row(f"OPCM (`merge continual`, mean±std over {len(self.order_list)} orders)",
                                 opcm.accs, std=opcm.std, avg_std=opcm.avg_std, status=opcm.status, note=opcm.note))
        L = [f"# Merge quality benchmark ({self.mode} run)", "",
             f"Generated by `benchmarks/quality/run_quality.py{' --quick' if self.mode == 'quick' else ''}` on "
             f"{time.strftime('%Y-%m-%d %H:%M')}; see `benchmarks/quality/README.md` for the setup. "
             f"Accuracy in % on each task's test split ({cfg['n_test']} samples, {N_CLASSES} classes, chance 10 %), "
             "every model read with the same frozen per-task head. *norm. %* = mean over tasks of merged / "
             "individual accuracy (full fine-tunes for sections 1-2, the individual LoRAs for sections 3-4).", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
             f"{torch.__version__}, Python {platform.python_version()}. Run time: training "
             f"{self.timings['train']:.0f} s{' (cached checkpoints)' if self.timings['train'] < 5 else ''}, "
             f"merging + evaluation {self.timings['merge+eval']:.0f} s ({CALLS['n']} `merge` calls, "
             f"{CALLS['seconds']:.0f} s of subprocess time over {self.args.jobs} parallel workers), "
             f"total {time.perf_counter() - T0:.0f} s. Load average at the end: "
             f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}.", "",
             "Methods registered at run time: " + ", ".join(f"`{m}`" for m in self.methods) + ".", "",
             f"## 1. Full fine-tunes, {self.n} tasks merged at once", "",
             f"lambda (task_arithmetic, ties, dare_*, magmax, tsv) chosen from {cfg['grid']} by mean validation "
             f"accuracy ({cfg['n_val']} samples per task), each grid point a real `merge run`. TIES / DARE keep "
             f"{TIES_DENSITY:.0%} / {DARE_DENSITY:.0%} of each task vector. WIDEN and linear have no lambda. "
             "OPCM: sequential, no tuned coefficient (alpha default), folded with `merge continual`.", ""]
        L += self.table(main_rows, extra_cols=[("lambda", lamfmt)])
        L += notes(main_rows)
        L += ["", f"## 2. Sequential (continual) setting: `merge continual init|add|export`, "
              f"{len(self.order_list)} task orders", "",
              "Orders: " + "; ".join("(" + ", ".join(f"T{t + 1}" for t in o) + ")" for o in self.order_list)
              + f". No validation-based tuning: OPCM (alpha default), MagMax lambda 0.5 (paper), task "
              f"arithmetic lambda {TA_SEQ_LAMBDA} (FusionBench default), averaging. Final model after all "
              f"{self.n} tasks: mean±std over orders (std per task and of the average).", ""]
        L += self.table(seq_rows, extra_cols=[("avg per order", lambda r: ", ".join(
            f"{a:.1f}" for a in r.extra.get("per_order_avg", [])) or "–")])
        L += notes(seq_rows)
        if curves:
            L += ["", "Average accuracy over the tasks seen so far, after each `add` (mean over orders):", "",
                  "| method | " + " | ".join(f"after {k + 1}" for k in range(self.n)) + " |",
                  "|---|" + "---|" * self.n]
            for name, curve in curves.items():
                L.append(f"| {name} | " + " | ".join(
                    f"{statistics.mean(c[k] for c in curve):.1f}" for k in range(self.n)) + " |")
        chk = checks.get("opcm_run_vs_continual")
        if chk is not None:
            L += ["", f"Check: `merge run` with opcm on order 1 vs `merge continual` on order 1: max |diff| = "
                  f"{chk if isinstance(chk, str) else f'{chk:.2e}'}."]
        L += ["", f"## 3. LoRA adapters (PEFT, r={LORA_R}, alpha={LORA_ALPHA}, on the 3 linear layers)", "",
              "All merges written with `output.format: full` (merged delta applied to the base) and evaluated "
              f"as full models. lambda from the same grid {cfg['grid']} on validation. Full space = dense "
              "method on the LoRA deltas; core space = `core_space` with `inner_method`. Full-space `tsv` keeps "
              f"floor(min(m, n)/{self.n}) triplets per task and module "
              f"({', '.join(f'{m}x{k}: {min(m, k) // self.n}' for m, k in LAYER_SHAPES)}; each LoRA has rank "
              f"{LORA_R}), core-space TSV keeps each LoRA's rank.", ""]
        L += self.table(lora_rows, extra_cols=[("lambda", lamfmt)])
        L += notes(lora_rows)
        if "core_ta_vs_full_ta_max_abs_diff" in checks:
            L += ["", "Check: core-space TA vs full-space TA, max |weight diff| over the whole grid = "
                  f"{checks['core_ta_vs_full_ta_max_abs_diff']:.2e}."]
        L += ["", "## 4. RMM: one bundle of all LoRAs, each task reverted (`merge revert --format full`)", "",
              "Each task's reverted model evaluated on its own task. Storage ratio = bundle / all adapters "
              "(`storage_ratio` in rmm_manifest.json).", ""]
        L += self.table(rmm_rows, extra_cols=[("storage ratio", lambda r: (
            "–" if r.extra.get("storage_ratio") is None else f"{r.extra['storage_ratio']:.3f}"))])
        L += notes(rmm_rows)
        L += ["", "## lambda search (mean validation accuracy per grid value)", ""]
        for sec, lams in (("full fine-tunes", lam_dense), ("LoRA", lam_lora)):
            for m, (lam, curve) in lams.items():
                L.append(f"- {sec}, {m}: " + ", ".join(f"{k:g}: {v:.1f}" for k, v in curve.items())
                         + f" -> {lam:g}")
        out = RESULTS / f"results{suffix}.md"
        out.write_text("\n".join(L) + "\n")
        data = {"mode": self.mode, "methods": list(self.methods), "orders": self.order_list,
                "sections": {s: [r.__dict__ for r in rows] for s, rows in
                             (("dense", main_rows), ("sequential", seq_rows), ("lora", lora_rows), ("rmm", rmm_rows))},
                "curves": curves, "checks": checks, "timings": self.timings, "calls": CALLS}
        (RESULTS / f"results{suffix}.json").write_text(json.dumps(data, indent=1, default=str))
        log(f"wrote {out}")
        print("\n".join(L))
        self.plot(main_rows, seq_rows, curves, lora_rows, rmm_rows, RESULTS / f"quality{suffix}.png")

    def plot(self, dense_rows, seq_rows, curves, lora_rows, rmm_rows, path: Path):
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            log("matplotlib not installed (pip install -r benchmarks/quality/requirements.txt): no figure")
            return
        fig, ax = plt.subplots(2, 2, figsize=(14, 10))

        def bars(a, rows, title):
            rows = [r for r in rows if r.accs is not None]
            names = [re.sub(r" \([^)]*\)", "", r.name) for r in rows]
            vals = [statistics.mean(r.accs) for r in rows]
            errs = [r.avg_std or 0 for r in rows]
            a.barh(range(len(rows)), vals, xerr=errs, color="tab:blue")
            a.set_yticks(range(len(rows)), names, fontsize=8)
            a.invert_yaxis()
            a.set_xlabel("average test accuracy (%)")
            a.set_title(title, fontsize=10)
            for i, v in enumerate(vals):
                a.text(v + 0.5, i, f"{v:.1f}", va="center", fontsize=7)
            a.set_xlim(40 if vals and min(vals) > 45 else 0, 100)
        bars(ax[0, 0], dense_rows, f"Full fine-tunes, {self.n} tasks at once")
        a = ax[0, 1]
        for name, curve in curves.items():
            xs = range(1, self.n + 1)
            m = [statistics.mean(c[k] for c in curve) for k in range(self.n)]
            s = [statistics.pstdev(c[k] for c in curve) for k in range(self.n)]
            a.errorbar(xs, m, yerr=s, marker="o", capsize=3, label=name)
        a.set_xticks(range(1, self.n + 1))
        a.set_xlabel("tasks merged (merge continual add)")
        a.set_ylabel("avg accuracy on tasks seen (%)")
        a.set_title(f"Sequential merging, mean±std over {len(self.order_list)} orders", fontsize=10)
        a.legend(fontsize=8)
        bars(ax[1, 0], lora_rows, f"LoRA r{LORA_R} adapters, {self.n} tasks")
        a = ax[1, 1]
        pts = [(r.extra.get("storage_ratio"), statistics.mean(r.accs), r.extra.get("p")) for r in rmm_rows
               if r.accs is not None and r.extra.get("storage_ratio") is not None and r.extra.get("p")]
        if pts:
            a.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label="RMM, each task reverted")
            for x, y, p in pts:
                a.annotate(f"p={p}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
        tr = [(r.extra["storage_ratio"], statistics.mean(r.accs)) for r in rmm_rows
              if r.accs is not None and r.extra.get("storage_ratio") is not None and not r.extra.get("p")]
        if tr:
            a.plot([p[0] for p in tr], [p[1] for p in tr], marker="s", ls="none", color="tab:green",
                   label="each LoRA truncated (SVD), same storage")
        a.axhline(statistics.mean(self.lora_indiv), color="k", ls="--", label="individual LoRAs (storage 1.0)")
        fa = next((r for r in lora_rows if r.name.startswith("Factor averaging")), None)
        if fa:
            a.axhline(statistics.mean(fa.accs), color="tab:red", ls=":", label="one merged LoRA (factor avg)")
        a.set_xlabel("storage vs keeping every adapter")
        a.set_ylabel("avg accuracy, each task reverted (%)")
        a.set_title("RMM: accuracy vs storage", fontsize=10)
        a.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        log(f"wrote {path}")


def notes(rows: list[Row]) -> list[str]:
    out = [f"- {r.name}: {r.note}" for r in rows if r.note and r.status != "ok"]
    return [""] + out if out else []


def find_key(obj, key):
    if isinstance(obj, dict):
        if key in obj and not isinstance(obj[key], (dict, list)):
            return obj[key]
        for v in obj.values():
            r = find_key(v, key)
            if r is not None:
                return r
    elif isinstance(obj, list):
        for v in obj:
            r = find_key(v, key)
            if r is not None:
                return r
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (3 tasks, small grids)")
    ap.add_argument("--rebuild", action="store_true", help="retrain the checkpoints even if cached")
    ap.add_argument("--jobs", type=int, default=2, help="parallel `merge` subprocesses (default 2)")
    args = ap.parse_args()
    Bench(args).run()


if __name__ == "__main__":
    main()
