"""The one validated description of a run.

A recipe is YAML checked by pydantic before anything heavy happens, so this module imports
neither torch nor transformers: `launcher validate` and `--help` stay instant. Field
descriptions double as the recipe reference in the README (`launcher reference`).
"""
from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from launcher.recipe import rules
from launcher.recipe.formats import FORMATS, LOWER_IS_BETTER, METRICS, OBJECTIVES, TASKS
from launcher.recipe.objective import objective_rules
from launcher.recipe.rules import RESIDUAL_INITS, unknown_key, without  # noqa: F401  (re-exported: files.py, model/, distributed/)
from launcher.recipe.values import listed_once, path_value, regex_value, warmup_fits

# bitsandbytes optimisers: they need its package, and they step whole local tensors (DDP only).
BNB_OPTIMIZERS = ("adamw-8bit", "paged-adamw", "paged-adamw-8bit")
# A key a resumed run may change without being refused as a different recipe (launcher/rundir/directory.py).
RESUMABLE = {"resumable": True}


class Section(BaseModel):
    """Strict: `true` is not the integer 1, "4" is not 4, and a number must be finite."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


PathText = Annotated[str, AfterValidator(path_value)]
Regex = Annotated[str, AfterValidator(regex_value)]


class ModelSection(Section):
    path: PathText = Field(description="Hub id, local folder, or `pkg:<python package>` for weights shipped inside a package.")
    gguf_file: PathText | None = Field(None, description="GGUF file inside `path`; dequantised once to a plain trainable folder.")
    task: Literal["causal-lm", "seq2seq", "classification"] = Field("causal-lm", description="Which head the model gets.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype: auto is float32 on CPU and for full fine-tuning, bfloat16 for adapters on GPU.")
    trust_remote_code: bool = Field(False, description="Run modelling code shipped with the checkpoint.")
    attn_implementation: str | None = Field(None, description="e.g. sdpa, eager, flash_attention_2; default: transformers' choice.")


class FreezeSection(Section):
    embeddings: bool = Field(False, description="Freeze the input embeddings (full fine-tuning only).")
    first_n_blocks: int = Field(0, ge=0, description="Freeze the first N transformer blocks.")
    patterns: list[Regex] = Field(default_factory=list, description="Freeze parameters whose name matches any of these regexes.")


class LoraSection(Section):
    r: int = Field(16, ge=1, le=4096, description="Adapter rank.")
    alpha: float = Field(32, gt=0, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or all-linear for every linear layer but the head.")
    modules_to_save: list[Regex] = Field(default_factory=list, description="Extra modules trained in full and saved with the adapter "
                                       "(a classifier's new head always is); a module is trained in full or adapted, never both.")
    dora: bool = Field(False, description="DoRA: each adapted weight is split into a trained magnitude per output row and a direction "
                       "that LoRA updates (peft use_dora).")
    rslora: bool = Field(False, description="rsLoRA: scale the update by alpha / sqrt(r) instead of alpha / r, so high ranks still learn.")
    init: Literal[("default", "gaussian", *RESIDUAL_INITS, "loftq")] = Field(
        "default", description="Adapter initialisation: default (B = 0); gaussian; pissa (top singular directions of each weight, "
                               "the base keeps the residual); olora (QR of each weight, likewise); loftq (method qlora on a GPU: "
                               "adapters that offset the 4-bit rounding). pissa/olora adapters are saved converted to plain "
                               "LoRA of rank 2r on the original base.")
    plus_lr_ratio: float | None = Field(None, gt=0, description="LoRA+: the B matrices learn at this multiple of train.lr (e.g. 16); "
                                        "null: one learning rate.")


class QuantSection(Section):
    bits: Literal[4, 8] = Field(4, description="method qlora: base weights as bitsandbytes 4-bit (QLoRA) or 8-bit (LLM.int8) layers.")
    type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type: nf4 (QLoRA's normal float) or fp4.")
    double_quant: bool = Field(True, description="4-bit: also quantise the per-block scales (about 0.4 bits less per weight).")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="4-bit: dtype weights are dequantised to for each matmul; auto is bfloat16 on a GPU that has it, float32 on CPU.")
    fp32_non_quantised: bool = Field(False, description="Upcast the weights left unquantised (embeddings, lm_head, norms) to "
                                     "float32, as peft's k-bit preparation does (about 2 GiB more on an 8B model); "
                                     "default: they stay in the compute dtype.")


class MemorySection(Section):
    gpu_gib: float | None = Field(None, gt=0, description="GPU memory per process (GiB) that `train` checks the plan against "
                                  "before loading weights; default: the visible GPU's (no check without one). Set, it "
                                  "applies on any machine.")
    node_gib: float | None = Field(None, gt=0, description="Host (CPU) memory per node (GiB) that `launcher plan` checks "
                                   "node 0's host figure against: loading, offloaded state, the final export's gather.")
    over_budget: Literal["refuse", "warn"] = Field("refuse", description="When the plan does not fit: refuse to train "
                                                   "(exit 2, naming the plan's cheapest fix) or warn and train anyway.")


# Written out so editors and type checkers see the names; `_agree_with_registry` holds it to launcher/formats.py.
DataFormat = Literal["instruction", "chat", "translation", "completion", "text", "qa", "classification", "preference", "chat-preference"]


class SourceEntry(Section):
    """One data source of a mixture; format and fields default to the data section's."""

    path: PathText = Field(description="A local file or `datasets` folder, or `hf:org/name` for a hub dataset (from the local cache when offline).")
    name: str | None = Field(None, description="hf: sources: the dataset's config name (datasets' `name`).")
    split: str = Field("train", description="hf: sources and saved DatasetDict folders: which split to read.")
    format: DataFormat | None = Field(None, description="This source's format; default: data.format.")
    fields: dict[str, str] | None = Field(None, description="This source's field mapping; default: data.fields.")
    weight: float | None = Field(None, gt=0, description="Share of the mixture (relative to the other weights); the mixture has as many "
                                 "rows as its sources together, each source repeated or subsampled to its share.")
    epochs: float | None = Field(None, gt=0, description="Instead of weight: passes over this source's rows (e.g. 2 repeats it, 0.5 takes half).")
    max_rows: int | None = Field(None, ge=1, description="Use only this source's first N rows (before weight or epochs apply).")

    @model_validator(mode="after")
    def _one_share(self) -> "SourceEntry":
        if self.weight is not None and self.epochs is not None:
            raise ValueError(f"data source {self.path}: give weight or epochs, not both")
        return self


