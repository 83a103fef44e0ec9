"""What goes inside a checkpoint folder (its layout); checkpoint.py makes the folder atomic.

Three layouts, chosen by the strategy object (`Strategy.checkpoint_layout`):

- `AccelerateLayout`: accelerate's save_state/load_state. DDP full fine-tuning (every rank holds
  the whole model, so it resumes on any process count) and DeepSpeed full fine-tuning (DeepSpeed's
  own per-rank shards; on another process count they load through their universal conversion,
  launcher/checkpoint/universal.py).
- `TrainableLayout`: adapter runs (LoRA, QLoRA) under every strategy. Only the trainable
  parameters and their optimiser state, keyed by parameter name and gathered whole into
  `trainable.pt`; the frozen base is never written. An adapter is a small fraction of the model,
  so gathering it costs little, and a file keyed by name loads on any number of processes.
- `ShardedLayout`: FSDP2 full fine-tuning through torch.distributed.checkpoint (`dcp/`): each
  rank writes and reads only its own shards, and DCP reshards on load when the process count
  changed. Nothing gathers the whole model.

Every layout also writes the schedule (`scheduler.pt`) and each rank's RNG (`rng-R.pt`); the
data position is the step in trainer_state.json (launcher/data.py's StepPlan jumps to any step).
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader

from launcher.checkpoint import verify

TRAINABLE_FILE = "trainable.pt"
SCHEDULER_FILE = "scheduler.pt"
SHARDS_FOLDER = "dcp"


def write(obj, path: Path) -> None:
    """torch.save through a Python file, so a write the filesystem refuses keeps its errno (diskspace.refused_writes)."""
    with open(path, "wb") as handle:
        torch.save(obj, handle)


def rng_file(rank: int) -> str:
    return f"rng-{rank}.pt"


def capture_rng() -> dict:
    """This process's generators; of CUDA's only its own device's (every device's would not restore on a
    process that sees fewer devices)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def cuda_rng_for(saved, device_index: int):
    """The saved CUDA generator state to restore on device `device_index`: the one saved tensor, or from a
    checkpoint that saved every visible device, that device's entry when it exists, else the first."""
    if isinstance(saved, (list, tuple)):
        return saved[device_index] if device_index < len(saved) else saved[0]
    return saved


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_rng_for(state["cuda"], torch.cuda.current_device()))


class CheckpointLayout:
    """Schedule and per-rank RNG, common to the launcher's own layouts; subclasses add model and optimiser.
    `bytes_read`: model and optimiser bytes this rank read on load (the rank log records it)."""

    bytes_read: int | None = None

    def __init__(self, accelerator, model, optimizer, scheduler, inner=None) -> None:
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.inner = inner if inner is not None else model  # the model under any DDP/DeepSpeed wrapper: names as saved

    def save(self, folder: Path) -> None:
        self.save_weights(folder)
        if self.accelerator.is_main_process:
            write(self.scheduler.state_dict(), folder / SCHEDULER_FILE)
        write(capture_rng(), folder / rng_file(self.accelerator.process_index))

    def load(self, folder: Path) -> None:
        self.load_weights(folder)
        self.scheduler.load_state_dict(torch.load(folder / SCHEDULER_FILE, weights_only=False))
        schedule = getattr(self.scheduler, "scheduler", self.scheduler)  # under accelerate's wrapper
        for group, lr in zip(schedule.optimizer.param_groups, schedule.get_last_lr()):
            group["lr"] = lr  # the rate the next step uses (an optimiser loaded by name does not carry it)
        own = folder / rng_file(self.accelerator.process_index)
        # a rank that did not exist when the checkpoint was written continues rank 0's stream
        restore_rng(torch.load(own if own.is_file() else folder / rng_file(0), weights_only=False))

    def save_weights(self, folder: Path) -> None:
        raise NotImplementedError

    def load_weights(self, folder: Path) -> None:
        raise NotImplementedError


class AccelerateLayout:
    """accelerate's own save_state/load_state (model, optimiser, scheduler, every rank's RNG)."""

    bytes_read: int | None = None  # not counted

    def __init__(self, accelerator, load_kwargs: dict) -> None:
        self.accelerator, self.load_kwargs = accelerator, load_kwargs

    def save(self, folder: Path) -> None:
        self.accelerator.save_state(str(folder))

    def load(self, folder: Path) -> None:
        self.accelerator.load_state(str(folder), **self.load_kwargs)
        # load_state restores accelerate's micro-batch count, which places the accumulation boundary; a run resumes
        # at an optimiser-step boundary, and on another process count grad_accum may have changed, so count afresh
        self.accelerator.step = 0


def step_tensor(value: float, param, group: dict) -> torch.Tensor:
    """An Adam/AdamW `step` counter as torch keeps it: on the parameter's device in a fused or capturable
    group (the fused CUDA kernel reads it there), a CPU scalar otherwise; float32 unless the default
    dtype is float64. torch's own load_state_dict follows the same rule; the ZeRO path sets state by hand."""
    on_device = group.get("fused") or group.get("capturable")
    dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    return torch.tensor(float(value), dtype=dtype, device=param.device if on_device else "cpu")


def group_of(optimizer, param) -> dict:
    """The param group holding `param`, else the first (ZeRO-3 swaps its partitions in only during a step;
    `fused` and `capturable` are set for the whole optimiser)."""
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    return optimizer.param_groups[0] if optimizer.param_groups else {}


