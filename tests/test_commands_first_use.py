"""The command line a new user meets: --version, the reference, suggestions, run directories as arguments,
`generate`, `recipes copy`, and piping into `head`."""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys

import pytest

from support import REPO, tiny_recipe, write_recipe

from launcher import __version__
from launcher.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out.strip() == f"launcher {__version__}"


def test_the_reference_lists_every_schema_field_with_its_allowed_values():
    from launcher.recipe.reference import fields, reference_markdown
    table = reference_markdown()
    keys = [key for key, _ in fields()]
    assert all(f"| `{key}` |" in table for key in keys)
    assert {"distributed.fsdp.sharding", "distributed.fsdp.cpu_offload", "report.trackers"} <= set(keys)
    rows = {line.split("|")[1].strip(" `"): line.split("|")[2].strip() for line in table.splitlines()[2:]}
    assert rows["model.task"] == "causal-lm / seq2seq / classification"
    assert rows["data.format"] == ("instruction / chat / translation / completion / text / qa / classification / "
                                   "preference / chat-preference")
    assert rows["distributed.strategy"] == "ddp / deepspeed / fsdp" and rows["train.schedule"].startswith("linear / cosine")


def test_reference_into_a_pipe_closed_early_exits_quietly():
    """`launcher reference | head -3`: the reader leaves after three lines; no BrokenPipeError traceback."""
    read, write = os.pipe()
    fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, 4096)  # smaller than the reference, so writing outlives the reader
    process = subprocess.Popen([sys.executable, "-m", "launcher", "reference"], stdout=write, stderr=subprocess.PIPE,
                               cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    os.close(write)
    with os.fdopen(read) as reader:
        head = [reader.readline() for _ in range(3)]
    _, errors = process.communicate(timeout=300)
    assert head[0].startswith("| key | allowed |")
    assert process.returncode == 0 and errors.decode() == ""


@pytest.mark.parametrize("override, hint", [("lora.rank=8", "did you mean 'r'?"), ("train.learning_rate=1e-4", "did you mean 'lr'?"),
                                            ("train.gradient_accumulation_steps=2", "did you mean 'grad_accum'?")])
def test_names_from_other_tools_get_a_suggestion(override, hint, capsys):
    assert main(["validate", str(REPO / "recipes" / "quickstart.yaml"), override]) == 2
    assert hint in capsys.readouterr().err


def test_recipes_copy_brings_the_data_so_the_copy_validates_anywhere(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["recipes", "copy", "quickstart", "mine"]) == 0
    assert (tmp_path / "mine" / "data" / "bible_en_es" / "train.jsonl").is_file()
    assert main(["validate", "mine/quickstart.yaml"]) == 0
    assert main(["recipes", "copy", "quickstart", "mine"]) == 2  # never over an existing file
    assert main(["recipes", "copy", "quickstrat", "other"]) == 2
    assert "no shipped recipe 'quickstrat'" in capsys.readouterr().err


def test_a_missing_extra_is_named_in_one_line(tmp_path, capsys):
    from launcher.preflight.checks import needed_extras
    from launcher.recipe.files import load_recipe
    recipe = load_recipe(REPO / "recipes" / "qlora.yaml", ["report.trackers=[wandb]", "distributed.strategy=ddp"])
    assert [extra for _, _, extra in needed_extras(recipe)] == ["qlora", "gguf", "wandb"]


@pytest.fixture(scope="module")
def trained_run(tiny_model, tmp_path_factory):
    """A tiny LoRA run trained hard on 8 verses, so its answers leave the base model's behind."""
    folder = tmp_path_factory.mktemp("generate")
    recipe = tiny_recipe(tiny_model, folder / "run", train={"max_steps": 12, "micro_batch_size": 4, "grad_accum": 1, "lr": 3e-2,
                                                            "schedule": "constant", "warmup_steps": 0},
                         lora={"r": 8, "alpha": 16, "dropout": 0.0}, data={"max_train_rows": 8, "max_eval_rows": 2},
                         eval={"samples": 0, "generate_rows": 0})
    assert main([str(write_recipe(recipe, folder / "recipe.yaml"))]) == 0
    return folder / "run"


def test_generate_answers_with_the_trained_adapter_in_the_recipe_format(trained_run, capsys):
    import json
    from launcher.commands.generate import answers
    first = json.loads((REPO / "recipes" / "data" / "bible_en_es" / "train.jsonl").read_text().splitlines()[0])
    tuned, = answers(trained_run, "final", [first["en"]], max_new_tokens=8)
    base, = answers(trained_run, "base", [first["en"]], max_new_tokens=8)
    assert tuned != base
    assert main(["generate", str(trained_run), "--prompt", first["en"], "--max-new-tokens", "8"]) == 0
    assert f"> {first['en']}\n{tuned}\n" in capsys.readouterr().out


def test_eval_and_generate_take_a_run_directory(trained_run, tmp_path, monkeypatch):
    from launcher.preflight.checks import recipe_or_run
    moved = tmp_path / "moved"
    import shutil
    shutil.copytree(trained_run, moved)
    monkeypatch.chdir(tmp_path)
    recipe = recipe_or_run(str(moved), ["eval.samples=1"])
    assert recipe.output_dir == str(moved) and recipe.eval.samples == 1
    assert main(["generate", "moved", "--checkpoint", "best", "--prompt", "x"]) == 2  # no eval metrics, so no best/
