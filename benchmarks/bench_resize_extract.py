"""`merge resize` / `merge extract` on an SDXL-sized set of LoRA modules, beside kohya's sd-scripts.

    python benchmarks/bench_resize_extract.py                          # ours only
    python benchmarks/bench_resize_extract.py --sd-scripts PATH        # + sd-scripts' resize_lora_model
    python benchmarks/bench_resize_extract.py --small                  # a tiny run to check the script

Everything is built here, no download. The module set is SDXL's kohya LoRA: 722 UNet modules (70
transformer blocks, 10 at width 640 and 60 at 1280, each with attn1 q/k/v/out, attn2 q/out and
k/v from 2048, ff 8d x d and d x 4d; proj_in/out of the 11 spatial transformers) and 264 text
encoder modules (CLIP-L 12 layers at 768, CLIP-G 32 layers at 1280; q/k/v/out, fc1, fc2).

resize: a rank-32 fp16 kohya file over all 986 modules (factors with a decaying spectrum, like a
trained LoRA), resized to rank 16 and with ``sv_fro 0.9`` (cap 32). Ours: ``adapters.resize.resize``
file to file (read, SVD, write, hashes). sd-scripts: its own ``resize_lora_model`` from
``networks/resize_lora.py`` of the checkout given (not on PyPI; its ``library`` imports, which pull
accelerate/torchvision/cv2 for training code this function does not use, are replaced by empty
stand-ins), in memory on the same state dict, plus ``save_file``; the two outputs are compared.

extract: the dense SVD of one fine-tune delta per distinct SDXL module shape, timed and multiplied by
how often the shape occurs (a whole SDXL base + fine-tune pair would be 2 x 10 GB), plus one
end-to-end ``adapters.extract.extract`` on a checkpoint pair holding one 1280-wide transformer block.
sd-scripts' ``extract_lora_from_models.py`` cannot run here: it loads the models through its SD/SDXL
pipeline loaders (real checkpoints and configs). Its per-module work is ``torch.linalg.svd`` of the
full matrix, timed as "full SVD" beside ours for the same shapes.
Results: benchmarks/results_resize_extract.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import platform
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "_work" / "resize_extract"


def sdxl_modules(small: bool = False) -> dict[str, tuple[int, int]]:
    """{kohya module name: (out, in)} of an SDXL LoRA."""
    mods: dict[str, tuple[int, int]] = {}

    def block(prefix: str, d: int) -> None:
        for a in ("attn1_to_q", "attn1_to_k", "attn1_to_v", "attn1_to_out_0", "attn2_to_q", "attn2_to_out_0"):
            mods[f"{prefix}_{a}"] = (d, d)
        mods[f"{prefix}_attn2_to_k"] = (d, 2048)
        mods[f"{prefix}_attn2_to_v"] = (d, 2048)
        mods[f"{prefix}_ff_net_0_proj"] = (8 * d, d)
        mods[f"{prefix}_ff_net_2"] = (d, 4 * d)

    unet = [("input_blocks_4_1", 640, 2), ("input_blocks_5_1", 640, 2), ("input_blocks_7_1", 1280, 10),
            ("input_blocks_8_1", 1280, 10), ("middle_block_1", 1280, 10), ("output_blocks_0_1", 1280, 10),
            ("output_blocks_1_1", 1280, 10), ("output_blocks_2_1", 1280, 10), ("output_blocks_3_1", 640, 2),
            ("output_blocks_4_1", 640, 2), ("output_blocks_5_1", 640, 2)]
    if small:
        unet = [("input_blocks_4_1", 64, 1)]
    for name, d, depth in unet:
        mods[f"lora_unet_{name}_proj_in"] = (d, d)
        mods[f"lora_unet_{name}_proj_out"] = (d, d)
        for i in range(depth):
            block(f"lora_unet_{name}_transformer_blocks_{i}", d)
    for te, d, layers in (("lora_te1", 768, 12), ("lora_te2", 1280, 32)) if not small else (("lora_te1", 48, 1),):
        for i in range(layers):
            p = f"{te}_text_model_encoder_layers_{i}_"
            for a in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj"):
                mods[p + a] = (d, d)
            mods[p + "mlp_fc1"] = (4 * d, d)
            mods[p + "mlp_fc2"] = (d, 4 * d)
    return mods


def build_lora(path: Path, mods: dict[str, tuple[int, int]], rank: int) -> None:
    g = torch.Generator().manual_seed(0)
    decay = 0.85 ** torch.arange(rank, dtype=torch.float32)
    t = {}
    for name, (o, i) in mods.items():
        t[f"{name}.lora_down.weight"] = (torch.randn(rank, i, generator=g) / i**0.5).half()
        t[f"{name}.lora_up.weight"] = (0.05 * torch.randn(o, rank, generator=g) * decay).half()
        t[f"{name}.alpha"] = torch.tensor(float(rank // 2), dtype=torch.float16)
    save_file(t, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                                      "ss_network_alpha": str(float(rank // 2)), "ss_base_model_version": "sdxl_base_v1-0"})


def kohya_resize_fn(src: Path):
    """sd-scripts' resize_lora_model, imported from the checkout (or bare git dir) at ``src``."""
    f = src / "networks" / "resize_lora.py"
    code = f.read_text() if f.is_file() else subprocess.run(
        ["git", "--git-dir", str(src), "show", "HEAD:networks/resize_lora.py"], check=True, capture_output=True,
        text=True).stdout
    rev = subprocess.run(["git", "--git-dir", str(src if not f.is_file() else src / ".git"), "rev-parse", "--short",
                          "HEAD"], capture_output=True, text=True).stdout.strip() or "?"
    lib = types.ModuleType("library")
    for sub in ("train_util", "model_util", "utils"):
        m = types.ModuleType(f"library.{sub}")
        m.setup_logging = lambda *a, **k: None
        setattr(lib, sub, m)
        sys.modules[f"library.{sub}"] = m
    sys.modules["library"] = lib
    WORK.mkdir(parents=True, exist_ok=True)
    copy = WORK / "sd_scripts_resize_lora.py"
    copy.write_text(code)
    spec = importlib.util.spec_from_file_location("sd_scripts_resize_lora", copy)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.resize_lora_model, rev


