"""The project as a new user meets it: README commands, CI, recipe reference, shipped recipes."""
import re
from pathlib import Path

import pytest

from launcher.recipe.files import load_recipe
from launcher.recipe.reference import readme_with_reference

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_readme_reference_matches_the_schema():
    assert readme_with_reference(README) == README, "run: python -m launcher reference --readme README.md"


def test_ci_runs_exactly_the_readme_test_command():
    test_command = re.search(r"## Tests\n\n    (.+)\n", README).group(1)
    ci_commands = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
                   if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci_commands == [test_command]


def test_readme_quickstart_runs_the_quickstart_recipe():
    quickstart = re.search(r"## Quick start.*?\n\n    ([^\n]+)\n", README, re.S).group(1)
    assert quickstart == "make quickstart"
    assert "-m launcher recipes/quickstart.yaml" in (REPO / "Makefile").read_text()


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
def test_every_shipped_recipe_validates(recipe, capsys):
    """`launcher validate`: the schema, then preflight (every data row, the DeepSpeed JSON, device support)."""
    from launcher.cli import main
    assert main(["validate", str(REPO / "recipes" / recipe)]) == 0, capsys.readouterr().err
    assert Path(load_recipe(REPO / "recipes" / recipe).data.train).is_file()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project built as a wheel, as `pip install .` would install it (not the editable checkout)."""
    import subprocess
    import sys
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
    import os
    import subprocess
    import sys
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
