"""Waits that outlast the training group's timeout: one process works while the others wait.

The training process group (NCCL on GPUs) fails any collective after distributed.timeout_minutes
(10 by default). The main process alone can take far longer: the first tokenisation, or writing
and reading back an export (a 70B model is about 141 GB each way). The others therefore wait on
a barrier of a separate gloo group with its own timeout, never on the training group.
"""
from __future__ import annotations

from contextlib import contextmanager
from datetime import timedelta

EXPORT_WAIT_MINUTES = 360.0  # writing and re-reading a 70B export on a slow shared filesystem


def wait_group_options(minutes: float) -> dict:
    """How the waiting group is made: gloo (a CPU barrier, on GPU runs too) with its own timeout."""
    return {"backend": "gloo", "timeout": timedelta(minutes=minutes)}


@contextmanager
def wait_group(accelerator, minutes: float):
    """A group of every process for long waits, destroyed afterwards; None when there is one process."""
    if accelerator.num_processes == 1:
        yield None
        return
    import torch.distributed as dist
    group = dist.new_group(**wait_group_options(minutes))
    try:
        yield group
    finally:
        dist.destroy_process_group(group)


@contextmanager
def main_first(accelerator, minutes: float):
    """The main process runs the block first, then the others; all leave together, so the next
    training collective finds every rank ready."""
    with wait_group(accelerator, minutes) as group:
        if group is None:
            yield
            return
        if not accelerator.is_main_process:
            meet(group)
        yield
        if accelerator.is_main_process:
            meet(group)
        meet(group)


def meet(group) -> None:
    """Every process waits here for the others, on `group` from `wait_group` (nothing with one process)."""
    if group is not None:
        import torch.distributed as dist
        dist.barrier(group=group)