def deltas(sd: dict, names) -> dict[str, torch.Tensor]:
    out = {}
    for n in names:
        down, up = sd[f"{n}.lora_down.weight"].float(), sd[f"{n}.lora_up.weight"].float()
        r = down.shape[0]
        alpha = float(sd[f"{n}.alpha"]) if f"{n}.alpha" in sd else r
        out[n] = (alpha / r) * up.reshape(up.shape[0], -1) @ down.reshape(r, -1)
    return out


def rel(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).norm() / b[k].norm()) for k in b)


def subset(mods) -> dict[str, tuple[int, int]]:
    """One 640-wide transformer (proj_in/out + block 0) and one CLIP-L layer: what sd-scripts' dense
    full SVDs can do in a few minutes on this machine."""
    keep = ("lora_unet_input_blocks_4_1_proj", "lora_unet_input_blocks_4_1_transformer_blocks_0_",
            "lora_te1_text_model_encoder_layers_0_")
    return {n: s for n, s in mods.items() if n.startswith(keep)} or dict(list(mods.items())[:12])


def _ours_row(src: Path, label: str, opts, names, ref):
    from mergekit_ortho.adapters.resize import resize

    out = WORK / "ours.safetensors"
    t0 = time.perf_counter()
    rep = resize(src, out, opts, overwrite=True)
    ours_s = time.perf_counter() - t0
    ours_sd = load_file(str(out))
    ours = deltas(ours_sd, names)
    err = max(float((ours[k] - ref[k]).norm() / ref[k].norm()) for k in names)
    row = (f"| {label} | {len(names)} | {ours_s:.1f} | {rep['summary']['rank_out_mean']:.1f} | "
           f"{rep['summary']['rel_error_mean']:.4f} / {rep['summary']['rel_error_max']:.4f} | {err:.4f} |")
    return row, ours_sd, ours


def bench_resize(args, mods) -> list[str]:
    from mergekit_ortho.adapters.resize import ResizeOptions

    WORK.mkdir(parents=True, exist_ok=True)
    kohya = kohya_resize_fn(Path(args.sd_scripts)) if args.sd_scripts else None
    lines = []
    modes = (("fixed rank 16", ResizeOptions(rank=16), (16, 16, None, None)),
             ("sv_fro 0.9, cap 32", ResizeOptions(rank=32, rule="sv_fro", threshold=0.9), (32, 32, "sv_fro", 0.9)))
    for which, ms in (("all", mods), ("subset", subset(mods))):
        src = WORK / f"sdxl_r32_{which}.safetensors"
        build_lora(src, ms, 32)
        sd = load_file(str(src))
        names = list(ms)
        ref = deltas(sd, names)
        for label, opts, kargs in modes:
            row, ours_sd, ours = _ours_row(src, f"{label} ({which})", opts, names, ref)
            if kohya is not None and which == "subset":
                fn, rev = kohya
                t0 = time.perf_counter()
                k_sd, _, _ = fn({k: v.float() for k, v in sd.items()}, kargs[0], kargs[1], torch.float16, "cpu",
                                kargs[2], kargs[3], False)
                save_file(k_sd, str(WORK / "kohya.safetensors"))
                k_s = time.perf_counter() - t0
                kd = deltas(k_sd, names)
                k_ranks = [k_sd[f"{n}.lora_down.weight"].shape[0] for n in names]
                same = sum(k_sd[f"{n}.lora_down.weight"].shape[0] == ours_sd[f"{n}.lora_down.weight"].shape[0]
                           for n in names)
                row += (f" {k_s:.1f} | {sum(k_ranks) / len(k_ranks):.1f} | {same}/{len(names)} | "
                        f"{rel(ours, kd):.2e} |")
            else:
                row += " | | | |"
            lines.append(row)
            print(row, flush=True)
    if kohya is not None:
        lines.append(f"\nsd-scripts checkout: {kohya[1]} (`networks/resize_lora.py` `resize_lora_model`, float32 in, "
                     "fp16 out, device cpu).")
    else:
        lines.append("\nsd-scripts not run (no --sd-scripts checkout given; it is not on PyPI).")
    return lines


