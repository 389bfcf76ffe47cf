"""Compatibility run: our `merge run` against mergekit 0.1.5's `mergekit-yaml`, recipe by recipe.

This is a measurement, not a test: it always exits 0 once the table is written.

    python benchmarks/mergekit_compat.py                    # everything (venv + models reused)
    python benchmarks/mergekit_compat.py --only 'M10_*'     # a subset (fnmatch, or a substring)
    python benchmarks/mergekit_compat.py --mergekit-src DIR # where mergekit's examples/ live

What it does:

1. Makes a venv of its own for mergekit (``--venv``, default ``benchmarks/_work/mergekit-venv``)
   and installs ``mergekit==0.1.5`` there with torch pinned by the repo's ``constraints.txt``
   (``--torch-index URL`` adds a wheel index, e.g. a CPU one, where pip needs it). The project
   itself never imports mergekit.
2. Builds tiny Llama-shaped stand-ins (hidden 4, intermediate 8, 2 heads, vocab 8, fp32, untied;
   4 layers or as many as a recipe's ``layer_range`` needs) as safetensors + config.json +
   a BPE tokenizer, under ``<work>/models`` (reused): the spec's M0 fixtures ``zero``/``one``/
   ``two``/``codeK``, random ``randK``, tied-head ``tied1``/``tied2``, ``code1x`` (extra tensors),
   the M10 vocabularies ``tokA``/``tokB``/``tokC``, and ``bf16-X`` (any of them stored in bf16).
3. Collects recipes: every YAML in mergekit's ``examples/`` (looked for in the 0.1.5 sdist,
   which ``pip download`` fetches into the work dir, in the installed package, then in
   ``--mergekit-src``: a checkout or a bare git dir of mergekit, read with ``git show``; none of
   mergekit's files are stored in this repo), plus ours in ``benchmarks/mergekit_compat/recipes/``
   (one mapping per file, name -> recipe; keys ``x-expect`` / ``x-note`` are ours and are
   removed). Every model reference is rewritten to a stand-in: placeholder names map to
   themselves; each other distinct id (a hub id) maps to the next unused ``randK``.
4. Runs ``mergekit-yaml RECIPE OUT --random-seed 0`` from the venv (its click command, many
   recipes per interpreter, ``--jobs`` interpreters) and ``merge -q run RECIPE
   --out OUT2`` (this checkout, this interpreter), each with ``--timeout`` seconds, ``--jobs``
   recipes at a time. mergekit's outputs are cached under ``<work>/out/<recipe>/`` keyed by the
   rewritten recipe's text, so a re-run only runs ours (``--rerun-mergekit`` to redo them).
5. Compares every output tensor (names, shapes, dtypes, max relative difference
   max|a-b| / max|a| per tensor, the largest over tensors) and config.json's
   ``num_hidden_layers`` / ``vocab_size`` / ``dtype``. For the random methods (dare_*, della*)
   it compares statistics instead of values: the fraction of elements that moved away from the
   base and the L1 norm of the merged delta (ours / mergekit), over all tensors.
6. Writes ``benchmarks/results_mergekit_compat.md`` (``--only`` runs write
   ``<work>/results_subset.md``) and prints it.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import copy
import datetime
import fnmatch
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
RECIPES = HERE / "mergekit_compat" / "recipes"
RESULTS = HERE / "results_mergekit_compat.md"
MERGEKIT = "mergekit==0.1.5"
RANDOM_METHODS = {"dare_ties", "dare_linear", "della", "della_linear"}
HIDDEN, INTER, HEADS, VOCAB, LAYERS = 4, 8, 2, 8, 4
MODEL_VERSION = 1  # bump to rebuild the stand-ins when their definition changes

# --------------------------------------------------------------------------------------------
# 1. the mergekit venv


def ensure_venv(venv: Path, work: Path, torch_index: str | None) -> Path:
    exe = venv / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    print(f"creating {venv} and installing {MERGEKIT} (a few minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    constraints = work / "constraints-mergekit.txt"
    constraints.write_text((ROOT / "constraints.txt").read_text())
    cmd = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(constraints), MERGEKIT]
    if torch_index:
        cmd += ["--extra-index-url", torch_index]
    subprocess.run(cmd, check=True)
    return exe


def mergekit_versions(venv: Path) -> str:
    code = ("import importlib.metadata as m;"
            "print(', '.join(f'{p} {m.version(p)}' for p in ('mergekit','torch','transformers','pydantic')))")
    r = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True)
    return r.stdout.strip() or r.stderr.strip()[-200:]


# --------------------------------------------------------------------------------------------
# 2. stand-in models

_TOK_BASE = ["<unk>", "<s>", "</s>"]
VOCABS = {
    "tokA": _TOK_BASE + ["a", "b", "c", "d", "e"],
    "tokB": _TOK_BASE + ["a", "c", "b", "x", "y"],
}
TEMPLATES = {"tokA": "{{ 'A-template' }}", "tokB": "{{ 'B-template' }}", "tokC": "{{ 'B-template' }}"}
_NAME = re.compile(r"^(bf16-)?(zero|one|two|code\d+|code\d+x|rand\d+|tied\d+|tok[ABC])$")


def is_standin(name: str) -> bool:
    return bool(_NAME.match(name))


def _tensor_names(layers: int, lm_head: bool) -> list[tuple[str, tuple[int, ...], int | None]]:
    """(name, shape, layer index or None) in checkpoint order."""
    out = [("model.embed_tokens.weight", (VOCAB, HIDDEN), None)]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (HIDDEN,), i),
                (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN), i),
                (p + "self_attn.k_proj.weight", (HIDDEN, HIDDEN), i),
                (p + "self_attn.v_proj.weight", (HIDDEN, HIDDEN), i),
                (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN), i),
                (p + "post_attention_layernorm.weight", (HIDDEN,), i),
                (p + "mlp.gate_proj.weight", (INTER, HIDDEN), i),
                (p + "mlp.up_proj.weight", (INTER, HIDDEN), i),
                (p + "mlp.down_proj.weight", (HIDDEN, INTER), i)]
    out.append(("model.norm.weight", (HIDDEN,), None))
    if lm_head:
        out.append(("lm_head.weight", (VOCAB, HIDDEN), None))
    return out


def _write_tokenizer(path: Path, vocab: list[str], added: list[str], template: str | None) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if added:
        fast.add_tokens(added, special_tokens=True)
    if template:
        fast.chat_template = template
    fast.save_pretrained(str(path))


def build_standin(name: str, layers: int, out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    m = _NAME.match(name)
    bf16, kind = bool(m.group(1)), m.group(2)
    tied = kind.startswith("tied")
    vocab_size = 10 if kind == "tokC" else VOCAB
    names = _tensor_names(layers, lm_head=not tied)
    tensors: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(int(re.sub(r"\D", "", kind) or 0) + 1000)
    k = int(re.sub(r"\D", "", kind) or 0)
    for tname, shape, layer in names:
        if tname in ("model.embed_tokens.weight", "lm_head.weight"):
            shape = (vocab_size, HIDDEN)
        if kind in ("zero", "one", "two"):
            t = torch.full(shape, float(("zero", "one", "two").index(kind)))
        elif kind.startswith("rand"):
            t = torch.randn(shape, generator=gen) * 0.5
            if tname.endswith("norm.weight"):
                t += 1.0
        elif kind.startswith("tok"):
            hundred = 100 * (1 + "ABC".index(kind[3]))
            rows = torch.arange(shape[0], dtype=torch.float32)[:, None]
            if tname == "model.embed_tokens.weight":
                t = (hundred + rows).expand(shape).clone()
            elif tname == "lm_head.weight":
                t = (hundred + 0.5 + rows).expand(shape).clone()
            else:
                t = torch.full(shape, float(hundred + (60 if layer is None else layer)))
        else:  # codeK, code Kx, tiedK: layer l = 100K+l, embed +50, norm +60, lm_head +70
            off = {"model.embed_tokens.weight": 50, "model.norm.weight": 60, "lm_head.weight": 70}
            t = torch.full(shape, float(100 * k + (layer if layer is not None else off[tname])))
        tensors[tname] = t
    if kind.endswith("x"):  # M5: tensors no architecture lists
        tensors["model.layers.0.self_attn.q_proj.bias"] = torch.full((HIDDEN,), 7.0)
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(HIDDEN // HEADS // 2)
        tensors["model.foo.weight"] = torch.full((2, 2), 3.0)
    dt = torch.bfloat16 if bf16 else torch.float32
    out.mkdir(parents=True, exist_ok=True)
    save_file({n: t.to(dt).contiguous() for n, t in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_attention_heads": HEADS, "num_key_value_heads": HEADS,
        "num_hidden_layers": layers, "vocab_size": vocab_size, "tie_word_embeddings": tied,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "bos_token_id": 1, "eos_token_id": 2, "dtype": "bfloat16" if bf16 else "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if kind.startswith("tok"):
        vocab = VOCABS["tokA" if kind == "tokC" else kind]
        _write_tokenizer(out, vocab, ["<im_start>", "<im_end>"] if kind == "tokC" else [], TEMPLATES[kind])
    else:
        _write_tokenizer(out, VOCABS["tokA"], [], None)


def standin_path(models: Path, name: str, layers: int) -> Path:
    path = models / f"{name}-L{layers}"
    stamp = path / "standin.json"
    want = {"version": MODEL_VERSION, "name": name, "layers": layers}
    if not (stamp.exists() and json.loads(stamp.read_text()) == want):
        build_standin(name, layers, path)
        stamp.write_text(json.dumps(want))
    return path


# --------------------------------------------------------------------------------------------
# 3. recipes


def _sdist(work: Path) -> Path | None:
    sd = work / "sdist"
    tgz = sd / "mergekit-0.1.5.tar.gz"
    if not tgz.exists():
        sd.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                            MERGEKIT, "-d", str(sd)], capture_output=True, text=True)
        if r.returncode != 0 or not tgz.exists():
            print(f"pip download of the sdist failed: {r.stderr.strip()[-300:]}", flush=True)
            return None
    root = sd / "mergekit-0.1.5"
    if not root.exists():
        with tarfile.open(tgz) as tf:
            tf.extractall(sd, filter="data")
    return root


def example_recipes(work: Path, venv: Path, src: Path | None) -> tuple[list[tuple[str, str, str]], str]:
    """[(name, origin, yaml text)] and a sentence saying where they came from."""
    places: list[Path] = []
    sd = _sdist(work)
    if sd:
        places.append(sd / "examples")
    places += list((venv / "lib").glob("python*/site-packages/mergekit/examples"))
    looked = ", ".join(str(p) for p in places)
    for p in places:
        files = sorted(list(p.glob("*.yml")) + list(p.glob("*.yaml")))
        if files:
            return [(f"example_{f.stem}", f"examples/{f.name}", f.read_text()) for f in files], f"from {p}"
    if src is not None:
        if (src / "examples").is_dir():
            files = sorted(list((src / "examples").glob("*.y*ml")))
            return ([(f"example_{f.stem}", f"examples/{f.name}", f.read_text()) for f in files],
                    f"not in the 0.1.5 sdist or package; from the checkout {src}")
        r = subprocess.run(["git", "-C", str(src), "ls-tree", "-r", "--name-only", "HEAD", "examples/"],
                           capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip():
            head = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"],
                                  capture_output=True, text=True).stdout.strip()
            out = []
            for path in r.stdout.split():
                if path.endswith((".yml", ".yaml")):
                    text = subprocess.run(["git", "-C", str(src), "show", f"HEAD:{path}"],
                                          capture_output=True, text=True).stdout
                    out.append((f"example_{Path(path).stem}", path, text))
            return out, f"not in the 0.1.5 sdist or package; from git {src} at {head}"
    return [], f"none found (looked in {looked}; give --mergekit-src)"


def our_recipes() -> list[tuple[str, str, dict]]:
    out = []
    for f in sorted(RECIPES.glob("*.yaml")):
        for name, recipe in yaml.safe_load(f.read_text()).items():
            out.append((name, f"{f.stem}", recipe))
    return out


def _is_ref_key(key: str) -> bool:
    return key in ("model", "base_model")


def collect_refs(node, refs: list[str]) -> None:
    """Model references in recipe order (models, sources, base_model, tokenizer sources)."""
    if isinstance(node, dict):
        for k, v in node.items():
            if _is_ref_key(k) and isinstance(v, str):
                refs.append(v)
            elif _is_ref_key(k) and isinstance(v, dict) and isinstance(v.get("path"), str):
                refs.append(v["path"])
            elif k in ("tokenizer_source", "source") and isinstance(v, str) and v not in ("union", "base"):
                refs.append(v)
            else:
                collect_refs(v, refs)
    elif isinstance(node, list):
        for v in node:
            collect_refs(v, refs)


def _max_layer(node) -> int:
    best = 0
    if isinstance(node, dict):
        lr = node.get("layer_range")
        if isinstance(lr, list) and len(lr) == 2 and all(isinstance(x, int) for x in lr):
            best = max(lr)
        for v in node.values():
            best = max(best, _max_layer(v))
    elif isinstance(node, list):
        for v in node:
            best = max(best, _max_layer(v))
    return best


def rewrite(recipe: dict, models: Path) -> tuple[dict, dict[str, str], int]:
    """The recipe with every model reference pointing at a local stand-in; the id -> stand-in
    map; the stand-ins' layer count (4, or the largest layer_range end when that is larger)."""
    refs: list[str] = []
    collect_refs(recipe, refs)
    # the spec's fixtures keep 4 layers (so a range past the end stays an error); stand-ins for
    # hub ids get as many layers as the recipe's largest layer_range end
    layers = LAYERS if all(is_standin(r) for r in refs) else max(LAYERS, _max_layer(recipe))
    mapping: dict[str, str] = {}
    used = {r for r in refs if is_standin(r)}
    k = 1
    for ref in refs:
        if ref in mapping:
            continue
        if is_standin(ref):
            mapping[ref] = ref
            continue
        while f"rand{k}" in used:
            k += 1
        mapping[ref] = f"rand{k}"
        used.add(f"rand{k}")
    paths = {ref: str(standin_path(models, name, layers)) for ref, name in mapping.items()}

    def walk(node):
        if isinstance(node, dict):
            out = {}
            for key, v in node.items():
                if isinstance(key, str) and key.startswith("x-"):
                    continue
                if _is_ref_key(key) and isinstance(v, str):
                    out[key] = paths[v]
                elif _is_ref_key(key) and isinstance(v, dict) and isinstance(v.get("path"), str):
                    out[key] = {**v, "path": paths[v["path"]]}
                elif key in ("tokenizer_source", "source") and isinstance(v, str) and v in paths:
                    out[key] = paths[v]
                else:
                    out[key] = walk(v)
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(copy.deepcopy(recipe)), mapping, layers


