"""What a model holds, for the memory planner: counts from a one-block copy built on the meta device.

The config comes from a local or packaged folder, the configs this package ships for hub ids
(launcher/model_configs/), or the Hugging Face cache; nothing is downloaded and no weights are read.
Parameters are counted as launcher/memory.py counts a loaded model (4-bit weights by their packed
bytes and scales); LoRA adapters are added as peft would add them, without importing peft.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

from launcher.memory import counts as memory
from launcher.model import loading as modeling
from launcher.preflight.locations import SHIPPED_CONFIGS
from launcher.recipe.schema import Recipe
from launcher.errors import UserError

OUTPUT_PROJECTIONS = ("o_proj", "down_proj", "out_proj", "wo", "w2", "fc2", "dense_4h_to_h", "c_proj")


def shipped_config(hub_id: str) -> Path | None:
    """The config.json this package ships for a hub id (`org/name` -> model_configs/org--name/), if any."""
    folder = SHIPPED_CONFIGS / hub_id.replace("/", "--")
    return folder if (folder / "config.json").is_file() else None


def model_config(recipe: Recipe):
    """The transformers config of the recipe's model, found offline: a local or packaged folder, the shipped
    configs, or the hub cache."""
    from transformers import AutoConfig
    path, gguf = modeling.weights_folder(recipe), recipe.model.gguf_file
    if not Path(path).is_dir() and shipped_config(path) is not None:
        path = str(shipped_config(path))
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=recipe.model.trust_remote_code,
                                          **({"gguf_file": gguf} if gguf else {}))
    except (OSError, ValueError) as exc:
        raise UserError(f"model.path: no config.json found offline for {recipe.model.path} ({str(exc).splitlines()[0]}); "
                        f"download it (huggingface-cli download {recipe.model.path} config.json) or add "
                        f"launcher/model_configs/{recipe.model.path.replace('/', '--')}/config.json") from None


@dataclass(frozen=True)
class Linear:
    name: str
    inputs: int
    outputs: int
    own_input: bool  # its input is not the preceding norm's output (an output projection)
    trainable: bool  # the base weight gets gradients
    adapted: bool  # a LoRA adapter sits beside it
    quantised: bool


@dataclass
class Inventory:
    """Counts from the one-block meta model: `block_*` per block, `rest_*` for everything outside the blocks."""
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_dim: int
    q_dim: int
    vocab: int
    block_params: int
    block_weight_bytes: int
    rest_weight_bytes: int
    block_trainable: int
    rest_trainable: int
    block_state_bytes: int  # optimiser state per block in the trainable parameters' own dtype
    rest_state_bytes: int
    trainable_bytes: int  # bytes of all trainable parameters (their gradients' size), whole model
    rest_params: int
    linears: tuple[Linear, ...]
    rms_norms: tuple[bool, ...]  # per norm in a block: weight trainable
    layer_norms: tuple[bool, ...]
    final_norm_trainable: bool
    head_trainable: bool
    gated: bool
    autocast_block_params: int  # float32 linear weights autocast copies, per block
    autocast_rest_params: int  # and outside the blocks (the head)

    @property
    def params(self) -> int:
        return self.layers * self.block_params + self.rest_params

    @property
    def trainable(self) -> int:
        return self.layers * self.block_trainable + self.rest_trainable


def resolved_dtypes(recipe: Recipe, device: str = "cuda") -> dict:
    """Weight, compute and 4-bit compute dtypes as they resolve on `device` (launcher/model/loading.py's rules; a GPU
    is taken to have bf16, as every GPU the real-size recipes name does)."""
    gpu = device == "cuda"
    quant = modeling.compute_dtype_name(recipe, gpu, gpu_has_bf16=True)
    weight = modeling.weight_dtype_name(recipe, gpu, gpu_has_bf16=True)
    precision = recipe.train.precision if recipe.train.precision != "auto" else ("bf16" if gpu else "fp32")
    return {"weight": weight, "precision": precision, "quant_compute": quant}


def inventory(recipe: Recipe, device: str = "cuda") -> Inventory:
    """The model's counts for this recipe's method, adapters and dtypes (cached: suggestions reuse it)."""
    dtypes = resolved_dtypes(recipe, device)
    key = json.dumps([recipe.model.model_dump(mode="json"), recipe.method, recipe.lora.model_dump(mode="json"),
                      recipe.quant.model_dump(mode="json"), recipe.freeze.model_dump(mode="json"), dtypes])
    if key not in _INVENTORIES:
        _INVENTORIES[key] = _inventory(recipe, dtypes)
    return _INVENTORIES[key]


_INVENTORIES: dict[str, Inventory] = {}


def _inventory(recipe: Recipe, dtypes: dict) -> Inventory:
    import torch

    config = model_config(recipe)
    layers = config.num_hidden_layers
    one = copy.deepcopy(config)
    one.num_hidden_layers = 1
    if isinstance(getattr(one, "layer_types", None), list):
        one.layer_types = one.layer_types[:1]
    stored = dtypes["weight"]
    if recipe.model.task == "classification":
        one.num_labels = 2  # the head is a rounding error beside the encoder
    with torch.device("meta"):
        model = modeling.unpartitioned_from_config(recipe.model.task, one, dtype=getattr(torch, stored))
        if recipe.method == "full":
            modeling.freeze(model, recipe.model_copy(update={"freeze": recipe.freeze.model_copy(update={"first_n_blocks": 0})}))
        else:
            for param in model.parameters():
                param.requires_grad_(False)
        return _count(model, config, layers, recipe)


def adapted_names(model, recipe: Recipe) -> set[str]:
    """Linear layers peft's LoraConfig would adapt: names equal to or ending in a target, or with all-linear every
    linear layer but the output head (peft's rule), found without importing peft."""
    import torch
    if recipe.method == "full":
        return set()
    head = model.get_output_embeddings()
    targets = recipe.lora.target_modules
    found = set()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head or name.rsplit(".", 1)[-1] in ("score", "classifier"):
            continue
        if targets == "all-linear" or any(name == t or name.endswith("." + t) for t in targets):
            found.add(name)
    return found


def _block_prefix(model) -> str:
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    for name, module in model.named_modules():
        if type(module).__name__ in blocks and name.endswith(".0"):  # the first of the repeated blocks (not, e.g., embeddings)
            return name + "."
    raise UserError(f"model: {type(model).__name__} names no transformer block class (_no_split_modules); cannot plan it")


def _linears(model, prefix: str, recipe: Recipe, adapted: set[str]) -> tuple[Linear, ...]:
    """The block's linear layers: base weights, whether an adapter sits beside them, and whose output they read."""
    import torch
    found = []
    for name, module in model.named_modules():
        if not name.startswith(prefix) or not isinstance(module, torch.nn.Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        own = leaf in OUTPUT_PROJECTIONS or ".output." in f".{name[len(prefix):]}."
        found.append(Linear(name, module.in_features, module.out_features, own, module.weight.requires_grad, name in adapted,
                            recipe.method == "qlora"))
    return tuple(found)


def _adapter_params(model, adapted: set[str], recipe: Recipe) -> list:
    """LoRA's A and B matrices (float32, as peft upcasts adapters) and full copies of modules_to_save, as meta tensors."""
    import torch
    params = []
    for name, module in model.named_modules():
        if name in adapted:
            params += [(name, torch.empty(recipe.lora.r, module.in_features, device="meta")),
                       (name, torch.empty(module.out_features, recipe.lora.r, device="meta"))]
        elif name.rsplit(".", 1)[-1] in recipe.lora.modules_to_save:
            params += [(name, torch.empty_like(p, device="meta")) for p in module.parameters()]
    return params


def _count(model, config, layers: int, recipe: Recipe) -> Inventory:
    prefix = _block_prefix(model)
    adapted = adapted_names(model, recipe)
    linears = _linears(model, prefix, recipe, adapted)
    quantised = {f"{lin.name}.weight": lin for lin in linears if lin.quantised}
    sums = {key: 0 for key in ("block_params", "block_weight", "rest_weight", "block_trainable", "rest_trainable",
                               "block_state", "rest_state", "block_grad", "rest_grad", "rest_params", "block_fp32", "rest_fp32")}
    linear_weights = {f"{n}.weight" for n, m in model.named_modules() if type(m).__name__ == "Linear"}
    adapters = [(f"{name}.adapter", param.requires_grad_(True)) for name, param in _adapter_params(model, adapted, recipe)]
    for name, param in [*model.named_parameters(), *adapters]:
        part = "block" if name.startswith(prefix) else "rest"
        numel = param.numel()
        if name in quantised:
            held = (memory.four_bit_bytes(numel, recipe.quant.double_quant) if recipe.quant.bits == 4
                    else memory.eight_bit_bytes(*param.shape))
        elif recipe.method == "qlora" and recipe.quant.fp32_non_quantised and not param.requires_grad:
            held = 4 * numel  # peft's k-bit preparation upcasts what stays unquantised
        else:
            held = numel * param.element_size()
        sums[f"{part}_params"] += numel
        sums[f"{part}_weight"] += held
        if name in linear_weights and name not in quantised and param.element_size() == 4:
            sums[f"{part}_fp32"] += numel
        if param.requires_grad:
            sums[f"{part}_trainable"] += numel
            sums[f"{part}_grad"] += numel * param.element_size()
            sums[f"{part}_state"] += memory.state_bytes([param], recipe.train.optimizer)
    norms = [(name.startswith(prefix), "RMS" in type(m).__name__, any(p.requires_grad for p in m.parameters()))
             for name, m in model.named_modules() if "Norm" in type(m).__name__ and list(m.parameters())]
    head = model.get_output_embeddings()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Inventory(
        layers=layers, hidden=config.hidden_size, intermediate=getattr(config, "intermediate_size", 4 * config.hidden_size),
        heads=heads, kv_dim=(getattr(config, "num_key_value_heads", None) or heads) * head_dim, q_dim=heads * head_dim,
        vocab=config.vocab_size, block_params=sums["block_params"], block_weight_bytes=sums["block_weight"],
        rest_weight_bytes=sums["rest_weight"], block_trainable=sums["block_trainable"], rest_trainable=sums["rest_trainable"],
        block_state_bytes=sums["block_state"], rest_state_bytes=sums["rest_state"],
        trainable_bytes=layers * sums["block_grad"] + sums["rest_grad"], rest_params=sums["rest_params"], linears=linears,
        rms_norms=tuple(t for inside, rms, t in norms if inside and rms),
        layer_norms=tuple(t for inside, rms, t in norms if inside and not rms),
        final_norm_trainable=any(t for inside, _, t in norms if not inside),
        head_trainable=head is not None and head.weight.requires_grad,
        gated=any(lin.name.rsplit(".", 1)[-1] in ("gate_proj", "w1", "gate_up_proj") for lin in linears),
        autocast_block_params=sums["block_fp32"], autocast_rest_params=sums["rest_fp32"])
