"""The Accelerator for a recipe, and guards against launches that silently are not distributed.

On CPU, accelerate picks no process-group backend and counts one process even when torchrun or
`accelerate launch --multi_gpu` started several; naming gloo explicitly fixes the count (see
ENVIRONMENT.md), and the world-size check turns the remaining silent cases into an error.
"""
from __future__ import annotations

import os
from datetime import timedelta

from launcher.recipe import Recipe, UserError

RENDEZVOUS_TIMEOUT = timedelta(minutes=10)


def launched_world_size() -> int:
    """The number of processes the launcher (torchrun, accelerate, Slurm's srun) says it started."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def mixed_precision(recipe: Recipe, on_gpu: bool) -> str:
    choice = recipe.train.precision
    if choice == "auto":
        import torch
        return "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "no"
    if choice != "fp32" and not on_gpu and choice == "fp16":
        raise UserError("train.precision: fp16 needs a GPU; use fp32 or bf16 on CPU")
    return {"fp32": "no"}.get(choice, choice)


def make_accelerator(recipe: Recipe):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    on_gpu = torch.cuda.is_available()
    backend = None if on_gpu or launched_world_size() == 1 else "gloo"
    handlers = [InitProcessGroupKwargs(backend=backend, timeout=RENDEZVOUS_TIMEOUT)]
    accelerator = Accelerator(gradient_accumulation_steps=recipe.train.grad_accum, cpu=not on_gpu,
                              mixed_precision=mixed_precision(recipe, on_gpu), step_scheduler_with_optimizer=False,
                              kwargs_handlers=handlers)
    check_world_size(accelerator.num_processes)
    return accelerator


def check_world_size(seen: int) -> None:
    """Refuse a launch whose process count differs from what its launcher announced."""
    expected = launched_world_size()
    if seen != expected:
        raise UserError(
            f"the launcher started {expected} processes but training sees {seen}: they would train independently. "
            "On CPU use `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N -m launcher R` "
            "or `torchrun --nproc_per_node N -m launcher R`")
