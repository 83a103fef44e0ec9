"""The shape of the package: it reads top-down, with no import cycles, short functions and modules, launcher
imports at module top, no reaching into another module's private names, and each strategy's behaviour in one place."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "launcher"
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 400
STRATEGY_NAMES = {"ddp", "deepspeed", "fsdp"}
# Where strategy names may appear: the schema (choices) and its file reader (distributed.deepspeed is a path relative
# to the recipe), each strategy's rules and its strategy object, preflight.
STRATEGY_HOMES = {"launcher.recipe.schema", "launcher.recipe.files", "launcher.distributed.rules",
                  "launcher.distributed.strategies", "launcher.preflight.checks"}
# Heavy or optional third-party packages: the only imports allowed inside a function, so light commands stay light.
LATE_IMPORTS = {"torch", "transformers", "peft", "accelerate", "datasets", "deepspeed", "bitsandbytes", "safetensors",
                "gguf", "matplotlib", "numpy", "mlflow", "wandb", "tensorboard", "sacrebleu", "trl", "rich",
                "huggingface_hub", "tokenizers", "jinja2", "liger_kernel", "flash_attn", "torchao", "psutil", "pynvml",
                "pyarrow", "httpx"}
# The module another helper is splitting (house issue #23, A2): over 400 lines, with launcher imports inside functions.
PENDING = {"launcher.distributed.strategies"}
HEAVY = {"torch", "transformers", "peft", "accelerate", "datasets", "deepspeed", "bitsandbytes"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def modules() -> dict[str, ast.Module]:
    return {name: ast.parse(path.read_text(), str(path)) for name, path in sources().items()}


NAMES = set(sources())


def imported_modules(node: ast.Import | ast.ImportFrom) -> list[tuple[str, str]]:
    """(launcher module, local name) for each launcher module an import statement binds or reads."""
    if isinstance(node, ast.Import):
        return [(a.name, a.asname or a.name) for a in node.names if a.name.split(".")[0] == "launcher"]
    if node.level or not node.module or node.module.split(".")[0] != "launcher":
        return []
    found = []
    for alias in node.names:
        full = f"{node.module}.{alias.name}"
        found.append((full, alias.asname or alias.name) if full in NAMES else (node.module, ""))
    return found


def launcher_imports(tree: ast.Module) -> set[str]:
    """Launcher modules a module imports, at the top or inside functions."""
    return {name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
            for name, _ in imported_modules(node)}


def function_imports(tree: ast.Module):
    """Every import statement inside a function."""
    for function in ast.walk(tree):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    yield node


def top_package(node: ast.Import | ast.ImportFrom) -> set[str]:
    if isinstance(node, ast.Import):
        return {a.name.split(".")[0] for a in node.names}
    return {"." if node.level else node.module.split(".")[0]}


def test_no_import_cycles_among_launcher_modules():
    graph = {name: launcher_imports(tree) - {name} for name, tree in modules().items()}

    def reaches(start: str, goal: str, seen: set) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = sorted(name for name in graph if reaches(name, name, {name}))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_no_module_is_longer_than_four_hundred_lines():
    long = [f"{name}: {len(path.read_text().splitlines())}" for name, path in sources().items()
            if len(path.read_text().splitlines()) > MAX_MODULE_LINES and name not in PENDING]
    assert not long, long


def test_no_function_is_longer_than_sixty_lines():
    long = [f"{name}.{node.name}: {node.end_lineno - node.lineno + 1}"
            for name, tree in modules().items() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long


def test_imports_inside_functions_are_only_heavy_or_optional_packages():
    late = [f"{name}:{node.lineno}: {', '.join(sorted(top_package(node)))}"
            for name, tree in modules().items() if name not in PENDING
            for node in function_imports(tree) if not top_package(node) <= LATE_IMPORTS]
    assert not late, late


def test_no_module_uses_another_modules_private_names():
    used = []
    for name, tree in modules().items():
        bound = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "launcher":
                used += [f"{name}:{node.lineno}: {node.module}.{a.name}" for a in node.names
                         if a.name.startswith("_") and not a.name.startswith("__")]
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                bound.update({local: module for module, local in imported_modules(node) if local})
        used += [f"{name}:{node.lineno}: {node.value.id}.{node.attr}" for node in ast.walk(tree)
                 if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                 and node.attr.startswith("_") and not node.attr.startswith("__")]
    assert not used, used


def test_recipe_wing_imports_only_itself_errors_and_shipped_and_no_heavy_package():
    for name, tree in modules().items():
        if name.startswith("launcher.recipe"):
            outside = {m for m in launcher_imports(tree)
                       if not m.startswith("launcher.recipe") and m not in {"launcher.errors", "launcher.shipped"}}
            assert not outside, f"{name} imports {outside}"
            heavy = {p for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                     for p in top_package(node)} & HEAVY
            assert not heavy, f"{name} imports {heavy}"
    assert launcher_imports(modules()["launcher.recipe.formats"]) == set(), "the format registry imports nothing"


def test_strategy_names_appear_only_in_the_schema_strategies_and_preflight():
    strays = [f"{name}:{node.lineno}: {node.value!r}"
              for name, tree in modules().items() if name not in STRATEGY_HOMES
              for node in ast.walk(tree) if isinstance(node, ast.Constant) and node.value in STRATEGY_NAMES]
    assert not strays, strays


def test_light_commands_import_no_torch(tmp_path):
    """`launcher validate`, `plan --help`, `recipes` and `reference` must stay instant on a login node (planning itself
    builds the model on torch's meta device)."""
    recipe = REPO / "recipes" / "quickstart.yaml"
    code = ("import contextlib, io, sys; from launcher.cli import main\n"
            "out = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n"
            "    try:\n        main(['plan', '--help'])\n    except SystemExit:\n        pass\n"
            "    codes = [main(['validate', sys.argv[1]]), main(['recipes']), main(['reference'])]\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "print(codes, out.getvalue())")
    result = subprocess.run([sys.executable, "-c", code, str(recipe)], capture_output=True, text=True, timeout=180,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("[0, 0, 0]"), result.stdout[:400]
    assert all(shown in result.stdout for shown in (": ok (", "--gpu-memory", "quickstart", "micro_batch_size"))