def base_optimizer(optimizer):
    """The torch optimiser under accelerate's (and DeepSpeed's) wrappers."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


class TrainableLayout(CheckpointLayout):
    """Trainable parameters and their optimiser state, whole and keyed by name, through torch's
    distributed state-dict API (plain modules, DDP and FSDP2 alike); frozen parameters are skipped
    before anything is gathered."""

    def trainable_names(self) -> set[str]:
        return {name for name, p in self.inner.named_parameters() if p.requires_grad}

    def gather(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        options = StateDictOptions(full_state_dict=True, cpu_offload=dist.is_initialized(), ignore_frozen_params=True)
        model, optim = get_state_dict(self.model, base_optimizer(self.optimizer), options=options)
        keep = self.trainable_names()  # quantised bases also carry non-parameter entries (absmax, quant_map)
        return {"model": {k: v for k, v in model.items() if k in keep}, "optimizer": optim}

    def scatter(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
        set_state_dict(self.model, base_optimizer(self.optimizer), model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"], options=StateDictOptions(full_state_dict=True, strict=False))

    def save_weights(self, folder: Path) -> None:
        state = self.gather()  # every rank takes part; the main process writes
        if self.accelerator.is_main_process:
            write(state, folder / TRAINABLE_FILE)
            verify.trainable_file(folder / TRAINABLE_FILE, state["model"])  # read back before the checkpoint counts

    def load_weights(self, folder: Path) -> None:
        self.scatter(torch.load(folder / TRAINABLE_FILE, map_location="cpu", weights_only=False))
        self.bytes_read = (folder / TRAINABLE_FILE).stat().st_size


class ZeroTrainableLayout(TrainableLayout):
    """The same file under DeepSpeed ZeRO 1/2/3, whose fp32 weights and optimiser state live in flat
    per-rank partitions: DeepSpeed's safe_get/safe_set helpers assemble and split them by parameter."""

    def named_trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(name, p) for name, p in self.inner.named_parameters() if p.requires_grad]

    def gather(self) -> dict:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
        base = base_optimizer(self.optimizer)
        keys = [k for k in next(iter(base.state.values()), {}) if k != "step"]
        weights, moments = {}, {}
        for name, param in self.named_trainable():  # collective: same order on every rank
            weights[name] = safe_get_full_fp32_param(param).detach().cpu().clone()
            moments[name] = {k: safe_get_full_optimizer_state(param, k).detach().cpu().clone() for k in keys}
        steps = [float(s["step"]) for s in base.state.values() if "step" in s]
        return {"model": weights, "optimizer": {"state": moments, "step": max(steps, default=0.0)}}

    def scatter(self, state: dict) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
        engine_optimizer = self.optimizer.optimizer  # DeepSpeed's ZeRO optimiser, under accelerate's wrapper
        self.create_state(next(iter(state["optimizer"]["state"].values()), {}).keys())
        if hasattr(engine_optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2 link each parameter to its
            engine_optimizer._lazy_init_hp_params_optimizer_state()  # slice of the optimiser state only at a step
        for name, param in self.named_trainable():
            safe_set_full_fp32_param(param, state["model"][name].to(param.device))
            for key, value in state["optimizer"]["state"][name].items():
                safe_set_full_optimizer_state(param, value.to(param.device), key)
        base = base_optimizer(self.optimizer)
        for param, param_state in base.state.items():  # ZeRO-3's flat partitions join param_groups only during a step
            if "step" in param_state:
                param_state["step"] = step_tensor(state["optimizer"]["step"], param, group_of(base, param))
        if hasattr(engine_optimizer, "update_lp_params"):  # ZeRO-1/2: copy fp32 masters into the model's weights
            engine_optimizer.update_lp_params()
        else:  # ZeRO-3: the same, per parameter sub-group
            for group in range(len(engine_optimizer.fp16_groups)):
                engine_optimizer._reassign_or_swap_out_partitioned_parameters(group)

    def create_state(self, keys) -> None:
        """Zeroed optimiser state where the optimiser creates it only at its first step (ZeRO-3), to be overwritten."""
        base = base_optimizer(self.optimizer)
        # ZeRO-3 hands its fp32 partitions to the torch optimiser only during a step
        flats = getattr(self.optimizer.optimizer, "fp32_partitioned_groups_flat", None) or \
            [p for group in base.param_groups for p in group["params"]]
        for flat in flats:
            if not base.state[flat]:
                base.state[flat] = {"step": step_tensor(0, flat, group_of(base, flat)),
                                    **{k: torch.zeros_like(flat) for k in keys}}


class ShardedLayout(CheckpointLayout):
    """FSDP2 model and optimiser through torch.distributed.checkpoint: each rank writes its own shards
    (`dcp/__R_0.distcp`) and reads back only the slices its shards need, resharding when the process
    count changed."""

    def state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model, optim = get_state_dict(self.model, base_optimizer(self.optimizer))
        return {"model": model, "optimizer": optim}

    def save_weights(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        dcp.save(self.state(), storage_writer=dcp.FileSystemWriter(folder / SHARDS_FOLDER, single_file_per_rank=True))

    def load_weights(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict
        state, reader = self.state(), CountingReader(folder / SHARDS_FOLDER)
        dcp.load(state, storage_reader=reader)
        self.bytes_read = reader.bytes_read
        set_state_dict(self.model, base_optimizer(self.optimizer), model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])


class CountingReader(FileSystemReader):
    """A FileSystemReader that counts the bytes of the stored items this rank's read plan reads."""

    bytes_read = 0

    def read_data(self, plan, planner):
        self.bytes_read += sum(self.storage_data[item.storage_index].length for item in plan.items)
        return super().read_data(plan, planner)
