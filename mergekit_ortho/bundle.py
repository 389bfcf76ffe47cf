"""The RMM basis bundle on disk: write, read (lazily) and validate. I/O only - the math is
:mod:`mergekit_ortho.ops.rmm`.

Spec: ../shared/specs/lora_lego_rmm.md B6 ("What to store") and B9.9 (task order is format).

Layout of a bundle directory (format version 1)::

    rmm_basis.safetensors   for every module key M (e.g. "model.layers.0.self_attn.q_proj.weight"):
                              M.left.mean  [d_out, r]      (only when center)
                              M.left.basis [d_out, r, p]
                              M.left.coef  [n_M, d_out, p]
                              M.right.mean [d_in, r]       (only when center)
                              M.right.basis [d_in, r, p]
                              M.right.coef [n_M, d_in, p]
                            header metadata: format, format_version
    rmm_manifest.json       written last (its presence marks a complete bundle):
        format            "mergekit-ortho/rmm-bundle"
        format_version    1
        tasks             task names in order (the global order; revert is by name)
        p, center         the requested basis size and centring
        scale_convention  how the LoRA scale was folded (reverted adapters have scale 1)
        sign_convention, dtype, base_model, source_hashes (optional), extras (per-task files)
        storage_ratio     sum of stored elements / sum of elements of every task's adapter
        stored_elements, full_elements
        files             {"rmm_basis.safetensors": {"bytes": N, "sha256": hex}}
        modules           {M: {"tasks": [...] (coefficient-row order; the tasks adapting M),
                               "rank", "p" (effective), "center", "d_out", "d_in",
                               "rel_error_left", "rel_error_right", "rel_error_delta": [...],
                               "storage_ratio", "stored_elements", "full_elements", ...}}

Reading checks the format name and version (a newer version -> ValueError saying to upgrade), the
required manifest keys, the file's size (and sha256 with ``verify=True``, the default) and every
tensor's presence and shape against the manifest, so a bad bundle fails before any revert. All
errors are :class:`~mergekit_ortho.errors.UserError` (a ValueError) naming the file.
"""
from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any

from .errors import UserError

