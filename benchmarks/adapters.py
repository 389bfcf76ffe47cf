"""Adapter types: materialisation cost per type, and `resize` / `extract` beside kohya's sd-scripts.

    python benchmarks/adapters.py --sd-scripts DIR     # DIR: an sd-scripts checkout (git clone of the snapshot)
    python benchmarks/adapters.py --small              # tiny shapes, checks the script

Not a test. Everything is built here (no download), under benchmarks/_work/adapters/.

Materialisation: one kohya/LyCORIS file per type over an SDXL UNet-like module set, scaled down
to one transformer block per width (SDXL has 10 at 640 and 60 at 1280: attn1 q/k/v/out, attn2
q/out and k/v from 2048, ff.net.0.proj 10240x1280 / 5120x640, ff.net.2) plus the two resnet 3x3
convs per width for Tucker LoCon. Timed: ``MatchedLora.delta_for`` of every module (read the
adapter's tensors, materialise the dense delta in float32; the base tensor, where the type needs
it, is already in memory). The SDXL estimate multiplies each width's time by its block count
(linear types: 70 blocks; Tucker: SDXL's 22 resnets x 2 convs, at the measured per-conv cost).

resize / extract: ``bench_resize_extract.py``'s SDXL LoRA subset (one 640-wide transformer and
one CLIP-L layer, rank 32 fp16), resized to rank 16 and with ``sv_fro 0.9``: ours
(``adapters.resize.resize``, file to file) and sd-scripts' ``resize_lora_model`` from
``networks/resize_lora.py`` in a subprocess started from the checkout. The script itself cannot
be run here: its ``library.train_util`` import chain needs torchvision (and via transformers'
CLIP models torchvision's compiled ops), and the PyPI torchvision 0.28.0 wheel does not load
against torch 2.13.0+cpu ("operator torchvision::nms does not exist"); so the subprocess loads
the file with its ``library`` imports replaced by empty stand-ins (the function uses none of
them) and calls the function on the same state dict. ``extract_lora_from_models.py``: its ``svd()``
runs on a tiny SD1-layout pair in a venv with sd-scripts' own pins (``--sd-python``), with a
torchvision stand-in and its full-size model loader replaced (``adapters_extract.py`` says why).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "_work" / "adapters"
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))


def unet_set(small: bool) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """{base key: shape} of one transformer block per SDXL width (+ resnet convs), and how many
    blocks of that width SDXL has."""
    widths = {320 // 20 if small else 640: 10, 1280 // 20 if small else 1280: 60}
    ctx = 2048 // 20 if small else 2048
    shapes: dict[str, tuple[int, ...]] = {}
    for w in widths:
        p = f"w{w}.transformer_blocks.0."
        for n in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0"):
            shapes[p + n + ".weight"] = (w, w)
        for n in ("attn2.to_k", "attn2.to_v"):
            shapes[p + n + ".weight"] = (w, ctx)
        shapes[p + "ff.net.0.proj.weight"] = (8 * w, w)
        shapes[p + "ff.net.2.weight"] = (w, 4 * w)
        shapes[f"w{w}.resnets.0.conv1.weight"] = (w, w, 3, 3)
        shapes[f"w{w}.resnets.0.conv2.weight"] = (w, w, 3, 3)
    return shapes, widths


def _lokr_split(n: int) -> tuple[int, int]:
    a = 8 if n % 8 == 0 else 4 if n % 4 == 0 else 2
    return a, n // a


def _boft_split(out: int) -> tuple[int, int]:
    """(n, b): the most blocks (a power of two) of an even size >= 16 (LyCORIS' small blocks)."""
    n = 1
    while out % (2 * n) == 0 and (out // (2 * n)) >= 16 and (out // (2 * n)) % 2 == 0:
        n *= 2
    return n, out // n


def adapter_tensors(kind: str, shapes: dict, rank: int, g) -> dict[str, torch.Tensor]:
    t: dict[str, torch.Tensor] = {}

    def r(*s, scale=0.02):
        return scale * torch.randn(*s, generator=g)

    for key, shp in shapes.items():
        conv = len(shp) == 4
        if (kind == "LoCon-Tucker") != conv:
            continue
        m = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
        o, i = shp[0], shp[1]
        if kind in ("LoRA", "DoRA"):
            t[f"{m}.lora_down.weight"], t[f"{m}.lora_up.weight"] = r(rank, i), r(o, rank)
            t[f"{m}.alpha"] = torch.tensor(float(rank))
            if kind == "DoRA":
                t[f"{m}.dora_scale"] = 1 + r(o, 1)
        elif kind == "LoCon-Tucker":
            t[f"{m}.lora_down.weight"], t[f"{m}.lora_up.weight"] = r(rank, i, 1, 1), r(o, rank, 1, 1)
            t[f"{m}.lora_mid.weight"] = r(rank, rank, 3, 3)
            t[f"{m}.alpha"] = torch.tensor(float(rank))
        elif kind == "LoHa":
            t[f"{m}.hada_w1_a"], t[f"{m}.hada_w1_b"] = r(o, rank), r(rank, i)
            t[f"{m}.hada_w2_a"], t[f"{m}.hada_w2_b"] = r(o, rank), r(rank, i)
            t[f"{m}.alpha"] = torch.tensor(float(rank))
        elif kind == "LoKr":
            a, b = _lokr_split(o)
            c, d = _lokr_split(i)
            t[f"{m}.lokr_w1"], t[f"{m}.lokr_w2_a"], t[f"{m}.lokr_w2_b"] = r(a, c), r(b, rank), r(rank, d)
            t[f"{m}.alpha"] = torch.tensor(float(rank))
        elif kind == "OFT":  # LyCORIS diag-OFT: blocks of 32 on the output rows
            b = 32 if o % 32 == 0 else 8
            t[f"{m}.oft_blocks"] = r(o // b, b, b)
        elif kind == "BOFT":  # LyCORIS BOFT: n blocks (a power of two) of b >= 16, log2(n) + 1 stages
            n, b = _boft_split(o)
            t[f"{m}.oft_blocks"] = r(int(math.log2(n)) + 1, n, b, b)
        elif kind == "IA3":
            t[f"{m}.weight"], t[f"{m}.on_input"] = r(o), torch.tensor(0)
    return t


def bench_materialise(args) -> list[str]:
    from mergekit_ortho.adapters.keymap import match_to_base
    from mergekit_ortho.adapters.lora import LoraSource
    from mergekit_ortho.adapters.matched import MatchedLora

    shapes, widths = unet_set(args.small)
    g = torch.Generator().manual_seed(0)
    base = {k: 0.02 * torch.randn(*s, generator=g) for k, s in shapes.items()}
    WORK.mkdir(parents=True, exist_ok=True)
    lines = ["| type | modules | stored MB | materialise s (set) | per module ms (mean) | SDXL UNet estimate s |",
             "|---|---:|---:|---:|---:|---:|"]
    for kind in ("LoRA", "LoCon-Tucker", "LoHa", "LoKr", "DoRA", "OFT", "BOFT", "IA3"):
        t = adapter_tensors(kind, shapes, args.rank, g)
        path = WORK / f"{kind}.safetensors"
        save_file(t, str(path), metadata={"ss_network_module": "lycoris.kohya"})
        src = LoraSource(path)
        src = MatchedLora(src, match_to_base(src, list(base), {k: v.shape for k, v in base.items()}))
        keys = sorted(src.by_base)
        per: dict[str, float] = {}
        for k in keys:  # warm-up once, then the best of two
            src.delta_for(k, shapes[k], base=base[k])
            best = math.inf
            for _ in range(2):
                t0 = time.perf_counter()
                d = src.delta_for(k, shapes[k], base=base[k])
                best = min(best, time.perf_counter() - t0)
            assert torch.isfinite(d).all()
            per[k] = best
        total = sum(per.values())
        if kind == "LoCon-Tucker":
            conv = sum(per.values()) / max(1, len(per))
            est = conv * 44  # SDXL: 22 resnets with two 3x3 convs
        else:
            est = sum(sum(v for k, v in per.items() if k.startswith(f"w{w}.")) * n for w, n in widths.items())
        mb = sum(x.numel() * x.element_size() for x in t.values()) / 2**20
        lines.append(f"| {kind} | {len(keys)} | {mb:.1f} | {total:.3f} | {1e3 * total / len(keys):.1f} | {est:.1f} |")
        print(lines[-1], flush=True)
    return lines


_KOHYA_CHILD = r"""
import json, sys, time
sys.path.insert(0, {bench!r})
import torch
from safetensors.torch import load_file, save_file
import bench_resize_extract as b
fn, rev = b.kohya_resize_fn(__import__("pathlib").Path({src!r}))
sd = {{k: v.float() for k, v in load_file({inp!r}).items()}}
t0 = time.perf_counter()
out, _, _ = fn(sd, {rank}, {rank}, torch.float16, "cpu", {method!r}, {param!r}, False)
dt = time.perf_counter() - t0
save_file({{k: v.contiguous() for k, v in out.items()}}, {out!r})
print(json.dumps({{"seconds": dt, "rev": rev}}))
"""


def bench_resize_extract(args) -> list[str]:
    import bench_resize_extract as b

    from mergekit_ortho.adapters.extract import ExtractOptions, extract
    from mergekit_ortho.adapters.resize import ResizeOptions

    mods = b.subset(b.sdxl_modules(args.small))
    WORK.mkdir(parents=True, exist_ok=True)
    b.WORK = WORK
    src = WORK / "lora_r32.safetensors"
    b.build_lora(src, mods, 32)
    sd = load_file(str(src))
    ref = b.deltas(sd, mods)
    lines = ["| resize | modules | ours s | ours mean rank | ours rel. error max | sd-scripts s | sd-scripts mean rank | "
             "same rank | ours vs sd-scripts (max rel.) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rev = None
    for label, opts, method, param in (("rank 16", ResizeOptions(rank=16), None, None),
                                       ("sv_fro 0.9 (cap 32)", ResizeOptions(rank=32, rule="sv_fro", threshold=0.9),
                                        "sv_fro", 0.9)):
        row, ours_sd, ours = b._ours_row(src, label, opts, list(mods), ref)
        cells = row.strip("|").split("|")
        ours_rank = {n: ours_sd[f"{n}.lora_down.weight"].shape[0] for n in mods}
        kcell = ["not run (no --sd-scripts)"] + [""] * 3
        if args.sd_scripts:
            out = WORK / f"kohya_{method or 'rank'}.safetensors"
            code = _KOHYA_CHILD.format(bench=str(ROOT), src=str(args.sd_scripts), inp=str(src), out=str(out),
                                       rank=opts.rank if method else 16, method=method, param=param)
            p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(args.sd_scripts))
            if p.returncode != 0:
                kcell = [f"failed: {p.stderr.strip().splitlines()[-1][:80]}"] + [""] * 3
            else:
                got = json.loads(p.stdout.strip().splitlines()[-1])
                rev = got["rev"]
                ksd = load_file(str(out))
                kd = b.deltas(ksd, mods)
                krank = {n: ksd[f"{n}.lora_down.weight"].shape[0] for n in mods}
                same = sum(krank[n] == ours_rank[n] for n in mods)
                diff = max(float((ours[n] - kd[n]).norm() / kd[n].norm()) for n in mods)
                kcell = [f"{got['seconds']:.1f}", f"{sum(krank.values()) / len(krank):.1f}", f"{same}/{len(mods)}",
                         f"{diff:.1e}"]
        lines.append("| " + " | ".join([cells[0].strip(), cells[1].strip(), cells[2].strip(), cells[3].strip(),
                                         cells[4].split("/")[-1].strip()] + kcell) + " |")
        print(lines[-1], flush=True)
    if rev:
        lines.append(f"\nsd-scripts {rev}: `networks/resize_lora.py` `resize_lora_model` in a subprocess (float32 in, "
                     "fp16 out, cpu); its `library` imports replaced by empty stand-ins (see the docstring).")
    # extract end to end on the same subset as fp16 checkpoints: a rank-8 fine-tune delta
    g = torch.Generator().manual_seed(1)
    base, tuned = {}, {}
    for n, (o, i) in mods.items():
        key = n.replace("lora_unet_", "model.diffusion_model.").replace("lora_te1_", "te.") + ".weight"
        base[key] = (0.02 * torch.randn(o, i, generator=g)).half()
        tuned[key] = (base[key].float() + 1e-2 * torch.randn(o, 8, generator=g) @ torch.randn(8, i, generator=g)
                      / i**0.5).half()
    save_file(base, str(WORK / "base.safetensors"))
    save_file(tuned, str(WORK / "tuned.safetensors"))
    t0 = time.perf_counter()
    rep = extract(WORK / "base.safetensors", WORK / "tuned.safetensors", WORK / "x.safetensors",
                  ExtractOptions(rank=16, format="kohya"), overwrite=True)
    lines.append(f"\nextract (ours, end to end, {len(mods)} fp16 modules, rank 16 of a rank-8 delta): "
                 f"{time.perf_counter() - t0:.1f} s, relative error max {rep['summary']['rel_error_max']:.1e} "
                 "(fp16 rounding). sd-scripts' extract on a model pair: the section below.")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sd-scripts", help="an sd-scripts checkout (to run its resize_lora_model)")
    ap.add_argument("--rank", type=int, default=16, help="rank of the generated adapters (materialisation)")
    ap.add_argument("--sd-python", help="a Python with sd-scripts' pinned packages (for its extract; see "
                                        "adapters_extract.py)")
    ap.add_argument("--extract-only", action="store_true", help="run only the extract comparison and replace its "
                                                                "section of the results file")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "results_adapters.md"))
    args = ap.parse_args()
    from adapters_extract import bench_extract

    section = "## extract beside sd-scripts' extract_lora_from_models (same model pair, equal rank)"
    if args.extract_only:
        x = bench_extract(args.sd_scripts, args.sd_python, args.small)
        print("\n".join(x))
        if not args.small:
            old = Path(args.out).read_text() if Path(args.out).exists() else ""
            old = old.split(section)[0].rstrip() + "\n\n" if section in old else old.rstrip() + "\n\n"
            Path(args.out).write_text(old + "\n".join([section, ""] + x) + "\n")
        return
    head = [f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}", ""]
    m = bench_materialise(args)
    r = bench_resize_extract(args)
    x = bench_extract(args.sd_scripts, args.sd_python, args.small)
    text = "\n".join(head + ["## materialisation (dense delta per module, float32)", ""] + m
                     + ["", "## resize / extract (SDXL subset, rank 32 fp16 in)", ""] + r + ["", section, ""] + x) + "\n"
    print(text)
    if not args.small:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
