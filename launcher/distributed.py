"""How the model is spread over processes (DDP, DeepSpeed ZeRO, FSDP2), and guards against launches
that silently are not distributed.

- DDP and DeepSpeed go through Accelerate; the DeepSpeed plugin is built from the recipe and a
  ds_configs/ JSON, whose "auto" values the launcher fills itself (accelerate would take them from
  a prepared DataLoader, which this loop does not use).
- FSDP2 is torch's `fully_shard`, applied here: accelerate only switches to FSDP on accelerator
  devices, so on CPU its plugin exits 0 while training unsharded (ENVIRONMENT.md). One code path
  on CPU and GPU means the tests exercise what users run. Its checkpoints are full (gathered)
  state dicts saved through accelerate's custom-object checkpointing, so they resume on any
  number of processes.
- On CPU, accelerate picks no process-group backend and counts one process even when several
  started; naming gloo fixes the count, and the world-size and gradient-sync checks turn the
  remaining silent cases into errors.
"""
from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

from launcher.recipe import Recipe, UserError

DS_CONFIGS = Path(__file__).resolve().parent / "ds_configs"  # symlink to the repo's ds_configs/, packaged in wheels
CPU_LAUNCH = ("`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N -m launcher R` "
              "or `torchrun --nproc_per_node N -m launcher R` (on GPUs: `accelerate launch --num_processes N -m launcher R`)")


