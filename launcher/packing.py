"""Packing: several causal-lm examples per row, with attention and labels kept inside each example.

Why not a library: TRL's packer is the well-kept one, but TRL is not a dependency of this
project and its packer works on its own dataset columns. The hard part, confining attention,
is transformers' own: a batch that carries `position_ids` restarting at 0 for each example and
no `attention_mask` is detected as packed (`masking_utils.find_packed_sequence_indices`) and
gets a block-diagonal causal mask on sdpa and eager, and the varlen kernels on flash-attention.
"""
from __future__ import annotations

import bisect

from launcher.data import IGNORE


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of at most `capacity` tokens.

    Longest first; each item goes to the bin with the least room that still fits it (ties: the
    oldest bin), else a new bin. Deterministic, O(n log n) lookups.
    """
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (free tokens, bin index)
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        size = lengths[index]
        if size > capacity:
            raise ValueError(f"example {index} has {size} tokens, more than the packing capacity {capacity}")
        at = bisect.bisect_left(room, (size, -1))
        if at == len(room):
            bins.append([index])
            free, number = capacity - size, len(bins) - 1
        else:
            free, number = room.pop(at)
            bins[number].append(index)
            free -= size
        bisect.insort(room, (free, number))
    return bins


def pack_dataset(dataset, capacity: int):
    """A `datasets.Dataset` of packed rows: input_ids, labels and the length of each example in it.

    The first token of every example gets label -100: with the causal shift, the last token of the
    example before it would otherwise be trained to predict it.
    """
    import datasets
    columns = dataset.select_columns(["input_ids", "labels"]).to_dict()  # plain lists: row access on a Column is slow
    ids, labels = columns["input_ids"], columns["labels"]
    packed: dict[str, list] = {"input_ids": [], "labels": [], "lengths": []}
    for members in best_fit_decreasing([len(row) for row in ids], capacity):
        row_ids, row_labels = [], []
        for index in members:
            row_ids += ids[index]
            row_labels += [IGNORE] + list(labels[index][1:])
        packed["input_ids"].append(row_ids)
        packed["labels"].append(row_labels)
        packed["lengths"].append([len(ids[index]) for index in members])
    return datasets.Dataset.from_dict(packed)


def collate_packed(rows: list[dict], pad_id: int) -> dict:
    """Right-pad packed rows; position_ids restart per example (and for the padding tail).

    attention_mask marks real tokens for counting only: the loss leaves it out of the forward
    call, since transformers detects packing only when no attention_mask is given.
    """
    import torch
    width = max(len(row["input_ids"]) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        mask[i, :n] = 1
        spans = list(row["lengths"]) + ([width - n] if width > n else [])
        positions[i] = torch.cat([torch.arange(length) for length in spans])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "position_ids": positions}


def padding_efficiency(dataset, micro_batch: int) -> float:
    """Real tokens / token slots when `dataset` rows are batched `micro_batch` at a time in order (right-padded)."""
    lengths = [len(row) for row in dataset["input_ids"]]
    real = sum(lengths)
    slots = sum(max(lengths[i:i + micro_batch]) * len(lengths[i:i + micro_batch]) for i in range(0, len(lengths), micro_batch))
    return real / max(slots, 1)