class DataSection(Section):
    train: PathText | list[SourceEntry] = Field(description="Training data: .jsonl, .json, .csv, .parquet, .txt, a folder saved by `datasets`, "
                                           "`hf:org/name` (split train), or a list of sources (see data sources) to mix.")
    eval: PathText | SourceEntry | list[SourceEntry] | None = Field(
        None, description="Held-out data: a path, a source entry, or a list of them (each source gets its own eval loss, "
        "and its own task metrics when the formats agree); default: split off `eval_fraction` of train.")
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="Share of train held out when `eval` is not given.")
    format: DataFormat = Field("instruction", description="How rows become prompts and targets.")
    fields: dict[str, str] = Field(default_factory=dict, description="Canonical field name -> column name in your files.")
    max_length: int = Field(512, ge=8, description="Tokens per example; longer rows are truncated, rows left with no target dropped.")
    skipped_share_warn: float = Field(0.05, ge=0, le=1, description="Warn in colour when more than this share of a source's "
                                      "rows is dropped (nothing left to train within max_length), or truncated.")
    skipped_share_refuse: bool = Field(False, description="Refuse to train (exit 2) instead of warning when a share exceeds skipped_share_warn.")
    train_on_prompt: bool = Field(False, description="Also train on prompt tokens (labels are -100 there otherwise).")
    packing: bool = Field(False, description="causal-lm: pack several examples into each row of up to max_length tokens "
                          "(best-fit decreasing); positions restart and attention stays inside each example. "
                          "micro_batch_size then counts packed rows.")
    chat_template: Literal["auto", "never"] = Field("auto", description="Wrap prompts in the tokenizer's chat template when it has one.")
    system_prompt: str | None = Field(None, description="System message for chat-template formats.")
    source_lang: str = Field("English", description="Source language name for the translation prompt.")
    target_lang: str = Field("Spanish", description="Target language name for the translation prompt.")
    prompt_template: str = Field(
        "Translate from {source_lang} to {target_lang}:\n{source}",
        description="Translation prompt; may use {source_lang}, {target_lang}, {source}.")
    max_train_rows: int | None = Field(None, ge=1, description="Use only the first N training rows.")
    max_eval_rows: int | None = Field(None, ge=1, description="Use only the first N eval rows.")
    qa_template: str = Field(
        "{context}Question: {question}\nAnswer:",
        description="QA prompt; may use {question} and {context} (the context line, empty when a row has none).")
    labels: list[str] | None = Field(None, min_length=2, description="classification: the class names, id i is labels[i]; "
                                     "every row's label must be one of them. Default: the train rows' labels, sorted "
                                     "(an eval label they lack is then refused).")

    preprocessed_dir: PathText | None = Field(None, description="Where `launcher preprocess` writes tokenised data and `train` looks for it "
                                         "(default: output_dir/preprocessed).")
    tokenise_timeout_minutes: float = Field(120, gt=0, description="How long other ranks wait while the main process tokenises "
                                            "(a separate process group; distributed.timeout_minutes is for training collectives).")

    @model_validator(mode="after")
    def _rules(self) -> "DataSection":
        rules.data_rules(self)
        return self

    def field(self, canonical: str) -> str:
        """Column name in the user's files for a canonical field."""
        return self.fields.get(canonical, canonical)

    def entries(self, which: str = "train") -> list[SourceEntry]:
        """data.train or data.eval as source entries (a plain path is one entry); [] without eval data."""
        value = getattr(self, which)
        value = [] if value is None else value if isinstance(value, list) else [value]
        return [SourceEntry(path=item) if isinstance(item, str) else item for item in value]

    def formats(self) -> set[str]:
        """The data formats of the training sources."""
        return {entry.format or self.format for entry in self.entries()}

    def eval_format(self) -> str | None:
        """The format of the eval rows: data.eval's, else the train sources' one format; None when they mix formats."""
        formats = {entry.format or self.format for entry in self.entries("eval")} or self.formats()
        return formats.pop() if len(formats) == 1 else None