def launched_world_size() -> int:
    """The number of processes the launcher (torchrun, accelerate, Slurm's srun) says it started."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def mixed_precision(recipe: Recipe, on_gpu: bool) -> str:
    choice = recipe.train.precision
    if choice == "auto":
        import torch
        return "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "no"
    if choice != "fp32" and not on_gpu and choice == "fp16":
        raise UserError("train.precision: fp16 needs a GPU; use fp32 or bf16 on CPU")
    return {"fp32": "no"}.get(choice, choice)


# ---------------------------------------------------------------- DeepSpeed config (no torch)

def deepspeed_path(recipe: Recipe) -> Path:
    name = recipe.distributed.deepspeed or ""
    return Path(name) if name.endswith(".json") else DS_CONFIGS / f"{name}.json"


def deepspeed_config(recipe: Recipe, world_size: int | None, precision: str | None = None) -> dict:
    """The recipe's DeepSpeed JSON, checked against the recipe, with every "auto" the launcher knows filled.

    Called at validation time (world_size from distributed.num_processes, maybe unknown) and again
    at launch with the real world size.
    """
    path, train = deepspeed_path(recipe), recipe.train
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
    zero = config.setdefault("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise UserError(f"distributed.deepspeed: {path}: unknown ZeRO stage {stage!r} (use 0, 1, 2 or 3)")
    if stage == 3 and train.l2_lambda:
        raise UserError("train.l2_lambda with ZeRO-3: parameters are partitioned across ranks, so the penalty would be "
                        "computed on empty placeholders; use train.weight_decay, or zero1 / zero2 / ddp")
    wanted = {"train_micro_batch_size_per_gpu": train.micro_batch_size, "gradient_accumulation_steps": train.grad_accum,
              "gradient_clipping": train.max_grad_norm or 0.0}
    if world_size is not None:
        wanted["train_batch_size"] = train.micro_batch_size * train.grad_accum * world_size
    recipe_key = {"train_micro_batch_size_per_gpu": "train.micro_batch_size", "gradient_accumulation_steps": "train.grad_accum",
                  "gradient_clipping": "train.max_grad_norm", "train_batch_size": "micro_batch_size x grad_accum x processes"}
    for key, value in wanted.items():
        given = config.get(key, "auto")
        if given == "auto":
            config[key] = value
        elif given != value:
            raise UserError(f"distributed.deepspeed: {path} hard-codes {key}={given} but the recipe gives {recipe_key[key]}={value}; "
                            f"set it to \"auto\" in the JSON (the launcher fills it) or make them agree")
    if precision is not None:
        for kind in ("bf16", "fp16"):
            block = config.setdefault(kind, {})
            if block.get("enabled", "auto") == "auto":
                block["enabled"] = precision == kind
            elif bool(block["enabled"]) != (precision == kind):
                raise UserError(f"distributed.deepspeed: {path} sets {kind}.enabled={block['enabled']} but train.precision "
                                f"resolves to {precision}; set it to \"auto\" or make them agree")
    return config


def deepspeed_stage(recipe: Recipe) -> int | None:
    if recipe.distributed.strategy != "deepspeed":
        return None
    return deepspeed_config(recipe, None).get("zero_optimization", {}).get("stage", 0)


# ---------------------------------------------------------------- launch checks

def check_launch(recipe: Recipe, on_gpu: bool) -> None:
    """Before any process group or model: the process count, options this device cannot honour, and an
    accelerate config that contradicts the recipe."""
    dist = recipe.distributed
    if dist.fsdp is not None and dist.fsdp.cpu_offload and not on_gpu:
        raise UserError("distributed.fsdp.cpu_offload: there is no GPU, so parameters already live in CPU memory; remove it")
    started = launched_world_size()
    if dist.num_processes is not None and started != dist.num_processes:
        raise UserError(f"distributed.num_processes is {dist.num_processes} but {started} process{'es' * (started != 1)} "
                        f"started; launch with {CPU_LAUNCH.replace(' N ', f' {dist.num_processes} ')}")
    env_ds = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    env_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    fix = "the recipe's distributed section decides; drop that setting from the accelerate config (or the --use_* flag)"
    if env_ds and dist.strategy != "deepspeed":
        raise UserError(f"accelerate launch is set up for DeepSpeed (ACCELERATE_USE_DEEPSPEED=true) but distributed.strategy "
                        f"is {dist.strategy}; {fix}, or set distributed.strategy: deepspeed")
    if env_fsdp:
        raise UserError("accelerate launch is set up for FSDP (ACCELERATE_USE_FSDP=true); the launcher applies FSDP2 itself "
                        f"when distributed.strategy is fsdp; {fix}")
    env_config = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if env_ds and env_config and Path(env_config).resolve() != deepspeed_path(recipe).resolve():
        raise UserError(f"accelerate's config names DeepSpeed config {env_config} but distributed.deepspeed is "
                        f"{deepspeed_path(recipe)}; {fix}")
    env_stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if env_ds and not env_config and env_stage and int(env_stage) != deepspeed_stage(recipe):
        raise UserError(f"accelerate's config asks for ZeRO stage {env_stage} but distributed.deepspeed gives stage "
                        f"{deepspeed_stage(recipe)}; {fix}")


def check_world_size(seen: int) -> None:
    """Refuse a launch whose process count differs from what its launcher announced."""
    expected = launched_world_size()
    if seen != expected:
        raise UserError(f"the launcher started {expected} processes but training sees {seen}: they would train "
                        f"independently. Use {CPU_LAUNCH}")


def make_accelerator(recipe: Recipe):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    on_gpu = torch.cuda.is_available()
    check_launch(recipe, on_gpu)
    world = launched_world_size()
    backend = None if on_gpu or (world == 1 and recipe.distributed.strategy != "deepspeed") else "gloo"
    timeout = timedelta(minutes=recipe.distributed.timeout_minutes)
    precision = mixed_precision(recipe, on_gpu)
    plugin, use_deepspeed = None, recipe.distributed.strategy == "deepspeed"
    if use_deepspeed:
        # Accelerate silently drops DeepSpeed when told to use the CPU (cpu=True or ACCELERATE_USE_CPU, which the
        # documented CPU launch sets); with no GPU, DeepSpeed itself runs on the CPU over gloo.
        os.environ["ACCELERATE_USE_CPU"] = "false"
        if "RANK" not in os.environ:  # `python -m launcher R`: a one-process group, as `accelerate launch` would set up
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if on_gpu else "cpu")
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(recipe, world, precision))
    accelerator = Accelerator(gradient_accumulation_steps=recipe.train.grad_accum, cpu=not (on_gpu or use_deepspeed),
                              mixed_precision=precision, step_scheduler_with_optimizer=False, deepspeed_plugin=plugin,
                              kwargs_handlers=[InitProcessGroupKwargs(backend=backend, timeout=timeout)])
    check_world_size(accelerator.num_processes)
    if use_deepspeed and accelerator.distributed_type != "DEEPSPEED":
        raise RuntimeError(f"accelerate chose {accelerator.distributed_type} instead of DeepSpeed for strategy deepspeed")
    return accelerator


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- preparing the model

def shard_model(model, recipe: Recipe, accelerator):
    """FSDP2: shard every transformer block, then the root, over all processes. Other strategies: unchanged.

    Must run before the optimiser is built: fully_shard replaces parameters with DTensor shards.
    """
    if recipe.distributed.strategy != "fsdp":
        return model
    options = recipe.distributed.fsdp
    if options is not None and options.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if accelerator.num_processes == 1:
        return model  # nothing to shard over; checkpoints stay full, so they resume on any count
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs = {"mesh": init_device_mesh(accelerator.device.type, (accelerator.num_processes,)),
              "reshard_after_forward": options is None or options.sharding == "full"}
    if options is not None and options.cpu_offload:  # GPU only: check_launch refused it on CPU
        kwargs["offload_policy"] = CPUOffloadPolicy()
    if accelerator.mixed_precision in ("bf16", "fp16"):
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[accelerator.mixed_precision]),
                                                   reduce_dtype=torch.float32)
    blocks = set(getattr(_base_model(model), "_no_split_modules", None) or [])
    if not blocks:
        raise UserError(f"strategy fsdp: {type(_base_model(model)).__name__} names no transformer block class "
                        "(_no_split_modules) to shard; use strategy deepspeed or ddp")
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _base_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_fsdp(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def prepare(accelerator, recipe: Recipe, model, optimizer, scheduler):
    """accelerator.prepare for DDP and DeepSpeed. FSDP2 models stay out of it (accelerate would wrap them
    in DDP on CPU); their optimiser gets accelerate's wrapper, which skips steps while accumulating,
    and model plus optimiser are checkpointed as full state dicts (FullState)."""
    if recipe.distributed.strategy != "fsdp":
        return accelerator.prepare(model, optimizer, scheduler)
    from accelerate.optimizer import AcceleratedOptimizer
    scheduler = accelerator.prepare(scheduler)
    accelerator.register_for_checkpointing(FullState(model, optimizer))
    return model, AcceleratedOptimizer(optimizer, device_placement=False), scheduler


class FullState:
    """Model and optimiser of an FSDP2 run as full state dicts keyed by parameter name: gathered on save
    (every rank takes part; the main process writes), sliced back into shards on load."""

    def __init__(self, model, optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        options = StateDictOptions(full_state_dict=True, cpu_offload=dist.is_initialized())
        model, optim = get_state_dict(self.model, self.optimizer, options=options)
        return {"model": model, "optimizer": optim}

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True))


def full_state_dict(accelerator, model) -> dict:
    """The whole model's state dict on the main process, whatever the strategy (ZeRO-3 gathers through
    accelerate, which needs stage3_gather_16bit_weights_on_model_save; FSDP2 gathers here)."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return accelerator.get_state_dict(model)