FORMAT = "mergekit-ortho/rmm-bundle"
FORMAT_VERSION = 1
MANIFEST = "rmm_manifest.json"
TENSORS = "rmm_basis.safetensors"
SCALE_CONVENTION = (
    "LoRA scale (alpha/r, alpha/sqrt(r) for rsLoRA) folded into the factors before the PCA, "
    "delta = lora_B @ lora_A; reverted adapters have scale 1 (lora_alpha = r)"
)
SIGN_CONVENTION = (
    "each basis column's first largest-|value| entry is positive; numerically-zero directions "
    "are stored as zeros"
)
_MODULE_KEYS = ("tasks", "rank", "p", "center", "d_out", "d_in")
_TOP_KEYS = ("tasks", "p", "center", "modules", "files")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _expected_shapes(entry: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    n, r, p = len(entry["tasks"]), int(entry["rank"]), int(entry["p"])
    shapes = {}
    for side, P in (("left", int(entry["d_out"])), ("right", int(entry["d_in"]))):
        if entry["center"]:
            shapes[f"{side}.mean"] = (P, r)
        shapes[f"{side}.basis"] = (P, r, p)
        shapes[f"{side}.coef"] = (n, P, p)
    return shapes


def build_manifest(
    tasks: list[str],
    module_reports: dict[str, dict[str, Any]],
    *,
    p: int,
    center: bool,
    dtype: str = "float32",
    base_model: str | None = None,
    source_hashes: dict[str, str] | None = None,
    extras: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the manifest from the per-module reports of the ``rmm`` operator.

    ``module_reports[M]`` is the operator's report for module M (JSON-safe; its tensors travel
    in ``LoraResult.bundle``). ``tasks`` is the global task order (recipe model names).
    """
    modules = {}
    stored = full = 0
    for key, rep in module_reports.items():
        entry = dict(rep)
        missing = [k for k in _MODULE_KEYS if k not in entry]
        if missing:
            raise ValueError(f"RMM module report '{key}' lacks {', '.join(missing)}")
        unknown = [t for t in entry["tasks"] if t not in tasks]
        if unknown:
            raise ValueError(f"RMM module '{key}' names tasks {unknown} not in the task list {tasks}")
        stored += int(entry.get("stored_elements", 0))
        full += int(entry.get("full_elements", 0))
        modules[key] = entry
    return {
        "tasks": list(tasks),
        "p": int(p),
        "center": bool(center),
        "scale_convention": SCALE_CONVENTION,
        "sign_convention": SIGN_CONVENTION,
        "dtype": dtype,
        "base_model": base_model,
        "source_hashes": dict(source_hashes or {}),
        "extras": dict(extras or {}),
        "stored_elements": stored,
        "full_elements": full,
        "storage_ratio": stored / full if full else None,
        "modules": modules,
    }


def write_bundle(dir_path: str | Path, modules: dict[str, dict[str, Any]], manifest: dict[str, Any]) -> dict[str, Any]:
    """Write ``rmm_basis.safetensors`` then ``rmm_manifest.json`` into the EXISTING ``dir_path``.

    ``modules[M]`` = the local-name tensors of M (``left.mean`` ...), ``manifest`` from
    :func:`build_manifest` (its ``modules`` must list exactly the same keys). The caller owns the
    temporary directory and the atomic rename. Returns the manifest as written.
    """
    import torch
    from safetensors.torch import save_file

    from .stable_header import fix_order

    root = Path(dir_path)
    if not root.is_dir():
        raise UserError(f"RMM bundle directory {root} does not exist (the caller creates it)")
    for key in ("tasks", "p", "center", "modules"):
        if key not in manifest:
            raise ValueError(f"RMM manifest lacks '{key}'")
    if set(manifest["modules"]) != set(modules):
        extra = sorted(set(modules) - set(manifest["modules"]))
        lack = sorted(set(manifest["modules"]) - set(modules))
        raise ValueError(f"RMM bundle: tensors and manifest disagree (no manifest entry: {extra}; "
                         f"no tensors: {lack})")
    flat: dict[str, torch.Tensor] = {}
    for key, tensors in modules.items():
        expected = _expected_shapes(manifest["modules"][key])
        for local, shape in expected.items():
            t = tensors.get(local)
            if t is None:
                raise ValueError(f"RMM bundle: module '{key}' lacks tensor '{local}'")
            if tuple(t.shape) != shape:
                raise ValueError(f"RMM bundle: module '{key}' tensor '{local}' has shape "
                                 f"{tuple(t.shape)}, manifest implies {shape}")
            flat[f"{key}.{local}"] = t.detach().to("cpu").contiguous()
        stray = sorted(set(tensors) - set(expected))
        if stray:
            raise ValueError(f"RMM bundle: module '{key}' has unexpected tensors {stray}")
    tensor_path = root / TENSORS
    meta = {"format": "pt", "rmm_format": FORMAT, "format_version": str(FORMAT_VERSION)}
    save_file(flat, str(tensor_path), metadata=meta)
    fix_order(tensor_path, meta)  # the same bytes (and manifest sha256) in every process
    out = {"format": FORMAT, "format_version": FORMAT_VERSION}
    out.update({k: v for k, v in manifest.items() if k not in ("format", "format_version", "files")})
    out["files"] = {TENSORS: {"bytes": tensor_path.stat().st_size, "sha256": _sha256(tensor_path)}}
    try:
        text = json.dumps(out, indent=2, allow_nan=False)
    except ValueError as e:
        raise ValueError(f"RMM manifest has a non-finite number (NaN/inf in the inputs?): {e}") from e
    (root / MANIFEST).write_text(text + "\n", encoding="utf-8")
    return out


class Bundle:
    """A validated RMM bundle; tensors are read lazily (one module at a time)."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest

    @property
    def tasks(self) -> list[str]:
        return list(self.manifest["tasks"])

    @property
    def modules(self) -> list[str]:
        return list(self.manifest["modules"])

    @property
    def format_version(self) -> int:
        return int(self.manifest["format_version"])

    def _check_task(self, task: str) -> None:
        if task not in self.manifest["tasks"]:
            hint = difflib.get_close_matches(task, self.tasks, n=1)
            msg = f"unknown task '{task}' in RMM bundle {self.path}"
            msg += f" (did you mean '{hint[0]}'?)" if hint else ""
            raise UserError(msg + f"; known tasks: {', '.join(self.tasks)}")

    def module_tensors(self, key: str) -> dict[str, Any]:
        """The local-name tensors of one module (``left.mean`` ...)."""
        from safetensors import safe_open

        if key not in self.manifest["modules"]:
            raise UserError(f"RMM bundle {self.path} has no module '{key}'")
        fpath = self.path / TENSORS
        out = {}
        try:
            with safe_open(str(fpath), framework="pt") as f:
                for local in _expected_shapes(self.manifest["modules"][key]):
                    out[local] = f.get_tensor(f"{key}.{local}")
        except Exception as e:  # noqa: BLE001 - the file changed since it was validated
            raise UserError(f"{fpath}: cannot read module '{key}': {e}") from e
        return out

    def revert_module(self, key: str, task: str):
        """(A, B) of ``task`` on module ``key``, scale 1; None if the task does not adapt it."""
        from .ops.rmm import revert_module

        self._check_task(task)
        names = self.manifest["modules"][key]["tasks"] if key in self.manifest["modules"] else None
        if names is None:
            raise UserError(f"RMM bundle {self.path} has no module '{key}'")
        if task not in names:
            return None
        return revert_module(self.module_tensors(key), names.index(task))

    def task_modules(self, task: str) -> list[str]:
        """The modules ``task`` adapts, from the manifest alone."""
        self._check_task(task)
        return [k for k in self.modules if task in self.manifest["modules"][k]["tasks"]]

    def revert(self, task: str) -> dict[str, tuple[Any, Any]]:
        """Every module's (A (r x d_in), B (d_out x r)) for ``task``; modules it does not adapt are
        left out. Write them as a PEFT adapter with lora_alpha = r (scale 1)."""
        self._check_task(task)
        out = {}
        for key in self.modules:
            ab = self.revert_module(key, task)
            if ab is not None:
                out[key] = ab
        return out


def _load_manifest(root: Path) -> dict[str, Any]:
    mpath = root / MANIFEST
    if mpath.is_symlink() or mpath.exists():
        from .sources.paths import contained

        contained(root, mpath, "bundle manifest")
    if not mpath.is_file():
        raise UserError(f"{mpath}: missing RMM manifest ({root} is not a complete RMM bundle)")
    from .io.json_files import read_object

    manifest = read_object(mpath, "RMM manifest")
    if manifest.get("format") != FORMAT:
        raise UserError(f"{mpath}: not an RMM bundle manifest (format {manifest.get('format')!r}, "
                        f"expected {FORMAT!r})")
    version = manifest.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise UserError(f"{mpath}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise UserError(f"{mpath}: RMM bundle format version {version} is newer than this "
                        f"mergekit-ortho reads ({FORMAT_VERSION}); upgrade mergekit-ortho")
    for key in _TOP_KEYS:
        if key not in manifest:
            raise UserError(f"{mpath}: corrupt RMM manifest, missing key '{key}'")
    tasks = manifest["tasks"]
    if (not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks)
            or len(set(tasks)) != len(tasks)):
        raise UserError(f"{mpath}: 'tasks' must be a list of unique names, got {tasks!r}")
    if not isinstance(manifest["modules"], dict):
        raise UserError(f"{mpath}: 'modules' must be an object")
    for key, entry in manifest["modules"].items():
        if not isinstance(entry, dict):
            raise UserError(f"{mpath}: module '{key}' entry must be an object")
        for k in _MODULE_KEYS:
            if k not in entry:
                raise UserError(f"{mpath}: module '{key}' lacks key '{k}'")
        if not isinstance(entry["tasks"], list) or any(t not in tasks for t in entry["tasks"]):
            raise UserError(f"{mpath}: module '{key}' names tasks {entry['tasks']!r} "
                            f"not all in {tasks}")
        for k in ("rank", "p", "d_out", "d_in"):
            v = entry[k]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise UserError(f"{mpath}: module '{key}' has invalid {k} {v!r}")
    return manifest


