"""How the model is spread over processes: one object per strategy (DDP, DeepSpeed ZeRO, FSDP2).

Every difference between the strategies lives in these classes, behind one small interface:
the Accelerator they need, sharding, `prepare`, the state dict an export gathers, how a
checkpoint loads, whether replicas can be compared, and which process counts a checkpoint
resumes on. The loop calls the interface and never asks which strategy it has.

- DDP and DeepSpeed go through Accelerate. The DeepSpeed plugin is built from the recipe and a
  ds_configs/ JSON, whose "auto" values the launcher fills itself (accelerate would take them from
  a prepared DataLoader, which this loop does not use).
- FSDP2 is torch's `fully_shard`, applied here: accelerate only switches to FSDP on accelerator
  devices, so on CPU its plugin exits 0 while training unsharded (docs/platform.md). One code
  path on CPU and GPU means the tests exercise what users run.
- On CPU, accelerate picks no process-group backend and counts one process even when several
  started; naming gloo fixes the count, and the world-size and gradient-sync checks turn the
  remaining silent cases into errors.

The module imports no torch at import time: preflight reads the DeepSpeed JSON through it.
"""
from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

from launcher.report import trackers
from launcher.memory.counts import Layout
from launcher.recipe.schema import FsdpSection, Recipe
from launcher.errors import UserError
from launcher.shipped import DS_CONFIGS

CPU_LAUNCH = ("`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N -m launcher R` "
              "or `torchrun --nproc_per_node N -m launcher R` (on GPUs: `accelerate launch --num_processes N -m launcher R`)")
ENV_FIX = "the recipe's distributed section decides; drop that setting from the accelerate config (or the --use_* flag)"


