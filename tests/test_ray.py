"""`merge run --executor ray` (mergekit_ortho/ray_executor.py) on a local Ray cluster of two nodes
(ray.cluster_utils.Cluster, 1 CPU each): bit-identical to a serial run, and unchanged when a worker
is killed with -9 mid-task (Ray re-runs the lost task). One cluster for the module: Ray's start is
slow. Every worker's output items are slowed a little (conftest.slow_env's sitecustomize, in the
cluster's environment), so a unit lasts long enough to be killed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'mergekit-ortho[ray]')")

from conftest import slow_env  # noqa: E402
from test_shard import recipe, tree  # noqa: E402

CLI = [sys.executable, "-m", "mergekit_ortho.cli"]


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = slow_env(0.05)["PYTHONPATH"]  # inherited by the nodes' workers only
    try:
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        c.add_node(num_cpus=1)
        c.wait_for_nodes()
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


def unit_workers() -> list[int]:
    """Worker processes executing a unit now (Ray titles a busy worker ``ray::<function>``)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "cmdline").read_bytes().startswith(b"ray::unit_task"):
                    found.append(int(d.name))
            except OSError:
                pass
    return found


def run_on_ray(r: Path, stage: Path, out: Path) -> Path:
    from mergekit_ortho import plan as plan_mod
    from mergekit_ortho import ray_executor
    from mergekit_ortho import recipe as recipe_mod

    plan = plan_mod.build_plan(recipe_mod.load_all(r)[0])
    try:
        return ray_executor.run(plan, r, stage, out)
    finally:
        plan_mod.close(plan)


@pytest.mark.parametrize("method", ["linear", "opcm"])
def test_ray_is_bit_identical_to_serial(method, cluster, tiny_models, tmp_path, cli):
    r = recipe(tmp_path / "r.yaml", method, [tiny_models[k] for k in "abc"], tiny_models["base"])
    assert cli("run", r, "--out", tmp_path / "serial")[0] == 0
    run_on_ray(r, tmp_path / "stage", tmp_path / "out")
    a, b = tree(tmp_path / "serial"), tree(tmp_path / "out")
    assert len([k for k in a if k.endswith(".safetensors")]) >= 4
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), [k for k in a if a.get(k) != b.get(k)]


def test_a_worker_killed_mid_task_is_retried_and_the_result_is_unchanged(cluster, tiny_models, tmp_path, cli):
    r = recipe(tmp_path / "r.yaml", "dare_ties", [tiny_models[k] for k in "abc"], tiny_models["base"],
               "{density: 0.5, seed: 3}")
    assert cli("run", r, "--out", tmp_path / "serial")[0] == 0
    stage, errors = tmp_path / "stage", []

    def drive():
        try:
            run_on_ray(r, stage, tmp_path / "out")
        except BaseException as e:  # reported by the assertion below
            errors.append(e)

    t = threading.Thread(target=drive)
    t.start()
    killed, end = None, time.time() + 60
    while killed is None and t.is_alive() and time.time() < end:
        busy = unit_workers()
        if busy and list(stage.glob(".unit-*.partial-*/*.safetensors")):  # a unit half written
            os.kill(busy[0], signal.SIGKILL)
            killed = busy[0]
        time.sleep(0.005)
    t.join(120)
    assert killed is not None, "no unit was caught mid-task"
    assert not errors, errors
    assert tree(tmp_path / "serial") == tree(tmp_path / "out")


def test_cli_executor_ray_on_the_cluster(cluster, tiny_models, tmp_path, cli):
    r = recipe(tmp_path / "r.yaml", "ties", [tiny_models[k] for k in "ab"], tiny_models["base"], "{density: 0.5}")
    assert cli("run", r, "--out", tmp_path / "serial")[0] == 0
    got = subprocess.run(CLI + ["run", str(r), "--out", str(tmp_path / "out"), "--executor", "ray",
                                "--address", cluster.address], capture_output=True, text=True, timeout=180)
    assert got.returncode == 0, got.stderr
    assert tree(tmp_path / "serial") == tree(tmp_path / "out")
    assert not (tmp_path / ".out.stage").exists()  # its own staging directory is removed
    code, _, err = cli("run", r, "--out", tmp_path / "o2", "--executor", "dask")
    assert code == 2 and "--executor dask" in err
    code, _, err = cli("run", r, "--out", tmp_path / "o2", "--executor", "ray", "--shard", "0/2")
    assert code == 2 and "--shard" in err


def test_cli_executor_ray_writes_a_peft_output_bit_identical_to_serial(cluster, tiny_models, tmp_path, cli):
    """An adapter output's units are runs of modules (module_units.py), one per cluster CPU here."""
    from conftest import TINY, write_recipe
    from mergekit_ortho.testing.checkpoints import llama_shapes
    from mergekit_ortho.testing.loras import write_peft_adapter

    shapes = llama_shapes(**TINY)
    for k, seed in (("la", 1), ("lb", 2)):
        write_peft_adapter(tmp_path / k, shapes, ("q_proj", "v_proj"), rank=2, alpha=4, seed=seed)
    r = write_recipe(tmp_path / "r.yaml", f"merge_method: ties\nbase_model: {tiny_models['base']}\nmodels:\n"
                     f"  - model: {tmp_path / 'la'}\n  - model: {tmp_path / 'lb'}\nparameters: {{density: 0.5}}\n"
                     "output:\n  format: peft\n  rank: 2\n")
    assert cli("run", r, "--out", tmp_path / "serial")[0] == 0
    got = subprocess.run(CLI + ["run", str(r), "--out", str(tmp_path / "out"), "--executor", "ray",
                                "--address", cluster.address, "--stage", str(tmp_path / "st")],
                         capture_output=True, text=True, timeout=180)
    assert got.returncode == 0, got.stderr
    assert tree(tmp_path / "serial") == tree(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "st").iterdir()) == ["unit-00000-of-00002", "unit-00001-of-00002"]
