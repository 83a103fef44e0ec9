"""How the model is spread over processes: one object per strategy (DDP, DeepSpeed ZeRO, FSDP2).

Every difference in how the strategies train lives in these classes, behind one small interface:
the Accelerator they need, sharding, `prepare`, the state dict an export gathers, how a
checkpoint loads and is laid out, whether replicas can be compared. What a strategy refuses,
resumes on and holds per rank is its torch-free rules object (launcher/distributed/rules.py),
which each strategy carries as `rules`. The loop calls the interface and never asks which
strategy it has.

- DDP and DeepSpeed go through Accelerate; the DeepSpeed plugin is built from the recipe and its
  JSON (launcher/distributed/deepspeed_config.py).
- FSDP2 is torch's `fully_shard`, applied here: accelerate only switches to FSDP on accelerator
  devices, so on CPU its plugin exits 0 while training unsharded (docs/platform.md). One code
  path on CPU and GPU means the tests exercise what users run.
"""
from __future__ import annotations

import os
from datetime import timedelta

from launcher.checkpoint import layouts, universal
from launcher.distributed import mesh, sequence
from launcher.distributed.deepspeed_config import deepspeed_config
from launcher.distributed.launch import CPU_LAUNCH, free_port, launched_world_size, mixed_precision
from launcher.distributed.rules import DdpRules, DeepSpeedRules, FsdpRules, StrategyRules, rules_for
from launcher.errors import UserError
from launcher.model.loading import compute_dtype
from launcher.recipe.schema import Recipe
from launcher.report import trackers


class Strategy:
    """What every strategy does the same way through Accelerate; subclasses name their rules and differ where they must."""

    rules_class: type[StrategyRules] = StrategyRules
    accelerate_type = None  # accelerate's DistributedType this strategy must end up with, when it insists on one

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.rules = self.rules_class(recipe)

    @property
    def name(self) -> str:
        return self.rules.name

    def backend(self, on_gpu: bool, world: int) -> str | None:
        return None if on_gpu or world == 1 else "gloo"

    def plugin_kwargs(self, on_gpu: bool, world: int, precision: str) -> dict:
        return {"cpu": not on_gpu}

    def make_accelerator(self):
        """The Accelerator this strategy runs on, after checking it sees every launched process."""
        import torch
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        on_gpu, world = torch.cuda.is_available(), launched_world_size()
        if not on_gpu:  # what deepspeed would detect anyway, said up front: its import (via accelerate) then stays silent
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        precision = mixed_precision(self.recipe, on_gpu)
        group = InitProcessGroupKwargs(backend=self.backend(on_gpu, world),
                                       timeout=timedelta(minutes=self.recipe.distributed.timeout_minutes))
        accelerator = Accelerator(gradient_accumulation_steps=self.recipe.train.grad_accum, mixed_precision=precision,
                                  step_scheduler_with_optimizer=False, kwargs_handlers=[group],
                                  **self.plugin_kwargs(on_gpu, world, precision), **trackers.accelerator_kwargs(self.recipe))
        if accelerator.num_processes != world:
            raise UserError(f"the launcher started {world} processes but training sees {accelerator.num_processes}: they "
                            f"would train independently. Use {CPU_LAUNCH}")
        if self.accelerate_type and accelerator.distributed_type != self.accelerate_type:
            raise RuntimeError(f"accelerate chose {accelerator.distributed_type} instead of {self.accelerate_type}")
        return accelerator

    def plan_resume(self, state: dict | None, world: int) -> None:
        """Told, before the accelerator is built, the trainer state of the checkpoint the run resumes from (None:
        a fresh start) and the process count. Only DeepSpeed full fine-tuning loads differently then."""

    def shard(self, model, accelerator):
        """Spread the model before the optimiser sees its parameters (FSDP2 only)."""
        return model

    def prepare(self, accelerator, model, optimizer, scheduler):
        return accelerator.prepare(model, optimizer, scheduler)

    def sync_gradients(self, model, now: bool) -> None:
        """Called before each micro-batch's backward; `now` on the one that ends an optimiser step. Nothing to do
        here: accelerate's accumulate() skips DDP's all-reduce until then, and DeepSpeed accumulates itself."""

    def unwrap(self, accelerator, model):
        """The model inside whatever wrapper `prepare` put around it (none here)."""
        return model

    def export_state_dict(self, accelerator, model) -> dict:
        """The whole model's state dict on the main process."""
        return self.unwrap(accelerator, model).state_dict()

    def load_state_kwargs(self) -> dict:
        """strict=False lets adapter runs load their trainable-only weights."""
        return {"strict": False}

    def checkpoint_layout(self, accelerator, model, optimizer, scheduler):
        """What a checkpoint holds (launcher/checkpoint/layouts.py): adapter runs keep only their trainable part,
        whole and by name (loads on any process count); full runs use accelerate's save_state."""
        if self.recipe.method != "full":
            return layouts.TrainableLayout(accelerator, model, optimizer, scheduler, self.unwrap(accelerator, model))
        return layouts.AccelerateLayout(accelerator, self.load_state_kwargs())

    def check_synchronised(self, accelerator, model) -> None:
        """After the first optimiser step, replicated parameters must be identical on every rank; if they are
        not, the processes are training independently (e.g. a group that never reduced gradients)."""
        if accelerator.num_processes == 1 or self.rules.shards_parameters:
            return  # single process, or each rank legitimately holds different values
        import torch
        unwrapped = self.unwrap(accelerator, model)
        with torch.no_grad():
            checksum = torch.stack([sum(p.double().sum() for p in unwrapped.parameters() if p.requires_grad),
                                    sum(p.double().abs().sum() for p in unwrapped.parameters() if p.requires_grad)])
        seen = accelerator.gather(checksum.to(accelerator.device)).view(-1, 2)
        if not torch.allclose(seen, seen[0].expand_as(seen), rtol=1e-6, atol=0):
            raise UserError(f"gradients are not synchronised: after the first step the {accelerator.num_processes} processes "
                            f"hold different weights (checksums {seen[:, 0].tolist()}), so they would train independently. "
                            f"Launch with {CPU_LAUNCH}")


