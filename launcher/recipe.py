"""The one validated description of a run.

A recipe is YAML checked by pydantic before anything heavy happens, so this module imports
neither torch nor transformers: `launcher validate` and `--help` stay instant. Field
descriptions double as the recipe reference in the README and in `launcher validate --explain`.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class UserError(Exception):
    """A mistake in the user's recipe, data or command line: shown as one line, exit status 2."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    path: str = Field(description="Hub id, local folder, or `pkg:<python package>` for weights shipped inside a package.")
    gguf_file: str | None = Field(None, description="GGUF file inside `path`; dequantised once to a plain trainable folder.")
    task: Literal["causal-lm", "seq2seq", "classification"] = Field("causal-lm", description="Which head the model gets.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype: auto is float32 on CPU and for full fine-tuning, bfloat16 for adapters on GPU.")
    trust_remote_code: bool = Field(False, description="Run modelling code shipped with the checkpoint.")
    attn_implementation: str | None = Field(None, description="e.g. sdpa, eager, flash_attention_2; default: transformers' choice.")


class FreezeSection(Section):
    embeddings: bool = Field(False, description="Freeze the input embeddings (full fine-tuning only).")
    first_n_blocks: int = Field(0, ge=0, description="Freeze the first N transformer blocks.")
    patterns: list[str] = Field(default_factory=list, description="Freeze parameters whose name matches any of these regexes.")


class LoraSection(Section):
    r: int = Field(16, ge=1, le=4096, description="Adapter rank.")
    alpha: float = Field(32, gt=0, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or all-linear for every linear layer but the head.")
    modules_to_save: list[str] = Field(default_factory=list, description="Extra modules trained in full and saved with the adapter.")


DataFormat = Literal["instruction", "chat", "translation", "completion", "text"]

# Canonical field names each format reads, and which of them a row may omit.
FORMAT_FIELDS: dict[str, tuple[list[str], list[str]]] = {
    "instruction": (["instruction", "output"], ["input", "system"]),
    "chat": (["messages"], []),
    "translation": (["source", "target"], []),
    "completion": (["prompt", "completion"], []),
    "text": (["text"], []),
}


class DataSection(Section):
    train: str = Field(description="Training data: .jsonl, .json, .csv, .parquet, or a folder saved by `datasets`.")
    eval: str | None = Field(None, description="Held-out data in the same format; default: split off `eval_fraction` of train.")
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="Share of train held out when `eval` is not given.")
    format: DataFormat = Field("instruction", description="How rows become prompts and targets.")
    fields: dict[str, str] = Field(default_factory=dict, description="Canonical field name -> column name in your files.")
    max_length: int = Field(512, ge=8, description="Tokens per example; longer rows are truncated, rows left with no target dropped.")
    train_on_prompt: bool = Field(False, description="Also train on prompt tokens (labels are -100 there otherwise).")
    chat_template: Literal["auto", "never"] = Field("auto", description="Wrap prompts in the tokenizer's chat template when it has one.")
    system_prompt: str | None = Field(None, description="System message for chat-template formats.")
    source_lang: str = Field("English", description="Source language name for the translation prompt.")
    target_lang: str = Field("Spanish", description="Target language name for the translation prompt.")
    prompt_template: str = Field(
        "Translate from {source_lang} to {target_lang}:\n{source}",
        description="Translation prompt; may use {source_lang}, {target_lang}, {source}.")
    max_train_rows: int | None = Field(None, ge=1, description="Use only the first N training rows.")
    max_eval_rows: int | None = Field(None, ge=1, description="Use only the first N eval rows.")

    def field(self, canonical: str) -> str:
        """Column name in the user's files for a canonical field."""
        return self.fields.get(canonical, canonical)


