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


# The variables a process launcher sets for each process, and the least value each may have (LOCAL_RANK -1: none,
# as Hugging Face's scripts write it).
LAUNCH_VARIABLES = {"WORLD_SIZE": 1, "RANK": 0, "LOCAL_WORLD_SIZE": 1, "LOCAL_RANK": -1}


def launch_variables() -> dict[str, int]:
    """The launcher variables that are set, as numbers; one that is not a whole number, is below its least value,
    or names a rank the world does not have is refused naming it (torch and accelerate would fail on it later,
    with a traceback, or start a run of no process)."""
    found = {}
    for name, least in LAUNCH_VARIABLES.items():
        text = os.environ.get(name)
        if text is None:
            continue
        if not text.strip().lstrip("-").isdigit() or int(text) < least:
            raise UserError(f"{name}={text!r}: must be a whole number of at least {least}; a process launcher "
                            f"(accelerate launch, torchrun, srun) sets it: unset it, or start the run with one")
        found[name] = int(text)
    for size, rank in (("WORLD_SIZE", "RANK"), ("LOCAL_WORLD_SIZE", "LOCAL_RANK")):
        if size in found and found.get(rank, 0) >= found[size]:
            raise UserError(f"{rank}={found[rank]} with {size}={found[size]}: ranks run from 0 to {found[size] - 1}; "
                            f"unset both, or start the run with a process launcher")
    if found.get("LOCAL_RANK", -1) >= 0 and not os.environ.get("MASTER_ADDR"):  # accelerate would open a process group
        raise UserError(f"LOCAL_RANK={found['LOCAL_RANK']} is set but MASTER_ADDR is not, so no process group can start; "
                        f"unset LOCAL_RANK for one process, or start the run with a process launcher (which sets both)")
    return found


def launched_world_size() -> int:
    """The number of processes the launcher (torchrun, accelerate, Slurm's srun) says it started."""
    return launch_variables().get("WORLD_SIZE", 1)


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
    return torch.cuda.get_device_capability(max(0, launch_variables().get("LOCAL_RANK", 0)) % count) if count else (0, 0)


def native_bf16(capability: tuple[int, int]) -> bool:
    """bf16 in hardware from Ampere (8.0) on; V100 (7.0) and T4 (7.5) only emulate it, slowly
    (`torch.cuda.is_bf16_supported()` says True there, and reads the current device, not this rank's)."""
    return tuple(capability) >= (8, 0)
