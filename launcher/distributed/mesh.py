"""The process mesh a recipe asks for: hybrid sharding (replicate x shard), sequence or context parallelism.

Torch-free, so `launcher validate` checks the mesh against the process count and the rest of
the recipe in one line each, before any process group exists. The engines own the parallelism:
FSDP2 shards over a 2-D device mesh for HSDP (shard inside a group, usually a node; replicate
across groups). The sequence split is checked as its engines need it (DeepSpeed Ulysses: the
length divides by the split; torch's context parallelism: FSDP2, SDPA attention, CUDA). Ulysses
trains (launcher/distributed/sequence.py); the loop does not train with context parallelism yet,
so a context split above 1 is refused last, after its checks.
"""
from __future__ import annotations

from dataclasses import dataclass

from launcher.distributed.rules import DeepSpeedRules, FsdpRules
from launcher.errors import UserError
from launcher.recipe.schema import Recipe

FSDP, DEEPSPEED = FsdpRules.name, DeepSpeedRules.name
CP_GPU_ONLY = ("distributed.context_parallel needs CUDA GPUs: torch's context parallelism has no sharding rule for the CPU "
               "attention kernel (aten._scaled_dot_product_flash_attention_for_cpu); set it to 1 on CPU")


@dataclass(frozen=True)
class Mesh:
    """How `world` processes are arranged: replicate x shard x sequence x context = world."""

    replicate: int
    shard: int
    sequence: int = 1
    context: int = 1

    @property
    def world(self) -> int:
        return self.replicate * self.shard * self.sequence * self.context

    @property
    def hybrid(self) -> bool:
        """More than one replica of sharded weights (HSDP)."""
        return self.replicate > 1


def check_keys(recipe: Recipe, on_gpu: bool | None = None) -> None:
    """The mesh keys against the strategy, the attention kernel, the sequence length and (when known) the device."""
    dist, data = recipe.distributed, recipe.data
    sp, cp = dist.sequence_parallel, dist.context_parallel
    hybrid_keys = [key for key in ("replicate", "shard") if getattr(dist, key) is not None]
    if hybrid_keys and dist.strategy != FSDP:
        raise UserError(f"distributed.{hybrid_keys[0]}: hybrid sharding (HSDP) is FSDP2's; set distributed.strategy: fsdp, "
                        f"or remove distributed.{hybrid_keys[0]} (strategy {dist.strategy} keeps one group)")
    if sp > 1 and cp > 1:
        raise UserError(f"distributed.sequence_parallel {sp} with distributed.context_parallel {cp}: both split the sequence "
                        "over processes; use one (sequence_parallel with DeepSpeed, context_parallel with FSDP2 on GPUs)")
    if sp > 1 and dist.strategy != DEEPSPEED:
        raise UserError(f"distributed.sequence_parallel {sp}: Ulysses sequence parallelism runs under DeepSpeed; set "
                        "distributed.strategy: deepspeed (zero1-3), or use distributed.context_parallel with fsdp on GPUs")
    if sp > 1:
        _check_ulysses(recipe, sp)
    if sp > 1 and data.max_length % sp:
        raise UserError(f"data.max_length {data.max_length} is not divisible by distributed.sequence_parallel {sp}: each "
                        f"rank takes an equal share of every sequence; use a multiple of {sp}")
    if cp > 1 and dist.strategy != FSDP:
        raise UserError(f"distributed.context_parallel {cp} needs distributed.strategy: fsdp (torch's context parallelism "
                        "shards over FSDP2's device mesh); or use sequence_parallel with deepspeed")
    if cp > 1 and recipe.model.attn_implementation not in (None, "sdpa"):
        raise UserError(f"distributed.context_parallel {cp} with model.attn_implementation {recipe.model.attn_implementation}: "
                        "context parallelism replaces torch's scaled_dot_product_attention; set attn_implementation: sdpa")
    if cp > 1 and data.max_length % (2 * cp):
        raise UserError(f"data.max_length {data.max_length} is not divisible by 2 x distributed.context_parallel = {2 * cp}: "
                        f"the load-balanced split gives each rank two equal chunks; use a multiple of {2 * cp}")
    if cp > 1 and on_gpu is False:
        raise UserError(CP_GPU_ONLY)
    if cp > 1:  # the recipe is consistent, but the training loop does not run torch's context parallelism yet
        raise UserError(f"distributed.context_parallel {cp}: the launcher checks the context split but does not train with "
                        "it yet; set distributed.context_parallel: 1 (for long contexts: distributed.sequence_parallel "
                        "with strategy deepspeed, train.gradient_checkpointing, train.loss_chunk_tokens)")


