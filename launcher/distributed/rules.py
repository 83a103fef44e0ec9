"""What each strategy refuses, how it is recognised, and what each rank holds.

One rules class per strategy, torch-free, so preflight (`launcher validate` included), the memory
planner and the strategy objects that train (strategies.py) all ask the same code. A DeepSpeed
recipe is recognised by its JSON's ZeRO stage (deepspeed_config.zero_section), never by the
file's name, so a custom stage-3 file is refused like zero3.
"""
from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

from launcher.distributed.deepspeed_config import deepspeed_config, deepspeed_path, zero_section
from launcher.distributed.launch import ENV_FIX, accelerate_env
from launcher.errors import UserError
from launcher.memory.counts import StatePlacement
from launcher.recipe.schema import BNB_OPTIMIZERS, RESIDUAL_INITS, FsdpSection, Recipe


class StrategyRules:
    """The rules every strategy shares; a subclass adds its own and says whether it shards parameters."""

    name = ""
    steps_local_tensors = False  # bitsandbytes optimisers step whole local tensors: only a replicating strategy has them

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe

    @property
    def shards_parameters(self) -> bool:
        """True when each rank holds only part of the weights (replicas cannot be compared, nor penalties summed)."""
        return False

    @property
    def sharded_label(self) -> str:
        """How messages about sharded parameters name this strategy."""
        return self.name

    def refuse(self) -> None:
        """Recipe combinations this strategy cannot train, refused before anything loads (preflight, and the planner
        before it suggests a change). Reads the strategy's own config file, nothing else."""
        train, init = self.recipe.train, self.recipe.lora.init
        if train.optimizer in BNB_OPTIMIZERS and not self.steps_local_tensors:
            raise UserError(f"train.optimizer {train.optimizer} with distributed.strategy: {self.name}: bitsandbytes optimisers step "
                            "whole local tensors, not DeepSpeed's flat partitions or FSDP's sharded DTensors; "
                            "use train.optimizer: adamw (the strategy already shards its state), or strategy: ddp")
        if not self.shards_parameters:
            return
        where = f"with sharded parameters ({self.sharded_label})"
        if train.loss_chunk_tokens:
            raise UserError(f"train.loss_chunk_tokens {where}: lm_head is used after the forward pass, when its weight is "
                            "already resharded; remove loss_chunk_tokens or use ddp / zero1-2")
        if train.l2_lambda:
            raise UserError(f"train.l2_lambda {where}: each rank holds only a shard of the parameters, so the penalty would "
                            "be wrong; use train.weight_decay, or strategy ddp / deepspeed zero1-2")
        if init in RESIDUAL_INITS:
            raise UserError(f"lora.init {init} {where}: converting the adapter to plain LoRA at export needs the whole "
                            "model in one process; use strategy ddp or deepspeed zero1 / zero2")

    def refuse_launch(self, on_gpu: bool) -> None:
        """The strategy against the device and accelerate's launch config (what `accelerate config` wrote)."""
        if accelerate_env("ACCELERATE_USE_FSDP") == "true":
            raise UserError("accelerate launch is set up for FSDP (ACCELERATE_USE_FSDP=true); the launcher applies FSDP2 itself "
                            f"when distributed.strategy is fsdp; {ENV_FIX}")
        if accelerate_env("ACCELERATE_USE_DEEPSPEED") == "true" and self.name != DeepSpeedRules.name:
            raise UserError(f"accelerate launch is set up for DeepSpeed (ACCELERATE_USE_DEEPSPEED=true) but distributed.strategy "
                            f"is {self.name}; {ENV_FIX}, or set distributed.strategy: deepspeed")

    def memory_layout(self, world: int, hidden: int) -> StatePlacement:
        """What each rank holds, for the memory planner."""
        raise NotImplementedError

    def quant_storage(self, compute_dtype):
        """The dtype bitsandbytes packs 4-bit weights into (None: its default, uint8)."""
        return None

    def reads_weights(self, world: int, rank: int) -> bool:
        """Whether this rank reads the checkpoint's weights into host memory (False: it builds the model on the meta
        device and receives its shards from rank 0 after sharding). Every rank does, except under FSDP2."""
        return True


class DdpRules(StrategyRules):
    """DDP: every rank holds the whole model, so nothing is refused for sharding and checkpoints load anywhere."""

    name = "ddp"
    steps_local_tensors = True

    def memory_layout(self, world: int, hidden: int) -> StatePlacement:
        """Everything on every rank; DDP's buckets copy every gradient once more."""
        return StatePlacement("DDP (every rank holds the whole model)", bucket_grads=world > 1)


