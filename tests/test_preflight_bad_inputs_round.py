"""Bad inputs, a further round by class: recipe keys the run would ignore or could not reach, YAML that expands or
refers to itself, data files in another encoding, templates without the row's text, classifiers of one class, the
process launcher's variables, caches that cannot be written, numeric CLI options, Slurm options, and damaged
checkpoints and run files. Each is refused in one line naming the key, file, row, variable or option (exit 2, no
traceback, output_dir as it was), before any model loads.

Recipe and data cases run in-process through `main`, as validate and as train (the corpus and its runner are
test_preflight_bad_inputs_more's); environment cases run validate in a fresh process (no torch: about a second).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launcher.checkpoint import saves, verify
from launcher.cli import main
from launcher.errors import UserError
from launcher.recipe.files import load_recipe, resolved_yaml
from launcher.rundir.directory import plan_run_dir
from test_preflight_bad_inputs_more import CLASSIFY, TRANSLATION, Case, build, jsonl, labelled, pairs, snapshot

REPO = Path(__file__).resolve().parents[1]
TEXT = "\n".join(json.dumps(row) for row in pairs()) + "\n"
LAUGHS = "".join(f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 8))


def recipe_cases() -> list[Case]:
    """Keys the run would not read, or whose values it could not reach; YAML that is empty, refers to itself, or
    expands past any recipe."""
    base = "model: {path: MODEL}\ndata: {train: t.jsonl, format: translation, fields: {source: en, target: es}}\n" \
           "train: {max_steps: 1, micro_batch_size: 2}\noutput_dir: OUT\n"
    t = {"t.jsonl": jsonl(pairs())}
    return [
        Case("samples-without-eval-data", "eval.samples: applies only when data.eval or data.eval_fraction is set", t,
             TRANSLATION, {"eval": {"samples": 2}}),
        Case("generate-rows-without-eval-data", "eval.generate_rows: applies only when data.eval or data.eval_fraction",
             t, TRANSLATION, {"eval": {"generate_rows": 8}}),
        Case("eval-batch-without-eval-data", "train.eval_batch_size: applies only when data.eval or data.eval_fraction",
             t, TRANSLATION, {"train": {"max_steps": 1, "eval_batch_size": 4}}),
        Case("warmup-past-max-steps", "train.warmup_steps 3 is more than the run's 1 steps (train.max_steps)", t,
             TRANSLATION, {"train": {"max_steps": 1, "warmup_steps": 3}}),
        Case("epochs-with-max-steps", "train.epochs: applies only with train.max_steps null (this recipe has 1)", t,
             TRANSLATION, {"train": {"max_steps": 1, "epochs": 3}}),
        Case("home-of-no-user", "key 'output_dir': there is no user 'no_such_user_here'", t, TRANSLATION,
             {"output_dir": "~no_such_user_here/run"}),
        Case("long-value-shown-cut", "key 'train.lr': Input should be a valid number (got [0, 1, 2, 3, 4, 5, 6, 7, ...])",
             t, TRANSLATION, {"train": {"max_steps": 1, "lr": list(range(5000))}}),
        Case("empty-recipe", "recipe.yaml: holds no keys (empty, or only comments)", t, raw=b""),
        Case("comments-only-recipe", "recipe.yaml: holds no keys", t, text="# model: {path: x}\n"),
        Case("alias-inside-itself", "key 'lora.target_modules[0]': an alias (*name) refers to a node it is inside", t,
             text=base + "lora: {target_modules: &m [*m]}\n"),
        Case("aliases-expanding", "expands to more than 100000 values (aliases repeated inside aliases)", t,
             text=base + "freeze:\n  x0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join("  " + line + "\n" for line in LAUGHS.splitlines())),
        Case("yaml-no-read-as-false", "key 'data.source_lang': Input should be a valid string (got False); YAML reads "
             "unquoted yes/no/on/off as booleans", t, {**TRANSLATION, "source_lang": False}),
        Case("empty-section", "key 'lora': Input should be a valid dictionary or instance of LoraSection (got None); an "
             "empty section: give it keys, or remove it for the defaults", t, TRANSLATION, {"lora": None}),
        Case("preprocessed-dir-a-file", "data.preprocessed_dir ", t, {**TRANSLATION, "preprocessed_dir": "t.jsonl"}),
        Case("same-source-twice", "data.train[1]: the same source as data.train[0]", t,
             {**TRANSLATION, "train": [{"path": "t.jsonl"}, {"path": "t.jsonl"}]}),
    ]


def data_cases() -> list[Case]:
    """Data files in an encoding that is not UTF-8 as a whole, templates that leave the row out, one class."""
    classify = {"model": {"task": "classification"}, "method": "full"}
    return [
        Case("jsonl-utf16", "t.jsonl: saved as UTF-16 text (it starts with bytes ff fe 7b 00)",
             {"t.jsonl": TEXT.encode("utf-16")}, TRANSLATION),
        Case("jsonl-utf16-without-mark", "t.jsonl: saved as UTF-16 or UTF-32 text", {"t.jsonl": TEXT.encode("utf-16-le")},
             TRANSLATION),
        Case("csv-utf32", "t.csv: saved as UTF-32 text", {"t.csv": "en,es\nhola,hello\n".encode("utf-32")}, TRANSLATION),
        Case("txt-utf16-big-endian", "n.txt: saved as UTF-16 text", {"n.txt": b"\xfe\xff" + "a note\n".encode("utf-16-be")},
             {"format": "text", "fields": {}}),
        Case("nul-in-a-row", "t.jsonl:2: not valid JSON (Invalid control character at character 10)",
             {"t.jsonl": jsonl(pairs(1)) + b'{"en": "a\x00b", "es": "x"}\n'}, TRANSLATION),
        Case("prompt-template-without-source", "data.prompt_template: has no {source}, so every row would get the same prompt",
             {"t.jsonl": jsonl(pairs())}, {**TRANSLATION, "prompt_template": "Translate from {source_lang}:"}),
        Case("qa-template-without-question", "data.qa_template: has no {question}",
             {"q.jsonl": jsonl([{"question": "q", "answer": "a"}] * 4)}, {"format": "qa", "qa_template": "{context}Answer:"}),
        Case("fewer-rows-than-a-batch", "data.train: 6 rows is less than one global batch (micro_batch_size x grad_accum = 8",
             {"t.jsonl": jsonl(pairs())}, TRANSLATION, {"train": {"max_steps": 1, "micro_batch_size": 4, "grad_accum": 2}}),
        Case("one-class-classifier", "l.jsonl: every row's label is 'good'; a classifier needs at least two classes",
             {"l.jsonl": labelled(["good"] * 6)}, CLASSIFY, classify),
    ]


CASES = recipe_cases() + data_cases()
RUNS = [(case, verb) for case in CASES for verb in ("validate", "train")]


@pytest.mark.parametrize("case,verb", RUNS, ids=[f"{verb}-{case.name}" for case, verb in RUNS])
def test_refused_in_one_line_naming_where(tmp_path, capsys, case, verb):
    recipe, output_dir = build(tmp_path, case)
    before = snapshot(output_dir)
    assert main([verb, str(recipe), *case.argv]) == 2
    err = capsys.readouterr().err
    assert case.expected in err, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert snapshot(output_dir) == before


def test_weights_of_another_shape_than_the_config_are_refused_before_the_load(tmp_path, capsys):
    """transformers finds [vocab, hidden] differing from config.json only as it loads (a RuntimeError traceback)."""
    recipe, _ = build(tmp_path, Case("model", "", {"t.jsonl": jsonl(pairs())}, TRANSLATION))
    model = tmp_path / "model"
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10, "hidden_size": 8}))
    header = json.dumps({"model.embed_tokens.weight": {"dtype": "F32", "shape": [10, 4], "data_offsets": [0, 160]}}).encode()
    (model / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(160))
    (model / "vocab.json").write_text("{}")
    assert main(["validate", str(recipe)]) == 2
    assert "model.embed_tokens.weight is 10 x 4, but config.json gives vocab_size 10 and hidden size 8" in capsys.readouterr().err


# ---------------------------------------------------------------- the environment a process starts in

ENVIRONMENTS = [
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc': must be a whole number of at least 1"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0': must be a whole number of at least 1"),
    ({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, "RANK='x': must be a whole number of at least 0"),
    ({"RANK": "5", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, "RANK=5 with WORLD_SIZE=2: ranks run from 0 to 1"),
    ({"LOCAL_RANK": "0"}, "LOCAL_RANK=0 is set but MASTER_ADDR is not, so no process group can start"),
    ({"HF_HOME": "/proc/launcher-test/hf"}, "the datasets cache (HF_HOME) /proc/launcher-test/hf/datasets: cannot be made"),
    ({"HF_DATASETS_CACHE": "FILE"}, "the datasets cache (HF_DATASETS_CACHE) "),
]


@pytest.mark.parametrize("env,expected", ENVIRONMENTS, ids=[" ".join(env) for env, _ in ENVIRONMENTS])
def test_a_launcher_variable_or_cache_the_run_cannot_use_is_one_line(tmp_path, env, expected):
    recipe, _ = build(tmp_path, Case("env", "", {"t.jsonl": jsonl(pairs())}, TRANSLATION))
    env = {key: str(recipe) if value == "FILE" else value for key, value in env.items()}
    launched = {key: value for key, value in os.environ.items()
                if key not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")}
    done = subprocess.run([sys.executable, "-m", "launcher", "validate", str(recipe)], capture_output=True, text=True,
                          env={**launched, "PYTHONPATH": str(REPO), **env})
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and expected in done.stderr, done.stderr


def test_ctrl_c_while_the_modules_import_is_one_line_and_130(tmp_path):
    """`launcher train` spends its first seconds importing torch (before main's try): Ctrl-C there was a traceback."""
    import signal
    import time
    recipe, _ = build(tmp_path, Case("ctrl-c", "", {"t.jsonl": jsonl(pairs())}, TRANSLATION))
    started = subprocess.Popen([sys.executable, "-m", "launcher", "train", str(recipe)], stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    time.sleep(0.5)
    started.send_signal(signal.SIGINT)
    err = started.communicate(timeout=120)[1]
    assert started.returncode == 130 and err.strip() == "interrupted", err


# ---------------------------------------------------------------- command-line options

@pytest.mark.parametrize("argv,expected", [
    (["plan", "R", "--gpus", "0"], "argument --gpus: must be at least 1, got 0"),
    (["plan", "R", "--nodes", "-1"], "argument --nodes: must be at least 1, got -1"),
    (["plan", "R", "--gpu-memory", "nan"], "argument --gpu-memory: must be a finite number above 0, got nan"),
    (["generate", "RUN", "--prompt", "hi", "--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1"),
    (["inspect", "R", "-n", "-1"], "argument -n/--examples: must be at least 0, got -1"),
    (["train", "R", "--overwrite", "--allow-data-change"], "argument --allow-data-change: not allowed with argument --overwrite"),
])
def test_an_option_out_of_range_or_in_conflict_is_refused_by_the_parser(tmp_path, capsys, argv, expected):
    """Not read as the default (`--gpus 0` was the recipe's count), nor a traceback (`--max-new-tokens -5`), nor one
    of two flags silently ignored (a fresh start has no checkpoint whose data could have changed)."""
    argv = [str(tmp_path / part) if part in ("R", "RUN") else part for part in argv]
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2 and expected in capsys.readouterr().err


@pytest.mark.parametrize("argv,expected", [
    (["recipes", "copy", "quickstart", "/proc/launcher-test/q.yaml"], "recipes copy: DEST /proc/launcher-test: cannot be made"),
    (["recipes", "copy", "quickstart", "FILE/q.yaml"], "recipe.yaml: is a file, not a folder; choose another DEST"),
    (["preprocess", "R", "data.preprocessed_dir=/proc/launcher-test"], "data.preprocessed_dir /proc/launcher-test: cannot be made"),
    (["preprocess", "FOLDER"], "recipe file is a folder, not a file"),
    (["generate", "FOLDER", "--file", "FOLDER"], "generate --file: FOLDER is a folder, not a file"),
    (["generate", "FOLDER", "--file", "WIDE"], "generate --file: WIDE: byte 0xff at offset 0 is not UTF-8"),
])
def test_a_destination_or_input_a_verb_cannot_use_is_one_line(tmp_path, capsys, argv, expected):
    """Each was a traceback (FileNotFoundError, NotADirectoryError, UnicodeDecodeError) or 'not found' for a folder."""
    recipe, _ = build(tmp_path, Case("verbs", "", {"t.jsonl": jsonl(pairs())}, TRANSLATION))
    (tmp_path / "wide.txt").write_bytes("a prompt\n".encode("utf-16"))
    names = {"R": str(recipe), "FILE": str(recipe), "FOLDER": str(tmp_path), "WIDE": str(tmp_path / "wide.txt")}
    argv = [names.get(part.split("/")[0], part.split("/")[0]) + part[len(part.split("/")[0]):] for part in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected.replace("FOLDER", str(tmp_path)).replace("WIDE", str(tmp_path / "wide.txt")) in err, err
    assert err.count("\n") == 1


@pytest.mark.parametrize("option,expected", [
    (["--port", "70000"], "port must be 1 to 65535, got 70000"),
    (["--cpus-per-task", "0"], "cpus_per_task must be at least 1, got 0"),
    (["--time", "two hours"], "time must be one word"),
    (["--time", "2h"], "time must be minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS, got '2h'"),
    (["--partition", "gpu debug"], "partition must be one word (letters, digits and ._,:+-), got 'gpu debug'"),
])
def test_a_slurm_option_sbatch_would_misread_is_refused_before_rendering(tmp_path, capsys, option, expected):
    recipe, _ = build(tmp_path, Case("slurm", "", {"t.jsonl": jsonl(pairs())}, TRANSLATION))
    assert main(["slurm", "render", str(recipe), "--nodes", "1", "--gpus-per-node", "0", *option]) == 2
    captured = capsys.readouterr()
    assert expected in captured.err and captured.err.count("\n") == 1 and "#SBATCH" not in captured.out


# ---------------------------------------------------------------- damaged checkpoints and run files

def checkpoint(folder: Path, **changes) -> Path:
    """checkpoints/step-N with one file and the state file save_checkpoint writes, `changes` applied to the state."""
    step_folder = folder / "checkpoints" / "step-2"
    step_folder.mkdir(parents=True)
    (step_folder / "trainable.pt").write_bytes(b"weights")
    state = {"step": 2, "total_steps": 4, "world_size": 1, "global_batch": 2, "strategy": "ddp",
             "best": {"metric": "eval_loss", "value": None, "step": None, "greater_is_better": False}, "data": {},
             saves.FILES_KEY: verify.file_record(step_folder, saves.STATE_FILE)}
    (step_folder / saves.STATE_FILE).write_text(json.dumps({**state, **changes}))
    return step_folder


@pytest.mark.parametrize("changes,expected", [
    ({}, None),
    ({"step": "2"}, 'step is "2", not a number'),
    ({"step": -1}, "step is -1, not a count"),
    ({"step": 10**6}, "step is 1000000, but the folder is step-2"),
    ({"world_size": "one"}, 'world_size is "one", not a number'),
    ({"global_batch": 0}, "global_batch is 0, not a count"),
    ({"best": "x"}, 'best is "x", not an object'),
    ({"best": {"value": "high"}}, "best or data is not as saved"),
    ({"data": 5}, "data is 5, not an object"),
    ({"files": "x"}, 'files is "x", not an object'),
    ({"files": {"trainable.pt": [7]}}, "files.trainable.pt is not [bytes, crc32]"),
    ({"strategy": True}, "strategy is true, not text"),
])
def test_a_state_file_of_wrong_types_makes_its_checkpoint_damaged_not_a_traceback(tmp_path, changes, expected):
    found = saves.damage(checkpoint(tmp_path, **changes))
    assert found == (f"{saves.STATE_FILE}: {expected}" if expected else None)


def test_a_file_where_a_step_folder_goes_is_damaged_not_a_traceback(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step-3").write_text("x")
    assert saves.newest_intact(tmp_path) == (None, [(tmp_path / "checkpoints" / "step-3", "is not a folder")])


@pytest.mark.parametrize("damage,expected", [
    ("recipe", "its recipe.yaml is not valid YAML ("),
    ("recipe-list", "its recipe.yaml is not a mapping"),
    ("metrics", "metrics.jsonl:2: not a JSON record"),
])
def test_a_damaged_run_file_is_refused_before_training_not_after(tmp_path, damage, expected):
    """The run's recipe.yaml and metrics.jsonl are read when deciding to resume: a damaged metrics line was found
    by the final report, after every step had run."""
    recipe_path, run = build(tmp_path, Case("run", "", {"t.jsonl": jsonl(pairs())}, TRANSLATION))
    recipe = load_recipe(recipe_path)
    run.mkdir()
    (run / "recipe.yaml").write_text({"recipe": "a: [b\n  c: : d\n", "recipe-list": "- a\n"}.get(damage, resolved_yaml(recipe)))
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n{not json\n{"kind": "train", "step": 2}\n')
    checkpoint(run)
    with pytest.raises(UserError, match=re.escape(expected)):
        plan_run_dir(run, yaml.safe_load(resolved_yaml(recipe)), overwrite=False)
