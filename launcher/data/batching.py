"""Tokenised rows -> batches: padding (collate), which rows each rank reads at each step (StepPlan), and the
eval batches every rank runs in step."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator

from launcher.data.packing import collate_packed, varlen_attention
from launcher.data.preference import REFERENCE, REJECTED
from launcher.errors import UserError
from launcher.recipe.formats import IGNORE
from launcher.recipe.schema import Recipe
from launcher.recipe.values import warmup_fits


def train_collate(recipe: Recipe, tokenizer, pack: bool = True) -> Callable[[list[dict]], dict]:
    """Packed rows carry position_ids; preference pairs are two sequences each; others are padded per task."""
    if recipe.data.packing and pack:
        return partial(collate_packed, pad_id=tokenizer.pad_token_id,
                       varlen=varlen_attention(recipe.model.attn_implementation))
    if recipe.objective == "dpo":
        return partial(collate_pairs, pad_id=tokenizer.pad_token_id)
    return partial(collate, pad_id=tokenizer.pad_token_id, task=recipe.model.task, multiple=recipe.distributed.sequence_parallel)


def collate(rows: list[dict], pad_id: int, task: str = "causal-lm", multiple: int = 1) -> dict:
    """Right-pad to the longest row, rounded up to a multiple of `multiple` (the sequence split: each rank takes an
    equal slice); padding is masked out of attention and loss.

    For rows of one example each (eval rows always; train rows unless packed: `load_datasets` picks).
    Labels are padded to their own width (seq2seq targets differ in length from the prompt);
    a classification batch's labels are one class id per row.
    """
    import torch
    width = -(-max(len(row["input_ids"]) for row in rows) // multiple) * multiple
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    label_width = max(len(row["labels"]) for row in rows)
    labels = torch.full((len(rows), label_width), IGNORE, dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, : len(row["labels"])] = torch.tensor(row["labels"])
        mask[i, :n] = 1
    if task == "classification":
        labels = labels[:, 0]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_pairs(rows: list[dict], pad_id: int) -> dict:
    """Preference pairs as one batch of 2n sequences: the n chosen, then the n rejected, padded together
    so policy and reference each score a whole micro-batch in one forward pass. Rows that carry precomputed
    reference log-probabilities (full fine-tuning) give them as REFERENCE, in the same order."""
    import torch
    rows = list(rows)
    sequences = [{"input_ids": row[key + "input_ids"], "labels": row[key + "labels"]}
                 for key in ("", REJECTED) for row in rows]
    batch = collate(sequences, pad_id)
    if rows and REFERENCE in rows[0]:
        batch[REFERENCE] = torch.tensor([row[REFERENCE][side] for side in (0, 1) for row in rows], dtype=torch.float32)
    return batch


@dataclass
class StepPlan:
    """Which rows each rank reads at each optimiser step.

    Step s of epoch e takes rows perm_e[s*G:(s+1)*G] with G = micro * accum * world; micro-batch a
    of rank r is the slice starting at (a*world + r)*micro. So one process with micro*world rows
    per micro-batch sees exactly the same global batches as `world` processes, and a resumed run
    can jump straight to any step.
    """

    rows: int
    micro: int
    accum: int
    world: int
    rank: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world

    @property
    def steps_per_epoch(self) -> int:
        return self.rows // self.global_batch

    def total_steps(self, epochs: float | None, max_steps: int | None, warmup_steps: int = 0) -> int:
        """Optimiser steps of the run; a warmup longer than the steps the epochs give is refused (before the model loads)."""
        if max_steps is not None:
            return max_steps
        steps = max(1, math.ceil(epochs * self.steps_per_epoch))
        try:
            warmup_fits(warmup_steps, steps, f"train.epochs {epochs:g} x {self.steps_per_epoch} per epoch of {self.rows} rows")
        except ValueError as exc:
            raise UserError(str(exc)) from None
        return steps

    def micro_batches(self, step: int) -> list[list[int]]:
        import torch
        epoch, within = divmod(step, self.steps_per_epoch)
        order = torch.randperm(self.rows, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        start = within * self.global_batch
        return [order[start + (a * self.world + self.rank) * self.micro:][: self.micro] for a in range(self.accum)]


def eval_batches(rows: int, size: int, world: int, rank: int) -> Iterator[tuple[list[int], bool]]:
    """Eval rows in order, batch i going to rank i % world.

    Every rank runs the same number of forward passes (sharded models need all ranks in each
    one); a rank with no batch left repeats the first with `real` False, and its loss is ignored.
    """
    starts = list(range(0, rows, size))
    for first in range(0, len(starts), world):
        index = first + rank
        real = index < len(starts)
        start = starts[index] if real else starts[0]
        yield list(range(start, min(start + size, rows))), real
