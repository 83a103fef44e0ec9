"""Host (CPU) memory per node: where large runs die before the first step, while every rank loads the model.

Node 0 is planned (it holds rank 0, which gathers the export). Three moments, each the sum over the
node's ranks:

- loading: every rank that builds the model from its checkpoint holds the whole model in host memory in
  its stored dtype (DDP and FSDP2 load it on the CPU, then move or shard it); loaded on rank 0 alone, the
  other ranks build it on the meta device and receive their shards by broadcast, into GPU memory (into host
  memory only under CPU offload), so the node holds one whole copy; ZeRO-3 partitions while it loads and
  4-bit weights are placed on the GPU as they load, so those ranks hold about one checkpoint file at a time;
- training: what stays in host memory for the run: ZeRO's offloaded partitions (pinned when
  offload_*.pin_memory: page-locked, never swapped) and FSDP2's CPU-offloaded shards;
- export: the training figure plus the final save on rank 0: sharded weights are gathered whole into
  host memory there (FSDP2's full_state_dict with cpu_offload, ZeRO-3's 16-bit consolidation), even for
  an adapter run; unsharded runs serialise their state dict a file at a time.

No dataloader workers are counted: the loop forms its batches in the training process itself.
"""
from __future__ import annotations

from dataclasses import dataclass

from launcher.memory import counts as memory
from launcher.memory import zero as zero3
from launcher.distributed.rules import rules_for
from launcher.memory.inventory import Inventory
from launcher.recipe.schema import Recipe

GIB = 2**30
# Resident memory of one rank before it loads anything: 0.55 GiB measured here (RSS after importing torch,
# transformers, accelerate, deepspeed and peft, CPU build of torch 2.13) plus 1.5 GiB assumed, not measured, for
# the CUDA runtime's host side (the CUDA libraries' kernel images and the driver's bookkeeping).
PROCESS_BYTES = int((0.55 + 1.5) * GIB)
CHECKPOINT_FILE_BYTES = 5 * 10**9  # the hub's Llama checkpoints come in files of at most 5 GB
SAVE_FILE_BYTES = 50 * 10**9  # transformers' save_pretrained max_shard_size default


@dataclass
class HostPlan:
    """Host bytes of node 0 at each moment, against the node's memory when one is given."""
    node_gib: float | None
    ranks_per_node: int
    every_rank_loads: bool
    partial_loading: bool  # ranks load a checkpoint file at a time (ZeRO-3 partitions, quantised weights on the GPU)
    moments: dict[str, dict[str, int]]

    @property
    def loading(self) -> str:
        if self.partial_loading:
            return "each rank holds one checkpoint file at a time while loading"
        return "every rank loads the whole model" if self.every_rank_loads else "rank 0 alone loads the whole model"

    @property
    def peak_moment(self) -> str:
        return max(self.moments, key=lambda name: sum(self.moments[name].values()))

    @property
    def peak_gib(self) -> float:
        return sum(self.moments[self.peak_moment].values()) / GIB

    @property
    def fits(self) -> bool | None:
        return None if self.node_gib is None else self.peak_gib <= self.node_gib


def host_plan(recipe: Recipe, inv: Inventory, layout: memory.StatePlacement, world: int, shards: int,
              ranks_per_node: int, node_gib: float | None, every_rank_loads: bool | None = None) -> HostPlan:
    """Node 0's host memory, state sharded over `shards` of the `world` processes. `every_rank_loads` False plans
    loading on rank 0 only (the others build the model on the meta device and receive their shards), True on every
    rank; None, the launcher's own loading (the strategy's reads_weights: rank 0 alone under FSDP2 over several
    processes). ZeRO-3 and quantised weights load partially whichever is asked."""
    model_bytes = inv.layers * inv.block_weight_bytes + inv.rest_weight_bytes
    partial = recipe.method == "qlora" or zero3.settings(recipe, inv.hidden) is not None
    if every_rank_loads is None:
        every_rank_loads = not partial and rules_for(recipe).reads_weights(world, 1)
    if partial:
        loaded = ranks_per_node * min(model_bytes, CHECKPOINT_FILE_BYTES)
    elif every_rank_loads:
        loaded = ranks_per_node * model_bytes
    else:  # rank 0's whole copy, and each rank's shard where CPU offload keeps shards in host memory
        loaded = model_bytes + (ranks_per_node * model_bytes / shards if layout.offload_weights else 0)
    processes = ranks_per_node * PROCESS_BYTES
    offloaded = ranks_per_node * offloaded_bytes(recipe, inv, layout, shards)
    moments = {
        "loading": {"processes": processes, "weights loaded": int(loaded)},
        "training": {"processes": processes, "offloaded state": offloaded},
        "export": {"processes": processes, "offloaded state": offloaded,
                   "export gather": export_bytes(recipe, inv, layout, shards, model_bytes)},
    }
    return HostPlan(node_gib, ranks_per_node, every_rank_loads, partial, moments)


def offloaded_bytes(recipe: Recipe, inv: Inventory, layout: memory.StatePlacement, shards: int) -> int:
    """One rank's share (of `shards`) of what CPU offload keeps in host memory."""
    trainable = inv.trainable
    zero = zero3.settings(recipe, inv.hidden)
    if zero is not None:
        low = 2  # DeepSpeed's bf16/fp16 partitions
        total = 0
        if zero.offload_params:  # stage3.py: the 16-bit partitions (param_groups_fp16_flat_cpu_memory when pinned)
            total += (inv.layers * inv.block_params + inv.rest_params) * low / shards
        if zero.offload_optimizer:  # fp32 master, Adam's two moments, gradient partitions and the step's fp32 copy
            total += trainable * (4 + 8 + (zero.grad_accum_bytes or low) + 4) / shards
        return int(total)
    total = 0
    if layout.offload_weights:  # FSDP2 CPUOffloadPolicy: the shards live on the CPU
        total += (inv.layers * inv.block_weight_bytes + inv.rest_weight_bytes) / shards
    if layout.offload_optimizer:  # and their gradients and optimiser state
        total += (inv.trainable_bytes + inv.layers * inv.block_state_bytes + inv.rest_state_bytes) / shards
    return int(total)


def export_bytes(recipe: Recipe, inv: Inventory, layout: memory.StatePlacement, shards: int, model_bytes: int) -> int:
    """Rank 0's host memory for the final save."""
    zero = zero3.settings(recipe, inv.hidden)
    if zero is not None:  # engine.py `_zero3_consolidated_16bit_state_dict`: every weight in 16 bits on rank 0's CPU
        return 2 * (inv.layers * inv.block_params + inv.rest_params) if zero.gather_on_save else 0
    if layout.shard_weights and shards > 1:  # FSDP2: get_model_state_dict(full_state_dict, cpu_offload) on rank 0
        return model_bytes
    saved = model_bytes if recipe.method == "full" else inv.trainable_bytes
    return min(saved, SAVE_FILE_BYTES)
