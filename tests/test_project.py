"""The project as a new user meets it: README commands, docs, CI, recipe reference, shipped recipes."""
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launcher.recipe.files import load_recipe
from launcher.recipe.reference import readme_with_reference

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
DOCS = sorted((REPO / "docs").glob("*.md"))
WINGS = sorted(p.parent for p in (REPO / "launcher").glob("*/__init__.py"))


def test_reference_page_matches_the_schema():
    page = (REPO / "docs" / "reference.md").read_text()
    assert readme_with_reference(page) == page, "refresh it: launcher reference --readme docs/reference.md"


def test_readme_is_a_short_path_to_the_docs():
    assert len(README.splitlines()) <= 300
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)", README))
    assert linked == {f"docs/{p.name}" for p in DOCS}, "every docs/ page is linked from the README, and no other"


def _anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_anchor(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("page", [REPO / "README.md", *DOCS], ids=lambda p: p.name)
def test_links_and_named_source_files_exist(page):
    """A moved section or module must not leave a dead link or a stale `launcher/...py` path behind."""
    text = page.read_text()
    dead = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        if not where.exists() or (anchor and where.suffix == ".md" and anchor not in _anchors(where)):
            dead.append(target)
    dead += [name for name in re.findall(r"`(launcher/[\w/]+\.py)`", text) if not (REPO / name).is_file()]
    assert not dead, f"{page.name}: {dead}"


def _listed_modules(docstring: str) -> list[str]:
    """The modules a wing's docstring lists, one per line as `name  what it holds`."""
    return re.findall(r"^([a-z_]+) {2,}\S", docstring, re.M)


def test_readme_lists_each_wing_as_its_docstring_does():
    import ast
    rows = dict(re.findall(r"^\| `(\w+)/` \| ([^|]*) \|", README, re.M))
    for wing in WINGS:
        listed = _listed_modules(ast.get_docstring(ast.parse((wing / "__init__.py").read_text())) or "")
        assert wing.name in rows, f"README's layout table lacks {wing.name}/"
        if listed and rows[wing.name] != "one module per verb":
            assert [m.strip() for m in rows[wing.name].split(",")] == listed, wing.name


def test_ci_runs_exactly_the_readme_test_command():
    test_command = re.search(r"## Tests\n\n    (.+)\n", README).group(1)
    ci_commands = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
                   if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci_commands == [test_command]


def test_readme_quickstart_runs_the_quickstart_recipe():
    quickstart = re.search(r"## Quick start.*?\n\n    ([^\n]+)\n", README, re.S).group(1)
    assert quickstart == "make quickstart"
    assert "-m launcher recipes/quickstart.yaml" in (REPO / "Makefile").read_text()


def _shell_commands(markdown: str) -> list[str]:
    """The command lines of a page: indented code blocks and sh/bash fences, comments dropped."""
    commands, fence = [], None
    for line in markdown.splitlines():
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
            continue
        if fence in ("sh", "bash", "shell") or (fence is None and line.startswith("    ")):
            line = line.strip()
            if line and not line.startswith(("#", "$")):
                commands.append(line)
    return commands


CHEAP = {"--version", "--help", "validate", "plan", "recipes", "reference"}


def _launcher_arguments(words: list[str]) -> list[str] | None:
    """What follows `launcher` or `-m launcher` in a command (after env assignments), or None."""
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        words = words[1:]
    if words and words[0] == "launcher":
        return words[1:]
    if "-m" in words and words[words.index("-m") + 1:][:1] == ["launcher"]:
        return words[words.index("-m") + 2:]
    return None


def _shipped_recipe_writing(run_dir: str) -> str:
    """The shipped recipe whose output_dir is run_dir (how the README names a finished run)."""
    for recipe in sorted((REPO / "recipes").glob("*.yaml")):
        if (yaml.safe_load(recipe.read_text()) or {}).get("output_dir") == run_dir.rstrip("/"):
            return f"recipes/{recipe.name}"
    raise AssertionError(f"no shipped recipe writes {run_dir}")


def _checks(command: str) -> list[list[str]]:
    """The launcher runs that check a README command: the command itself when it is cheap; for training,
    a launch, a Slurm submission or a finished run's verb, `validate` of the recipe it names (and
    `slurm render` with the same options for a submission)."""
    words = shlex.split(command)
    if words[0] == "make":
        assert words[1] in re.findall(r"^(\w+):", (REPO / "Makefile").read_text(), re.M), command
        made = re.search(rf"^{words[1]}:.*?\n\n", (REPO / "Makefile").read_text() + "\n\n", re.M | re.S).group(0)
        return [["validate", recipe] for recipe in re.findall(r"-m launcher (\S+\.yaml)", made)]
    if words[:2] == ["pip", "install"]:
        extras = re.findall(r"\.\[([\w,]+)\]", command)
        declared = re.findall(r"^(\w+) = \[", (REPO / "pyproject.toml").read_text(), re.M)
        assert all(e in declared for group in extras for e in group.split(",")), command
        return []
    arguments = _launcher_arguments(words)
    assert arguments, f"not a command the README test knows: {command}"
    if arguments[0] in CHEAP or arguments[:2] == ["slurm", "render"] or "--help" in arguments:
        return [arguments]
    if arguments[:2] == ["slurm", "submit"]:
        return [["validate", arguments[2]], ["slurm", "render", *arguments[2:]]]
    if arguments[0] in ("train", "preprocess", "inspect", "eval", "generate", "merge"):
        arguments = arguments[1:]
    target = arguments[0]
    overrides = [a for a in arguments[1:] if re.fullmatch(r"[\w.]+=\S+", a)]
    return [["validate", target if target.endswith(".yaml") else _shipped_recipe_writing(target), *overrides]]


RUN_IN_ORDER = """
import json, sys
from launcher.cli import main
for number, arguments in enumerate(json.loads(sys.argv[1])):
    print(f"### {number}", file=sys.stderr, flush=True)
    try:
        status = main(arguments)
    except SystemExit as stop:  # argparse refusing an option
        status = stop.code
    print(f"### status {status}", file=sys.stderr, flush=True)
"""


def test_every_readme_command_runs_as_written(tmp_path):
    """The README's commands, then the reference page's refresh command: cheap ones run as typed, in order,
    in a copy of the repository's recipes and docs (so the ones that write touch nothing here); expensive
    ones are validated. Each must exit 0, and the refresh must leave the current page as it is. One
    process runs them all through the launcher's entry point, to keep the suite fast."""
    import json
    for folder in ("recipes", "docs"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    commands = _shell_commands(README) + _shell_commands((REPO / "docs" / "reference.md").read_text())
    assert any("accelerate launch" in c for c in commands) and any("slurm submit" in c for c in commands)
    checks = [(command, arguments) for command in commands for arguments in _checks(command)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", RUN_IN_ORDER, json.dumps([a for _, a in checks])], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=600)
    reports = run.stderr.split("### ")[1:]
    assert len(reports) == 2 * len(checks), run.stderr[-3000:]
    outcomes = zip(checks, reports[0::2], reports[1::2])
    failed = [f"{command}\n  -> launcher {shlex.join(arguments)}: exit {status.split()[1]}: "
              f"{said.partition(chr(10))[2][-500:]}" for (command, arguments), said, status in outcomes
              if status.split()[1] != "0"]
    assert not failed, "\n".join(failed)
    assert (tmp_path / "docs" / "reference.md").read_text() == (REPO / "docs" / "reference.md").read_text()


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
def test_every_shipped_recipe_validates(recipe, capsys):
    """`launcher validate`: the schema, then preflight (every data row, the DeepSpeed JSON, device support)."""
    from launcher.cli import main
    assert main(["validate", str(REPO / "recipes" / recipe)]) == 0, capsys.readouterr().err
    assert Path(load_recipe(REPO / "recipes" / recipe).data.train).is_file()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project built as a wheel, as `pip install .` would install it (not the editable checkout)."""
    folder = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(folder), str(REPO)], check=True, capture_output=True)
    [built] = folder.glob("launcher-*.whl")
    return built


def test_a_built_wheel_carries_the_deepspeed_shorthands_and_sbatch_template(wheel):
    """A non-editable install must still resolve `deepspeed: zero3` and render Slurm jobs."""
    import zipfile
    packaged = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"launcher/ds_configs/{p.name}" for p in (REPO / "ds_configs").glob("*.json")}
    assert shipped and shipped <= packaged
    assert "launcher/templates/job.sbatch.tmpl" in packaged
    configs = {f"launcher/model_configs/{p.parent.name}/config.json" for p in (REPO / "launcher" / "model_configs").glob("*/config.json")}
    assert configs and configs <= packaged  # `launcher plan` resolves the real-size recipes' models offline


def test_an_installed_wheel_lists_every_shipped_recipe_and_copies_one_that_validates(wheel, tmp_path):
    """`launcher recipes` and `recipes copy` from the wheel alone: the recipes and their data ship in the package."""
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}

    def launcher(*args):
        return subprocess.run([sys.executable, "-m", "launcher", *args], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=120)
    listed = launcher("recipes")
    assert listed.returncode == 0, listed.stderr
    names = [line.split()[0] for line in listed.stdout.splitlines() if line.strip()][:-1]
    assert sorted(names) == sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
    copied = launcher("recipes", "copy", "translate-cpu", "mine")  # inherits from translate.yaml: both come along
    assert copied.returncode == 0, copied.stderr
    assert sorted(p.name for p in (tmp_path / "mine").glob("*.yaml")) == ["translate-cpu.yaml", "translate.yaml"]
    checked = launcher("validate", "mine/translate-cpu.yaml")
    assert checked.returncode == 0 and ": ok (" in checked.stdout, checked.stderr
    where = subprocess.run([sys.executable, "-c", "import launcher; print(launcher.__file__)"], capture_output=True,
                           text=True, env=env, cwd=tmp_path).stdout
    assert where.startswith(str(site)), f"not the wheel's launcher: {where}"