def features(recipe: dict) -> str:
    f = [str(recipe.get("merge_method"))]
    text = json.dumps(recipe)
    if "slices" in recipe:
        f.append("slices")
    if "modules" in recipe:
        f.append("modules")
    if "base_model" in text:
        f.append("base")
    if '"filter"' in text:
        f.append("filters")

    def has_gradient(node) -> bool:
        if isinstance(node, dict):
            return any((k in ("parameters", "value") and _grad(v)) or has_gradient(v) for k, v in node.items())
        if isinstance(node, list):
            return any(has_gradient(v) for v in node)
        return False

    def _grad(v) -> bool:
        if isinstance(v, list) and v and not isinstance(v[0], dict):
            return True
        if isinstance(v, dict):
            return any(_grad(x) or (isinstance(x, list) and any(isinstance(e, dict) and _grad(e.get("value")) for e in x))
                       for x in v.values())
        return False

    if has_gradient(recipe):
        f.append("gradients")
    if "tokenizer_source" in recipe or "tokenizer" in recipe:
        f.append("tokenizer")
    if "chat_template" in recipe:
        f.append("chat_template")
    if "dtype" in recipe or "out_dtype" in recipe:
        f.append("dtype " + "/".join(str(recipe.get(k)) for k in ("dtype", "out_dtype") if k in recipe))
    if any(k in recipe for k in ("name", "embed_slerp", "int8_mask", "residual_weight")):
        f.append("legacy keys")
    return ", ".join(f)


