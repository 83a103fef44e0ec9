"""Which modules an adapter run adapts, trains in full or keeps unquantised, and the LoRA variants.

peft builds the adapters (LoRA, DoRA, rsLoRA, PiSSA / OLoRA / LoftQ initialisation); what is
decided here is where they go (`AdapterPlacement`), from a weightless skeleton of the model so it is known before any
weight loads:
- a head is either trained in full (`modules_to_save`: a classifier's new head) or adapted,
  never both (peft refuses to fully train a module it has already wrapped);
- the layers adapted are every linear layer (nn.Linear, GPT-2's Conv1D) outside the heads and
  the output embedding, written as one regex so encoders, decoders and encoder-decoders agree;
- under QLoRA the heads and the output embedding stay unquantised (transformers' default keeps
  only the last *parameter*, which for BERT is `classifier.bias`, so the head got quantised).

PiSSA and OLoRA move the top singular / QR directions of each weight out of the base into the
adapter, so the base in memory is a residual. The adapter saved at export is converted (peft's
`path_initial_model_for_weight_conversion`) into a plain LoRA adapter of twice the rank that
applies to the original base: the saved result then reloads with plain peft.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from launcher.recipe.schema import RESIDUAL_INITS, Recipe

from launcher.errors import UserError
from launcher.rundir.paths import RunDir

# lora.init -> peft's init_lora_weights; the residual inits (PiSSA, OLoRA) rewrite the base weights, so their adapters are
# converted to plain LoRA at export.
INIT = {"default": True, "gaussian": "gaussian", **{name: name for name in RESIDUAL_INITS}, "loftq": True}


@dataclass
class AdapterPlacement:
    """Where the adapter goes in one model, by module name (relative to the transformers model)."""
    targets: str  # regex peft full-matches against module names
    trained_in_full: list[str]  # modules_to_save
    unquantised: list[str]  # QLoRA: modules bitsandbytes must leave in float


def is_linear(module) -> bool:
    """Layers LoRA adapts: torch's Linear (bitsandbytes' 4/8-bit layers subclass it) and GPT-2's Conv1D."""
    import torch
    from transformers.pytorch_utils import Conv1D
    return isinstance(module, (torch.nn.Linear, Conv1D))


def new_heads(model, task: str) -> list[str]:
    """A classifier's head: the top-level modules with weights outside the pretrained backbone
    (BERT: classifier; DistilBERT: pre_classifier and classifier; Llama: score). Generative tasks keep theirs."""
    if task != "classification":
        return []
    backbone = getattr(model, model.base_model_prefix, None)
    return [name for name, child in model.named_children()
            if child is not backbone and any(True for _ in child.parameters())]


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def placement(model, recipe: Recipe) -> AdapterPlacement:
    """Targets, fully trained heads and unquantised modules of `model` (a skeleton will do)."""
    lora = recipe.lora
    names = [name for name, _ in model.named_modules() if name]
    for wanted in lora.modules_to_save:  # peft saves the modules whose name is this or ends in .this
        if not any(name == wanted or name.endswith("." + wanted) for name in names):
            raise UserError(f"lora.modules_to_save: {wanted!r} names no module of {type(model).__name__} (its top-level "
                            f"modules: {', '.join(n for n in names if '.' not in n)}); fix or remove it")
    heads = sorted(set(new_heads(model, recipe.model.task)) | set(lora.modules_to_save))
    output = model.get_output_embeddings()
    output_names = [n for n, m in model.named_modules() if output is not None and m is output]
    excluded = heads + output_names
    linears = {name for name, module in model.named_modules() if is_linear(module) and name}
    if lora.target_modules == "all-linear":
        leaves = sorted({name.rsplit(".", 1)[-1] for name in linears if not _under(name, excluded)})
    else:
        leaves = list(lora.target_modules)
        kinds = sorted({name.rsplit(".", 1)[-1] for name in linears})
        unmatched = [leaf for leaf in leaves if leaf not in kinds]
        if unmatched:
            raise UserError(f"lora.target_modules: {unmatched[0]!r} names no linear layer of {type(model).__name__} "
                            f"(its linear layers: {', '.join(kinds)}); fix or remove it")
        clash = [n for n in linears if _under(n, heads) and n.rsplit(".", 1)[-1] in leaves]
        if clash:
            raise UserError(f"lora.target_modules {leaves} would adapt {clash[0]}, which is trained in full "
                            f"(lora.modules_to_save or the classifier's new head {heads}); a module is adapted or "
                            "trained in full, not both: remove it from one of them")
    if not leaves:
        raise UserError(f"lora.target_modules: no linear layer of {type(model).__name__} to adapt outside {excluded}")
    negative = f"(?!(?:{'|'.join(map(re.escape, excluded))})(?:\\.|$))" if excluded else ""
    targets = f"^{negative}(?:.*\\.)?(?:{'|'.join(map(re.escape, leaves))})$"
    if not any(re.fullmatch(targets, name) for name in linears):
        raise UserError(f"lora.target_modules {leaves} match no linear layer of {type(model).__name__}")
    return AdapterPlacement(targets, heads, sorted(set(excluded)))