def launched_world_size() -> int:
    """The number of processes the launcher (torchrun, accelerate, Slurm's srun) says it started."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launch_hint(world: int) -> str:
    return CPU_LAUNCH.replace(" N ", f" {world} ")


def mixed_precision(recipe: Recipe, on_gpu: bool) -> str:
    choice = recipe.train.precision
    if choice == "auto":
        import torch
        return "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "no"
    if not on_gpu and choice == "fp16":
        raise UserError("train.precision: fp16 needs a GPU; use fp32 or bf16 on CPU")
    return {"fp32": "no"}.get(choice, choice)


# ---------------------------------------------------------------- DeepSpeed JSON (no torch)

def deepspeed_path(recipe: Recipe) -> Path:
    name = recipe.distributed.deepspeed or ""
    return Path(name) if name.endswith(".json") else DS_CONFIGS / f"{name}.json"


def _read_deepspeed_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"distributed.deepspeed: DeepSpeed config not found: {path}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"distributed.deepspeed: {path} line {exc.lineno}: not valid JSON ({exc.msg})") from None
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise UserError(f"distributed.deepspeed: {path} has a '{section}' section; the launcher builds the optimiser "
                            "and schedule from train.* (lr, schedule, weight_decay): remove it")
    stage = config.setdefault("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise UserError(f"distributed.deepspeed: {path}: unknown ZeRO stage {stage!r} (use 0, 1, 2 or 3)")
    return config


def deepspeed_config(recipe: Recipe, world_size: int | None, precision: str | None = None) -> dict:
    """The recipe's DeepSpeed JSON, checked against the recipe, with every "auto" the launcher knows filled.

    Called by preflight (world_size from distributed.num_processes, maybe unknown) and again at
    launch with the real world size.
    """
    path, train = deepspeed_path(recipe), recipe.train
    config = _read_deepspeed_json(path)
    if config["zero_optimization"].get("stage", 0) == 3 and train.l2_lambda:
        raise UserError("train.l2_lambda with ZeRO-3: parameters are partitioned across ranks, so the penalty would be "
                        "computed on empty placeholders; use train.weight_decay, or zero1 / zero2 / ddp")
    wanted = {"train_micro_batch_size_per_gpu": (train.micro_batch_size, "train.micro_batch_size"),
              "gradient_accumulation_steps": (train.grad_accum, "train.grad_accum"),
              "gradient_clipping": (train.max_grad_norm or 0.0, "train.max_grad_norm")}
    if world_size is not None:
        wanted["train_batch_size"] = (train.micro_batch_size * train.grad_accum * world_size,
                                      "micro_batch_size x grad_accum x processes")
    for key, (value, recipe_key) in wanted.items():
        given = config.get(key, "auto")
        if given == "auto":
            config[key] = value
        elif given != value:
            raise UserError(f"distributed.deepspeed: {path} hard-codes {key}={given} but the recipe gives {recipe_key}={value}; "
                            f"set it to \"auto\" in the JSON (the launcher fills it) or make them agree")
    for kind in ("bf16", "fp16") if precision is not None else ():
        block = config.setdefault(kind, {})
        if block.get("enabled", "auto") == "auto":
            block["enabled"] = precision == kind
        elif bool(block["enabled"]) != (precision == kind):
            raise UserError(f"distributed.deepspeed: {path} sets {kind}.enabled={block['enabled']} but train.precision "
                            f"resolves to {precision}; set it to \"auto\" or make them agree")
    return config


# ---------------------------------------------------------------- the strategies

class Strategy:
    """DDP through Accelerate: every rank holds the whole model; checkpoints resume on any process count."""

    name = "ddp"
    accelerate_type = None  # accelerate's DistributedType this strategy must end up with, when it insists on one

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe

    @property
    def shards_parameters(self) -> bool:
        """True when each rank holds only part of the weights (replicas cannot be compared)."""
        return False

    def preflight(self, on_gpu: bool) -> None:
        """Torch-free checks of this strategy's settings against the device and accelerate's launch config."""
        if _accelerate_env("ACCELERATE_USE_FSDP") == "true":
            raise UserError("accelerate launch is set up for FSDP (ACCELERATE_USE_FSDP=true); the launcher applies FSDP2 itself "
                            f"when distributed.strategy is fsdp; {ENV_FIX}")
        if _accelerate_env("ACCELERATE_USE_DEEPSPEED") == "true" and self.name != "deepspeed":
            raise UserError(f"accelerate launch is set up for DeepSpeed (ACCELERATE_USE_DEEPSPEED=true) but distributed.strategy "
                            f"is {self.name}; {ENV_FIX}, or set distributed.strategy: deepspeed")
        if self.recipe.train.loss_chunk_tokens and self.shards_parameters:  # ZeRO's stage read from its JSON
            raise UserError(f"train.loss_chunk_tokens with sharded parameters ({self.name}{', ZeRO-3' * (self.name == 'deepspeed')}): "
                            "lm_head is used after the forward pass, when its weight is already resharded; remove "
                            "loss_chunk_tokens or use ddp / zero1-2")

    def backend(self, on_gpu: bool, world: int) -> str | None:
        return None if on_gpu or world == 1 else "gloo"

    def memory_layout(self, world: int, hidden: int) -> Layout:
        """What each rank holds, for the planner: everything; DDP's buckets copy every gradient once more."""
        return Layout("DDP (every rank holds the whole model)", bucket_grads=world > 1)

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

    def shard(self, model, accelerator):
        """Spread the model before the optimiser sees its parameters (FSDP2 only)."""
        return model

    def quant_storage(self, compute_dtype):
        """The dtype bitsandbytes packs 4-bit weights into (None: its default, uint8)."""
        return None

    def prepare(self, accelerator, model, optimizer, scheduler):
        return accelerator.prepare(model, optimizer, scheduler)

    def sync_gradients(self, model, now: bool) -> None:
        """Called before each micro-batch's backward; `now` on the one that ends an optimiser step. Nothing to do
        here: accelerate's accumulate() skips DDP's all-reduce until then, and DeepSpeed accumulates itself."""

    def unwrap(self, accelerator, model):
        """The model inside the DDP wrapper. Not accelerator.unwrap_model: that imports deepspeed whenever it is
        installed, and deepspeed's import warns ("Setting accelerator to CPU") on runs that never use it."""
        from torch.nn.parallel import DistributedDataParallel
        while isinstance(model, DistributedDataParallel):
            model = model.module
        return model

    def export_state_dict(self, accelerator, model) -> dict:
        """The whole model's state dict on the main process (ZeRO-3 gathers through accelerate)."""
        return self.unwrap(accelerator, model).state_dict()

    def load_state_kwargs(self) -> dict:
        """strict=False lets adapter runs load their trainable-only weights."""
        return {"strict": False}

    def checkpoint_layout(self, accelerator, model, optimizer, scheduler):
        """What a checkpoint holds (launcher/layouts.py): adapter runs keep only their trainable part,
        whole and by name (loads on any process count); full runs use accelerate's save_state."""
        from launcher.checkpoint import layouts
        if self.recipe.method != "full":
            return layouts.TrainableLayout(accelerator, model, optimizer, scheduler, self.unwrap(accelerator, model))
        return layouts.AccelerateLayout(accelerator, self.load_state_kwargs())

    def resumes_on_any_world_size(self) -> bool:
        return True

    def check_resume(self, state: dict, world: int) -> None:
        """Refuse to resume a checkpoint on a process count this strategy cannot load it on."""
        saved = state.get("world_size", 1)
        if saved != world and not self.resumes_on_any_world_size():
            raise UserError(f"this checkpoint was written by {saved} processes under DeepSpeed ZeRO full fine-tuning, whose "
                            f"optimiser state is split per process; resume with {saved} processes (e.g. {launch_hint(saved)}), "
                            "or start fresh with --overwrite")

    def check_synchronised(self, accelerator, model) -> None:
        """After the first optimiser step, replicated parameters must be identical on every rank; if they are
        not, the processes are training independently (e.g. a group that never reduced gradients)."""
        if accelerator.num_processes == 1 or self.shards_parameters:
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


