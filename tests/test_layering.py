"""The package's layering: the schema imports no library part, loading a model needs no task, the
GRPO loop does not know its variants, the sweep backends do not import the sweep, analysis is
model-generic, and no two modules import each other (module-level imports, any length of circle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PKG = SRC / "mechrl"


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path, *, module_level_only: bool) -> set[str]:
    """The mechrl modules `path` imports (`from mechrl.x import y` counts as mechrl.x and, when y is a
    module, mechrl.x.y)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("mechrl")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mechrl") and node.level == 0:
            out.add(node.module)
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                if (SRC / Path(*sub.split("."))).with_suffix(".py").exists() or (SRC / Path(*sub.split("."))).is_dir():
                    out.add(sub)
    return out


MODULES = {_module_name(p): p for p in PKG.rglob("*.py")}


def _graph(module_level_only: bool) -> dict[str, set[str]]:
    return {m: {i for i in _imports(p, module_level_only=module_level_only) if i in MODULES and i != m}
            for m, p in MODULES.items()}


def test_no_import_circles_at_module_level():
    graph = _graph(module_level_only=True)
    # Tarjan's strongly connected components: a component of more than one module is a circle
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            comps.append(comp)

    for v in graph:
        if v not in index:
            visit(v)
    # config re-exports config_loading (which reads the schema) at its very bottom: a deliberate pair
    circles = [sorted(c) for c in comps if len(c) > 1 and set(c) != {"mechrl.config", "mechrl.config_loading"}]
    assert not circles, f"import circles: {circles}"


@pytest.mark.parametrize("module,forbidden", [
    ("mechrl.config", ("mechrl.rewards", "mechrl.train", "mechrl.models", "mechrl.runs", "mechrl.analysis")),
    ("mechrl.models.loading", ("mechrl.tasks",)),
    ("mechrl.train.grpo", ("mechrl.train.routing", "mechrl.train.mitigation", "mechrl.train.detect")),
    ("mechrl.runs.sweep_backends", ("mechrl.runs.sweep",)),
])
def test_a_module_does_not_reach_up(module, forbidden):
    imports = _imports(MODULES[module], module_level_only=False)  # function-local imports count too
    bad = sorted(i for i in imports if any(i == f or i.startswith(f + ".") for f in forbidden)
                 and i != "mechrl.runs.sweep_record")
    assert not bad, f"{module} imports {bad}"


def test_analysis_is_model_generic():
    assert not [p.name for p in (PKG / "analysis").glob("card_*.py")]
    for p in (PKG / "analysis").glob("*.py"):
        assert not [i for i in _imports(p, module_level_only=False) if i.startswith("mechrl.tasks.cards")], p.name
