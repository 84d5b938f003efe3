"""infd/ is a library: it never imports the applications or their frameworks; no module of the
repository imports itself through others (the import graph is acyclic)."""
import ast
import subprocess
import sys
from pathlib import Path

from tests.import_graph import find_cycles, import_graph, module_names

ROOT = Path(__file__).resolve().parents[1]
INFD = ROOT / "infd"
FORBIDDEN = {"train", "data_prep", "cluster", "hydra", "deepspeed", "wandb", "omegaconf"}


def test_no_forbidden_import_statement_in_infd():
    offenders = []
    for path in INFD.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not offenders, offenders


def test_importing_every_infd_module_loads_no_forbidden_package():
    modules = [".".join(p.relative_to(INFD.parent).with_suffix("").parts) for p in INFD.rglob("*.py")]
    modules = [m.removesuffix(".__init__") for m in modules if not m.endswith(".__main__")]  # those run a command
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            f"bad = sorted(n for n in sys.modules if n.split('.')[0] in {sorted(FORBIDDEN)!r})\n"
            "assert not bad, bad\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=INFD.parent)
    assert out.returncode == 0, out.stderr


# ---- The import graph of infd/, train/, data_prep/ and cluster/ has no cycle. ----

def test_the_repository_import_graph_has_no_cycle():
    """Function-level imports and import_module("name") count: a lazy import hides a cycle, it
    does not remove it (the two modules still cannot be understood or loaded one without the other)."""
    graph = import_graph(ROOT)
    assert len(graph) > 50 and sum(map(len, graph.values())) > 150  # the whole repository was read
    assert find_cycles(graph) == []


def test_data_prep_does_not_import_train():
    graph = import_graph(ROOT)
    offenders = {m: sorted(t for t in deps if t.startswith("train")) for m, deps in graph.items()
                 if m.startswith("data_prep")}
    assert not {m: t for m, t in offenders.items() if t}


def test_the_cycle_finder_finds_every_cycle_of_a_synthetic_graph():
    acyclic = {"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"a"}}
    assert find_cycles(acyclic) == []
    cyclic = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}, "f": {"g"}, "g": {"f", "a"}}
    assert find_cycles(cyclic) == [["a", "b", "c", "a"], ["e", "e"], ["f", "g", "f"]]


def test_the_graph_counts_function_level_and_import_module_imports(tmp_path):
    """A synthetic package whose only cycles go through a function-level import, a relative
    import and importlib.import_module with a constant name."""
    pkg = tmp_path / "infd"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from infd.b import thing\n")
    (pkg / "b.py").write_text("def f():\n    from infd import a\n    return a\n")
    (pkg / "c.py").write_text("import importlib\n\ndef load():\n    return importlib.import_module('infd.sub.d')\n")
    (pkg / "sub" / "d.py").write_text("from .. import c\nimport os\n")
    (pkg / "e.py").write_text("import infd.a\n")
    graph = import_graph(tmp_path, packages=("infd",))
    assert graph["infd.a"] == {"infd.b"} and graph["infd.b"] == {"infd.a"}
    assert graph["infd.c"] == {"infd.sub.d"} and graph["infd.sub.d"] == {"infd.c"}
    assert graph["infd.e"] == {"infd.a"} and graph["infd"] == set()
    assert find_cycles(graph) == [["infd.a", "infd.b", "infd.a"], ["infd.c", "infd.sub.d", "infd.c"]]


def test_every_module_of_the_repository_imports():
    """make test-fast's floor: a module that no fast test exercises still gets imported here, so a
    syntax or import error anywhere fails the inner loop."""
    modules = sorted(m for m in module_names(ROOT) if not m.endswith(".__main__"))  # those run a command
    code = f"import importlib\nfor m in {modules!r}: importlib.import_module(m)\nprint(len({modules!r}))\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout) == len(modules) > 90