# --------------------------------------------------------------------------------------------
# 4. running both tools


def _last_line(text: str, prefer: tuple[str, ...] = ()) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not set(ln.strip()) <= set("─│╭╮╰╯ ")]
    lines = [ln.strip("│ ").strip() for ln in lines]
    for ln in reversed(lines):
        if any(p in ln for p in prefer):
            return ln[:240]
    return lines[-1][:240] if lines else ""


def run_cmd(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        return r.returncode, r.stdout + "\n" + r.stderr, time.perf_counter() - t0
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout:.0f} s", time.perf_counter() - t0


# One interpreter runs many recipes through mergekit-yaml's own click command: the CLI code path,
# without paying mergekit's ~20 s import for every recipe. Each recipe has its own alarm.
_DRIVER = """
import json, signal, sys, time
from mergekit.scripts.run_yaml import main

def _alarm(signum, frame):
    raise TimeoutError("timed out")

signal.signal(signal.SIGALRM, _alarm)
for job in json.load(open(sys.argv[1])):
    t0 = time.perf_counter()
    signal.alarm(int(job["timeout"]))
    try:
        main.main(args=[job["recipe"], job["out"], *job["flags"]], standalone_mode=False)
        ok, msg = True, ""
    except SystemExit as e:
        ok, msg = e.code in (0, None), f"exit {e.code}"
    except BaseException as e:
        ok, msg = False, (f"{type(e).__name__}: {e}".strip().splitlines() or [type(e).__name__])[0][:240]
    finally:
        signal.alarm(0)
    print("RESULT " + json.dumps({"out": job["out"], "ok": ok, "msg": msg, "wall": time.perf_counter() - t0}), flush=True)
"""