class TrainSection(Section):
    epochs: float | None = Field(1.0, gt=0, description="Passes over the training data (when max_steps is null).", json_schema_extra=RESUMABLE)
    max_steps: int | None = Field(None, ge=1, description="Optimiser steps to train; overrides epochs.", json_schema_extra=RESUMABLE)
    micro_batch_size: int = Field(4, ge=1, description="Examples per process per forward pass.", json_schema_extra=RESUMABLE)
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimiser step.", json_schema_extra=RESUMABLE)
    lr: float = Field(2e-4, gt=0, le=1, description="Peak learning rate.")
    schedule: Literal["linear", "cosine", "constant", "exponential"] = Field("cosine", description="Learning-rate schedule after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps; no more than the run's steps.")
    decay_rate: float = Field(0.96, gt=0, le=1, description="exponential: lr_t = lr * decay_rate ** (t / decay_steps).")
    decay_steps: int = Field(100, ge=1, description="exponential: steps per factor of decay_rate.")
    optimizer: Literal[("adamw", *BNB_OPTIMIZERS, "adafactor", "sgd")] = Field(
        "adamw", description="adamw (torch, fused on GPU); adamw-8bit (bitsandbytes, 8-bit state); paged-adamw / paged-adamw-8bit "
                             "(state pages to CPU memory under GPU memory pressure; CUDA only); adafactor (factored state); sgd (momentum 0.9).")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (AdamW).")
    l2_lambda: float = Field(0.0, ge=0, description="Explicit penalty lambda * ||theta||^2 on trainable parameters, added to the loss.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm; null disables.")
    skip_nonfinite: int = Field(0, ge=0, description="Skip up to N optimiser steps whose gradient norm is NaN or inf "
                                "(their update is not applied); 0: the run stops at the first one, naming the step.", json_schema_extra=RESUMABLE)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="Mixed precision: auto is bf16 on a capable GPU, fp32 on CPU.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward (non-reentrant) to save memory.")
    loss_chunk_tokens: int = Field(0, ge=0, description="causal-lm: compute lm_head + cross-entropy over chunks of this many "
                                   "target tokens, recomputed in backward, so full-vocabulary logits never exist for "
                                   "the whole batch (e.g. 1024; 0: off). Same loss and gradients as plain CE.")
    compile: bool = Field(False, description="torch.compile the model (inductor): faster steps after a one-off compile per "
                          "shape; needs a C++ compiler on CPU and triton on GPU, checked before the model loads.")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Drives init, data order and dropout (numpy's seed range).")
    eval_every: int = Field(0, ge=0, description="Evaluate every N steps (0: only before and after training).", json_schema_extra=RESUMABLE)
    save_every: int = Field(0, ge=0, description="Checkpoint every N steps (0: only at the end and on preemption).", json_schema_extra=RESUMABLE)
    log_every: int = Field(1, ge=1, description="Write a metrics line every N steps.", json_schema_extra=RESUMABLE)
    keep_last: int = Field(2, ge=1, description="Checkpoints kept on disk.", json_schema_extra=RESUMABLE)
    eval_batch_size: int | None = Field(None, ge=1, description="Default: micro_batch_size.")

    @model_validator(mode="after")
    def _warmup_within_the_run(self) -> "TrainSection":
        if self.max_steps is not None:
            warmup_fits(self.warmup_steps, self.max_steps, "train.max_steps")
        return self

    def eval_batch(self) -> int:
        """Rows per eval forward pass: eval_batch_size, else micro_batch_size (evaluation and the planner agree)."""
        return self.eval_batch_size or self.micro_batch_size


class EvalSection(Section):
    samples: int = Field(3, ge=0, description="Eval predictions shown before and after training in the report.", json_schema_extra=RESUMABLE)
    max_new_tokens: int = Field(64, ge=1, description="Generation length for samples and generation metrics.")
    num_beams: int = Field(1, ge=1, description="1: greedy decoding; more: beam search.")
    no_repeat_ngram_size: int = Field(0, ge=0, description="Forbid any n-gram of this size twice in one output (0: off); stops the loops small models fall into.")
    repetition_penalty: float = Field(1.0, gt=0, description="Divide the scores of tokens already in the output by this (1.0: off).")
    generate_rows: int = Field(48, ge=0, description="Eval rows generated and scored (BLEU/chrF, EM/F1) at each eval; 0 skips it.")
    generate_batch_size: int | None = Field(None, ge=1, description="Rows generated together (left-padded); default: "
                                            "train.eval_batch_size. Larger batches generate much faster on CPU.")
    metric: Literal["auto", "loss", "ppl", "bleu", "chrf", "accuracy", "macro_f1", "exact_match", "f1", "preference_accuracy",
                    "reward_accuracy"] = Field(
        "auto", description="Picks the best checkpoint (saved to output_dir/best); auto: chrf for translation, "
                            "exact_match for qa, macro_f1 for classification, preference_accuracy for pairs, loss otherwise.")
    greater_is_better: bool | None = Field(None, description="Direction of eval.metric; default: false for loss and ppl, true otherwise.")

    def chosen(self, data_format: str | None) -> tuple[str, bool]:
        """(metrics.jsonl key, greater is better) of the metric that selects the best checkpoint;
        eval rows of mixed formats (data_format None) share only the loss, so auto picks it."""
        default = FORMATS[data_format].default_metric if data_format else "loss"
        name = default if self.metric == "auto" else self.metric
        greater = self.greater_is_better if self.greater_is_better is not None else name not in LOWER_IS_BETTER
        return f"eval_{name}", greater


Tracker = Literal["tensorboard", "mlflow", "wandb"]


class ReportSection(Section):
    trackers: Annotated[list[Tracker], AfterValidator(listed_once)] = Field(
        default_factory=list, description="Experiment trackers fed through accelerate's log_with: tensorboard (output_dir/tb/<project>), "
        "mlflow (MLFLOW_TRACKING_URI, else a local store in output_dir/mlruns), wandb (offline in output_dir/wandb "
        "unless WANDB_MODE says otherwise). Credentials are read from the environment only, never from the recipe.", json_schema_extra=RESUMABLE)
    project: str | None = Field(None, description="Experiment / project name in the trackers; default: the name of output_dir.")


DEEPSPEED_SHORTHANDS = ("zero1", "zero2", "zero3", "zero3_offload")


class FsdpSection(Section):
    sharding: Literal["full", "grad_op"] = Field(
        "full", description="full: parameters resharded after forward (like ZeRO-3); grad_op: kept gathered until backward (like ZeRO-2).")
    cpu_offload: bool = Field(False, description="Keep sharded parameters, gradients and optimiser state in CPU memory (GPU runs).")
    activation_checkpointing: bool = Field(False, description="Recompute each block's activations in backward (as train.gradient_checkpointing).")


class DistributedSection(Section):
    strategy: Literal["ddp", "deepspeed", "fsdp"] = Field("ddp", description="How the model is spread over processes.")
    num_processes: int | None = Field(None, ge=1, description="Processes this run must see; any other count is refused (catches launches that silently start one).", json_schema_extra=RESUMABLE)
    deepspeed: PathText | None = Field(None, description="strategy deepspeed: zero1, zero2, zero3, zero3_offload (ds_configs/) or a DeepSpeed JSON file.")
    fsdp: FsdpSection | None = Field(None, description="strategy fsdp: FSDP2 options (default: full sharding).")
    timeout_minutes: float = Field(10, gt=0, description="How long a rank waits for the others in a collective before the launch fails.")
    replicate: int | None = Field(None, ge=1, description="strategy fsdp: hybrid sharding (HSDP): groups holding a full replica each "
                                  "(usually nodes); weights are sharded inside a group and gradients all-reduced across groups. "
                                  "Default: 1 (plain FSDP2), or the node count under `launcher slurm` with several nodes.",
                                  json_schema_extra=RESUMABLE)
    shard: int | None = Field(None, ge=1, description="strategy fsdp: processes each replica is sharded over (usually GPUs per node); "
                              "replicate x shard x sequence split = processes. Default: what is left.", json_schema_extra=RESUMABLE)
    sequence_parallel: int = Field(1, ge=1, description="strategy deepspeed: split each sequence over this many processes "
                                   "(DeepSpeed Ulysses) for long contexts; data.max_length must divide by it, and the attention "
                                   "heads too. causal-lm without packing; each group of this many processes reads one batch.")
    context_parallel: int = Field(1, ge=1, description="strategy fsdp on CUDA GPUs: torch's context parallelism over this many "
                                  "processes (SDPA attention; data.max_length divisible by 2x it). Checked, not yet trained: values "
                                  "above 1 are refused.")

    def rules(self) -> None:
        """What the chosen strategy needs (keys it does not read are refused by rules.SCOPES). What a strategy
        itself cannot train is its own rules' (launcher/distributed/rules.py), which preflight applies."""
        if self.strategy == "deepspeed" and self.deepspeed is None:
            raise ValueError(f"distributed.strategy deepspeed needs distributed.deepspeed: one of {', '.join(DEEPSPEED_SHORTHANDS)} "
                             "or a path to a DeepSpeed JSON file")
        if self.strategy == "deepspeed" and not self.deepspeed.endswith(".json") and self.deepspeed not in DEEPSPEED_SHORTHANDS:
            raise ValueError(f"distributed.deepspeed '{self.deepspeed}' is neither a known stage "
                             f"({', '.join(DEEPSPEED_SHORTHANDS)}) nor a .json file")


class DpoSection(Section):
    beta: float = Field(0.1, gt=0, description="A reply's reward is beta x (its log-probability under the policy - the reference's).")
    loss: Literal["sigmoid", "ipo"] = Field("sigmoid", description="sigmoid: DPO's -log sigmoid(reward margin); ipo: (margin - 1/(2 beta))^2.")


class Recipe(Section):
    model: ModelSection
    objective: Literal[OBJECTIVES] | None = Field(None, description="sft: learn the targets; dpo: prefer each pair's chosen "
                                                  "reply to its rejected one (preference formats); default: the format's.")
    dpo: DpoSection = Field(default_factory=DpoSection)
    method: Literal["full", "lora", "qlora"] = Field("lora", description="full fine-tuning, LoRA, or QLoRA.")
    freeze: FreezeSection = Field(default_factory=FreezeSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    quant: QuantSection = Field(default_factory=QuantSection)
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    report: ReportSection = Field(default_factory=ReportSection)
    distributed: DistributedSection = Field(default_factory=DistributedSection)
    memory: MemorySection = Field(default_factory=MemorySection)
    output_dir: PathText = Field(description="Run directory: resolved recipe, metrics, checkpoints, final model, report. Where the "
                                 "run is, not part of what it is: a run directory moved with mv resumes from its new place.",
                                 json_schema_extra=RESUMABLE)

    def model_dump(self, **kwargs) -> dict:
        """Without the keys this recipe's settings make the run ignore (`rules.SCOPES`), so a dump validates
        again as a recipe and says only what the run uses."""
        return without(super().model_dump(**kwargs), rules.inapplicable(self))

    @model_validator(mode="after")
    def _cross_field_rules(self, info: ValidationInfo) -> "Recipe":
        rules.format_rules(self)
        objective_rules(self)
        if not (info.context or {}).get(KEEP_INAPPLICABLE):
            rules.refuse_inapplicable(self)
        rules.adapter_rules(self)
        self.distributed.rules()
        if self.data.eval and self.data.eval_fraction:
            raise ValueError("data.eval and data.eval_fraction both set: give one")
        if self.train.max_steps is None and self.train.epochs is None:
            raise ValueError("train: set epochs or max_steps")
        return self


def _agree_with_registry() -> None:
    """The schema's choices are written out for readers; the format registry is where they come from."""
    for key, annotation, registry in (("data.format", DataFormat, set(FORMATS)),
                                      ("model.task", ModelSection.model_fields["task"].annotation, set(TASKS)),
                                      ("eval.metric", EvalSection.model_fields["metric"].annotation, {"auto", *METRICS})):
        if set(get_args(annotation)) != registry:
            raise ImportError(f"recipe {key} choices {sorted(get_args(annotation))} disagree with launcher/formats.py {sorted(registry)}")


_agree_with_registry()


KEEP_INAPPLICABLE = "keep inapplicable keys"  # validation context: read a dumped recipe whose ignored keys are still in


def ignored_keys(data: dict) -> list[str] | None:
    """The dotted keys of a recipe given as a dict that its other settings make the run ignore (present or not);
    None when it does not validate."""
    try:
        return rules.inapplicable(Recipe.model_validate(data, context={KEEP_INAPPLICABLE: True}))
    except ValidationError:
        return None


def applicable(dumped: dict) -> dict:
    """A recipe as a dict (a dump, or one with overrides applied) without the keys its settings make the run
    ignore, so it validates again and compares with another by what the run uses; as it is when it does not validate."""
    return without(dumped, ignored_keys(dumped) or [])
