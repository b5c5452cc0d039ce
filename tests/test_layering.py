"""The package import graph: one way only. Every `import` counts, module top or inside a function."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lsjax", "pallas_kernels")


def unit(module: str) -> str:
    """The graph's node for a module: `pallas_kernels`, or lsjax's top-level module or subpackage."""
    parts = module.split(".")
    return parts[0] if parts[0] == "pallas_kernels" or len(parts) == 1 else ".".join(parts[:2])


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported(path: Path, known: dict[str, Path]) -> set[str]:
    """lsjax / pallas_kernels modules that a file imports anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def graph() -> dict[str, set[str]]:
    """unit -> the units it imports (a package's own `__init__` is not an edge from its children)."""
    known = modules()
    edges: dict[str, set[str]] = {unit(m): set() for m in known}
    for module, path in known.items():
        for target in imported(path, known):
            if unit(target) != unit(module) and target != "lsjax":
                edges[unit(module)].add(unit(target))
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_has_no_cycles():
    edges = graph()
    assert len(edges) > 20 and "lsjax.train" in edges["lsjax.reproduce"]  # the graph is really built
    cycle = find_cycle(edges)
    assert cycle is None, " -> ".join(cycle)


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_layers_point_down():
    edges = graph()
    assert edges["pallas_kernels"] == set()  # kernels know nothing of models
    for core in ("lsjax.model", "lsjax.decode", "lsjax.adapters"):  # the optional CPU library stays behind its backend
        assert "lsjax.native" not in edges[core], core
    for low, high in [("lsjax.convert", "lsjax.adapters"), ("lsjax.checkpoint", "lsjax.convert"),
                      ("lsjax.model", "lsjax.checkpoint"), ("lsjax.eval", "lsjax.train"), ("lsjax.data", "lsjax.train"),
                      ("lsjax.eval", "lsjax.reproduce"), ("lsjax.train", "lsjax.cli")]:
        assert high not in edges[low], f"{low} imports {high}"
