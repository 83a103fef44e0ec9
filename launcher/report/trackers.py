"""Experiment trackers through accelerate's own `log_with`: TensorBoard, MLflow, Weights & Biases.

The recipe names them (`report.trackers`); where each writes is decided here so that a run works
offline by default: TensorBoard under output_dir/tb/<project>, MLflow into a local file store in
output_dir/mlruns unless MLFLOW_TRACKING_URI names a server, W&B in offline mode under output_dir
unless WANDB_MODE says otherwise. Credentials (WANDB_API_KEY, MLFLOW_TRACKING_TOKEN, ...) are read
by the libraries from the environment; the recipe has no key for them, so they never reach the
saved recipe, metrics.jsonl or the trackers' own configuration.

After a resume from step k, TensorBoard's writer purges what an earlier attempt logged after k,
so the one run under tb/ holds exactly one value per step and tag.
"""
from __future__ import annotations

import os
from pathlib import Path

from launcher.recipe.schema import Recipe
from launcher.rundir.paths import RunDir

def accelerator_kwargs(recipe: Recipe) -> dict:
    """What the Accelerator needs to carry the recipe's trackers (nothing when there are none)."""
    if not recipe.report.trackers:
        return {}
    from accelerate.utils import ProjectConfiguration
    return {"log_with": list(recipe.report.trackers),
            "project_config": ProjectConfiguration(project_dir=recipe.output_dir, logging_dir=str(RunDir(recipe.output_dir).tensorboard))}


def flat_config(values: dict, prefix: str = "") -> dict:
    """The resolved recipe as flat scalar hyperparameters (trackers take str, int, float, bool)."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (str, int, float, bool)) else str(value)
    return flat


def start(accelerator, recipe: Recipe, resume_step: int) -> None:
    """Open the recipe's trackers on the main process; a resumed run continues after `resume_step`."""
    trackers = recipe.report.trackers
    if not trackers:
        return
    run = RunDir(Path(recipe.output_dir).resolve())
    run_dir = run.root
    name = recipe.report.project or run_dir.name
    init: dict = {}
    if "tensorboard" in trackers:
        init["tensorboard"] = {"purge_step": resume_step + 1} if resume_step else {}
    if "mlflow" in trackers and accelerator.is_main_process and not os.environ.get("MLFLOW_TRACKING_URI"):
        import mlflow
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store for offline use behind this
        mlflow.set_tracking_uri(run.mlflow.as_uri())
    if "wandb" in trackers:
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        init["wandb"] = {"dir": str(run.wandb.parent), "name": run_dir.name}  # wandb writes into dir/wandb
    if "mlflow" in trackers:
        init["mlflow"] = {"run_name": run_dir.name}
    accelerator.init_trackers(name, init_kwargs=init)  # TensorBoard: output_dir/tb/<name>; MLflow experiment; W&B project
    config = flat_config(recipe.model_dump(mode="json"))
    for tracker in accelerator.trackers:
        if tracker.name != "tensorboard":  # add_hparams would open a second TensorBoard run
            tracker.store_init_configuration(config)


def log(accelerator, record: dict) -> None:
    """One metrics.jsonl record as tracker scalars: train/loss, eval/chrf, ... at its step."""
    if not accelerator.trackers:
        return
    kind = record.get("kind", "train")
    values = {f"{kind}/{key.removeprefix(kind + '_')}": value for key, value in record.items()
              if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "time")}
    accelerator.log(values, step=record.get("step", 0))