class TrainSection(Section):
    epochs: float | None = Field(1.0, gt=0, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Optimiser steps to train; overrides epochs.")
    micro_batch_size: int = Field(4, ge=1, description="Examples per process per forward pass.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimiser step.")
    lr: float = Field(2e-4, gt=0, le=1, description="Peak learning rate.")
    schedule: Literal["linear", "cosine", "constant", "exponential"] = Field("cosine", description="Learning-rate schedule after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    decay_rate: float = Field(0.96, gt=0, le=1, description="exponential: lr_t = lr * decay_rate ** (t / decay_steps).")
    decay_steps: int = Field(100, ge=1, description="exponential: steps per factor of decay_rate.")
    optimizer: Literal["adamw"] = Field("adamw", description="Optimiser.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (AdamW).")
    l2_lambda: float = Field(0.0, ge=0, description="Explicit penalty lambda * ||theta||^2 on trainable parameters, added to the loss.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm; null disables.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="Mixed precision: auto is bf16 on a capable GPU, fp32 on CPU.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward (non-reentrant) to save memory.")
    seed: int = Field(42, description="Drives init, data order and dropout.")
    eval_every: int = Field(0, ge=0, description="Evaluate every N steps (0: only before and after training).")
    save_every: int = Field(0, ge=0, description="Checkpoint every N steps (0: only at the end and on preemption).")
    log_every: int = Field(1, ge=1, description="Write a metrics line every N steps.")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept on disk.")
    eval_batch_size: int | None = Field(None, ge=1, description="Default: micro_batch_size.")


class EvalSection(Section):
    samples: int = Field(3, ge=0, description="Eval prompts generated before and after training and shown in the report.")
    max_new_tokens: int = Field(64, ge=1, description="Generation length for samples.")


class ReportSection(Section):
    tensorboard: bool = Field(False, description="Also write TensorBoard event files under output_dir/tb.")


class Recipe(Section):
    model: ModelSection
    method: Literal["full", "lora", "qlora"] = Field("lora", description="full fine-tuning, LoRA, or QLoRA.")
    freeze: FreezeSection = Field(default_factory=FreezeSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    report: ReportSection = Field(default_factory=ReportSection)
    output_dir: str = Field(description="Run directory: resolved recipe, metrics, checkpoints, final model, report.")

    @model_validator(mode="after")
    def _cross_field_rules(self) -> "Recipe":
        if self.method == "qlora":
            raise ValueError("method: 'qlora' is not available yet; use method: lora (4-bit loading lands with QLoRA support)")
        frozen = self.freeze.embeddings or self.freeze.first_n_blocks or self.freeze.patterns
        if frozen and self.method != "full":
            raise ValueError(f"freeze: only applies to method: full (LoRA already freezes the base); remove it or set method: full")
        required, optional = FORMAT_FIELDS[self.data.format]
        for key in self.data.fields:
            if key not in required + optional:
                raise ValueError(_unknown("data.fields", key, required + optional)
                                 + f" (format {self.data.format} reads {', '.join(required + optional)})")
        if self.data.eval and self.data.eval_fraction:
            raise ValueError("data.eval and data.eval_fraction both set: give one")
        if self.train.max_steps is None and self.train.epochs is None:
            raise ValueError("train: set epochs or max_steps")
        return self


def _unknown(where: str, key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown key '{where}.{key}'{hint}".replace("'.", "'")


def _section_fields(location: tuple) -> list[str]:
    """Field names allowed at a nested location of the recipe, for suggestions."""
    cls: Any = Recipe
    for part in location:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        cls = field.annotation
    return list(getattr(cls, "model_fields", {}))


def _describe(error: dict) -> str:
    loc = tuple(str(p) for p in error["loc"])
    key = ".".join(loc)
    if error["type"] == "extra_forbidden":
        return _unknown(".".join(loc[:-1]), loc[-1], _section_fields(loc[:-1]))
    if error["type"] == "missing":
        return f"missing key '{key}'"
    if not loc:  # a cross-field rule
        return error["msg"].removeprefix("Value error, ")
    return f"key '{key}': {error['msg']} (got {error.get('input')!r})"


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe is a mapping of keys, got {type(data).__name__}")
    return data


def _deep_merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        merged[key] = _deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def _resolve_bases(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Follow `base:` links (relative to the recipe that names them); later files win."""
    path = path.resolve()
    if path in seen:
        raise UserError(f"{path}: 'base' forms a cycle: {' -> '.join(p.name for p in seen + (path,))}")
    data = _read_yaml(path)
    base = data.pop("base", None)
    _absolutise_paths(data, path.parent)
    if base is None:
        return data
    if not isinstance(base, str):
        raise UserError(f"{path}: key 'base' must be a path to another recipe")
    return _deep_merge(_resolve_bases(path.parent / base, seen + (path,)), data)


def _absolutise_paths(data: dict, folder: Path) -> None:
    """Data paths are relative to the recipe that names them; so is a model path starting with ./ or ../."""
    for section, key in (("data", "train"), ("data", "eval"), ("model", "path")):
        node = data.get(section)
        value = node.get(key) if isinstance(node, dict) else None
        if not isinstance(value, str) or os.path.isabs(value) or value.startswith(("pkg:", "~")):
            continue
        if section == "data" or value.startswith(("./", "../")):
            node[key] = os.path.normpath(folder / value)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (['train', 'lr'], 1e-4); values are YAML scalars or lists."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(f"override '{text}' is not of the form key.path=value")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for part in keys[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override '{text}': '{part}' is not a section")
        node[keys[-1]] = value
    return data


def load_recipe(path: str | os.PathLike, overrides: list[str] = ()) -> Recipe:
    """Read, merge bases, apply overrides and validate; every failure is a UserError."""
    data = apply_overrides(_resolve_bases(Path(path)), list(overrides))
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = len(exc.errors()) - 1
        suffix = f" (and {more} more problem{'s' * (more > 1)})" if more else ""
        raise UserError(f"{path}: {_describe(first)}{suffix}") from None
    check_paths(recipe, Path(path))
    return recipe


def check_paths(recipe: Recipe, path: Path) -> None:
    for key, value in (("data.train", recipe.data.train), ("data.eval", recipe.data.eval)):
        if value is not None and not Path(value).exists():
            raise UserError(f"{path}: key '{key}': file not found: {value}")
    model_path = recipe.model.path
    looks_local = model_path.startswith(("/", ".", "~")) or os.path.isabs(model_path)
    if looks_local and not Path(model_path).expanduser().exists():
        raise UserError(f"{path}: key 'model.path': folder not found: {model_path}")


def resolved_yaml(recipe: Recipe) -> str:
    """The fully resolved recipe, as written into the run directory."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def reference_markdown() -> str:
    """The recipe reference table, generated from the schema (README embeds it; a test checks it)."""
    lines = ["| key | default | meaning |", "|---|---|---|"]

    def walk(cls: type[BaseModel], prefix: str) -> None:
        for name, field in cls.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name}.")
                continue
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            meaning = (field.description or "").replace("|", "\\|")
            lines.append(f"| `{prefix}{name}` | `{default.replace('|', '/')}` | {meaning} |")

    walk(Recipe, "")
    return "\n".join(lines)


REFERENCE_START, REFERENCE_END = "<!-- recipe-reference:start -->", "<!-- recipe-reference:end -->"


def readme_with_reference(readme: str) -> str:
    """README text with its generated recipe reference block replaced by the current schema's."""
    head, _, rest = readme.partition(REFERENCE_START)
    _, _, tail = rest.partition(REFERENCE_END)
    return f"{head}{REFERENCE_START}\n{reference_markdown()}\n{REFERENCE_END}{tail}"
