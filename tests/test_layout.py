"""The package's layout holds: no import cycle between its modules, every module under 400 lines
and those of engine/ and run/ under 300 (the layers themselves are import-linter's contract in
pyproject.toml, which .ci/run checks with ``lint-imports``)."""

from pathlib import Path

import grimp

PACKAGE = Path(__file__).resolve().parents[1] / "fedlora_jax"


def strongly_connected(graph) -> list[list[str]]:
    """Tarjan's strongly connected components of the module import graph."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            components.append(component)

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return components


def test_no_import_cycle_between_modules():
    graph = grimp.build_graph("fedlora_jax")  # imports inside functions count too
    cycles = [sorted(c) for c in strongly_connected(graph) if len(c) > 1]
    assert cycles == []


def test_cycle_finder_finds_a_cycle():
    class Graph:
        modules = {"a", "b", "c"}
        edges = {"a": {"b"}, "b": {"a"}, "c": {"a"}}

        def find_modules_directly_imported_by(self, m):
            return self.edges[m]

    assert sorted(map(sorted, strongly_connected(Graph()))) == [["a", "b"], ["c"]]


def test_modules_are_small():
    sizes = {p.relative_to(PACKAGE).as_posix(): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    too_big = {name: n for name, n in sizes.items()
               if n > (300 if name.startswith(("engine/", "run/")) else 400)}
    assert too_big == {}
