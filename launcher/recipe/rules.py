"""The rules between recipe keys: combinations that cannot work, refused before anything loads.

Kept apart from the sections (schema.py) so each reads on its own; `Recipe` runs them after its keys validate.
Imports only the format registry: the recipe it checks is passed in.
"""
from __future__ import annotations

import difflib
import string

from launcher.recipe.formats import FORMATS, LOWER_IS_BETTER, formats_for_task

# LoRA inits that move each weight's top directions into the adapter and leave the residual in the base weights,
# so the adapter is converted to plain LoRA at export (it needs the whole model in one process then).
RESIDUAL_INITS = ("pissa", "olora")
# What each prompt template may name (str.format placeholders).
TEMPLATE_FIELDS = {"prompt_template": {"source_lang", "target_lang", "source"}, "qa_template": {"question", "context"}}


def method_sections(recipe) -> None:
    """A section the method does not read is refused when given at all, so nothing the user wrote is ignored."""
    given = recipe.model_fields_set
    if "quant" in given and recipe.method != "qlora":
        raise ValueError(f"quant: only applies to method: qlora (got method: {recipe.method}); remove it or set method: qlora")
    if "freeze" in given and recipe.method != "full":
        raise ValueError("freeze: only applies to method: full (LoRA already freezes the base); remove it or set method: full")


def data_rules(data) -> None:
    """Source lists that hold something, and prompt templates that name only what a row gives them."""
    for which in ("train", "eval"):
        if getattr(data, which) == []:
            raise ValueError(f"data.{which}: an empty list of sources; give a path or at least one source")
    if data.labels is not None and (data.formats() | {data.format}) != {"classification"}:
        raise ValueError("data.labels: class names apply to data.format classification; remove them")
    if data.labels is not None and len(set(data.labels)) != len(data.labels):
        raise ValueError(f"data.labels: {next(n for n in data.labels if data.labels.count(n) > 1)!r} is listed twice")
    for key, allowed in TEMPLATE_FIELDS.items():
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(getattr(data, key)) if name is not None}
        except ValueError as exc:
            raise ValueError(f"data.{key}: not a valid template ({exc}); write a literal brace as {{{{ or }}}}") from None
        unknown = sorted(name for name in names if name not in allowed)
        if unknown:
            raise ValueError(f"data.{key}: unknown placeholder {{{unknown[0]}}}; it may use "
                             f"{', '.join('{' + n + '}' for n in sorted(allowed))}")


def format_rules(recipe) -> None:
    """Fields, task and metric must be ones the data format has (launcher/formats.py)."""
    task, data = recipe.model.task, recipe.data
    for entry in [None, *data.entries(), *data.entries("eval")]:
        fmt = entry.format or data.format if entry else data.format
        fields = entry.fields if entry and entry.fields is not None else data.fields
        spec = FORMATS[fmt]
        for key in fields:
            if key not in spec.fields:
                raise ValueError(unknown_key("data.fields", key, list(spec.fields)) + f" (format {fmt} reads {', '.join(spec.fields)})")
        if task not in spec.tasks:
            fix = ("use data.format: classification" if task == "classification" else
                   "set model.task: classification" if fmt == "classification" else
                   f"use one of: {', '.join(formats_for_task(task))}")
            raise ValueError(f"model.task {task} cannot train on data.format {fmt}; {fix}")
    fmt = data.eval_format()
    metric = recipe.eval.chosen(fmt)[0].removeprefix("eval_")
    selectable = FORMATS[fmt].selectable_metrics if fmt else LOWER_IS_BETTER
    if metric not in selectable:
        raise ValueError(f"eval.metric {metric} is not computed for data.format {fmt or 'of mixed formats'}; "
                         f"choose one of: {', '.join(selectable)}")
    if any(entry.weight is not None or entry.epochs is not None for entry in data.entries("eval")):
        raise ValueError("data.eval: weight and epochs apply to train sources; remove them")
    weighted = {entry.weight is not None for entry in data.entries()}
    if len(weighted) > 1:
        raise ValueError("data.train: give every source a weight, or none (then each is read `epochs` times, default 1)")


def quant_rules(recipe) -> None:
    """quant settings that mean nothing for this recipe (what a strategy cannot quantise is its rules')."""
    quant = recipe.quant
    four_bit_only = quant.model_fields_set & {"type", "double_quant", "compute_dtype"}
    if quant.bits == 8 and four_bit_only:
        raise ValueError(f"quant.{sorted(four_bit_only)[0]} applies to 4-bit weights only; remove it or set quant.bits: 4")


# Names other fine-tuning tools use for a key, so `lora.rank=8` gets "did you mean 'lora.r'?".
ALIASES = {"rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "learning_rate": "lr",
           "batch_size": "micro_batch_size", "per_device_train_batch_size": "micro_batch_size",
           "gradient_accumulation_steps": "grad_accum", "num_epochs": "epochs", "num_train_epochs": "epochs",
           "lr_scheduler": "schedule", "lr_scheduler_type": "schedule", "warmup": "warmup_steps",
           "sequence_len": "max_length", "max_seq_length": "max_length", "output": "output_dir"}


def adapter_rules(recipe) -> None:
    """LoRA variants that cannot work together, decided before anything loads (README "Methods")."""
    lora, method = recipe.lora, recipe.method
    variants = [f"lora.{k}" for k, default in (("dora", False), ("rslora", False), ("init", "default"), ("plus_lr_ratio", None))
                if getattr(lora, k) != default]
    if variants and method == "full":
        raise ValueError(f"{variants[0]} applies to method lora or qlora (got method: full); remove it or choose an adapter method")
    if lora.init in RESIDUAL_INITS and method == "qlora":
        raise ValueError(f"lora.init {lora.init} with method: qlora: it moves each weight's top directions into the adapter and "
                         "leaves the residual in the base, which 4-bit storage would round again, so the adapter would no longer "
                         "match its base; use method: lora with it, or lora.init: loftq for a 4-bit base")
    if lora.init in RESIDUAL_INITS and lora.dora:
        raise ValueError(f"lora.init {lora.init} with lora.dora: the adapter is converted to plain LoRA at export, and DoRA's "
                         "magnitude vector cannot be; use one of them")
    if lora.init == "loftq" and (method != "qlora" or recipe.quant.bits != 4 or recipe.quant.type != "nf4"):
        raise ValueError("lora.init loftq initialises adapters against a 4-bit nf4 base: it needs method: qlora with quant.bits 4 "
                         "and quant.type nf4 (with method: lora it would alter the base the adapter is saved against)")
    if lora.init == "loftq" and lora.dora:
        raise ValueError("lora.init loftq with lora.dora: peft's LoftQ initialises plain LoRA matrices only; use one of them")


def unknown_key(where: str, key: str, known: list[str]) -> str:
    alias = ALIASES.get(key)
    close = [alias] if alias in known else difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown key '{where}.{key}'{hint}".replace("'.", "'")
