"""The package's layering, read from its source: no import cycle, Ray only at the edge, lower
layers never importing the launchers or the CLI (docs/architecture.md has the picture).

Every ``import`` / ``from ... import`` counts, also those inside functions (a lazy import is
still a dependency), except under ``if TYPE_CHECKING:`` (annotations only).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "albef_ray"
# Layers that must import neither the Ray edge nor the CLI (nor anything above them).
LOWER = ("model", "objectives", "eval", "data", "train", "synth")
# Each lower layer's allowed albef_ray imports (besides itself): the layers below it.
ALLOWED = {
    "model": {"config", "precision"},
    "data": {"config", "model"},
    "objectives": {"config", "model"},
    "train": {"config", "precision", "model", "objectives", "tasks", "data"},
    "eval": {"config", "precision", "model", "objectives", "tasks", "data", "train", "tracking"},
    "synth": {"config", "model", "objectives", "data", "eval"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # annotations only: not a dependency at run time
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            node.body = []
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            # ``from . import x`` may name a submodule
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def package_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in imports_of(path) if m in modules and m != name}
    return graph


GRAPH = package_graph()


def layer(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of module-level imports, or None (package ``__init__`` edges to children excluded:
    a package importing its own submodules is how packages export, not a cycle of concerns)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if dep.startswith(node + "."):
                continue
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_is_read():
    assert "albef_ray.model.albef" in GRAPH["albef_ray.model.loading"]
    assert "albef_ray.tasks" in GRAPH["albef_ray.launch.train"]


def test_no_import_cycle():
    assert find_cycle(GRAPH) is None, " -> ".join(find_cycle(GRAPH))


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_ray_only_in_launch():
    offenders = {
        name: sorted(m for m in imports_of(PACKAGE.parent / (name.replace(".", "/") + ".py"))
                     if m == "ray" or m.startswith("ray."))
        for name in GRAPH if layer(name) != "launch" and (PACKAGE.parent / (name.replace(".", "/") + ".py")).exists()
    }
    assert {k: v for k, v in offenders.items() if v} == {}


@pytest.mark.parametrize("lower", LOWER)
def test_lower_layers_import_only_below_them(lower):
    bad = {
        name: sorted(dep for dep in deps if layer(dep) not in ALLOWED[lower] | {lower})
        for name, deps in GRAPH.items() if layer(name) == lower
    }
    assert {k: v for k, v in bad.items() if v} == {}


def test_nothing_below_imports_launch_or_cli():
    for name, deps in GRAPH.items():
        if layer(name) in LOWER or name in ("albef_ray.tasks", "albef_ray.tracking", "albef_ray.config",
                                            "albef_ray.precision", "albef_ray.sweep", "albef_ray.compare"):
            assert not {d for d in deps if layer(d) in ("launch", "cli")}, name