class DeepSpeed(Strategy):
    """DeepSpeed ZeRO 1/2/3 (+ offload) through Accelerate's plugin, on gloo when there is no GPU."""

    name = "deepspeed"
    accelerate_type = "DEEPSPEED"

    @property
    def stage(self) -> int:
        return deepspeed_config(self.recipe, None)["zero_optimization"].get("stage", 0)

    def unwrap(self, accelerator, model):
        return accelerator.unwrap_model(model)

    def export_state_dict(self, accelerator, model) -> dict:
        return accelerator.get_state_dict(model)  # ZeRO-3 gathers the 16-bit weights

    def preflight(self, on_gpu: bool) -> None:
        super().preflight(on_gpu)
        deepspeed_config(self.recipe, self.recipe.distributed.num_processes)
        if self.recipe.method == "qlora" and self.stage == 3:
            raise UserError("method: qlora with DeepSpeed ZeRO-3: ZeRO-3 partitions every parameter, and bitsandbytes' packed "
                            "4-bit weights would be split apart from their quantisation state (DeepSpeed has no 4-bit storage "
                            "route); use distributed.strategy: fsdp (4-bit weights stored in the compute dtype, sharded by "
                            "FSDP2), or deepspeed zero1 / zero2 (the quantised base replicated, adapter state partitioned)")
        if _accelerate_env("ACCELERATE_USE_DEEPSPEED") != "true":
            return
        env_config, env_stage = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"), os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        if env_config and Path(env_config).resolve() != deepspeed_path(self.recipe).resolve():
            raise UserError(f"accelerate's config names DeepSpeed config {env_config} but distributed.deepspeed is "
                            f"{deepspeed_path(self.recipe)}; {ENV_FIX}")
        if not env_config and env_stage and int(env_stage) != self.stage:
            raise UserError(f"accelerate's config asks for ZeRO stage {env_stage} but distributed.deepspeed gives stage "
                            f"{self.stage}; {ENV_FIX}")

    @property
    def shards_parameters(self) -> bool:
        return self.stage == 3

    def memory_layout(self, world: int, hidden: int) -> Layout:
        """ZeRO stage N shards optimiser state (1), gradients (2) and weights (3); bf16 mode keeps weights in bf16
        and an fp32 master copy in the optimiser; "auto" bucket sizes are hidden^2, as accelerate fills them."""
        zero = deepspeed_config(self.recipe, None)["zero_optimization"]
        stage = zero.get("stage", 0)
        offloaded = {key: (zero.get(key) or {}).get("device", "none") not in ("none", None)
                     for key in ("offload_param", "offload_optimizer")}
        buckets = sum(value if isinstance(value, (int, float)) else hidden * hidden
                      for key, value in zero.items() if key in ("reduce_bucket_size", "stage3_prefetch_bucket_size"))
        return Layout(f"DeepSpeed ZeRO-{stage}" + (" with CPU offload" if any(offloaded.values()) else ""),
                      shard_weights=stage == 3, shard_gradients=stage >= 2, shard_optimizer=stage >= 1,
                      offload_weights=offloaded["offload_param"], offload_optimizer=offloaded["offload_optimizer"],
                      low_precision_master=True, autocast=False, cast_weights=True, gathered_blocks=2 if stage == 3 else 0,
                      bucket_elements=int(buckets))

    def backend(self, on_gpu: bool, world: int) -> str | None:
        return None if on_gpu else "gloo"

    def plugin_kwargs(self, on_gpu: bool, world: int, precision: str) -> dict:
        from accelerate.utils import DeepSpeedPlugin
        # Accelerate silently drops DeepSpeed when told to use the CPU (cpu=True or ACCELERATE_USE_CPU, which the
        # documented CPU launch sets); with no GPU, DeepSpeed itself runs on the CPU over gloo.
        os.environ["ACCELERATE_USE_CPU"] = "false"
        if "RANK" not in os.environ:  # `python -m launcher R`: a one-process group, as `accelerate launch` would set up
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if on_gpu else "cpu")
        return {"cpu": False, "deepspeed_plugin": DeepSpeedPlugin(hf_ds_config=deepspeed_config(self.recipe, world, precision))}

    def load_state_kwargs(self) -> dict:
        return {}  # a DeepSpeed engine loads its whole module itself and takes no `strict`

    def checkpoint_layout(self, accelerator, model, optimizer, scheduler):
        """Adapters: the trainable part assembled from ZeRO's partitions by name (any process count);
        full fine-tuning: DeepSpeed's own per-rank shards (the process count that wrote them)."""
        from launcher.checkpoint import layouts
        if self.recipe.method != "full":
            return layouts.ZeroTrainableLayout(accelerator, model, optimizer, scheduler, self.unwrap(accelerator, model))
        return super().checkpoint_layout(accelerator, model, optimizer, scheduler)

    def resumes_on_any_world_size(self) -> bool:
        return self.recipe.method != "full"


