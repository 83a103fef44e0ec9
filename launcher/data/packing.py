"""Packing: several causal-lm examples per row, with attention and labels kept inside each example.

Why not a library: TRL's packer is the well-kept one, but TRL is not a dependency of this
project and its packer works on its own dataset columns. The hard part, confining attention,
is transformers' own: a batch that carries `position_ids` restarting at 0 for each example and
no `attention_mask` is detected as packed (`masking_utils.find_packed_sequence_indices`) and
gets a block-diagonal causal mask on sdpa and eager. Flash-attention infers the boundaries from
`position_ids` only when a batch has one row (`modeling_flash_attention_utils`); with more, the
collator passes them itself as `cu_seq_lens_*`/`max_length_*` over the flattened batch (`varlen`).
"""

from __future__ import annotations

import bisect

from launcher.recipe.formats import IGNORE


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
    example before it would otherwise be trained to predict it. Rows are moved as Arrow buffers
    (one `take` and new offsets), never as Python lists, so packing costs little next to tokenising.
    """
    import datasets
    import numpy as np
    import pyarrow as pa

    if len(dataset) == 0:  # nothing survived tokenising: the run's batch check reports it
        return datasets.Dataset.from_dict({"input_ids": [], "labels": [], "lengths": []})
    table = dataset.select_columns(["input_ids", "labels"]).with_format("arrow")[:]
    ids, labels = (table.column(name).combine_chunks() for name in ("input_ids", "labels"))
    lengths = ids.value_lengths().to_numpy(zero_copy_only=False)
    bins = best_fit_decreasing(lengths.tolist(), capacity)
    order = pa.array(np.fromiter((i for members in bins for i in members), dtype=np.int64, count=len(lengths)))
    member_lengths = lengths[order.to_numpy()]
    example_offsets = np.concatenate([[0], np.cumsum(member_lengths)])  # where each example starts, in packed order
    bin_sizes = np.fromiter((len(members) for members in bins), dtype=np.int64, count=len(bins))
    first_members = np.concatenate([[0], np.cumsum(bin_sizes)])  # each row's first example; also its lengths' offsets
    flat_ids = ids.take(order).flatten()
    flat_labels = labels.take(order).flatten().to_numpy(zero_copy_only=False).copy()
    flat_labels[example_offsets[:-1]] = IGNORE
    row_offsets = pa.array(example_offsets[first_members], type=pa.int32())
    length_offsets = pa.array(first_members, type=pa.int32())
    packed = pa.table({
        "input_ids": pa.ListArray.from_arrays(row_offsets, flat_ids),
        "labels": pa.ListArray.from_arrays(row_offsets, pa.array(flat_labels, type=flat_ids.type)),
        "lengths": pa.ListArray.from_arrays(length_offsets, pa.array(member_lengths, type=pa.int64())),
    })
    return datasets.Dataset(packed)


VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")  # flash-attention's sequence bounds


def varlen_attention(attn_implementation: str | None) -> bool:
    """Whether packed batches must carry their sequence boundaries: the flash-attention kernels (2, 3,
    or from the kernels hub) read them; sdpa and eager build a block-diagonal mask from position_ids."""
    return bool(attn_implementation) and "flash" in attn_implementation


def collate_packed(rows: list[dict], pad_id: int, varlen: bool = False) -> dict:
    """Right-pad packed rows; position_ids restart per example (and for the padding tail).

    attention_mask marks real tokens for counting only: the loss leaves it out of the forward
    call, since transformers detects packing only when no attention_mask is given. With `varlen`,
    the cumulative example lengths over the rows laid end to end (padding tails are spans of
    their own) and the longest example, as flash-attention's varlen kernel takes them.
    """
    import torch
    width = max(len(row["input_ids"]) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    every_span = []
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        mask[i, :n] = 1
        spans = list(row["lengths"]) + ([width - n] if width > n else [])
        positions[i] = torch.cat([torch.arange(length) for length in spans])
        every_span += spans
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "position_ids": positions}
    if varlen:
        bounds = torch.tensor([0, *every_span], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        longest = int(max(every_span))
        batch.update(cu_seq_lens_q=bounds, cu_seq_lens_k=bounds.clone(), max_length_q=longest, max_length_k=longest)
    return batch


def padding_efficiency(dataset, micro_batch: int) -> float:
    """Real tokens / token slots when `dataset` rows are batched `micro_batch` at a time in order (right-padded)."""
    lengths = [len(row) for row in dataset["input_ids"]]
    real = sum(lengths)
    slots = sum(max(lengths[i:i + micro_batch]) * len(lengths[i:i + micro_batch]) for i in range(0, len(lengths), micro_batch))
    return real / max(slots, 1)
