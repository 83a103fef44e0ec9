"""What DeepSpeed ZeRO-3 allocates on each rank beyond the partitions themselves, from the recipe's DeepSpeed JSON.

Every term follows an allocation in DeepSpeed's source (0.19; paths under deepspeed/runtime/zero/), from the
settings as the run resolves them: the JSON's own values, DeepSpeed's defaults (config.py) where a key is
absent, and Accelerate's fill-ins where it says "auto" (accelerator.py: reduce_bucket_size hidden^2,
stage3_prefetch_bucket_size 0.9 hidden^2, stage3_param_persistence_threshold 10 hidden).

Gathered weights are the subtle part. After a module runs, partitioned_param_coordinator.py
(`__params_to_release`) keeps its weights gathered when the module comes back within
stage3_max_reuse_distance elements of fetched weights; the trace it looks along is one forward and
backward, so the last blocks of the forward, reused soon in backward, stay whole through the turn.
Prefetching (`fetch_sub_module`) gathers at most stage3_prefetch_bucket_size elements ahead, and never
beyond stage3_max_live_parameters. With one process nothing is gathered: `all_gather_coalesced`
(partition_parameters.py) points each weight at its partition (`_no_gather_coalesced`).
"""
from __future__ import annotations

from dataclasses import dataclass

from launcher.distributed.deepspeed_config import deepspeed_config
from launcher.distributed.rules import DeepSpeedRules, rules_for
from launcher.memory.inventory import Inventory
from launcher.recipe.schema import Recipe

GRAD_DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}


@dataclass(frozen=True)
class ZeroSettings:
    """The zero_optimization settings that size ZeRO-3's buffers, resolved (elements unless named otherwise)."""
    reduce_bucket: int
    prefetch_bucket: int
    persistence_threshold: int
    max_live: int
    max_reuse: int
    sub_group: int  # sub_group_size: the optimiser steps the partition in groups of this many elements
    contiguous_gradients: bool
    gather_on_save: bool
    grad_accum_bytes: int | None  # data_types.grad_accum_dtype; None: the model's dtype
    offload_params: bool
    offload_optimizer: bool
    pinned: bool  # offloaded state in page-locked host memory (offload_*.pin_memory)


def settings(recipe: Recipe, hidden: int) -> ZeroSettings | None:
    """ZeRO-3's settings for this recipe, or None when it does not run DeepSpeed stage 3."""
    rules = rules_for(recipe)
    if not isinstance(rules, DeepSpeedRules) or rules.stage != 3:
        return None
    config = deepspeed_config(recipe, None)
    zero = rules.zero
    auto = {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "stage3_param_persistence_threshold": 10 * hidden}  # accelerate/accelerator.py's fill-ins
    defaults = {"reduce_bucket_size": 500_000_000, "stage3_prefetch_bucket_size": 50_000_000,  # zero/config.py
                "stage3_param_persistence_threshold": 100_000, "stage3_max_live_parameters": 1_000_000_000,
                "stage3_max_reuse_distance": 1_000_000_000, "sub_group_size": 1_000_000_000}

    def value(key: str) -> int:
        given = zero.get(key, defaults[key])
        return int(auto[key] if given == "auto" else given)

    offload = {key: (zero.get(key) or {}) for key in ("offload_param", "offload_optimizer")}
    moved = {key: part.get("device", "none") not in ("none", None) for key, part in offload.items()}
    grad_dtype = (config.get("data_types") or {}).get("grad_accum_dtype")
    return ZeroSettings(value("reduce_bucket_size"), value("stage3_prefetch_bucket_size"),
                        value("stage3_param_persistence_threshold"), value("stage3_max_live_parameters"),
                        value("stage3_max_reuse_distance"), value("sub_group_size"), bool(zero.get("contiguous_gradients", True)),
                        bool(zero.get("stage3_gather_16bit_weights_on_model_save", False)),
                        GRAD_DTYPE_BYTES.get(str(grad_dtype).lower()) if grad_dtype else None,
                        moved["offload_param"], moved["offload_optimizer"],
                        any(part.get("pin_memory", False) for key, part in offload.items() if moved[key]))


