"""Free space checked before each checkpoint and export, so a full disk never costs the last good one.

A checkpoint is written under a temporary name and older ones are pruned only after it is
complete (launcher/checkpoint.py), so refusing to start a write that cannot fit keeps every
checkpoint already on disk. The estimate is the newest complete checkpoint's size when there is
one (it measures the real layout), otherwise what the run holds: trainable weights and
optimiser state for a checkpoint, the weights for an export.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from launcher.errors import UserError

MARGIN = 1.1  # a little over the estimate: file headers, the tokenizer, the state files


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def existing_ancestor(path: Path) -> Path:
    """The nearest folder that exists (the run directory may not have been created yet)."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return path


def human(size: float) -> str:
    unit = "B"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024:
            break
        size /= 1024
    return f"{size:.1f} {unit}"


def check_free_space(target: Path, needed: int, what: str) -> None:
    """Raise UserError, before anything is written, when the filesystem holding `target` cannot take `needed` bytes."""
    where = existing_ancestor(target)
    free = shutil.disk_usage(where).free
    if free < needed * MARGIN:
        raise UserError(f"not enough disk space for the {what}: it needs about {human(needed * MARGIN)} in {where}, "
                        f"which has {human(free)} free. Nothing was overwritten: the last good checkpoint is kept. "
                        f"Free space there (or lower train.keep_last) and run the same command to resume")


def checkpoint_estimate(previous: Path | None, held_bytes: int) -> int:
    """Bytes the next checkpoint will take: the previous one's size, else what the run holds."""
    return folder_bytes(previous) if previous is not None else held_bytes


def run_bytes(params, full: bool, with_optimizer: bool) -> int:
    """What a run writes: all weights (full fine-tuning) or the fp32 trainable ones, and optionally the optimiser state."""
    weights = params.weight_bytes if full else 4 * params.trainable
    return weights + (params.optimizer_bytes if with_optimizer else 0)
