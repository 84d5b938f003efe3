"""infd/ is a library: it never imports the applications or their frameworks."""
import ast
import subprocess
import sys
from pathlib import Path

INFD = Path(__file__).resolve().parents[1] / "infd"
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
    modules = [m.removesuffix(".__init__") for m in modules]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            f"bad = sorted(n for n in sys.modules if n.split('.')[0] in {sorted(FORBIDDEN)!r})\n"
            "assert not bad, bad\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=INFD.parent)
    assert out.returncode == 0, out.stderr