class Fsdp2(Strategy):
    """torch's FSDP2 (`fully_shard`) on every transformer block and the root, over all processes.

    Checkpoints are sharded (launcher/layouts.py), so they resume on any number of processes.
    """

    name = "fsdp"

    @property
    def shards_parameters(self) -> bool:
        return True

    def memory_layout(self, world: int, hidden: int) -> Layout:
        """FSDP2 shards weights, gradients and state; gathered blocks are bf16 copies (its mixed-precision policy casts
        the weights, no autocast); the root's embeddings and head stay gathered; grad_op keeps every block gathered.
        One process is left unsharded (see `shard`), so nothing is sharded or offloaded then."""
        options = self.recipe.distributed.fsdp or FsdpSection()
        sharded = world > 1
        return Layout("FSDP2 " + ("full sharding" if options.sharding == "full" else "grad_op sharding")
                      + (" with CPU offload" if options.cpu_offload else ""),
                      shard_weights=sharded, shard_gradients=sharded, shard_optimizer=sharded,
                      offload_weights=sharded and options.cpu_offload, offload_optimizer=sharded and options.cpu_offload,
                      autocast=False, cast_weights=sharded,
                      gathered_blocks=2 if sharded else 0, keep_gathered=sharded and options.sharding == "grad_op",
                      root_gathered=sharded)

    def preflight(self, on_gpu: bool) -> None:
        super().preflight(on_gpu)
        options = self.recipe.distributed.fsdp
        if options is not None and options.cpu_offload and not on_gpu:
            raise UserError("distributed.fsdp.cpu_offload: there is no GPU, so parameters already live in CPU memory; remove it")

    def quant_storage(self, compute_dtype):
        """QLoRA: 4-bit weights packed into the compute dtype, so every parameter of a block has one dtype and
        FSDP2 shards them like any other (its default uint8 storage mixes dtypes; accelerate #3983 saw loss 0 and NaN)."""
        return compute_dtype

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
        for module in model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module, **kwargs)
        fully_shard(model, **kwargs)
        return model

    def _shard_kwargs(self, accelerator) -> dict:
        import torch
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy
        options = self.recipe.distributed.fsdp
        kwargs = {"mesh": init_device_mesh(accelerator.device.type, (accelerator.num_processes,)),
                  "reshard_after_forward": options is None or options.sharding == "full"}
        if options is not None and options.cpu_offload:  # GPU only: preflight refused it on CPU
            kwargs["offload_policy"] = CPUOffloadPolicy()
        low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
        if low is not None:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
        return kwargs

    def prepare(self, accelerator, model, optimizer, scheduler):
        """FSDP2 models stay out of accelerator.prepare (accelerate would wrap them in DDP on CPU); the optimiser
        gets accelerate's wrapper, which skips steps while accumulating and unscales fp16 gradients."""
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
            model.set_requires_gradient_sync(now)

    def checkpoint_layout(self, accelerator, model, optimizer, scheduler):
        """Adapters: the trainable part by name; full fine-tuning: torch.distributed.checkpoint shards, each
        rank its own, resharded on load (both resume on any process count)."""
        from launcher.checkpoint import layouts
        if self.recipe.method == "full":
            return layouts.ShardedLayout(accelerator, model, optimizer, scheduler)
        return super().checkpoint_layout(accelerator, model, optimizer, scheduler)

    def export_state_dict(self, accelerator, model) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.distributed.fsdp import FSDPModule
        if not isinstance(model, FSDPModule):  # one process: nothing was sharded
            return model.state_dict()
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (Strategy, DeepSpeed, Fsdp2)}


def strategy_for(recipe: Recipe) -> Strategy:
    return STRATEGIES[recipe.distributed.strategy](recipe)


# Changes of strategy the memory planner may suggest: (what it does, recipe overrides, rough step time vs. unsharded,
# whether it saves memory with one process: only offload does, and FSDP2 leaves one process unsharded).
SHARDING_CHANGES = (
    ("ZeRO-2: shard gradients and optimiser state", ("distributed.strategy=deepspeed", "distributed.deepspeed=zero2"), 1.05, False),
    ("ZeRO-3: shard weights, gradients and optimiser state", ("distributed.strategy=deepspeed", "distributed.deepspeed=zero3"), 1.2, False),
    ("FSDP2 full sharding", ("distributed.strategy=fsdp",), 1.15, False),
    ("ZeRO-3 with weights and optimiser in CPU memory", ("distributed.strategy=deepspeed", "distributed.deepspeed=zero3_offload"), 3.0, True),
    ("FSDP2 with CPU offload", ("distributed.strategy=fsdp", "distributed.fsdp.cpu_offload=true"), 3.0, False),
)


def _accelerate_env(name: str) -> str:
    return os.environ.get(name, "").lower()


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
