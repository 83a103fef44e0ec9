"""Checkpoints that survive crashes, exact resume, and the final export.

What a checkpoint holds is its layout (launcher/layouts.py, chosen by the strategy). Making it
atomic and picking the last good one is this module: each checkpoint is written under a temporary
name and renamed only once complete, with `trainer_state.json` written last inside it. That file lists
every other file's size and checksum, so a resume checks the checkpoint as the save did and passes
over a damaged one (a file deleted, truncated or changed since) for the newest intact one.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from launcher.checkpoint import diskspace, verify
from launcher.distributed import waiting
from launcher.model.adapters import export_kwargs
from launcher.rundir.paths import RunDir

STATE_FILE = "trainer_state.json"
FILES_KEY = "files"  # in the state file: every other file of the checkpoint, [bytes, crc32], as saved


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    return [(step, path) for step, path in RunDir(run_dir).step_folders() if (path / STATE_FILE).is_file()]


def last_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(accelerator, layout, run_dir: Path, step: int, state: dict, keep_last: int, held_bytes: int = 0) -> Path:
    """Write checkpoints/step-N atomically and prune to the newest `keep_last`; `layout` (launcher/layouts.py)
    decides what goes inside. Refused before writing when the disk cannot hold it (`held_bytes`: the estimate
    when no checkpoint exists yet); a write the filesystem refuses midway is one line, the partial save removed."""
    folder = RunDir(run_dir).step_folder(step)
    needed = diskspace.checkpoint_estimate(last_checkpoint(run_dir), held_bytes)
    what = f"checkpoint of step {step}"
    diskspace.check_free_space(run_dir, needed, what)
    staging = RunDir.staging(folder)
    with diskspace.refused_writes(folder, needed, what, staging if accelerator.is_main_process else None):
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        with waiting.wait_group(accelerator, waiting.EXPORT_WAIT_MINUTES) as group:  # main-process I/O outlasts NCCL's timeout
            layout.save(staging)
            waiting.meet(group)
            if accelerator.is_main_process:
                verify.checkpoint(staging)  # read back before it counts: a bad save never replaces a good one
                _write_state(staging, {**state, FILES_KEY: verify.file_record(staging, STATE_FILE)})
                if folder.is_dir() and not folder.is_symlink():
                    shutil.rmtree(folder)
                elif folder.exists() or folder.is_symlink():  # a stray file or link where the step's folder goes
                    folder.unlink()
                staging.rename(folder)
                _prune(run_dir, step, keep_last)
            waiting.meet(group)
    return folder


def _write_state(folder: Path, state: dict) -> None:
    """The state file, last: its list of every other file's size and checksum is what resume checks."""
    with open(folder / STATE_FILE, "w") as handle:
        json.dump(state, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _prune(run_dir: Path, step: int, keep_last: int) -> None:
    """Keep the newest `keep_last` up to `step`; a later (damaged, passed-over) one is replaced when training reaches it."""
    for _, old in [found for found in checkpoints(run_dir) if found[0] <= step][:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def damage(folder: Path) -> str | None:
    """Why a checkpoint cannot be trusted (its state file unreadable, a file missing, truncated or changed); None when whole."""
    if not folder.is_dir():
        return "is not a folder"
    try:
        state = load_state_file(folder)
    except FileNotFoundError:
        return f"{STATE_FILE} is missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"{STATE_FILE} is {'empty' if _empty(folder / STATE_FILE) else 'not valid JSON'}"
    problem = state_problem(state, folder)
    if problem:
        return f"{STATE_FILE}: {problem}"
    return verify.damage(folder, state.get(FILES_KEY) or {})  # saved before the list was kept: the state alone


# What a state file's keys hold when present (older checkpoints lack some); a count is at least 1.
STATE_TYPES = {"step": int, "total_steps": int, "world_size": int, "global_batch": int, "strategy": str, "best": dict,
               "data": dict, FILES_KEY: dict}
COUNTS = ("step", "total_steps", "world_size", "global_batch")


def state_problem(state, folder: Path) -> str | None:
    """What in a checkpoint's state file resume could not use (a wrong type, a step not the folder's, a file entry
    that is not [bytes, crc32]); None when it can. Such a checkpoint is passed over as damaged."""
    if not isinstance(state, dict) or "step" not in state:
        return "holds no step"
    for key, kind in STATE_TYPES.items():
        if key in state and (not isinstance(state[key], kind) or isinstance(state[key], bool)):
            return f"{key} is {json.dumps(state[key])[:40]}, not {'a number' if kind is int else 'an object' if kind is dict else 'text'}"
    bad = next((key for key in COUNTS if key in state and state[key] < 1), None)
    if bad:
        return f"{bad} is {state[bad]}, not a count"
    if folder.name != f"step-{state['step']}":
        return f"step is {state['step']}, but the folder is {folder.name}"
    entry = next((name for name, value in state.get(FILES_KEY, {}).items() if not (isinstance(value, list) and
                  len(value) == 2 and all(isinstance(n, int) and not isinstance(n, bool) for n in value))), None)
    if entry is not None:
        return f"{FILES_KEY}.{entry} is not [bytes, crc32]"
    best = state.get("best", {})
    if not all(isinstance(best.get(key), (int, float, type(None))) for key in ("value", "step")) or \
            not all(isinstance(value, dict) for value in state.get("data", {}).values()):
        return "best or data is not as saved"
    return None


def _empty(path: Path) -> bool:
    return path.is_file() and path.stat().st_size == 0


def newest_intact(run_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint whose files are those saved, and each newer one passed over with why."""
    passed_over = []
    for _, folder in reversed(RunDir(run_dir).step_folders()):
        reason = damage(folder)
        if reason is None:
            return folder, passed_over
        passed_over.append((folder, reason))
    return None, passed_over


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
    needed = needed_bytes + diskspace.tokenizer_bytes(tokenizer)
    diskspace.check_free_space(run_dir, needed, f"export to {target}")
    staging = RunDir.staging(target)
    with waiting.wait_group(accelerator, waiting.EXPORT_WAIT_MINUTES) as group:  # the others wait out the main's I/O
        state_dict = strategy.export_state_dict(accelerator, model)
        if accelerator.is_main_process:
            with diskspace.refused_writes(target, needed, f"export to {target}", staging):
                shutil.rmtree(staging, ignore_errors=True)
                unwrapped = strategy.unwrap(accelerator, model)  # PiSSA/OLoRA adapters are converted to plain LoRA on the original base
                conversion = export_kwargs(unwrapped, run_dir)  # PiSSA/OLoRA: may replace state_dict with the model's own
                expected = verify.before_export(unwrapped, state_dict, converted=bool(conversion))  # refuses non-finite weights
                unwrapped.save_pretrained(staging, **{"state_dict": state_dict, "safe_serialization": True, **conversion})
                tokenizer.save_pretrained(staging)
                verify.after_export(staging, expected)
                shutil.rmtree(target, ignore_errors=True)
                staging.rename(target)
        waiting.meet(group)
    return target
