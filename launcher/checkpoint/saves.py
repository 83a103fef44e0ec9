"""Checkpoints that survive crashes, exact resume, and the final export.

What a checkpoint holds is its layout (launcher/layouts.py, chosen by the strategy). Making it
atomic and picking the last good one is this module: each checkpoint is written under a temporary
name and renamed only once complete, with `trainer_state.json` written last inside it.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from launcher.checkpoint import diskspace

from launcher.checkpoint import verify
from launcher.model.adapters import export_kwargs
from launcher.rundir.paths import RunDir

STATE_FILE = "trainer_state.json"
def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    return [(step, path) for step, path in RunDir(run_dir).step_folders() if (path / STATE_FILE).is_file()]


def last_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(accelerator, layout, run_dir: Path, step: int, state: dict, keep_last: int, held_bytes: int = 0) -> Path:
    """Write checkpoints/step-N atomically and prune to the newest `keep_last`; `layout` (launcher/layouts.py)
    decides what goes inside. Refused before writing when the disk cannot hold it (`held_bytes`: the estimate
    when no checkpoint exists yet)."""
    folder = RunDir(run_dir).step_folder(step)
    diskspace.check_free_space(run_dir, diskspace.checkpoint_estimate(last_checkpoint(run_dir), held_bytes),
                               f"checkpoint of step {step}")
    staging = RunDir.staging(folder)
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    layout.save(staging)
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


def load_checkpoint(layout, folder: Path) -> dict:
    """Restore model, optimiser, scheduler and RNG from `folder`; returns its trainer state."""
    layout.load(folder)
    return load_state_file(folder)


def export_final(accelerator, strategy, model, tokenizer, run_dir: Path, name: str = "final", needed_bytes: int = 0) -> Path:
    """A save_pretrained folder that transformers or PEFT load directly.

    The state dict comes from the strategy, which gathers ZeRO-3 and FSDP shards; a PEFT model
    picks its adapter out of that full dict, so a sharded run never saves an empty adapter.
    """
    target = RunDir(run_dir).export(name)  # final/, or best/ for the best eval so far
    diskspace.check_free_space(run_dir, needed_bytes, f"export to {target}")
    staging = RunDir.staging(target)
    state_dict = strategy.export_state_dict(accelerator, model)
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        unwrapped = strategy.unwrap(accelerator, model)  # PiSSA/OLoRA adapters are converted to plain LoRA on the original base
        conversion = export_kwargs(unwrapped, run_dir)  # PiSSA/OLoRA: may replace state_dict with the model's own
        expected = verify.before_export(unwrapped, state_dict, converted=bool(conversion))  # refuses non-finite weights
        unwrapped.save_pretrained(staging, **{"state_dict": state_dict, "safe_serialization": True, **conversion})
        tokenizer.save_pretrained(staging)
        verify.after_export(staging, expected)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    accelerator.wait_for_everyone()
    return target