def read_bundle(dir_path: str | Path, verify: bool = True) -> Bundle:
    """Open and validate an RMM bundle directory (tensors stay on disk until reverted).

    ``verify`` also checks the tensor file's sha256 (reads it once); size, names and shapes are
    always checked.
    """
    from safetensors import safe_open

    root = Path(dir_path)
    if not root.is_dir():
        raise UserError(f"RMM bundle {root} is not a directory")
    manifest = _load_manifest(root)
    mpath = root / MANIFEST
    tpath = root / TENSORS
    info = manifest["files"].get(TENSORS) if isinstance(manifest["files"], dict) else None
    if not isinstance(info, dict) or "bytes" not in info:
        raise UserError(f"{mpath}: corrupt RMM manifest, no size recorded for {TENSORS}")
    if tpath.is_symlink() or tpath.exists():
        from .sources.paths import contained

        contained(root, tpath, "bundle tensor file")
    if not tpath.is_file():
        raise UserError(f"{tpath}: missing RMM tensor file")
    size = tpath.stat().st_size
    if size != info["bytes"]:
        raise UserError(f"{tpath}: corrupt or truncated ({size} bytes, manifest says {info['bytes']})")
    if verify and "sha256" in info and _sha256(tpath) != info["sha256"]:
        raise UserError(f"{tpath}: corrupt (sha256 differs from the manifest)")
    try:
        with safe_open(str(tpath), framework="pt") as f:
            keys = set(f.keys())
            for key, entry in manifest["modules"].items():
                for local, shape in _expected_shapes(entry).items():
                    name = f"{key}.{local}"
                    if name not in keys:
                        raise UserError(f"{tpath}: missing tensor '{name}'")
                    got = tuple(f.get_slice(name).get_shape())
                    if got != shape:
                        raise UserError(f"{tpath}: tensor '{name}' has shape {got}, "
                                        f"manifest implies {shape}")
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
        raise UserError(f"{tpath}: corrupt safetensors file ({e})") from e
    return Bundle(root, manifest)
