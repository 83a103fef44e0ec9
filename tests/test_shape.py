"""The shape of the package: it reads top-down, with no import cycles, short functions, and each
strategy's behaviour in one place."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "launcher"
MAX_FUNCTION_LINES = 60
STRATEGY_NAMES = {"ddp", "deepspeed", "fsdp"}
# Where strategy names may appear: the schema (choices and rules) and its file reader (distributed.deepspeed is a
# path relative to the recipe), the strategy objects, preflight's refusals.
STRATEGY_HOMES = {"recipe", "recipefile", "strategies", "preflight"}


def modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text(), str(path)) for path in sorted(PACKAGE.glob("*.py"))}


def launcher_imports(tree: ast.Module) -> set[str]:
    """Launcher modules a module imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("launcher.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "launcher":
                found |= {a.name for a in node.names}
            elif node.module.startswith("launcher."):
                found.add(node.module.split(".")[1])
    return found


def test_no_import_cycles_among_launcher_modules():
    graph = {name: launcher_imports(tree) - {name} for name, tree in modules().items()}

    def reaches(start: str, goal: str, seen: set) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = sorted(name for name in graph if reaches(name, name, {name}))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_recipe_imports_only_the_format_registry_which_imports_nothing():
    trees = modules()
    assert launcher_imports(trees["recipe"]) <= {"formats"}
    assert launcher_imports(trees["formats"]) == set()


def test_no_function_is_longer_than_sixty_lines():
    long = [f"{name}.{node.name}: {node.end_lineno - node.lineno + 1}"
            for name, tree in modules().items() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long


def test_strategy_names_appear_only_in_the_schema_strategies_and_preflight():
    strays = [f"{name}.py:{node.lineno}: {node.value!r}"
              for name, tree in modules().items() if name not in STRATEGY_HOMES
              for node in ast.walk(tree) if isinstance(node, ast.Constant) and node.value in STRATEGY_NAMES]
    assert not strays, strays


def test_validate_and_preflight_import_no_torch(tmp_path):
    """`launcher validate` is preflight alone: it must stay instant on a login node."""
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    code = ("import sys; from launcher.cli import main; status = main(['validate', sys.argv[1]]); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(status)")
    result = subprocess.run([sys.executable, "-c", code, str(recipe)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert ": ok (" in result.stdout