def shape_counts(mods) -> dict[tuple[int, int], int]:
    c: dict[tuple[int, int], int] = {}
    for s in mods.values():
        c[s] = c.get(s, 0) + 1
    return c


def bench_extract(args, mods) -> list[str]:
    from mergekit_ortho.adapters.extract import ExtractOptions, extract, extract_module

    g = torch.Generator().manual_seed(1)
    lines = []
    tot_ours = tot_full = 0.0
    for (o, i), n in sorted(shape_counts(mods).items()):
        # a fine-tune delta: a decaying low-rank part plus small full-rank noise
        low = (torch.randn(o, 64, generator=g) * 0.9 ** torch.arange(64)) @ torch.randn(64, i, generator=g)
        D = 1e-3 * low / i**0.5 + 1e-5 * torch.randn(o, i, generator=g)
        t0 = time.perf_counter()
        _, _, rep = extract_module(D, args.rank)
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        full = not args.skip_full_svd and o * i <= args.full_svd_max
        if full:
            torch.linalg.svd(D, full_matrices=False)
        t_full = time.perf_counter() - t0
        tot_ours += n * t_ours
        tot_full += n * t_full
        lines.append(f"| {o}x{i} | {n} | {t_ours:.3f} | {f'{t_full:.3f}' if full else 'not timed'} | "
                     f"{rep['rel_error']:.4f} |")
        print(lines[-1], flush=True)
    lines.append(f"| **all {len(mods)} modules (count x time)** | {len(mods)} | **{tot_ours:.0f}** | "
                 f"{tot_full:.0f} (timed shapes only) | |")
    # end to end on one 1280-wide transformer block (10 modules), files on disk
    blk = {n: s for n, s in mods.items() if "transformer_blocks_0_" in n and s[0] >= 1280 and
           "middle_block" in n} or dict(list(mods.items())[:10])
    base, tuned = {}, {}
    for n, (o, i) in blk.items():
        key = n.replace("lora_unet_", "model.diffusion_model.") + ".weight"
        base[key] = (0.02 * torch.randn(o, i, generator=g)).half()
        tuned[key] = (base[key].float() + 1e-2 * torch.randn(o, 8, generator=g) @ torch.randn(8, i, generator=g)
                      / i**0.5).half()
    WORK.mkdir(parents=True, exist_ok=True)
    save_file(base, str(WORK / "base.safetensors"))
    save_file(tuned, str(WORK / "tuned.safetensors"))
    t0 = time.perf_counter()
    rep = extract(WORK / "base.safetensors", WORK / "tuned.safetensors", WORK / "x.safetensors",
                  ExtractOptions(rank=args.rank, format="kohya"), overwrite=True)
    e2e = time.perf_counter() - t0
    lines.append(f"\nEnd to end (`extract`, fp16 files, {len(blk)} modules of one 1280-wide block, rank {args.rank}): "
                 f"{e2e:.1f} s, relative error max {rep['summary']['rel_error_max']:.2e} (a rank-8 delta + fp16 rounding).")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sd-scripts", help="sd-scripts checkout or bare git dir (to run its resize_lora_model)")
    ap.add_argument("--rank", type=int, default=32, help="extract rank")
    ap.add_argument("--small", action="store_true", help="tiny module set (checks the script)")
    ap.add_argument("--skip-full-svd", action="store_true", help="do not time the full-SVD baseline")
    ap.add_argument("--full-svd-max", type=int, default=3_000_000,
                    help="time the full-SVD baseline only for matrices up to this many entries")
    ap.add_argument("--out", default=str(ROOT / "results_resize_extract.md"))
    args = ap.parse_args()
    mods = sdxl_modules(args.small)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    head = [f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
            f"{torch.__version__}", ""]
    print(head[0], flush=True)
    r = bench_resize(args, mods)
    e = bench_extract(args, mods)
    text = "\n".join(head + ["## resize (rank 32 fp16 in; all = 986 SDXL modules)",
                             "", "| resize | modules | ours s | ours mean rank | ours rel. error mean / max | "
                             "ours vs input delta (max rel.) | sd-scripts s | sd-scripts mean rank | same rank | "
                             "ours vs sd-scripts (max rel.) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
                     + r + ["", f"## extract (rank {args.rank})", "", "| shape | count | ours s / module | full SVD s / module | rel. error |",
                            "|---|---:|---:|---:|---:|"] + e) + "\n"
    if not args.small:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
