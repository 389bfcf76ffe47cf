"""Units of a sharded run whose output is produced module by module (a PEFT or kohya LoRA, an RMM
bundle: ``plan.module_mode``).

Such an output is one file (or a few) that depends on every module at once: a PEFT config's ``r``
is the most common rank, a kohya file's one alpha folds into every module's factors and its hashes
cover the whole file, a bundle's manifest lists every module. So a unit does not write pieces of
the output; it computes its modules (a contiguous run of ``plan.module_keys``: unit i of N of M
modules is ``module_keys[floor(i*M/N) : floor((i+1)*M/N)]``) with the serial run's loop
(``outputs.fill_modules``: :func:`.execute.execute` over ``lowrank_result`` / ``bundle_result``),
and stages what the loop hands the sink — each module's factors (or bundle tensors), exactly as
computed, and its report — in ``part.safetensors`` with its receipt (:func:`.stage.verify_modules`). `merge finalize`
verifies every receipt, then puts the staged modules, in plan order, into the very sink a serial
run uses (``outputs._adapter_sink`` / ``_bundle_sink``), which packs and commits the output:
every file bit-identical to a serial run's. The staged factors are the adapter's own size, and
the serial sink holds them all before it packs too.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .errors import UserError

PART = "part.safetensors"
PHASE = "modules"


def check(plan, n: int) -> None:
    m = len(plan.module_keys)
    if not plan.op.merges_one_tensor_alone:
        raise UserError(f"not supported yet: --shard with method '{plan.op.name}' to a {plan.out_format} output "
                        "(its scalars reduce over every module); run it without --shard / --stage")
    if n > m:
        raise UserError(f"--shard .../{n}: the {plan.out_format} output has {m} module(s), so at most {m} units; "
                        "use a smaller N")


def unit_keys(plan, i: int, n: int) -> list[str]:
    """The modules of unit ``i`` of ``n``, in plan order."""
    keys = plan.module_keys
    m = len(keys)
    return list(keys[i * m // n:(i + 1) * m // n])


def describe(plan, i: int, n: int) -> str:
    m = len(plan.module_keys)
    return f"module(s) {i * m // n + 1}..{(i + 1) * m // n} of {m}"


class _Staged:
    """The sink of a unit: what the serial sink's ``put`` would get, kept in put order."""

    def __init__(self):
        self.modules: list[tuple[str, dict, dict | None]] = []

    def order(self) -> list[str]:
        return []  # the plan's order, as the serial Adapter and Bundle sinks

    def put(self, name: str, value, report: dict | None = None) -> None:
        from .sinks import json_safe

        if hasattr(value, "tensors"):  # a bundle's module
            tensors = dict(value.tensors)
        else:
            tensors = {"A": value.A, "B": value.B}
        # contiguous as the serial sink stores them; cloned: safetensors refuses shared storage
        tensors = {k: t.detach().contiguous().clone() for k, t in tensors.items()}
        self.modules.append((name, tensors, json_safe(report) if report is not None else None))


def compute_unit(plan, i: int, n: int, directory: Path, on_tensor: Callable[[str, int], None] | None = None) -> dict:
    """Unit ``i`` of ``n``'s modules into ``directory/part.safetensors``; the receipt's fields."""
    from .outputs import fill_modules
    from .sinks import save_safetensors, tensor_record
    from .stage import header_sha256

    index = {k: j for j, k in enumerate(plan.module_keys)}
    sink = _Staged()
    fill_modules(plan, sink, unit_keys(plan, i, n), on_tensor)
    tensors, modules, records = {}, [], []
    for key, parts, report in sink.modules:
        stored = {field: f"{index[key]}.{field}" for field in parts}
        for field, t in parts.items():
            tensors[stored[field]] = t
            records.append(tensor_record(stored[field], t))
        modules.append({"key": key, "tensors": stored, "report": report})
    path = Path(directory) / PART
    save_safetensors(tensors, path, {"format": "pt"})
    return {"phase": PHASE, "modules": modules,
            "files": [{"name": PART, "bytes": path.stat().st_size, "header_sha256": header_sha256(path),
                       "tensors": records}]}


def _value(plan, tensors: dict):
    from .ops import registry

    if plan.out_format == "bundle":
        return registry.BundleEntry(tensors=tensors)
    return registry.LoraResult(A=tensors["A"], B=tensors["B"])


def commit(plan, dirs: list[Path], receipts: list[dict], target: Path, guard: dict,
           on_tensor: Callable[[str, int], None] | None = None) -> Path:
    """The output of the verified units, through the serial run's sink, in plan order."""
    from safetensors import safe_open

    from .outputs import _adapter_sink, _bundle_sink

    sink = _bundle_sink(plan, target, guard) if plan.out_format == "bundle" else _adapter_sink(plan, target, guard)
    with sink:
        for d, receipt in zip(dirs, receipts):
            with safe_open(str(d / PART), framework="pt") as f:
                for mod in receipt["modules"]:
                    tensors = {field: f.get_tensor(stored) for field, stored in mod["tensors"].items()}
                    sink.put(mod["key"], _value(plan, tensors), mod["report"])
                    if on_tensor is not None:
                        on_tensor(mod["key"], 0)
        return sink.commit()
