"""The import graph of the repository's packages, and its cycles.

An edge a -> b means module a imports module b anywhere in its source: at the top, inside a
function (a lazy import still ties the two modules together), or through importlib.import_module
/ __import__ with a constant name. `from p import x` is an edge to p.x when p.x is a module of
the repository, else to p. The implicit import of a parent package's __init__ is not an edge.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGES = ("infd", "train", "data_prep", "cluster")


def module_names(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """{dotted module name: file} of every .py file under root/<package>."""
    out = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def _targets(node: ast.AST, module: str, is_package: bool, modules) -> list[str]:
    """The repository modules one AST node imports."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in modules]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: from the module's package, one level up per extra dot
            parts = module.split(".")
            parts = parts[: len(parts) - node.level + (1 if is_package else 0)]
            base = ".".join(parts + ([base] if base else []))
        # `from p import x` imports p.x when that is a module, else a name defined in p.
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
                if f"{base}.{a.name}" in modules or base in modules]
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in ("import_module", "__import__") and node.args[0].value in modules:
            return [node.args[0].value]
    return []


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    """{module: the repository modules it imports}."""
    modules = module_names(root, packages)
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        graph[name] = {t for node in ast.walk(tree) for t in _targets(node, name, is_package, modules)} - {name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (or a self-loop),
    as a list of modules [a, b, ..., a]; [] for an acyclic graph. Tarjan's algorithm, iterative."""
    index, low, on_stack, stack, components, counter = {}, {}, set(), [], [], [0]

    def visit(root: str) -> None:
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(component)
            elif child not in index:
                index[child] = low[child] = counter[0]
                counter[0] += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])

    for node in sorted(graph):
        if node not in index:
            visit(node)
    cycles = []
    for component in components:
        if len(component) > 1 or component[0] in graph.get(component[0], ()):
            cycles.append(_cycle_within(graph, set(component)))
    return sorted(cycles)


def _cycle_within(graph: dict[str, set[str]], members: set[str]) -> list[str]:
    """A concrete cycle through the smallest member of a strongly connected component (BFS)."""
    start = min(members)
    parents, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph.get(node, ())):
                if child == start:
                    path = [node]
                    while parents[path[-1]] is not None:
                        path.append(parents[path[-1]])
                    return path[::-1] + [start]
                if child in members and child not in parents:
                    parents[child] = node
                    nxt.append(child)
        frontier = nxt
    raise AssertionError("a strongly connected component always holds a cycle")