def lora_config(recipe: Recipe, where: AdapterPlacement):
    from peft import LoraConfig, TaskType
    task_type = {"causal-lm": TaskType.CAUSAL_LM, "seq2seq": TaskType.SEQ_2_SEQ_LM,
                 "classification": TaskType.SEQ_CLS}[recipe.model.task]
    lora = recipe.lora
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type=task_type,
                      target_modules=where.targets, modules_to_save=where.trained_in_full or None,
                      use_dora=lora.dora, use_rslora=lora.rslora, init_lora_weights=INIT[lora.init])


def add_adapter(model, recipe: Recipe, where: AdapterPlacement):
    """The peft model. PiSSA/OLoRA save their adapter before training into the run directory (the main
    process; every rank computes the same one) for the conversion at export. LoftQ re-initialises the
    adapters of a 4-bit base from the original weights (CUDA only: preflight refuses it elsewhere)."""
    from accelerate import PartialState
    from peft import get_peft_model
    peft_model = get_peft_model(model, lora_config(recipe, where))
    if recipe.lora.init in RESIDUAL_INITS and PartialState().is_main_process:
        peft_model.save_pretrained(RunDir(recipe.output_dir).adapter_init)
    if recipe.lora.init == "loftq":
        from peft import replace_lora_weights_loftq
        replace_lora_weights_loftq(peft_model)
    return peft_model


def low_precision_trainable(model) -> list[str]:
    """Trainable parameters held below float32 (peft upcasts LoRA layers on a bf16 base, not `modules_to_save`)."""
    import torch
    return [name for name, p in model.named_parameters()
            if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32]


def keep_trainable_fp32(model) -> list[str]:
    """Every trainable parameter in float32, so AdamW updates a full-precision copy (a bf16 head would lose small
    updates to rounding). Each upcast module computes on inputs cast to its weights' dtype and hands back
    outputs in the dtype it had, so the bf16 layers around it see what they saw before. Returns the names."""
    import torch
    names = low_precision_trainable(model)
    owners = {name.rpartition(".")[0] for name in names}
    for owner in owners:
        module = model.get_submodule(owner)
        before = next(p.dtype for p in module.parameters(recurse=False) if p.is_floating_point())
        module.to(torch.float32)
        module.register_forward_pre_hook(partial(_cast_floats, to=None))
        module.register_forward_hook(partial(_cast_output, to=before))
    return names


def _cast_floats(module, inputs, to=None):
    """Floating inputs to the module's weight dtype (float32 here; what DeepSpeed may later cast it to)."""
    import torch
    dtype = to or next(p.dtype for p in module.parameters(recurse=False) if p.is_floating_point())
    return tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)


def _cast_output(module, inputs, output, to=None):
    return _cast_floats(module, (output,), to)[0] if not isinstance(output, tuple) else _cast_floats(module, output, to)


def export_kwargs(model, run_dir: Path) -> dict:
    """save_pretrained arguments that turn a PiSSA/OLoRA adapter into a plain LoRA one (rank 2r) for the
    original base, so the export reloads with plain peft; nothing for other models."""
    config = getattr(model, "peft_config", {}).get("default")
    if config is None or str(config.init_lora_weights) not in RESIDUAL_INITS:
        return {}
    # peft reads the initial adapter through the state dict it is given: it must be the model's own (whole, unsharded).
    return {"path_initial_model_for_weight_conversion": str(RunDir(run_dir).adapter_init), "state_dict": None}


def loraplus_groups(model, groups: list[dict], lr: float, ratio: float | None) -> list[dict]:
    """LoRA+: the B matrices learn `ratio` times faster than the rest (Hayou et al., 2024); other groups keep lr."""
    if not ratio:
        return groups
    b_ids = {id(p) for name, p in model.named_parameters() if p.requires_grad and ".lora_B." in name}
    split = []
    for group in groups:
        for is_b in (False, True):
            params = [p for p in group["params"] if (id(p) in b_ids) == is_b]
            if params:
                split.append({**group, "params": params, **({"lr": lr * ratio} if is_b else {})})
    return split
