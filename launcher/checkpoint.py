"""Checkpoints that survive crashes, exact resume, and the final export.

Accelerate's save_state/load_state carry model, optimiser, scheduler and every process's RNG
under DDP, DeepSpeed and FSDP alike. What it does not do is be atomic or pick the last good
checkpoint; that is this module: each checkpoint is written under a temporary name and renamed
only once complete, with `trainer_state.json` written last inside it.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from launcher import verify
from launcher.adapters import export_kwargs
from launcher.recipe import UserError

STATE_FILE = "trainer_state.json"
RUN_FILES = ("checkpoints", "final", "best", "metrics.jsonl", "report.md", "loss.png", "recipe.yaml", "tb", "logs")  # what a run writes
# Keys of the recipe that may change between a run and its resumption.
RESUMABLE_CHANGES = {("train", "max_steps"), ("train", "epochs"), ("train", "eval_every"), ("train", "save_every"),
                     ("distributed", "num_processes"), ("train", "log_every"), ("train", "keep_last"), ("eval", "samples"), ("report", "tensorboard"),
                     ("train", "skip_nonfinite")}


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    found = []
    for path in (run_dir / "checkpoints").glob("step-*"):
        step = path.name.removeprefix("step-")
        if step.isdigit() and (path / STATE_FILE).is_file():
            found.append((int(step), path))
    return sorted(found)


def last_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1][1] if found else None


def _changed_keys(old: dict, new: dict, prefix: tuple = ()) -> list[tuple]:
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_keys(a, b, prefix + (key,))
        elif a != b:
            changed.append(prefix + (key,))
    return changed


def _holds_only_launch_files(run_dir: Path) -> bool:
    """True for what exists before a run's first recipe.yaml: the job script and Slurm log that
    `launcher slurm submit` writes to slurm/, and per-rank logs/."""
    for entry in run_dir.iterdir():
        if entry.name == "slurm" and (entry / "job.sbatch").is_file():
            continue
        if entry.name == "logs" and entry.is_dir() and all(f.name.startswith("rank-") for f in entry.iterdir()):
            continue
        return False
    return True


def plan_run_dir(run_dir: Path, resolved: dict, overwrite: bool) -> Path | None:
    """Decide, before any model loads, whether this run starts fresh or resumes; never clobber silently."""
    if overwrite and run_dir.exists():
        return None
    previous = run_dir / "recipe.yaml"
    if not run_dir.exists() or _holds_only_launch_files(run_dir):
        return None
    if not previous.is_file():
        raise UserError(f"output_dir {run_dir} exists and is not a launcher run; choose another output_dir or pass --overwrite")
    import yaml
    changed = [k for k in _changed_keys(yaml.safe_load(previous.read_text()) or {}, resolved) if k not in RESUMABLE_CHANGES]
    if changed:
        names = ", ".join(".".join(k) for k in changed[:5])
        raise UserError(f"output_dir {run_dir} holds a run with a different recipe ({names} changed); "
                        f"resume with the same recipe, choose another output_dir, or pass --overwrite to start fresh")
    return last_checkpoint(run_dir)


def clear_run_dir(run_dir: Path) -> None:
    """--overwrite: remove what a previous run wrote (only the launcher's own files, and never slurm/:
    the running job's script and log are there)."""
    for name in RUN_FILES:
        target = run_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def keep_trainable_only(model_names: set[str]):
    """A save_state pre-hook: adapter runs checkpoint only what trains, not the frozen base."""
    def hook(models, weights, output_dir):
        for index, state in enumerate(weights):
            weights[index] = {k: v for k, v in state.items() if k in model_names}
    return hook


def save_checkpoint(accelerator, run_dir: Path, step: int, state: dict, keep_last: int) -> Path:
    """Write checkpoints/step-N atomically and prune to the newest `keep_last`."""
    folder = run_dir / "checkpoints" / f"step-{step}"
    staging = folder.with_name(folder.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        verify.checkpoint(staging)  # read back before it counts: a bad save never replaces a good one
        with open(staging / STATE_FILE, "w") as handle:
            json.dump(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
        for _, old in checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return folder


def load_state_file(folder: Path) -> dict:
    return json.loads((folder / STATE_FILE).read_text())


def load_checkpoint(accelerator, folder: Path, strategy) -> dict:
    """Restore model, optimiser, scheduler and RNG from `folder`; returns its trainer state."""
    accelerator.load_state(str(folder), **strategy.load_state_kwargs())
    return load_state_file(folder)


def export_final(accelerator, strategy, model, tokenizer, run_dir: Path, name: str = "final") -> Path:
    """A save_pretrained folder that transformers or PEFT load directly.

    The state dict comes from the strategy, which gathers ZeRO-3 and FSDP shards; a PEFT model
    picks its adapter out of that full dict, so a sharded run never saves an empty adapter.
    """
    target = run_dir / name  # final/, or best/ for the best eval so far
    staging = target.with_name(f"{name}.tmp")
    state_dict = strategy.export_state_dict(accelerator, model)
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        unwrapped = strategy.unwrap(accelerator, model)  # PiSSA/OLoRA adapters are converted to plain LoRA on the original base
        conversion = export_kwargs(unwrapped, run_dir)
        expected = verify.before_export(unwrapped, state_dict, converted=bool(conversion))  # refuses non-finite weights
        unwrapped.save_pretrained(staging, state_dict=state_dict, safe_serialization=True, **conversion)
        tokenizer.save_pretrained(staging)
        verify.after_export(staging, expected)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    accelerator.wait_for_everyone()
    return target
