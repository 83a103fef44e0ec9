"""The rules between recipe keys: combinations that cannot work, refused before anything loads.

Kept apart from the sections (schema.py) so each reads on its own; `Recipe` runs them after its keys validate.
Imports only the format registry: the recipe it checks is passed in.
"""
from __future__ import annotations

import copy
import difflib
import string
from dataclasses import dataclass
from typing import Any, Callable

from launcher.recipe.formats import FORMATS, LOWER_IS_BETTER, formats_for_task, generated_formats
from launcher.recipe.objective import reference_precomputed

# LoRA inits that move each weight's top directions into the adapter and leave the residual in the base weights,
# so the adapter is converted to plain LoRA at export (it needs the whole model in one process then).
RESIDUAL_INITS = ("pissa", "olora")
# What each prompt template may name (str.format placeholders), and the one it must: without it every row's prompt is the same.
TEMPLATE_FIELDS = {"prompt_template": {"source_lang", "target_lang", "source"}, "qa_template": {"question", "context"}}
TEMPLATE_NEEDS = {"prompt_template": "source", "qa_template": "question"}


@dataclass(frozen=True)
class Scope:
    """Keys read only when a setting has one of some values (`reads` gives the recipe's values of that setting).
    Given otherwise, they are refused (`refuse_inapplicable`); dumped otherwise, they are left out (`inapplicable`)."""

    keys: tuple[str, ...]                   # dotted recipe keys: a section or one field
    setting: str                            # the key (or fact) whose value decides, as the user reads it
    values: tuple[str, ...]                 # its values under which `keys` are read; (): any, once it is set
    reads: Callable[[Any], set]             # recipe -> the values the setting has (several for a data mixture)


def _all_formats(recipe) -> set:
    return {entry.format or recipe.data.format for entry in [*recipe.data.entries(), *recipe.data.entries("eval")]}


def _evaluated(recipe) -> set:
    return {f"data.{key}" for key in ("eval", "eval_fraction") if getattr(recipe.data, key)}


GENERATION_KEYS = tuple(f"eval.{key}" for key in ("max_new_tokens", "num_beams", "no_repeat_ngram_size",
                                                  "repetition_penalty", "generate_batch_size"))
# Every key some other key's value makes the run ignore: one table, read by the refusal and by the dump.
SCOPES = (
    Scope(("quant",), "method", ("qlora",), lambda r: {r.method}),
    Scope(("freeze",), "method", ("full",), lambda r: {r.method}),
    Scope(("quant.type", "quant.double_quant", "quant.compute_dtype"), "quant.bits", ("4",), lambda r: {str(r.quant.bits)}),
    Scope(("lora",), "method", ("lora", "qlora"), lambda r: {r.method}),
    Scope(("dpo",), "objective", ("dpo",), lambda r: {r.objective}),
    # (the mesh keys replicate, shard, sequence_parallel and context_parallel: distributed/mesh.py refuses them, saying why)
    # a strategy's own section bears its name, and is read under that strategy only
    *(Scope((key,), "distributed.strategy", (key.split(".")[1],), lambda r: {r.distributed.strategy})
      for key in ("distributed.deepspeed", "distributed.fsdp")),
    Scope(("data.packing", "train.loss_chunk_tokens"), "model.task", ("causal-lm",), lambda r: {r.model.task}),
    Scope(("data.labels",), "model.task", ("classification",), lambda r: {r.model.task}),
    Scope(GENERATION_KEYS, "model.task", ("causal-lm", "seq2seq"), lambda r: {r.model.task}),
    Scope(("eval.generate_rows",), "data.format (of the eval rows)", generated_formats(), lambda r: {r.data.eval_format()}),
    Scope(("data.prompt_template", "data.source_lang", "data.target_lang"), "data.format", ("translation",), _all_formats),
    Scope(("data.qa_template",), "data.format", ("qa",), _all_formats),
    Scope(("data.system_prompt",), "data.format", ("instruction", "translation", "completion", "qa", "preference"), _all_formats),
    Scope(("train.epochs",), "train.max_steps", ("null",), lambda r: {"null" if r.train.max_steps is None else str(r.train.max_steps)}),
    Scope(("train.decay_rate", "train.decay_steps"), "train.schedule", ("exponential",), lambda r: {r.train.schedule}),
    Scope(("data.max_eval_rows",), "data.eval", (), lambda r: {"data.eval"} if r.data.eval else set()),
    # what only an evaluation reads (`launcher generate` reads the other generation keys, with or without eval data)
    Scope(("train.eval_every", "eval.metric", "eval.greater_is_better", "eval.samples", "eval.generate_rows"),
          "data.eval or data.eval_fraction", (), _evaluated),
    # the eval batch is also the batch of full-fine-tuning DPO's reference pass (data/reference_logps.py)
    Scope(("train.eval_batch_size",), "data.eval or data.eval_fraction, or objective dpo with method full", (),
          lambda r: _evaluated(r) | ({"dpo with method full"} if reference_precomputed(r) else set())),
    Scope(("report.project",), "report.trackers", (), lambda r: set(r.report.trackers)),
)


