"""DeepSpeed ZeRO full fine-tuning resumed on another process count, through DeepSpeed's universal checkpoints.

A ZeRO checkpoint holds each rank's flat slice of the fp32 weights and optimiser state, laid out
for the process count that wrote it. DeepSpeed's converter (`deepspeed.checkpoint.ds_to_universal`)
rewrites those slices as one file per parameter and state, which an engine started with
`"checkpoint": {"load_universal": true}` slices again for its own count. Accelerate has no wrapper,
so the launcher drives it: the main process converts once into `universal/` inside the checkpoint
(written under a temporary name and renamed when complete, so a crash never leaves a half
conversion that a later resume would trust), the other ranks wait, and every rank loads from it.
A second resume from the same checkpoint reuses the conversion; pruning the checkpoint removes it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from launcher.checkpoint.layouts import AccelerateLayout
from launcher.errors import UserError

UNIVERSAL_FOLDER = "universal"
ENGINE_TAG = "pytorch_model"  # the folder accelerate's save_state gives the first DeepSpeed engine's checkpoint
CONVERTER = "deepspeed.checkpoint.ds_to_universal"


def converter_command(source: Path, target: Path) -> list[str]:
    """The converter run on one checkpoint; --inject_missing_state because accelerate's engines do not record the
    (optional, tensor-parallel) layout information the converter otherwise insists on."""
    workers = max(1, min(8, os.cpu_count() or 1))
    return [sys.executable, "-m", CONVERTER, "--input_folder", str(source), "--output_folder", str(target),
            "--inject_missing_state", "--num_extract_workers", str(workers), "--num_merge_workers", str(max(1, workers // 2))]


def convert(checkpoint: Path) -> bool:
    """Write `checkpoint/universal` unless an earlier resume did; True when this call converted.

    Besides the engine's folder, accelerate's small files (schedule, each rank's RNG) are copied,
    so the universal folder loads through accelerate's load_state like the checkpoint itself.
    """
    target = checkpoint / UNIVERSAL_FOLDER
    if target.is_dir():
        return False
    staging = checkpoint / f"{UNIVERSAL_FOLDER}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    done = subprocess.run(converter_command(checkpoint / ENGINE_TAG, staging / ENGINE_TAG), capture_output=True, text=True)
    if done.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise UserError(f"converting {checkpoint} to a DeepSpeed universal checkpoint failed ({CONVERTER}: {last[0]}); "
                        "resume with the process count that wrote it, or pass --overwrite to start fresh")
    for item in checkpoint.iterdir():
        if item.is_file() and item.suffix in (".bin", ".pkl"):
            shutil.copy2(item, staging / item.name)
    staging.rename(target)
    return True


class UniversalLayout(AccelerateLayout):
    """Saves as accelerate does; loads a checkpoint written by another process count from its universal conversion.
    The engine must have been built with load_universal (strategies.DeepSpeed does when it is told of the resume)."""

    def load(self, folder: Path) -> None:
        accelerator, problem = self.accelerator, None
        if accelerator.is_main_process:
            try:
                converted = convert(folder)
                print(f"{'converted' if converted else 'reusing the conversion of'} {folder} to a DeepSpeed universal "
                      f"checkpoint ({folder / UNIVERSAL_FOLDER}), which loads on any process count")
            except UserError as exc:
                problem = exc
        accelerator.wait_for_everyone()  # every rank reaches this, so a failed conversion does not leave the others waiting
        if problem is not None:
            raise problem
        if not (folder / UNIVERSAL_FOLDER).is_dir():
            raise UserError(f"{folder / UNIVERSAL_FOLDER} is missing on this node after the main process converted it: "
                            "checkpoints must be on a file system every node shares")
        super().load(folder / UNIVERSAL_FOLDER)
