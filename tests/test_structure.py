"""The package's import graph has no cycle (function-level imports counted too): each layer
depends one way: the executor uses the plan, the inputs and the sinks, never the reverse."""
from __future__ import annotations

import ast
from pathlib import Path

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
    assert callers == {"outputs", "continual", "revert", "sequential"}, callers
    for p in PKG.rglob("*.py"):
        text = p.read_text(encoding="utf-8")
        if p.stem not in ("execute", "writer", "sinks"):
            assert "ShardedWriter(" not in text, f"{p.name} writes shards outside a sink"
    assert mergekit_ortho