def module_trace(inv: Inventory, checkpointing: bool) -> tuple[list[tuple], int]:
    """(module, elements) of each weight-holding module in the order ZeRO-3 fetches them over one step, and how many
    of them are the forward pass: the embedding, each block's norms and linear layers, the final norm and the
    head; then backward in reverse, a checkpointed block running its forward again before its backward."""
    block = []
    for index, lin in enumerate(inv.linears):
        if index == 0 or (not lin.own_input and inv.linears[index - 1].own_input):
            block.append((f"norm {len(block)}", inv.hidden))  # the norm in front of attention, then of the MLP
        block.append((lin.name, lin.inputs * lin.outputs))
    embedding = inv.vocab * inv.hidden
    head = max(inv.rest_params - embedding - inv.hidden, 0)  # 0 when tied to the embedding
    blocks = [[((layer, name), size) for name, size in block] for layer in range(inv.layers)]
    forward = [("embedding", embedding)] + [m for b in blocks for m in b] + [("final norm", inv.hidden), ("head", head)]
    backward = [("head", head), ("final norm", inv.hidden)]
    for b in reversed(blocks):
        backward += (b if checkpointing else []) + b[::-1]
    return forward + backward + [("embedding", embedding)], len(forward)


def retained_elements(trace: list[tuple], forward_length: int, max_reuse: int, persistence: int) -> int:
    """Elements still gathered when the forward pass ends: each forward module met again within `max_reuse` fetched
    elements after it ran is not released (`__params_to_release` walks the trace from the next module, adding each
    module's elements, and stops once the sum reaches stage3_max_reuse_distance)."""
    before = [0]
    for _, size in trace:
        before.append(before[-1] + size)
    next_use, seen = {}, {}
    for index in range(len(trace) - 1, -1, -1):
        module = trace[index][0]
        next_use[index] = seen.get(module)
        seen[module] = index
    kept = 0
    for index in range(forward_length):
        size, later = trace[index][1], next_use[index]
        if size > persistence and later is not None and before[later] - before[index + 1] < max_reuse:
            kept += size
    return kept


def zero3_bytes(zero: ZeroSettings, inv: Inventory, trainable: int, world: int, compute: int,
                checkpointing: bool) -> dict:
    """ZeRO-3's own bytes on one rank at each moment (see the module docstring)."""
    partition = trainable / world
    grad_bytes = zero.grad_accum_bytes or compute
    # stage3.py `_setup_for_real_optimizer`: grad_partitions_flat_buffer, this rank's gradients in the accumulation
    # dtype (engine.py `get_data_types`: the model's dtype unless data_types.grad_accum_dtype says otherwise)
    gradient_partitions = 0 if zero.offload_optimizer else partition * grad_bytes
    # stage3.py: with contiguous_gradients an IPG bucket of reduce_bucket_size elements per communication dtype
    reduce_bucket = zero.reduce_bucket * compute if zero.contiguous_gradients else 0
    # stage3.py `step` walks the partition one sub group (`_create_fp16_sub_groups`: sub_group_size elements, closed
    # once reached, so up to one weight's partition more) at a time; `_prepare_fp32_grad_for_sub_group` flattens its
    # gradients (accumulation dtype) and casts them to fp32, both alive during the cast, freed by `_release_sub_group`
    group = min(partition, zero.sub_group + max(lin.inputs * lin.outputs for lin in inv.linears) / world)
    step = 0 if zero.offload_optimizer else group * (grad_bytes + 4)
    if world == 1:  # nothing is gathered (partition_parameters.py `_no_gather_coalesced`)
        return {"gradient partitions": int(gradient_partitions), "reduce bucket": int(reduce_bucket), "step": int(step),
                "gathered forward": 0, "gathered backward": 0, "gathered eval": 0, "persistent": 0}
    trace, forward_length = module_trace(inv, checkpointing)
    largest = max(size for _, size in trace)
    largest_in_block = max(lin.inputs * lin.outputs for lin in inv.linears)
    retained = min(retained_elements(trace, forward_length, zero.max_reuse, zero.persistence_threshold), zero.max_live)
    # partitioned_param_coordinator.py `fetch_sub_module`: the current module, and a prefetch that stops once it
    # passes stage3_prefetch_bucket_size (so up to one block module more) or would exceed stage3_max_live_parameters
    prefetch = min(zero.prefetch_bucket + largest_in_block, max(zero.max_live - retained, 0))
    in_flight = largest + prefetch
    # partition_parameters.py: weights at or under stage3_param_persistence_threshold are never partitioned away
    persistent = sum(size for _, size in trace[:forward_length] if size <= zero.persistence_threshold)
    return {"gradient partitions": int(gradient_partitions), "reduce bucket": int(reduce_bucket), "step": int(step),
            "gathered forward": int((retained + in_flight) * compute),
            # the module in backward also holds its full-size gradient until the hook copies it into the bucket
            "gathered backward": int((in_flight + largest) * compute), "gathered eval": int(in_flight * compute),
            "persistent": int(persistent * compute)}
