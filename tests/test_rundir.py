"""The run directory: `RunDir` names what a run writes, `--overwrite` removes exactly those files and never
the user's, a resume may change what the schema marks resumable, and `launcher eval` tokenises no train row.

One tiny run is trained in this process, resumed with a tracker added, evaluated, and overwritten with the
user's notes in its logs/; the rules on folders that are not runs are checked on folders made by hand.
"""
from __future__ import annotations

import json
import os

import pytest
from support import tiny_recipe, write_recipe

from launcher.cli import main
from launcher.errors import UserError
from launcher.rundir.directory import plan_run_dir, resumable_keys
from launcher.rundir.paths import RunDir

LOSS_ONLY = {"samples": 0, "generate_rows": 0, "metric": "loss"}  # evals without generation: seconds, not minutes
OLD = (1_000_000_000, 1_000_000_000)  # the discarded run's files are stamped with this mtime, to be found if they survive
LONG = " ".join(["and the word of the people went out into the land"] * 12)  # far over data.max_length 64


def refusing(train_file) -> list[str]:
    """Overrides under which tokenising `train_file` is refused (every row dropped), the eval rows' truncation not."""
    return [f"data.train={train_file}", "data.skipped_share_warn=0.99", "data.skipped_share_refuse=true"]


def files(root) -> dict[str, int]:
    """Every file under root (relative path -> mtime in ns)."""
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, root)] = os.stat(path).st_mtime_ns
    return found


@pytest.fixture(scope="module")
def journey(tiny_model, tmp_path_factory):
    """Train 2 steps; resume to 3 adding TensorBoard; `launcher eval` with a train file no row of which
    tokenises; then --overwrite with a user's file in logs/. Returns what each step left."""
    folder = tmp_path_factory.mktemp("rundir")
    run = RunDir(folder / "run")
    recipe = write_recipe(tiny_recipe(tiny_model, run.root, train={"max_steps": 2, "micro_batch_size": 2, "grad_accum": 1},
                                      eval=LOSS_ONLY), folder / "r.yaml")
    seen = {"first": main([str(recipe)])}
    seen["locked_after_first"] = run.lock.exists()  # the run has ended; this process goes on
    seen["resumed"] = main([str(recipe), "train.max_steps=3", "report.trackers=[tensorboard]"])
    seen["tensorboard"] = sorted(p.name for p in run.tensorboard.rglob("events.out.tfevents.*"))
    seen["resume_record"] = [json.loads(line) for line in run.rank_log(0).read_text().splitlines() if "resumed_from" in line]
    untokenisable = folder / "long.jsonl"  # every row left with no target token within max_length
    untokenisable.write_text("".join(json.dumps({"en": f"{i} {LONG}", "es": "hola"}) + "\n" for i in range(8)))
    seen["untokenisable"] = untokenisable
    seen["eval"] = main(["eval", str(run.root), *refusing(untokenisable)])
    seen["eval_json"] = run.eval_results.is_file()
    run.logs.joinpath("notes.txt").write_text("mine")  # the user's, in a folder the launcher shares
    seen["before"] = files(run.root)
    for name in seen["before"]:
        os.utime(run.root / name, ns=OLD)
    seen["overwrite"] = main([str(recipe), "train.lr=1e-3", "--overwrite"])
    seen["after"] = files(run.root)
    return run, seen


def test_a_finished_run_frees_its_output_dir_while_the_process_goes_on(journey):
    """The launcher called as a library (a notebook, these tests): the live lock goes when the run ends, not at exit,
    so another process may resume the folder at once."""
    _, seen = journey
    assert seen["first"] == 0 and seen["locked_after_first"] is False


def test_adding_a_tracker_on_resume_is_accepted_and_the_run_continues(journey):
    run, seen = journey
    assert "report.trackers" in resumable_keys()
    assert seen["first"] == 0 and seen["resumed"] == 0
    assert [r["resumed_from"] for r in seen["resume_record"]] == [str(run.step_folder(2))]
    assert seen["tensorboard"], "the tracker added on resume wrote nothing"


def test_eval_of_a_run_dir_tokenises_no_train_row(journey, tiny_model):
    from transformers import AutoTokenizer

    from launcher.data.encode import load_eval_data, tokenise_train
    from launcher.recipe.files import load_run
    run, seen = journey
    assert seen["eval"] == 0 and seen["eval_json"]
    recipe = load_run(run.root, refusing(seen["untokenisable"]))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    with pytest.raises(UserError, match="data.skipped_share_refuse"):  # so eval would have failed had it tokenised one
        tokenise_train(recipe, tokenizer, None)
    evaluation, _ = load_eval_data(recipe, tokenizer)
    assert evaluation.rows == recipe.data.max_eval_rows


