"""The package's import graph has no cycle (function-level imports counted too): each layer
depends one way: the executor uses the plan, the inputs and the sinks, never the reverse.
Operator modules read their resolved parameters (no ``.get`` defaults), never probe their task,
and stay under 400 lines."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "mergekit_ortho"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        out.update(c for c in candidates if c in modules and c != name)
    return out


def test_no_import_cycle():
    files = [p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts]
    modules = {_module_name(p) for p in files}
    graph = {_module_name(p): _imports(p, modules) for p in files}
    packages = {_module_name(p) for p in files if p.name == "__init__.py"}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for dep in sorted(graph[m] - packages):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert "mergekit_ortho.sinks" in graph["mergekit_ortho.execute"]  # the graph is really read


def test_one_execution_loop():
    """Every command runs its items through execute.execute: no other module walks items itself
    (the old per-output loops: engine.execute, lora_engine.merged_modules / run_bundle,
    continual._add_locked's own walk)."""
    import mergekit_ortho

    for old in ("engine", "lora_engine"):
        assert not (PKG / f"{old}.py").exists(), old
    def calls_execute(path: Path) -> bool:
        return any(isinstance(n, ast.Call) and getattr(n.func, "id", getattr(n.func, "attr", "")) == "execute"
                   for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))))

    callers = {p.stem for p in PKG.rglob("*.py") if p.stem != "execute" and calls_execute(p)}
    assert callers == {"outputs", "service", "removal", "revert", "sequential"}, callers
    for p in PKG.rglob("*.py"):
        text = p.read_text(encoding="utf-8")
        if p.stem not in ("execute", "writer", "sinks"):
            assert "ShardedWriter(" not in text, f"{p.name} writes shards outside a sink"
    assert mergekit_ortho


# --- operator modules: parameters read from the resolved Params, no duck typing, small files ------

OPS = PKG / "ops"
# the low-rank families converted to registry.Params; widened to every operator module once the
# dense families (linear, gta, sce, magmax, widen, tsv, slerp, opcm) are converted too
# every operator module (kernels aside): the checks below hold for all of them
OPERATOR_MODULES = sorted(p.name for p in OPS.glob("*.py") if p.name != "__init__.py")
_PARAMS_NAMES = {"params", "p", "mp", "model_params"}
_PARAMS_ATTRS = {"params", "model_params"}


def _params_get_calls(source: str) -> list[int]:
    """Lines calling ``.get(`` on a parameters object: ``X.get(...)`` with X a name in
    _PARAMS_NAMES, or an attribute ending in ``.params`` / ``.model_params``."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
            obj = node.func.value
            if (isinstance(obj, ast.Name) and obj.id in _PARAMS_NAMES) or (
                    isinstance(obj, ast.Attribute) and obj.attr in _PARAMS_ATTRS):
                lines.append(node.lineno)
    return lines


def _task_duck_typing(source: str) -> list[int]:
    """Lines calling ``hasattr(task, ...)`` or ``getattr(task, ...)``."""
    return [n.lineno for n in ast.walk(ast.parse(source))
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("hasattr", "getattr")
            and n.args and isinstance(n.args[0], ast.Name) and n.args[0].id == "task"]


def test_the_checks_see_what_they_look_for():
    src = ("a = params.get('x', 1)\nb = p.get('y')\nc = task.params.get('z')\nd = t.model_params.get('w')\n"
           "e = mp.get('v', 0)\nf = model_params.get('u')\nok = rule.get('k', 1)\nok2 = plan.params['r']\n")
    assert _params_get_calls(src) == [1, 2, 3, 4, 5, 6]
    assert _task_duck_typing("if hasattr(task, 'inputs'):\n    i = getattr(task, 'model_index', None)\n"
                             "ok = hasattr(other, 'inputs')\n") == [1, 2]


@pytest.mark.parametrize("name", OPERATOR_MODULES)
def test_operator_reads_resolved_params(name):
    """Defaults live once, in the Param schema: an operator reads ``p.rank`` / ``p["lambda"]``
    from the resolved registry.Params, never ``params.get(name, default)``."""
    lines = _params_get_calls((OPS / name).read_text(encoding="utf-8"))
    assert not lines, f"ops/{name} calls .get( on a parameters object at line(s) {lines}"


@pytest.mark.parametrize("name", OPERATOR_MODULES)
def test_operator_does_not_duck_type_its_task(name):
    """An operator is told what it gets (TensorTask or LoraTask, by input_kind); it never probes."""
    text = (OPS / name).read_text(encoding="utf-8")
    assert "hasattr(task" not in text and not _task_duck_typing(text), f"ops/{name} duck-types its task"


@pytest.mark.parametrize("path", sorted(p.name for p in OPS.glob("*.py")))
def test_operator_modules_stay_small(path):
    n = len((OPS / path).read_text(encoding="utf-8").splitlines())
    assert n < 400, f"ops/{path} has {n} lines; split it by concern (kernels to ops/kernels/)"


def test_operator_module_list_is_current():
    assert {"linear.py", "gta.py", "sparsify.py", "sce.py", "opcm.py", "rmm.py", "registry.py"} <= set(OPERATOR_MODULES)


def test_one_fold_concept():
    """One form for folds (registry.Fold, with optional gather and reduce): no second protocol."""
    for name in OPERATOR_MODULES:
        text = (OPS / name).read_text(encoding="utf-8")
        for old in ("StreamFold", "SEQUENTIAL", "sequential=", "stream=", "prepass"):
            assert old not in text, f"ops/{name} still names {old}"