def _check_ulysses(recipe: Recipe, sp: int) -> None:
    """What DeepSpeed's split attention trains correctly: causal-lm rows, one example each, on an attention
    function it can wrap (it drops the mask and attends causally over the whole gathered row)."""
    key = f"distributed.sequence_parallel {sp}"
    if recipe.model.task != "causal-lm" or recipe.objective == "dpo":
        what = f"objective {recipe.objective}" if recipe.objective == "dpo" else f"model.task {recipe.model.task}"
        raise UserError(f"{key} with {what}: the sequence split trains causal-lm next-token losses only; set "
                        "distributed.sequence_parallel: 1")
    if recipe.data.packing:
        raise UserError(f"{key} with data.packing: the split attention is one causal mask over the whole row, so packed "
                        "examples would attend to each other; set data.packing: false (long rows need no packing)")
    if recipe.model.attn_implementation == "eager":
        raise UserError(f"{key} with model.attn_implementation eager: DeepSpeed's split attention needs sdpa or "
                        "flash_attention_2 (eager builds the whole row's mask); set attn_implementation: sdpa")


def smallest_world(recipe: Recipe) -> int:
    """The fewest processes the recipe's mesh keys allow (their product): what a plan assumes when it is not told."""
    dist = recipe.distributed
    return (dist.replicate or 1) * (dist.shard or 1) * dist.sequence_parallel * dist.context_parallel


def mesh_for(recipe: Recipe, world: int) -> Mesh:
    """The mesh of `world` processes, the unset replicate/shard filled in; refuses one that does not multiply to `world`."""
    dist = recipe.distributed
    sp, cp = dist.sequence_parallel, dist.context_parallel
    split = sp * cp
    if world % split:
        key = "sequence_parallel" if sp > 1 else "context_parallel"
        raise UserError(f"distributed.{key} {split} does not divide the {world} processes; launch a multiple of {split}")
    groups = world // split
    replicate, shard = dist.replicate, dist.shard
    if replicate is None and shard is None:
        replicate, shard = 1, groups
    elif replicate is None or shard is None:
        given, key = (replicate, "replicate") if shard is None else (shard, "shard")
        if groups % given:
            raise UserError(f"distributed.{key} {given} does not divide the {groups} data-parallel processes "
                            f"({world} processes / sequence split {split}); choose a divisor of {groups}")
        replicate, shard = (given, groups // given) if shard is None else (groups // given, given)
    mesh = Mesh(replicate, shard, sp, cp)
    if mesh.world != world:
        raise UserError(f"distributed.replicate {replicate} x shard {shard}" + (f" x sequence split {split}" if split > 1 else "")
                        + f" = {mesh.world} processes, but {world} run; make the product {world}")
    return mesh


def check(recipe: Recipe, world: int | None, on_gpu: bool | None = None) -> Mesh | None:
    """Every mesh rule preflight can apply; `world` None when the process count is not known yet (plain validate)."""
    check_keys(recipe, on_gpu)
    return mesh_for(recipe, world) if world is not None else None


def hybrid_overrides(recipe: Recipe, nodes: int, per_node: int) -> list[str]:
    """Recipe overrides for a job of `nodes` x `per_node` processes: HSDP (shard inside a node, replicate across nodes)
    for FSDP2 on several nodes, unless the recipe already chose its mesh (replicate 1 keeps plain FSDP)."""
    dist = recipe.distributed
    if nodes < 2 or dist.strategy != FSDP or dist.replicate is not None or dist.shard is not None:
        return []
    if per_node % (dist.sequence_parallel * dist.context_parallel):
        return []  # the sequence split spans nodes: let the mesh check name the problem
    return [f"distributed.replicate={nodes}", f"distributed.shard={per_node // (dist.sequence_parallel * dist.context_parallel)}"]


def device_mesh(recipe: Recipe, device_type: str, world: int):
    """The torch device mesh FSDP2 shards over: 1-D (shard over every process), or 2-D (replicate, shard) for HSDP,
    where fully_shard shards inside each group and all-reduces gradients across groups."""
    from torch.distributed.device_mesh import init_device_mesh
    shape = mesh_for(recipe, world)
    if not shape.hybrid:
        return init_device_mesh(device_type, (world,))
    return init_device_mesh(device_type, (shape.replicate, shape.shard), mesh_dim_names=("replicate", "shard"))