MK_FLAGS = ["--random-seed", "0", "--no-cuda", "--allow-crimes", "--quiet"]


def _mk_key(recipe: Path) -> str:
    import hashlib

    return hashlib.sha256(recipe.read_bytes() + " ".join(MK_FLAGS).encode()).hexdigest()


def mergekit_cached(recipe: Path, out: Path) -> dict | None:
    """mergekit's result for this exact recipe text, if a previous run left it."""
    stamp = out.parent / "mergekit.json"
    if stamp.exists():
        cached = json.loads(stamp.read_text())
        if cached.get("key") == _mk_key(recipe) and (not cached["ok"] or (out / "config.json").exists()):
            return cached
    return None


def run_mergekit_batch(venv: Path, jobs: list[tuple[Path, Path]], timeout: float, work: Path, tag: str) -> None:
    """Run mergekit-yaml on each (recipe, out) in one venv interpreter; results go to
    out/../mergekit.json (the cache)."""
    if not jobs:
        return
    driver = work / "mergekit_driver.py"
    driver.write_text(_DRIVER)
    listing = work / f"mergekit_jobs_{tag}.json"
    for _, out in jobs:
        if out.exists():
            subprocess.run(["rm", "-rf", str(out)])
        out.parent.mkdir(parents=True, exist_ok=True)
    listing.write_text(json.dumps([{"recipe": str(r), "out": str(o), "timeout": timeout,
                                    "flags": MK_FLAGS + ["--lora-merge-cache", str(o) + "-lora"]} for r, o in jobs]))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}
    try:
        r = subprocess.run([str(venv / "bin" / "python"), str(driver), str(listing)], capture_output=True,
                           text=True, env=env, timeout=timeout * len(jobs) + 120)
        stdout, stderr = r.stdout, r.stderr
    except subprocess.TimeoutExpired as e:
        stdout, stderr = (e.stdout or b"").decode(errors="replace"), "the driver timed out"
    got = {}
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
            got[res["out"]] = res
    for recipe, out in jobs:
        res = got.get(str(out)) or {"ok": False, "msg": "driver died: " + _last_line(stderr), "wall": 0.0}
        res["ok"] = bool(res["ok"]) and (out / "config.json").exists()
        if not res["ok"] and not res["msg"]:
            res["msg"] = "no config.json written (an error was only logged)"
        (out.parent / "mergekit.json").write_text(json.dumps({**res, "key": _mk_key(recipe)}))


