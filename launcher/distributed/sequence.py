"""Ulysses sequence parallelism (DeepSpeed's ALST, switched on through accelerate's ParallelismConfig).

The engines do the parallel part: accelerate hands the model to DeepSpeed with a sequence group,
and DeepSpeed's `UlyssesSPAttentionHF` all-to-alls each attention layer's heads for sequence, so
every rank attends over the whole row while holding only its slice of it. What stays the
launcher's is the data side, kept exact against one process:

- every rank of a sequence group reads the same rows (DeepSpeed's groups are consecutive ranks),
  so the step plan runs over the data-parallel groups, not the processes (`data_parallel`);
- each rank keeps an equal slice of every collated row (`split_batch`): the next-token targets are
  shifted before the split (the target of a slice's last position is the first token of the next
  rank's slice), prompt and padding targets stay masked, and position_ids stay global;
- the loop divides the step's summed loss by the target count over all ranks, as it does for data
  parallelism, and multiplies it by the count the engine divides the summed gradients by
  (`averaged_over`), so each target weighs the same as on one process.

Packing is refused by preflight (launcher/distributed/mesh.py): the split attention sees one causal
mask over the whole row, so packed examples would attend to each other.
"""
from __future__ import annotations

from launcher.distributed.deepspeed_config import zero_section
from launcher.errors import UserError
from launcher.recipe.formats import IGNORE
from launcher.recipe.schema import Recipe


def data_parallel(recipe: Recipe, world: int, rank: int) -> tuple[int, int]:
    """(data-parallel groups, this rank's group): ranks r*split .. r*split + split-1 share group r's rows."""
    split = recipe.distributed.sequence_parallel
    return world // split, rank // split


def averaged_over(recipe: Recipe, processes: int) -> int:
    """What the engine divides the gradients summed over all processes by: the process count, except under a
    sequence split, where DeepSpeed (0.19.8) divides by the data-parallel count (processes / split: a slice's
    gradient is one part of its row's) in ZeRO-1/2 and in ZeRO-3 without reduce_scatter, but by every process
    in ZeRO-3's reduce-scatter path. Both are measured against one process in
    tests/test_distributed_sequence_parallel.py."""
    split = recipe.distributed.sequence_parallel
    if split == 1:
        return processes
    zero = zero_section(recipe)
    return processes if zero["stage"] == 3 and zero.get("reduce_scatter", True) else processes // split


def split_batch(batch: dict, split: int, place: int) -> dict:
    """Rank `place`'s slice of a collated causal-lm batch whose width divides by `split` (collate pads it).

    Its `shift_labels` are next-token targets aligned with its positions (launcher/model/loss.py
    uses them unshifted); `attention_mask` is kept only to count real tokens: the split attention
    is causal over the whole row and the padding sits at its end, after every real token.
    """
    import torch
    import torch.nn.functional as F
    ids = batch["input_ids"]
    width = ids.shape[1]
    if width % split:
        raise ValueError(f"batch width {width} is not a multiple of the sequence split {split}")
    labels = batch["labels"]
    targets = F.pad(labels[:, 1:], (0, width + 1 - labels.shape[1]), value=IGNORE)  # the last position has none
    positions = torch.arange(width, device=ids.device).expand_as(ids)
    share = width // split
    part = slice(share * place, share * (place + 1))
    return {"input_ids": ids[:, part], "attention_mask": batch["attention_mask"][:, part],
            "position_ids": positions[:, part], "shift_labels": targets[:, part]}


def rank_slice(batch: dict, recipe: Recipe, rank: int) -> dict:
    """The part of a collated training batch this process trains on: all of it unless the sequence is split."""
    split = recipe.distributed.sequence_parallel
    return batch if split == 1 else split_batch(batch, split, rank % split)


def prepare_split(accelerator, model, prepare):
    """Run `prepare` (accelerate's, which registers DeepSpeed's split attention) with the attention the model
    loaded with, and keep that attention whole in eval mode.

    DeepSpeed replaces the attention function process-wide and drops every padding mask, which suits
    training (causal, padding at the end) but not generation from left-padded prompts: in eval mode
    the original function runs, with its mask.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    check_heads(model.config.get_text_config(), accelerator.parallelism_config.sp_size)
    implementation = model.config._attn_implementation
    accelerator.parallelism_config.sp_handler.sp_attn_implementation = implementation
    whole = ALL_ATTENTION_FUNCTIONS[implementation]
    prepared = prepare()
    split = ALL_ATTENTION_FUNCTIONS[implementation]

    def attention(module, *args, **kwargs):
        return (split if module.training else whole)(module, *args, **kwargs)
    ALL_ATTENTION_FUNCTIONS[implementation] = attention
    return prepared


def check_heads(config, split: int) -> None:
    """Each rank attends with heads / split of the query heads, and of the key-value heads (or one copy of each):
    refused in one line here, before DeepSpeed raises on it inside accelerate's prepare."""
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if heads % split or (kv_heads % split and split % kv_heads):
        raise UserError(f"distributed.sequence_parallel {split}: the model has {heads} attention heads and {kv_heads} "
                        f"key-value heads; the split must divide the first and divide or be a multiple of the second")
