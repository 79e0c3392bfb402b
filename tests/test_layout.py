"""The source tree's shape: modules import only their own stage or the stages below it, nothing imports in a
circle, no module is over 400 lines and no function over 60, and `dsmr --help` needs no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# the stages, lowest first: a module may import from its own stage and the ones before it
STAGES = [
    ("dsmr.errors", "dsmr.core"),
    ("dsmr.data",),
    ("dsmr.backends",),
    ("dsmr.model",),
    ("dsmr.evaluation",),
    ("dsmr.sharing",),
    ("dsmr.training",),
    ("dsmr.generation",),
    ("dsmr.study", "dsmr.app"),
    ("dsmr.cli", "dsmr.__main__", "dsmr._moved"),
]
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted((SRC / "dsmr").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def stage_of(module: str) -> int:
    for rank, prefixes in enumerate(STAGES):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} belongs to no stage: add it to tests/test_layout.py's STAGES")


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The dsmr modules `path` imports (`from dsmr.x import y` counts dsmr.x.y where that is a module)."""
    found = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # imports for type checkers only are not dependencies
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("dsmr.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dsmr") and not node.level:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in known else node.module)
    return {m for m in found if m != "dsmr"}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) for name, path in known.items() if name != "dsmr"}


def test_every_import_goes_to_the_same_stage_or_down():
    back_up = [f"{m} -> {d}" for m, deps in graph().items() for d in deps
               if not m.endswith("__init__") and stage_of(d) > stage_of(m)]
    assert not back_up, "imports from a higher stage:\n" + "\n".join(sorted(back_up))


def test_no_import_circles():
    g = graph()
    done, on_path, circles = set(), [], []

    def visit(m):
        if m in on_path:
            circles.append(on_path[on_path.index(m):] + [m])
            return
        if m in done:
            return
        on_path.append(m)
        for d in sorted(g.get(m, ())):
            # a package's own __init__ importing its submodules is how packages work, not a circle
            if not d.startswith(m + "."):
                visit(d)
        on_path.pop()
        done.add(m)

    for m in sorted(g):
        visit(m)
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_modules_and_functions_stay_small():
    too_long = []
    for name, path in modules().items():
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(SRC)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}: {n} lines")
    assert not too_long, "over the limits:\n" + "\n".join(too_long)


BLOCK_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not installed (blocked by the test)")
sys.meta_path.insert(0, NoTorch())
from dsmr.cli import main
sys.argv = ["dsmr"] + sys.argv[1:]
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
sys.exit(code)
"""


def test_help_needs_no_torch():
    """`dsmr --help` and every command's --help work where torch cannot be imported."""
    for args in (["--help"], ["train", "--help"], ["generate", "--help"], ["study", "--help"], ["live", "--help"],
                 ["data", "build", "--help"], ["eval", "--help"], ["app", "--help"], ["schedule", "show", "--help"]):
        proc = subprocess.run([sys.executable, "-c", BLOCK_TORCH, *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"dsmr {' '.join(args)}: {proc.stderr[-2000:]}"
        assert "usage: dsmr" in proc.stdout, proc.stdout


def test_tests_are_laid_out_like_the_source():
    """Each folder of tests/ is named after the stage of src/dsmr/ it tests (cross-cutting tests stay at the top)."""
    tests = Path(__file__).resolve().parent
    stages = {p.name for p in (SRC / "dsmr").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    folders = {p.name for p in tests.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))}
    assert folders and folders <= stages, f"test folders without a stage of the same name: {sorted(folders - stages)}"
