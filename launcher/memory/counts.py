"""Bytes a run's choices cost: weights, gradients and optimiser state, counted from the tensors.

One place for these counts, so the run summary, the per-rank logs and the memory planner agree.
Counting is by what each tensor really stores: ZeRO-3 placeholders keep their full size in
`ds_numel`, FSDP2 shards are DTensors, and bitsandbytes packs 4-bit weights two to a byte with
scales beside them. Imports no torch at module level.
"""
from __future__ import annotations

import gc
import math
from dataclasses import dataclass

BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps 32-bit state for smaller tensors (its min_8bit_size default)
BNB_BLOCK = 256  # values per float32 absmax in blockwise 8-bit state


@dataclass
class StatePlacement:
    """Where a strategy keeps model state on each rank, as the memory planner needs it (launcher/distributed/rules.py fills it)."""
    label: str
    shard_weights: bool = False  # each rank holds 1/N of the weights (ZeRO-3, FSDP)
    shard_gradients: bool = False  # and of the gradients (ZeRO-2/3, FSDP)
    shard_optimizer: bool = False  # and of the optimiser state (ZeRO-1/2/3, FSDP)
    offload_weights: bool = False  # sharded weights live in CPU memory
    offload_optimizer: bool = False  # optimiser state (and its fp32 master weights) live in CPU memory
    low_precision_master: bool = False  # weights held in the compute dtype, fp32 master copy inside the optimiser
    autocast: bool = True  # mixed precision by autocast around the forward pass
    cast_weights: bool = False  # mixed precision by computing with compute-dtype copies of the weights (no autocast)
    gathered_blocks: int = 0  # sharded: whole blocks gathered at once (the current one and the prefetched one)
    keep_gathered: bool = False  # sharded weights stay gathered from forward until backward (FSDP grad_op)
    root_gathered: bool = False  # embeddings and head stay gathered for the whole step (FSDP's root)
    bucket_elements: int = 0  # gradient reduction and gather buffers, in elements of the compute dtype
    bucket_grads: bool = False  # a second copy of every gradient in communication buckets (DDP, world > 1)


@dataclass
class ParamCount:
    """The memory a run's choices cost before activations: what the user needs to trust them."""
    total: int
    trainable: int
    weight_bytes: int
    quantised: int = 0  # parameters held in 4 or 8 bits
    quantised_bytes: int = 0  # their packed bytes and scales
    gradient_bytes: int = 0
    optimizer: str = "adamw"
    optimizer_bytes: int = 0

    def line(self) -> str:
        share = 100 * self.trainable / max(self.total, 1)
        bits = 8 * self.quantised_bytes / max(self.quantised, 1)
        quantised = f" ({count_text(self.quantised)} quantised, {bits:.2f} bits each)" if self.quantised else ""
        return (f"{count_text(self.total)} parameters{quantised}, {count_text(self.trainable)} trainable ({share:.2f}%); "
                f"weights {mib_text(self.weight_bytes)}, gradients {mib_text(self.gradient_bytes)}, "
                f"{self.optimizer} state {mib_text(self.optimizer_bytes)}")