def lookup(tree: dict, key: str):
    """The value at a dotted key of nested dicts; None where absent."""
    node = tree
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def without(dumped: dict, keys: list[str]) -> dict:
    """A copy of `dumped` with these dotted keys removed where present."""
    dumped = copy.deepcopy(dumped)
    for key in keys:
        *sections, last = key.split(".")
        parent = lookup(dumped, ".".join(sections)) if sections else dumped
        if isinstance(parent, dict):
            parent.pop(last, None)
    return dumped


def _given(recipe, key: str) -> bool:
    """Whether the recipe's text set `key` (to something other than null)."""
    node = recipe
    for part in key.split("."):
        if node is None or part not in node.model_fields_set:
            return False
        node = getattr(node, part)
    return node is not None


def _applies(scope: Scope, recipe) -> bool:
    values = scope.reads(recipe) - {None}
    return bool(values & set(scope.values) if scope.values else values)


def _condition(scope: Scope) -> str:
    return f"when {scope.setting} is set" if not scope.values else f"with {scope.setting} {' or '.join(scope.values)}"


def refuse_inapplicable(recipe) -> None:
    """A key the run would not read is refused when given at all, so nothing the user wrote is silently ignored."""
    for scope in SCOPES:
        given = [key for key in scope.keys if _given(recipe, key)]
        if not given or _applies(scope, recipe):
            continue
        has = ", ".join(sorted(scope.reads(recipe) - {None})) or ("none" if not scope.values else "mixed formats")
        fix = scope.setting if not scope.values else f"{scope.setting}: {' or '.join(scope.values)}"
        raise ValueError(f"{given[0]}: applies only {_condition(scope)} (this recipe has {has}); remove it, or set {fix}")


def used_only(key: str) -> str | None:
    """When the run reads `key` (a leaf or section key), as the reference says it; None: always."""
    found = [scope for scope in SCOPES for scoped in scope.keys if key == scoped or key.startswith(scoped + ".")]
    return " and ".join(_condition(scope) for scope in found) or None


def inapplicable(recipe) -> list[str]:
    """The dotted keys of `recipe` that its other settings make the run ignore."""
    return [key for scope in SCOPES if not _applies(scope, recipe) for key in scope.keys]


def data_rules(data) -> None:
    """Source lists that hold something, and prompt templates that name only what a row gives them."""
    for which in ("train", "eval"):
        if getattr(data, which) == []:
            raise ValueError(f"data.{which}: an empty list of sources; give a path or at least one source")
    for which in ("train", "eval"):  # the same file read the same way twice: epochs or weight say how often
        seen: dict[tuple, int] = {}
        for index, entry in enumerate(data.entries(which)):
            fields = entry.fields if entry.fields is not None else data.fields
            key = (entry.path, entry.name, entry.split, entry.format or data.format, tuple(sorted(fields.items())), entry.max_rows)
            if key in seen:
                raise ValueError(f"data.{which}[{index}]: the same source as data.{which}[{seen[key]}] ({entry.path}, read the "
                                 f"same way); give it once{', with epochs or weight to read it more' * (which == 'train')}")
            seen[key] = index
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
        if TEMPLATE_NEEDS[key] not in names:
            raise ValueError(f"data.{key}: has no {{{TEMPLATE_NEEDS[key]}}}, so every row would get the same prompt; "
                             f"put {{{TEMPLATE_NEEDS[key]}}} where the row's {TEMPLATE_NEEDS[key]} goes")


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
        _one_column_each(fields, spec.fields)
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


# Names other fine-tuning tools use for a key, so `lora.rank=8` gets "did you mean 'lora.r'?".
ALIASES = {"rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "learning_rate": "lr",
           "batch_size": "micro_batch_size", "per_device_train_batch_size": "micro_batch_size",
           "gradient_accumulation_steps": "grad_accum", "num_epochs": "epochs", "num_train_epochs": "epochs",
           "lr_scheduler": "schedule", "lr_scheduler_type": "schedule", "warmup": "warmup_steps",
           "sequence_len": "max_length", "max_seq_length": "max_length", "output": "output_dir"}


def adapter_rules(recipe) -> None:
    """LoRA variants that cannot work together, decided before anything loads (README "Methods")."""
    lora, method = recipe.lora, recipe.method
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


def _one_column_each(fields: dict[str, str], canonical: tuple[str, ...]) -> None:
    """Each field read from a named column of its own: two fields from one column would train the row against itself."""
    for key, column in fields.items():
        if not column.strip():
            raise ValueError(f"data.fields.{key}: an empty column name; name the column that holds {key}")
    columns = {key: fields.get(key, key) for key in canonical}
    for key, column in columns.items():
        other = next((k for k, c in columns.items() if c == column and k != key), None)
        if other is not None:
            raise ValueError(f"data.fields: {key} and {other} both read column '{column}'; map each field to its own column")


def unknown_key(where: str, key: str, known: list[str]) -> str:
    alias = ALIASES.get(key)
    close = [alias] if alias in known else difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown key '{where}.{key}'{hint}".replace("'.", "'")