# ---------------------------------------------------------------- checks while training

def parameter_bytes(model) -> dict:
    """Bytes of parameters this rank really holds (a shard under FSDP2 and ZeRO-3), and of the whole model."""
    local = full = 0
    for param in model.parameters():
        if hasattr(param, "ds_tensor"):  # ZeRO-3: a placeholder; ds_tensor is this rank's partition
            local += param.ds_tensor.numel() * param.ds_tensor.element_size()
            full += param.ds_numel * param.ds_tensor.element_size()
            continue
        held = param.to_local() if hasattr(param, "to_local") else param  # FSDP2: a DTensor shard
        local += held.numel() * held.element_size()
        full += param.numel() * param.element_size()
    return {"parameter_bytes": local, "full_parameter_bytes": full}


def write_rank_log(run_dir: Path, accelerator, record: dict) -> None:
    """Every process may log to its own file (logs/rank-R.jsonl); only the main one prints."""
    folder = Path(run_dir) / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"rank-{accelerator.process_index}.jsonl", "a") as handle:
        handle.write(json.dumps({"rank": accelerator.process_index, **record}) + "\n")


def check_synchronised(accelerator, model, recipe: Recipe) -> None:
    """After the first optimiser step, replicated parameters must be identical on every rank; if they are
    not, the processes are training independently (e.g. a group that never reduced gradients)."""
    if accelerator.num_processes == 1 or recipe.distributed.strategy == "fsdp" or deepspeed_stage(recipe) == 3:
        return  # single process, or parameters are sharded: each rank legitimately holds different values
    import torch
    unwrapped = accelerator.unwrap_model(model)
    with torch.no_grad():
        checksum = torch.stack([sum(p.double().sum() for p in unwrapped.parameters() if p.requires_grad),
                                sum(p.double().abs().sum() for p in unwrapped.parameters() if p.requires_grad)])
    seen = accelerator.gather(checksum.to(accelerator.device)).view(-1, 2)
    if not torch.allclose(seen, seen[0].expand_as(seen), rtol=1e-6, atol=0):
        raise UserError(f"gradients are not synchronised: after the first step the {accelerator.num_processes} processes hold "
                        f"different weights (checksums {seen[:, 0].tolist()}), so they would train independently. "
                        f"Launch with {CPU_LAUNCH}")


def check_resume(state: dict, recipe: Recipe, world: int) -> None:
    """Resuming onto another process count works where checkpoints are full (DDP, FSDP2); ZeRO partitions
    the optimiser per rank, so it is refused with what to do instead."""
    saved_world, saved_strategy = state.get("world_size", 1), state.get("strategy", "ddp")
    if saved_world == world or saved_strategy != "deepspeed":
        return
    raise UserError(f"this checkpoint was written by {saved_world} processes under DeepSpeed ZeRO, whose optimiser state is "
                    f"split per process; resume with {saved_world} processes "
                    f"(e.g. {CPU_LAUNCH.replace(' N ', f' {saved_world} ')}), or start fresh with --overwrite")