class Ddp(Strategy):
    """DDP through Accelerate: every rank holds the whole model; checkpoints resume on any process count."""

    rules_class = DdpRules

    def unwrap(self, accelerator, model):
        """The model inside the DDP wrapper. Not accelerator.unwrap_model: that imports deepspeed whenever it is
        installed, and deepspeed's import warns ("Setting accelerator to CPU") on runs that never use it."""
        from torch.nn.parallel import DistributedDataParallel
        while isinstance(model, DistributedDataParallel):
            model = model.module
        return model


class DeepSpeed(Strategy):
    """DeepSpeed ZeRO 1/2/3 (+ offload) through Accelerate's plugin, on gloo when there is no GPU."""

    rules_class = DeepSpeedRules
    accelerate_type = "DEEPSPEED"
    universal = False  # resuming full fine-tuning on another process count: load the universal conversion

    def plan_resume(self, state: dict | None, world: int) -> None:
        self.universal = state is not None and self.recipe.method == "full" and state.get("world_size", 1) != world

    def unwrap(self, accelerator, model):
        return accelerator.unwrap_model(model)

    def export_state_dict(self, accelerator, model) -> dict:
        return accelerator.get_state_dict(model)  # ZeRO-3 gathers the 16-bit weights

    def backend(self, on_gpu: bool, world: int) -> str | None:
        return None if on_gpu else "gloo"

    def plugin_kwargs(self, on_gpu: bool, world: int, precision: str) -> dict:
        from accelerate.utils import DeepSpeedPlugin
        # Accelerate silently drops DeepSpeed when told to use the CPU (cpu=True or ACCELERATE_USE_CPU, which the
        # documented CPU launch sets); with no GPU, DeepSpeed itself runs on the CPU over gloo.
        os.environ["ACCELERATE_USE_CPU"] = "false"
        if "RANK" not in os.environ:  # `python -m launcher R`: a one-process group, as `accelerate launch` would set up
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if on_gpu else "cpu")
        config = deepspeed_config(self.recipe, world, precision)
        if self.universal:  # read when the engine loads a checkpoint: per-parameter files, sliced for this count
            config["checkpoint"] = {**config.get("checkpoint", {}), "load_universal": True}
        split = self.recipe.distributed.sequence_parallel
        return {"cpu": False, "deepspeed_plugin": DeepSpeedPlugin(hf_ds_config=config),
                **({"parallelism_config": self.sequence_groups(world, split)} if split > 1 else {})}

    @staticmethod
    def sequence_groups(world: int, split: int):
        """accelerate's ParallelismConfig for Ulysses (launcher/distributed/sequence.py): it hands DeepSpeed the sequence
        groups. Lengths vary from batch to batch; eval runs whole rows, each rank its own eval batch."""
        from accelerate.parallelism_config import ParallelismConfig
        from accelerate.utils import DeepSpeedSequenceParallelConfig
        handler = DeepSpeedSequenceParallelConfig(sp_seq_length_is_variable=True, sp_disable_in_eval=True)
        return ParallelismConfig(dp_replicate_size=world // split, sp_size=split, sp_backend="deepspeed", sp_handler=handler)

    def prepare(self, accelerator, model, optimizer, scheduler):
        if self.recipe.distributed.sequence_parallel == 1:
            return super().prepare(accelerator, model, optimizer, scheduler)
        return sequence.prepare_split(accelerator, model, lambda: accelerator.prepare(model, optimizer, scheduler))

    def load_state_kwargs(self) -> dict:
        return {}  # a DeepSpeed engine loads its whole module itself and takes no `strict`

    def checkpoint_layout(self, accelerator, model, optimizer, scheduler):
        """Adapters: the trainable part assembled from ZeRO's partitions by name (any process count);
        full fine-tuning: DeepSpeed's own per-rank shards, loaded through their universal conversion when the
        process count changed (launcher/checkpoint/universal.py)."""
        if self.recipe.method != "full":
            return layouts.ZeroTrainableLayout(accelerator, model, optimizer, scheduler, self.unwrap(accelerator, model))
        if self.universal:
            return universal.UniversalLayout(accelerator, self.load_state_kwargs())
        return super().checkpoint_layout(accelerator, model, optimizer, scheduler)


class Fsdp2(Strategy):
    """torch's FSDP2 (`fully_shard`) on every transformer block and the root, over all processes: sharded over all of
    them, or (HSDP, distributed.replicate) sharded inside each group and replicated across groups.

    Checkpoints are sharded (launcher/checkpoint/layouts.py), so they resume on any number of processes.
    """

    rules_class = FsdpRules

    def backend(self, on_gpu: bool, world: int) -> str | None:
        """With cpu_offload the shards, their gradients and the optimiser step live in CPU memory: clipping
        reduces over CPU DTensors, which an NCCL-only group cannot ("No backend type associated with device
        type cpu"). accelerate adds gloo for CPU only under its own FSDP settings, so it is named here."""
        options = self.recipe.distributed.fsdp
        if on_gpu and world > 1 and options is not None and options.cpu_offload:
            return "cpu:gloo,cuda:nccl"
        return super().backend(on_gpu, world)

    def reduces_every_micro_batch(self) -> bool:
        """Full fine-tuning reduce-scatters gradients at every micro-batch: skipping it would accumulate whole,
        unsharded fp32 gradients on every rank (8B: 32 GB more per rank than the plan, which counts sharded
        ones), for less traffic. Adapter gradients are small: those sync once per optimiser step."""
        return self.recipe.method == "full"

    def shard(self, model, accelerator):
        options = self.recipe.distributed.fsdp
        if options is not None and options.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if accelerator.num_processes == 1:  # nothing to shard over; accelerator.prepare never sees the model, so place it
            return model.to(accelerator.device)
        from torch.distributed.fsdp import fully_shard
        kwargs = self._shard_kwargs(accelerator)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        blocks = set(getattr(base, "_no_split_modules", None) or [])
        if not blocks:
            raise UserError(f"strategy fsdp: {type(base).__name__} names no transformer block class "
                            "(_no_split_modules) to shard; use strategy deepspeed or ddp")
        receives = not self.rules.reads_weights(accelerator.num_processes, 1)  # rank 0 alone read the weights
        whole = model.state_dict() if receives and accelerator.is_main_process else None
        for module in model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module, **kwargs)
        fully_shard(model, **kwargs)
        if receives:
            fill_shards(model, whole, accelerator.device, "cpu" if "offload_policy" in kwargs else accelerator.device)
        return model

    def _shard_kwargs(self, accelerator) -> dict:
        import torch
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy
        options = self.recipe.distributed.fsdp
        kwargs = {"mesh": mesh.device_mesh(self.recipe, accelerator.device.type, accelerator.num_processes),
                  "reshard_after_forward": options is None or options.sharding == "full"}
        if options is not None and options.cpu_offload:  # GPU only: preflight refused it on CPU
            kwargs["offload_policy"] = CPUOffloadPolicy()
        storage = quant_storage_dtype(self.recipe, accelerator.device.type == "cuda")
        low = fsdp_param_dtype(accelerator.mixed_precision, storage)
        if low is not None:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
        return kwargs

    def prepare(self, accelerator, model, optimizer, scheduler):
        """FSDP2 models stay out of accelerator.prepare (accelerate would wrap them in DDP on CPU); the optimiser
        gets accelerate's wrapper, which skips steps while accumulating and unscales fp16 gradients. One process
        shards nothing and so has no MixedPrecisionPolicy: accelerate's own path applies train.precision there."""
        if accelerator.num_processes == 1:
            return super().prepare(accelerator, model, optimizer, scheduler)
        scheduler = accelerator.prepare(scheduler)
        scaler = self.gradient_scaler(accelerator)
        if scaler is not None:
            accelerator.scaler = scaler  # accelerator.backward scales with it; clip_grad_norm_ and step unscale with it
        return model, accelerator.prepare_optimizer(optimizer, device_placement=False), scheduler

    def gradient_scaler(self, accelerator):
        """fp16 needs loss scaling; accelerate's GradScaler would look for overflow in this rank's shard only, so
        ranks could disagree on skipping a step: the sharded scaler agrees over all of them. None otherwise."""
        if accelerator.mixed_precision != "fp16":
            return None
        import torch
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
        if accelerator.num_processes == 1:  # no process group to agree over
            return torch.amp.GradScaler(accelerator.device.type)
        return ShardedGradScaler(accelerator.device.type)

    def sync_gradients(self, model, now: bool) -> None:
        """Reduce-scatter gradients once per optimiser step: FSDP2 keeps them unsharded and local on the other
        micro-batches (accelerate's no_sync does this only for models it wrapped itself)."""
        from torch.distributed.fsdp import FSDPModule
        if isinstance(model, FSDPModule):
            model.set_requires_gradient_sync(now or self.reduces_every_micro_batch())

    def checkpoint_layout(self, accelerator, model, optimizer, scheduler):
        """Adapters: the trainable part by name; full fine-tuning: torch.distributed.checkpoint shards, each
        rank its own, resharded on load (both resume on any process count)."""
        if self.recipe.method == "full":
            return layouts.ShardedLayout(accelerator, model, optimizer, scheduler)
        return super().checkpoint_layout(accelerator, model, optimizer, scheduler)

    def export_state_dict(self, accelerator, model) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.distributed.fsdp import FSDPModule
        if not isinstance(model, FSDPModule):  # one process: nothing was sharded
            return model.state_dict()
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def fill_shards(model, whole: dict | None, device, shard_device) -> None:
    """Every rank's shards from rank 0's whole state dict (`whole`; None on the other ranks), one tensor at a time,
    so no other rank holds more than its shards and one whole tensor (accelerate's cpu_ram_efficient_loading does
    the same for the FSDP2 it applies). A model built on the meta device (the other ranks') gets memory for its
    shards on `shard_device` (the CPU under offload) and copies its slice of each tensor; its buffers were computed
    when it was built (rotary inv_freq is in no state dict) and are kept. Rank 0's random generator state goes to
    every rank too, as when each rank loaded the model itself (LoRA's initialisation draws from it)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor
    receives = any(p.is_meta for p in model.parameters())
    if receives:
        buffers = dict(model.named_buffers())
        model.to_empty(device=shard_device)
        for name, buffer in buffers.items():
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner), leaf, buffer)
    filled = set()  # tied weights (embeddings and head) are one parameter under two names
    with torch.no_grad():
        for name, local in model.state_dict(keep_vars=True).items():
            if id(local) in filled:
                continue
            filled.add(id(local))
            full = whole[name].to(device) if whole is not None else torch.empty(local.shape, dtype=local.dtype, device=device)
            dist.broadcast(full, src=0)
            if receives and isinstance(local, DTensor):
                local.to_local().copy_(distribute_tensor(full, local.device_mesh, local.placements, src_data_rank=None).to_local())
            elif receives:
                local.copy_(full)
        generator = torch.get_rng_state().to(device)
        dist.broadcast(generator, src=0)
        torch.set_rng_state(generator.cpu())


def quant_storage_dtype(recipe: Recipe, on_gpu: bool):
    """The float dtype QLoRA's 4-bit weights are packed into under this strategy; None when they are not."""
    if recipe.method != "qlora" or recipe.quant.bits != 4:
        return None
    return rules_for(recipe).quant_storage(compute_dtype(recipe, on_gpu))


def fsdp_param_dtype(precision: str, storage):
    """FSDP2's param_dtype for accelerate's precision name. FSDP2 casts every float parameter of another dtype
    value by value, which would scramble 4-bit weights packed into `storage` (QLoRA): they must agree."""
    import torch
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if storage is not None and low is not None and low != storage:
        stored = str(storage).removeprefix("torch.")
        raise UserError(f"method qlora under strategy fsdp: train.precision {precision} would make FSDP2 cast the 4-bit "
                        f"weights, packed as {stored} (quant.compute_dtype), value by value and corrupt them; set "
                        f"train.precision and quant.compute_dtype to the same dtype")
    return low


STRATEGIES: dict[str, type[Strategy]] = {cls.rules_class.name: cls for cls in (Ddp, DeepSpeed, Fsdp2)}


def strategy_for(recipe: Recipe) -> Strategy:
    return STRATEGIES[recipe.distributed.strategy](recipe)