def count_text(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def mib_text(count: int) -> str:
    return f"{count / 2**20:.1f} MiB" if count < 10 * 2**20 else f"{count / 2**20:.0f} MiB"


def stored_numel(param) -> int:
    """Elements a parameter really has: ZeRO-3 loads parameters already partitioned (numel 0), ds_numel keeps the count."""
    return getattr(param, "ds_numel", None) or param.numel()


def logical_numel(param) -> int:
    """bitsandbytes packs two 4-bit weights per byte; its quant_state keeps the real shape."""
    state = getattr(param, "quant_state", None)
    return state.shape.numel() if state is not None else stored_numel(param)


def quant_state_bytes(param) -> int:
    """Per-block scales (4-bit) or per-row scales (8-bit) stored beside the packed weights."""
    state = getattr(param, "quant_state", None)
    if state is not None:
        return sum(t.numel() * t.element_size() for t in state.as_dict(packed=False).values() if hasattr(t, "element_size"))
    scales = getattr(param, "SCB", None)
    return scales.numel() * scales.element_size() if scales is not None else 0


def is_quantised(param) -> bool:
    return str(param.dtype) in ("torch.int8", "torch.uint8") or getattr(param, "quant_state", None) is not None


def count_parameters(model, optimizer: str = "adamw") -> ParamCount:
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    quantised = [p for p in params if is_quantised(p)]
    return ParamCount(total=sum(logical_numel(p) for p in params),
                      trainable=sum(stored_numel(p) for p in trainable),
                      weight_bytes=sum(stored_numel(p) * p.element_size() + quant_state_bytes(p) for p in params),
                      quantised=sum(logical_numel(p) for p in quantised),
                      quantised_bytes=sum(stored_numel(p) * p.element_size() + quant_state_bytes(p) for p in quantised),
                      gradient_bytes=sum(stored_numel(p) * p.element_size() for p in trainable),
                      optimizer=optimizer, optimizer_bytes=state_bytes(trainable, optimizer))


def state_bytes(params, name: str) -> int:
    """Bytes of optimiser state `name` will hold for these trainable tensors, known before its first step."""
    total = 0
    for p in params:
        count, size = stored_numel(p), p.element_size()
        if name == "adamw":
            total += 2 * count * size  # exp_avg and exp_avg_sq in the parameter's dtype
        elif name == "sgd":
            total += count * size  # momentum buffer
        elif name == "adafactor":  # factored second moment: one value per row and per column
            total += (count // p.shape[-1] + count // p.shape[-2] if p.ndim >= 2 else count) * size
        elif name.endswith("8bit") and count >= BNB_MIN_8BIT_SIZE:
            total += 2 * count + 2 * 4 * math.ceil(count / BNB_BLOCK)  # two uint8 moments and their float32 block scales
        else:
            total += 2 * count * 4  # bitsandbytes' 32-bit state
    return total


def local_part(param):
    """The tensor this rank really holds of a parameter: a ZeRO-3 placeholder's partition (ds_tensor), an FSDP2
    DTensor's local shard, else the parameter itself."""
    if hasattr(param, "ds_tensor"):
        return param.ds_tensor
    return param.to_local() if hasattr(param, "to_local") else param


def parameter_bytes(model) -> dict:
    """Bytes of parameters this rank really holds (a shard under FSDP2 and ZeRO-3), and of the whole model."""
    local = full = 0
    for param in model.parameters():
        held = local_part(param)
        local += held.numel() * held.element_size()
        full += (param.ds_numel if hasattr(param, "ds_tensor") else param.numel()) * held.element_size()
    return {"parameter_bytes": local, "full_parameter_bytes": full}


def process_parameter_bytes() -> int:
    """Bytes held by every parameter alive in this process, whichever model or wrapper holds it: equal to the trained
    model's `parameter_bytes` when it is the only model here (a second copy, sharded or not, would add its own).
    Collects garbage first and walks the garbage collector's objects: a fraction of a second, so called once a run."""
    import torch
    gc.collect()
    total = 0
    for item in gc.get_objects():  # each object once
        kind = type(item)  # not isinstance: it reads __class__, which a few deprecated torch objects answer with a warning
        if issubclass(kind, torch.nn.Parameter) or (issubclass(kind, torch.Tensor) and getattr(item, "_is_param", False)):
            total += _resident(item)  # _is_param: a tensor subclass made a Parameter (FSDP2's DTensors)
    return total


def _resident(param) -> int:
    """Bytes of a parameter's local part, but 0 for one with no memory behind it: on meta, or FSDP2's full-size
    unsharded parameter, whose storage is freed (resized to 0) while the module is sharded."""
    held = local_part(param)
    if held.device.type == "meta":
        return 0
    return min(held.numel() * held.element_size(), held.untyped_storage().nbytes())


def four_bit_bytes(numel: int, double_quant: bool, blocksize: int = 64) -> int:
    """Bytes bitsandbytes stores for a 4-bit weight of `numel` values, as `quant_state_bytes` counts a loaded one:
    two values per byte, one absmax per block (uint8 with a float32 scale per 256 of them when double-quantised,
    else float32), and the 16-value code book (plus the 256-value one of the nested scales)."""
    blocks = math.ceil(numel / blocksize)
    scales = blocks + 4 * math.ceil(blocks / 256) + 4 * 256 if double_quant else 4 * blocks
    return math.ceil(numel / 2) + scales + 4 * 16


def eight_bit_bytes(rows: int, columns: int) -> int:
    """LLM.int8 weights: one byte per value and a float32 scale per output row (SCB)."""
    return rows * columns + 4 * rows
