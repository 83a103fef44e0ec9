"""Resuming on a different number of processes without changing the training.

A run's global batch (micro_batch_size x grad_accum x processes) decides which rows each step
reads (launcher/data.py's StepPlan), how many steps an epoch has, and the size of each update.
When a run resumes on another process count, the launcher keeps that product: it re-derives
grad_accum when the new count divides the batch evenly, and otherwise refuses, naming values that
would hold it. Runs in the same output_dir may change micro_batch_size and grad_accum for the same
reason (they are marked resumable in recipe/schema.py); this check is what keeps their product honest.
"""
from __future__ import annotations

from launcher.recipe.schema import Recipe

from launcher.errors import UserError


def saved_global_batch(state: dict, recipe: Recipe) -> int:
    """The checkpoint's global batch (checkpoints before it was recorded: the recipe's, on the count that wrote them)."""
    train = recipe.train
    return state.get("global_batch", train.micro_batch_size * train.grad_accum * state.get("world_size", 1))


def hold_global_batch(recipe: Recipe, state: dict, world: int) -> tuple[Recipe, str | None]:
    """The recipe to resume `state` with on `world` processes, and a line saying what changed (None: nothing).

    Raises UserError (exit 2, before any model loads) when no grad_accum holds the global batch.
    """
    train, saved_world = recipe.train, state.get("world_size", 1)
    batch = saved_global_batch(state, recipe)
    micro, accum = train.micro_batch_size, train.grad_accum
    moved = f"resuming on {world} process{'es' * (world != 1)} (the checkpoint was written by {saved_world})"
    readers = world // recipe.distributed.sequence_parallel  # the processes of a sequence group read one batch
    if micro * accum * readers == batch:
        return recipe, (f"{moved}: global batch {batch} = micro_batch_size {micro} x grad_accum {accum} x {readers}"
                        if world != saved_world else None)
    per_process, rest = divmod(batch, readers)
    if rest == 0 and per_process % micro == 0:
        held = recipe.model_copy(update={"train": train.model_copy(update={"grad_accum": per_process // micro})})
        return held, (f"{moved}: train.grad_accum {accum} -> {per_process // micro}, so micro_batch_size {micro} x "
                      f"grad_accum {per_process // micro} x {readers} keeps the run's global batch of {batch}")
    raise UserError(refusal(batch, readers, micro, accum))


def refusal(batch: int, world: int, micro: int, accum: int) -> str:
    """Why the global batch cannot be held, and the values (or process counts) that would hold it."""
    start = (f"train.micro_batch_size {micro} x train.grad_accum {accum} x {world} processes = {micro * accum * world}, "
             f"but this run's checkpoints have a global batch of {batch}")
    if batch % world:
        counts = [n for n in range(1, batch + 1) if batch % n == 0 and n <= max(2 * world, 8)]
        return (f"{start}, which does not split over {world} processes; resume on a process count that divides it "
                f"({', '.join(map(str, counts))}), or pass --overwrite to start fresh")
    per_process = batch // world
    pairs = [f"micro_batch_size {m} with grad_accum {per_process // m}" for m in range(1, per_process + 1)
             if per_process % m == 0][:6]
    return f"{start}; on {world} processes set {' or '.join(pairs)}, or pass --overwrite to start fresh"
