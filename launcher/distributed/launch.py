"""What the process launcher set up: how many processes, how to start them, which precision and backend.

On CPU, accelerate picks no process-group backend and counts one process even when several
started; naming gloo fixes the count, and the world-size and gradient-sync checks turn the
remaining silent cases into errors. torch is imported only where a GPU must be asked.
"""
from __future__ import annotations

import os
import socket

from launcher.errors import UserError
from launcher.recipe.schema import Recipe

CPU_LAUNCH = ("`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N -m launcher R` "
              "or `torchrun --nproc_per_node N -m launcher R` (on GPUs: `accelerate launch --num_processes N -m launcher R`)")
ENV_FIX = "the recipe's distributed section decides; drop that setting from the accelerate config (or the --use_* flag)"


def launched_world_size() -> int:
    """The number of processes the launcher (torchrun, accelerate, Slurm's srun) says it started."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched() -> bool:
    """True when a process launcher set the world size (else `launched_world_size` only assumes one process)."""
    return "WORLD_SIZE" in os.environ


def launch_hint(world: int) -> str:
    return CPU_LAUNCH.replace(" N ", f" {world} ")


def mixed_precision(recipe: Recipe, on_gpu: bool) -> str:
    choice = recipe.train.precision
    if choice == "auto":
        return "bf16" if on_gpu and native_bf16(this_gpu_capability()) else "no"
    if not on_gpu and choice == "fp16":
        raise UserError("train.precision: fp16 needs a GPU; use fp32 or bf16 on CPU")
    return {"fp32": "no"}.get(choice, choice)


def accelerate_env(name: str) -> str:
    """A setting `accelerate launch` passed down from its config or flags, lower-cased ('' when unset)."""
    return os.environ.get(name, "").lower()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def this_gpu_capability() -> tuple[int, int]:
    """The compute capability of this process's GPU (LOCAL_RANK), read before the device is set."""
    import torch
    count = torch.cuda.device_count()
    return torch.cuda.get_device_capability(int(os.environ.get("LOCAL_RANK", "0")) % count) if count else (0, 0)


def native_bf16(capability: tuple[int, int]) -> bool:
    """bf16 in hardware from Ampere (8.0) on; V100 (7.0) and T4 (7.5) only emulate it, slowly
    (`torch.cuda.is_bf16_supported()` says True there, and reads the current device, not this rank's)."""
    return tuple(capability) >= (8, 0)