def run_ours(recipe: Path, out: Path, timeout: float) -> tuple[bool, str, float]:
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)])
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1"}
    rc, text, wall = run_cmd([sys.executable, "-c", "from mergekit_ortho.cli import main; main()",
                              "run", str(recipe), "--out", str(out), "-q"], timeout, env)
    ok = rc == 0 and out.exists()
    return ok, "" if ok else _last_line(text, ("error",)), wall


# --------------------------------------------------------------------------------------------
# 5. comparing outputs


def load_dir(path: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def _config(path: Path) -> dict:
    try:
        c = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return {"num_hidden_layers": c.get("num_hidden_layers"), "vocab_size": c.get("vocab_size"),
            "dtype": c.get("dtype", c.get("torch_dtype"))}


def compare(mk: Path, ours: Path, base: Path | None, random: bool) -> tuple[str, str, str]:
    """(status, max relative difference or statistics, detail)."""
    import torch

    a, b = load_dir(mk), load_dir(ours)
    problems = []
    only_mk, only_ours = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_mk:
        problems.append(f"{len(only_mk)} tensors only in mergekit's (e.g. {only_mk[0]})")
    if only_ours:
        problems.append(f"{len(only_ours)} tensors only in ours (e.g. {only_ours[0]})")
    common = sorted(set(a) & set(b))
    shape_bad = [n for n in common if tuple(a[n].shape) != tuple(b[n].shape)]
    dtype_bad = [n for n in common if a[n].dtype != b[n].dtype]
    if shape_bad:
        n = shape_bad[0]
        problems.append(f"{len(shape_bad)} shape mismatches (e.g. {n} {tuple(a[n].shape)} vs {tuple(b[n].shape)})")
    if dtype_bad:
        n = dtype_bad[0]
        problems.append(f"{len(dtype_bad)} dtype mismatches (e.g. {n} {a[n].dtype} vs {b[n].dtype})")
    ca, cb = _config(mk), _config(ours)
    for key in ca:
        if ca[key] != cb.get(key):
            problems.append(f"config {key}: mergekit {ca[key]}, ours {cb.get(key)}")
    same = [n for n in common if n not in shape_bad]
    if random and base is not None:
        ref = load_dir(base)
        moved = {"mk": [0, 0, 0.0], "ours": [0, 0, 0.0]}
        for n in same:
            if n not in ref or ref[n].shape != a[n].shape:
                continue
            r = ref[n].double()
            for key, src in (("mk", a), ("ours", b)):
                d = src[n].double() - r
                moved[key][0] += int((d.abs() > 1e-6 * (1 + r.abs())).sum())
                moved[key][1] += d.numel()
                moved[key][2] += float(d.abs().sum())
        if not moved["mk"][1]:
            return "differs" if problems else "match", "n/a", "; ".join(problems) or "no tensor to compare with the base"
        fa, fb = moved["mk"][0] / moved["mk"][1], moved["ours"][0] / moved["ours"][1]
        ratio = moved["ours"][2] / moved["mk"][2] if moved["mk"][2] else float("inf")
        stats = f"kept {fa:.3f} vs {fb:.3f}, L1 ours/mk {ratio:.3f} (stats, random)"
        if abs(fa - fb) > 0.06 or not 0.8 <= ratio <= 1.25:
            problems.append("kept fraction or L1 outside tolerance (0.06, [0.8, 1.25])")
        return ("differs" if problems else "match"), stats, "; ".join(problems)
    worst, worst_name = 0.0, ""
    for n in same:
        x, y = a[n].double(), b[n].double()
        if x.numel() == 0:
            continue
        both_nan = torch.isnan(x) & torch.isnan(y)
        both_inf = torch.isinf(x) & torch.isinf(y) & (torch.sign(x) == torch.sign(y))
        diff = (x - y).abs().masked_fill(both_nan | both_inf, 0.0)
        if torch.isnan(diff).any():
            rel = float("inf")
        else:
            scale = float(x.abs().masked_fill(both_nan | both_inf, 0.0).max())
            rel = float(diff.max()) / max(scale, 1e-12)
        if rel > worst:
            worst, worst_name = rel, n
    tol = 1e-2 if any(t.dtype in (torch.bfloat16, torch.float16) for t in a.values()) else 1e-5
    if worst > tol:
        problems.append(f"largest at {worst_name}")
    status = "differs" if problems else "match"
    return status, f"{worst:.2e}", "; ".join(problems)


# --------------------------------------------------------------------------------------------
# 6. the run and the table


def to_fp32(recipe):
    """The recipe with every dtype float32 and the fp32 stand-ins: the like-for-like comparison
    (mergekit computes in the inputs' dtype, we in float32, so half-precision runs differ by
    half-precision rounding, and selection methods keep other entries at ties)."""
    if isinstance(recipe, dict):
        out = {k: to_fp32(v) for k, v in recipe.items() if k != "out_dtype"}
        if "dtype" in out:
            out["dtype"] = "float32"
        return out
    if isinstance(recipe, list):
        return [to_fp32(v) for v in recipe]
    if isinstance(recipe, str) and recipe.startswith("bf16-"):
        return recipe[len("bf16-"):]
    return recipe


def prepare(name, origin, recipe, work) -> tuple[dict, Path | None, dict | None]:
    """The table row, the rewritten recipe's path and content (None where it cannot run).
    Runs in the main thread: it builds stand-ins (transformers' lazy imports are not thread-safe)."""
    row = {"recipe": name, "origin": origin, "features": "", "mk": "no", "ours": "no", "diff": "",
           "status": "", "note": "", "expect": "", "mk_s": 0.0, "ours_s": 0.0}
    if not isinstance(recipe, dict):
        row.update(status="not run", note=f"not a YAML mapping: {recipe}"[:240])
        return row, None, None
    row["expect"] = str(recipe.get("x-expect", ""))
    row["features"] = features({k: v for k, v in recipe.items() if not str(k).startswith("x-")})
    try:
        local, mapping, layers = rewrite(recipe, work / "models")
    except Exception as e:  # a recipe we cannot map is reported, not fatal
        row.update(status="not run", note=f"rewrite failed: {type(e).__name__}: {e}"[:240])
        return row, None, None
    rdir = work / "recipes"
    rdir.mkdir(parents=True, exist_ok=True)
    rpath = rdir / f"{name}.yaml"
    hub = {k: v for k, v in mapping.items() if k != v}
    header = f"# {origin}: {name}; stand-ins {layers} layers" + (f"; {hub}" if hub else "") + "\n"
    rpath.write_text(header + yaml.safe_dump(local, sort_keys=False))
    row["method"] = str(recipe.get("merge_method"))
    return row, rpath, local


def execute(row: dict, rpath: Path, local: dict, args, exe: Path, work: Path) -> dict:
    name = row["recipe"]
    out_mk, out_ours = work / "out" / name / "mergekit", work / "out" / name / "ours"
    cached = mergekit_cached(rpath, out_mk) or {"ok": False, "msg": "mergekit did not run", "wall": 0.0}
    mk_ok, mk_msg, row["mk_s"] = cached["ok"], cached["msg"], cached["wall"]
    ours_ok, ours_msg, row["ours_s"] = run_ours(rpath, out_ours, args.timeout)
    row["mk"], row["ours"] = ("yes" if mk_ok else "no"), ("yes" if ours_ok else "no")
    if mk_ok and ours_ok:
        base_ref = local.get("base_model") if isinstance(local.get("base_model"), str) else None
        random = row["method"] in RANDOM_METHODS
        try:
            row["status"], row["diff"], row["note"] = compare(out_mk, out_ours, Path(base_ref) if base_ref else None, random)
        except Exception as e:
            row.update(status="differs", note=f"comparison failed: {type(e).__name__}: {e}"[:240])
    elif mk_ok:
        row.update(status="refused by us", note=ours_msg)
    elif ours_ok:
        row.update(status="refused by mergekit", note=f"mergekit: {mk_msg}")
    else:
        row.update(status="both refused", note=f"ours: {ours_msg} / mergekit: {mk_msg}")
    row["note"] = row["note"].replace(f"{work}/", "")  # paths relative to the work dir, for the table
    return row


def _rel(p: Path) -> str:
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(p)


def _cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict], meta: list[str]) -> str:
    n = len(rows)
    count = lambda st: sum(r["status"] == st for r in rows)  # noqa: E731
    both = sum(r["mk"] == "yes" and r["ours"] == "yes" for r in rows)
    mk_failed = sum(r["mk"] == "no" for r in rows)
    expected_err = [r for r in rows if r["expect"] == "error"]
    lines = ["# mergekit 0.1.5 compatibility: `merge run` vs `mergekit-yaml`, recipe by recipe", ""]
    lines += [f"- {m}" for m in meta]
    lines += ["", "## Counts", "",
              "| recipes | ran by both | match | differ | refused by us | refused by mergekit | both refused | mergekit failed (any) |",
              "|---|---|---|---|---|---|---|---|",
              f"| {n} | {both} | {count('match')} | {count('differs')} | {count('refused by us')} | "
              f"{count('refused by mergekit')} | {count('both refused')} | {mk_failed} |", ""]
    if expected_err:
        ok = sum(r["mk"] == "no" for r in expected_err)
        lines.append(f"{len(expected_err)} recipes expect an error (x-expect: error, spec error rows); "
                     f"mergekit refused {ok} of them; for those, 'both refused' is the compatible outcome "
                     "(the messages are not compared).")
        lines.append("")
    lines += ["Max rel. diff is max|mergekit − ours| / max|mergekit| per tensor, the largest over all tensors; "
              "match means identical names, shapes, dtypes and config keys, and a difference ≤ 1e-5 "
              "(≤ 1e-2 when mergekit's output is bf16/fp16). For dare_* and della* (random masks) the column "
              "holds statistics instead: the fraction of elements moved away from the base (mergekit vs ours) "
              "and the L1 norm of the merged delta, ours / mergekit; match there means within 0.06 and "
              "[0.8, 1.25].", "",
              "| recipe | from | features | mergekit ran | we ran | max rel. diff | status | our error / detail |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        exp = " (error expected)" if r["expect"] == "error" else ""
        lines.append("| " + " | ".join(_cell(x) for x in (
            r["recipe"], r["origin"], r["features"], r["mk"], r["ours"], r["diff"], r["status"] + exp, r["note"])) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--venv", type=Path, default=HERE / "_work" / "mergekit-venv")
    ap.add_argument("--work", type=Path, default=HERE / "_work" / "mergekit_compat")
    ap.add_argument("--only", help="run recipes whose name matches this fnmatch pattern (or contains it)")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds per tool per recipe")
    ap.add_argument("--jobs", type=int, default=max(1, min(4, (os.cpu_count() or 2))))
    ap.add_argument("--rerun-mergekit", action="store_true", help="ignore mergekit's cached outputs")
    ap.add_argument("--mergekit-src", type=Path, help="a mergekit checkout or bare git dir holding examples/")
    ap.add_argument("--torch-index", help="extra pip index for the venv's torch (e.g. a CPU wheel index)")
    ap.add_argument("--out", type=Path, help="where to write the table (default: results_mergekit_compat.md)")
    ap.add_argument("--fp32", action="store_true", help="every recipe with dtype float32 and fp32 models (the "
                    "like-for-like comparison; table: results_mergekit_compat_fp32.md)")
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    exe = ensure_venv(args.venv.resolve(), work, args.torch_index)
    examples, where = example_recipes(work, args.venv.resolve(), args.mergekit_src)
    recipes: list[tuple[str, str, object]] = []
    for name, origin, text in examples:
        try:
            recipes.append((name, origin, yaml.safe_load(text)))
        except yaml.YAMLError as e:
            recipes.append((name, origin, f"YAML error: {e}"))
    recipes += our_recipes()
    if args.fp32:
        recipes = [(n, o, to_fp32(r)) for n, o, r in recipes]
        work = work / "fp32"
        work.mkdir(parents=True, exist_ok=True)
        if not (work / "models").exists():
            (work / "models").symlink_to(args.work.resolve() / "models")
    if args.only:
        recipes = [r for r in recipes if fnmatch.fnmatch(r[0], args.only) or args.only in r[0]]
    print(f"{len(recipes)} recipes; mergekit examples {where}", flush=True)
    t0 = time.perf_counter()
    prepared = [prepare(n, o, r, work) for n, o, r in recipes]
    todo = [(rpath, work / "out" / row["recipe"] / "mergekit") for row, rpath, _ in prepared if rpath]
    if not args.rerun_mergekit:
        todo = [(r, o) for r, o in todo if mergekit_cached(r, o) is None]
    print(f"mergekit: {len(todo)} recipes to run, the rest cached", flush=True)
    chunks = [todo[i::args.jobs] for i in range(args.jobs)]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda ic: run_mergekit_batch(args.venv.resolve(), ic[1], args.timeout, work, str(ic[0])),
                      enumerate(chunks)))
    print(f"mergekit done in {time.perf_counter() - t0:.0f} s", flush=True)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(execute, row, rpath, local, args, exe, work) if rpath else None
                   for row, rpath, local in prepared]
        rows = []
        for f, (row, _, _) in zip(futures, prepared):
            row = f.result() if f else row
            n = row["recipe"]
            rows.append(row)
            print(f"  {n:42s} mergekit {row['mk']:3s} ours {row['ours']:3s} {row['status']:20s} {row['diff']}"
                  f"  ({row['mk_s']:.0f} s / {row['ours_s']:.0f} s)", flush=True)
    meta = [f"date {datetime.date.today().isoformat()}; ours: this checkout "
            f"({subprocess.run(['git', '-C', str(ROOT), 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()}), "
            f"python {sys.version.split()[0]}; mergekit venv: {mergekit_versions(args.venv.resolve())}",
            f"mergekit examples: {where}".replace(str(work) + "/", ""),
            f"stand-ins: Llama-shaped, hidden {HIDDEN}, intermediate {INTER}, {HEADS} heads, vocab {VOCAB} "
            f"(tokC 10), 4 layers or the recipe's largest layer_range end, fp32 unless bf16-X; hub ids map "
            f"to randK in order of first appearance (the rewritten recipes are in {_rel(work / 'recipes')})",
            f"mergekit-yaml (its click command, several recipes per interpreter) run with --random-seed 0 --no-cuda --allow-crimes; per-tool timeout {args.timeout:.0f} s; "
            f"total wall {time.perf_counter() - t0:.0f} s with {args.jobs} jobs",
            "not covered: M2 (base+LoRA references: needs a PEFT adapter and --lora-merge-cache), "
            "M12 (multi-document recipes run by mergekit-multi, not mergekit-yaml), non-Llama architectures "
            "(mergekit's gpt2 / granite / LLaVA test models), --unsafe-truncate-embeddings (a CLI flag)"]
    text = table(rows, meta)
    default = RESULTS.with_name(RESULTS.stem + "_fp32.md") if args.fp32 else RESULTS
    dest = args.out or (default if not args.only else work / "results_subset.md")
    dest.write_text(text)
    print()
    print(text)
    print(f"written to {dest}")


if __name__ == "__main__":
    main()