def test_overwrite_keeps_the_users_file_in_logs_and_no_file_of_the_discarded_run(journey):
    run, seen = journey
    assert seen["overwrite"] == 0
    assert (run.logs / "notes.txt").read_text() == "mine"
    survivors = [name for name, stamp in seen["after"].items() if stamp == OLD[1]]
    assert survivors == [os.path.join("logs", "notes.txt")], survivors
    discarded = {"eval.json", "provenance.json", "checkpoints/step-3/trainer_state.json"} | \
                {name for name in seen["before"] if name.startswith("tb/")}
    assert discarded <= set(seen["before"]) and not (discarded - {"provenance.json"}) & set(seen["after"])
    assert len(json.loads(run.provenance.read_text())) == 1  # the new run's start alone
    assert [json.loads(line)["step"] for line in run.metrics.read_text().splitlines()
            if json.loads(line)["kind"] == "train"] == [1, 2]


# ---------------------------------------------------------------- folders made by hand

def make(root, names: dict[str, str]) -> None:
    for name, text in names.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


LAUNCHER_FILES = {"recipe.yaml": "{}\n", "metrics.jsonl": "", "report.md": "", "loss.png": "", "provenance.json": "[]",
                  "eval.json": "{}", "checkpoints/step-2/trainer_state.json": "{}", "checkpoints/step-4.tmp/x": "",
                  "final/adapter_config.json": "{}", "best.tmp/x": "", "merged/config.json": "{}", "adapter-init/a": "",
                  "tb/journey/events": "", "mlruns/0/meta.yaml": "", "wandb/offline-run/x": "", "logs/rank-0.jsonl": "",
                  "logs/rank-1.jsonl": "", "run.lock.stale-17": ""}
LAUNCH_FILES = {"slurm/job.sbatch": "#!/bin/bash\n", "slurm/launcher-7.out": "log\n", "preprocessed/fingerprint.json": "{}"}
USER_FILES = {"notes.md": "top level", "logs/mine.txt": "in a shared folder", "checkpoints/README": "about them",
              "slurm/my-script.sh": "echo"}


def test_clear_removes_every_launcher_file_and_keeps_the_users_and_the_launch_files(tmp_path):
    run = RunDir(tmp_path)
    make(tmp_path, {**LAUNCHER_FILES, **LAUNCH_FILES, **USER_FILES})
    assert sorted(str(p.relative_to(tmp_path)) for p in run.foreign()) == sorted(USER_FILES)
    assert plan_run_dir(tmp_path, {}, overwrite=True).resume_from is None  # a run, with the user's files in it: overwritable
    run.clear()
    assert sorted(files(tmp_path)) == sorted({**LAUNCH_FILES, **USER_FILES})
    make(tmp_path, {"logs/rank-0.jsonl": ""})
    (tmp_path / "logs" / "mine.txt").unlink()
    run.clear()
    assert not run.logs.exists(), "a shared folder the launcher's files alone were in goes with them"


def test_a_folder_of_launch_files_alone_starts_fresh_and_one_with_results_but_no_recipe_needs_overwrite(tmp_path):
    make(tmp_path, {**LAUNCH_FILES, "logs/rank-0.jsonl": ""})
    fresh = plan_run_dir(tmp_path, {}, overwrite=False)
    assert fresh.resume_from is None and fresh.replaced == [os.path.join("logs", "rank-0.jsonl")]
    make(tmp_path, {"final/adapter_config.json": "{}"})
    with pytest.raises(UserError, match="no recipe.yaml"):
        plan_run_dir(tmp_path, {}, overwrite=False)
    assert plan_run_dir(tmp_path, {}, overwrite=True).resume_from is None


def test_a_folder_that_is_not_a_run_is_refused_even_with_overwrite(tmp_path, tiny_model, capsys):
    mine = tmp_path / "mine"
    make(mine, {"thesis.tex": "precious", "logs/rank-0.jsonl": "{}"})
    recipe = write_recipe(tiny_recipe(tiny_model, mine, train={"max_steps": 1}), tmp_path / "r.yaml")
    assert main([str(recipe), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "not a launcher run" in err and "thesis.tex" in err, err
    assert sorted(files(mine)) == ["logs/rank-0.jsonl", "thesis.tex"]
