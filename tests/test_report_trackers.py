"""Experiment trackers through accelerate's log_with, provenance, and a report that survives a resume.

One short run logs to TensorBoard, MLflow (local file store) and W&B (offline), is cut back to its
step-2 checkpoint and resumed, as after a crash between a checkpoint and the end. No network.
"""
from __future__ import annotations

import json
import shutil

import pytest

from support import tiny_recipe, write_recipe

SECRET = "sk-test-never-written-anywhere"


@pytest.fixture(scope="module")
def resumed_run(tiny_model, tmp_path_factory):
    from launcher.cli import main
    folder = tmp_path_factory.mktemp("tracked")
    recipe = write_recipe(tiny_recipe(tiny_model, folder / "run", train={"max_steps": 4, "save_every": 2, "micro_batch_size": 2,
                                                                         "grad_accum": 1},
                                      eval={"samples": 2, "generate_rows": 2, "max_new_tokens": 4},
                                      data={"max_eval_rows": 4},
                                      report={"trackers": ["tensorboard", "mlflow", "wandb"], "project": "journey"}),
                          folder / "recipe.yaml")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_API_KEY", SECRET)
        env.setenv("MLFLOW_TRACKING_TOKEN", SECRET)
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        env.delenv("WANDB_MODE", raising=False)
        assert main([str(recipe)]) == 0
        run = folder / "run"
        shutil.rmtree(run / "final")
        shutil.rmtree(run / "checkpoints" / "step-4")  # the crash: steps 3 and 4 were logged but not checkpointed
        assert main([str(recipe)]) == 0
    return run


def test_tensorboard_holds_one_value_per_step_and_tag_after_a_resume(resumed_run):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    runs = EventMultiplexer().AddRunsFromDirectory(str(resumed_run / "tb")).Reload()
    assert runs.Runs() and list(runs.Runs()) == ["journey"]
    scalars = runs.GetAccumulator("journey").Tags()["scalars"]
    assert {"train/loss", "train/lr", "eval/loss", "eval/chrf"} <= set(scalars)
    assert [e.step for e in runs.Scalars("journey", "train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in runs.Scalars("journey", "eval/loss")] == [0, 4]


def test_mlflow_file_store_holds_the_run_metrics(resumed_run):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=(resumed_run / "mlruns").resolve().as_uri())
    [experiment] = [e for e in client.search_experiments() if e.name == "journey"]
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
    assert len(runs) == 2  # the first attempt and the resumed one
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert steps == [3, 4]
    assert runs[0].data.params["train.max_steps"] == "4"


def test_wandb_offline_run_is_written_under_the_run_directory(resumed_run):
    offline = sorted((resumed_run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2
    [events] = offline[-1].glob("*.wandb")
    assert b"train/loss" in events.read_bytes()


def test_secrets_stay_in_the_environment(resumed_run):
    for path in resumed_run.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".json", ".jsonl", ".md", ".txt", ".yml", ".wandb"):
            assert SECRET.encode() not in path.read_bytes(), path


def test_provenance_records_every_start(resumed_run):
    starts = json.loads((resumed_run / "provenance.json").read_text())
    assert len(starts) == 2
    for start in starts:
        assert start["world_size"] == 1 and start["devices"] and start["packages"]["torch"]
        assert start["packages"]["launcher"] and "command" in start


def test_the_report_of_a_resumed_run_keeps_the_before_samples(resumed_run):
    report = (resumed_run / "report.md").read_text()
    assert report.count("- before: ") == 2 and "- before: ''" not in report