class DeepSpeedRules(StrategyRules):
    """DeepSpeed ZeRO 1/2/3: ZeRO-3 shards the weights; full fine-tuning checkpoints are per-rank optimiser shards."""

    name = "deepspeed"

    @cached_property
    def zero(self) -> dict:
        """The JSON's zero_optimization block, read once per recipe."""
        return zero_section(self.recipe)

    @property
    def stage(self) -> int:
        return self.zero["stage"]

    @property
    def shards_parameters(self) -> bool:
        return self.stage == 3

    @property
    def sharded_label(self) -> str:
        return f"{self.name}, ZeRO-3"

    def refuse(self) -> None:
        deepspeed_config(self.recipe, self.recipe.distributed.num_processes)  # the JSON agrees with the recipe
        super().refuse()
        if self.recipe.method == "qlora" and self.stage == 3:
            raise UserError("method: qlora with DeepSpeed ZeRO-3: ZeRO-3 partitions every parameter, and bitsandbytes' packed "
                            "4-bit weights would be split apart from their quantisation state (DeepSpeed has no 4-bit storage "
                            "route); use distributed.strategy: fsdp (4-bit weights stored in the compute dtype, sharded by "
                            "FSDP2), or deepspeed zero1 / zero2 (the quantised base replicated, adapter state partitioned)")
        if self.recipe.train.skip_nonfinite:
            raise UserError("train.skip_nonfinite: DeepSpeed applies the optimiser step inside its backward, so a step cannot "
                            "be skipped there; set it to 0 (the run then stops at the first non-finite step)")

    def refuse_launch(self, on_gpu: bool) -> None:
        super().refuse_launch(on_gpu)
        if accelerate_env("ACCELERATE_USE_DEEPSPEED") != "true":
            return
        env_config, env_stage = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"), os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        if env_config and Path(env_config).resolve() != deepspeed_path(self.recipe).resolve():
            raise UserError(f"accelerate's config names DeepSpeed config {env_config} but distributed.deepspeed is "
                            f"{deepspeed_path(self.recipe)}; {ENV_FIX}")
        if not env_config and env_stage and int(env_stage) != self.stage:
            raise UserError(f"accelerate's config asks for ZeRO stage {env_stage} but distributed.deepspeed gives stage "
                            f"{self.stage}; {ENV_FIX}")

    def memory_layout(self, world: int, hidden: int) -> StatePlacement:
        """ZeRO stage N shards optimiser state (1), gradients (2) and weights (3); bf16 mode keeps weights in bf16
        and an fp32 master copy in the optimiser; "auto" bucket sizes are hidden^2, as accelerate fills them."""
        zero, stage = self.zero, self.stage
        offloaded = {key: (zero.get(key) or {}).get("device", "none") not in ("none", None)
                     for key in ("offload_param", "offload_optimizer")}
        buckets = sum(value if isinstance(value, (int, float)) else hidden * hidden
                      for key, value in zero.items() if key in ("reduce_bucket_size", "stage3_prefetch_bucket_size"))
        return StatePlacement(f"DeepSpeed ZeRO-{stage}" + (" with CPU offload" if any(offloaded.values()) else ""),
                              shard_weights=stage == 3, shard_gradients=stage >= 2, shard_optimizer=stage >= 1,
                              offload_weights=offloaded["offload_param"], offload_optimizer=offloaded["offload_optimizer"],
                              low_precision_master=True, autocast=False, cast_weights=True,
                              gathered_blocks=2 if stage == 3 else 0, bucket_elements=int(buckets))


class FsdpRules(StrategyRules):
    """FSDP2: weights sharded over every process; its checkpoints reshard on load, so they resume anywhere."""

    name = "fsdp"

    @property
    def shards_parameters(self) -> bool:
        return True

    def memory_layout(self, world: int, hidden: int) -> StatePlacement:
        """FSDP2 shards weights, gradients and state; gathered blocks are bf16 copies (its mixed-precision policy casts
        the weights, no autocast); the root's embeddings and head stay gathered; grad_op keeps every block gathered.
        One process is left unsharded (strategies.Fsdp2.shard), so nothing is sharded or offloaded then."""
        options = self.recipe.distributed.fsdp or FsdpSection()
        sharded = world > 1
        return StatePlacement("FSDP2 " + ("full sharding" if options.sharding == "full" else "grad_op sharding")
                              + (" with CPU offload" if options.cpu_offload else ""),
                              shard_weights=sharded, shard_gradients=sharded, shard_optimizer=sharded,
                              offload_weights=sharded and options.cpu_offload, offload_optimizer=sharded and options.cpu_offload,
                              autocast=False, cast_weights=sharded,
                              gathered_blocks=2 if sharded else 0, keep_gathered=sharded and options.sharding == "grad_op",
                              root_gathered=sharded)

    def reads_weights(self, world: int, rank: int) -> bool:
        """Rank 0 only, over several processes (strategies.fill_shards sends the others their shards): every rank
        loading the whole model would need world x its size of host memory per node. QLoRA still loads on every
        rank: bitsandbytes quantises while it loads, straight to the rank's device."""
        return world == 1 or rank == 0 or self.recipe.method == "qlora"

    def quant_storage(self, compute_dtype):
        """QLoRA: 4-bit weights packed into the compute dtype, so every parameter of a block has one dtype and
        FSDP2 shards them like any other (its default uint8 storage mixes dtypes; accelerate #3983 saw loss 0 and NaN)."""
        return compute_dtype

    def refuse(self) -> None:
        super().refuse()
        if self.recipe.method == "qlora" and self.recipe.quant.bits == 8:
            raise UserError("method: qlora with quant.bits 8 and distributed.strategy: fsdp: 8-bit weights are int8 with per-row "
                            "scales that FSDP would shard apart; use quant.bits 4 (stored in the compute dtype so FSDP2 can shard "
                            "it), or strategy: ddp")

    def refuse_launch(self, on_gpu: bool) -> None:
        super().refuse_launch(on_gpu)
        options = self.recipe.distributed.fsdp
        if options is not None and options.cpu_offload and not on_gpu:
            raise UserError("distributed.fsdp.cpu_offload: there is no GPU, so parameters already live in CPU memory; remove it")


RULES: dict[str, type[StrategyRules]] = {cls.name: cls for cls in (DdpRules, DeepSpeedRules, FsdpRules)}


def rules_for(recipe: Recipe) -> StrategyRules:
    return RULES[recipe.distributed.strategy](recipe)
