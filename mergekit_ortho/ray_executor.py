"""`merge run RECIPE --executor ray [--address auto]`: the units of a sharded run as Ray tasks.

The same unit function as `merge run --shard i/N --stage DIR` (``schedule.run_unit``), one Ray task
per unit, then the same ``schedule.finalize`` as `merge finalize`, so the output is bit-identical to
a serial run. A task gets the recipe's path, the unit's (i, N) and the staging directory, never a
tensor: each worker plans from the recipe (headers only), reads its inputs from the (shared)
filesystem (hub ids: downloads the weight files of its own items only, into the node's cache; the
driver reads headers only) and commits its unit atomically with its receipt (``stage``); finalize
verifies every receipt against the driver's plan, so a node that saw other input files (another
commit of a hub model) is refused, not merged.

An adapter or bundle output (``plan.module_mode``) splits into runs of modules
(:mod:`.module_units`), one per CPU of the cluster unless ``units`` is given.

Resources per task, from the plan's per-unit estimate (``schedule.unit_estimate``): ``num_cpus=1``
(a unit is one stream of tensors; torch uses the node's threads within it) and ``memory`` = the
plan's peak estimate, so Ray packs no more units on a node than its memory holds. A task lost with
its worker or node is re-run by Ray (``max_retries``); re-running a unit replaces only its own
directory, so a retry or a duplicate is harmless.

Optional dependency: ``pip install 'mergekit-ortho[ray]'``. Every node needs mergekit-ortho
installed and the recipe, inputs and staging directory at the same paths (a shared filesystem).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .errors import UserError

MAX_RETRIES = 3


def unit_task(recipe_path: str, i: int, n: int, stage: str, device: str) -> str:
    """One unit on whichever node Ray chose (module-level, so Ray ships it by reference)."""
    from . import plan as plan_mod
    from . import recipe as recipe_mod
    from . import schedule

    docs = recipe_mod.load_all(Path(recipe_path))
    plan = schedule.plan_unit(docs[0], i, n, device)  # hub models: this unit's files only
    try:
        return str(schedule.run_unit(plan, i, n, Path(stage)))
    finally:
        plan_mod.close(plan)


def _ray():
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'mergekit-ortho[ray]'") from None
    return ray


def _connect(ray, address: str | None) -> bool:
    """Connect to (``address``) or start a local Ray; True when this call started it."""
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except ConnectionError as e:
        raise UserError(f"--address {address}: no Ray cluster there ({str(e).splitlines()[0][:160]}); start one "
                        "with `ray start --head` or leave --address out to run on this machine") from None
    return True


def run(plan, recipe_path: Path, stage: Path, target: Path, *, address: str | None = None, units: int | None = None,
        overwrite: bool = False, force_replace: bool = False,
        on_unit: Callable[[int, int], None] | None = None) -> Path:
    """Run every unit of ``plan`` as a Ray task into ``stage``, then finalize into ``target``."""
    from . import schedule

    schedule.check_shardable(plan, units or (1 if plan.module_mode else len(plan.shards)))  # before Ray starts
    ray = _ray()
    started = _connect(ray, address)
    try:
        n = units or _default_units(ray, plan)
        schedule.check_shardable(plan, n)
        est = max((schedule.unit_estimate(plan, i, n) for i in range(n)), key=lambda e: e.peak_bytes)
        largest = max((node.get("Resources", {}).get("memory", 0) for node in ray.nodes() if node.get("Alive")),
                      default=0)
        memory = est.peak_bytes
        if largest and memory > largest:
            raise UserError(f"--executor ray: a unit needs about {memory / 2**30:.1f} GiB (the plan's estimate) but the "
                            f"largest Ray node offers {largest / 2**30:.1f} GiB; add memory or use a machine that has it")
        task = ray.remote(unit_task).options(num_cpus=1, memory=memory or None, max_retries=MAX_RETRIES,
                                             retry_exceptions=False)
        pending = {task.remote(str(Path(recipe_path).absolute()), i, n, str(Path(stage).absolute()), plan.device): i
                   for i in range(n)}
        done = 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                pending.pop(ref)
                _result(ray, ref)
                done += 1
                if on_unit is not None:
                    on_unit(done, n)
    finally:
        if started:
            ray.shutdown()
    return schedule.finalize(plan, stage, target, overwrite=overwrite, force_replace=force_replace)


def _default_units(ray, plan) -> int:
    """One unit per output shard; an adapter or bundle output (one file, any number of modules):
    one unit per CPU of the cluster, at most one per module."""
    if not plan.module_mode:
        return len(plan.shards)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(len(plan.module_keys), cpus))


def _result(ray, ref):
    """A unit's result; a UserError raised in a task is the user's one line, not a Ray traceback."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, UserError):
            raise UserError(str(cause)) from None
        raise
