"""What each data format is: its fields, the tasks that can learn it, how its eval is scored.

One registry entry per format, so a new format is one entry here plus its prompt builder
(data/encode.py's PROMPT_BUILDERS) and, when it is scored, its scorer (evaluate.SCORERS). The recipe schema,
the row checks, the encoder and the evaluation all read these facts from here. A leaf
module: no launcher imports and no torch, so `launcher validate` stays instant.
"""
from __future__ import annotations

from dataclasses import dataclass

IGNORE = -100  # label of a token the loss skips (prompt tokens, padding, class-less rows)
TASKS = ("causal-lm", "seq2seq", "classification")
OBJECTIVES = ("sft", "dpo")  # supervised targets, or preference pairs (Rafailov et al. 2023; IPO: Azar et al. 2023)
LOWER_IS_BETTER = ("loss", "ppl")  # the metrics every format has; all others are better when higher


@dataclass(frozen=True)
class Format:
    """One data format; field names are canonical (a recipe maps them to columns with data.fields)."""

    name: str
    required: tuple[str, ...]                      # fields every row must have
    optional: tuple[str, ...] = ()                 # fields a row may leave out or empty
    tasks: tuple[str, ...] = ("causal-lm",)        # model.task values that can learn it
    reference: str | None = None                   # field scored against generated text; None: not generation-scored
    metrics: tuple[str, ...] = ()                  # task metrics computed for it, besides loss and ppl
    default_metric: str = "loss"                   # what eval.metric auto picks the best checkpoint by
    objective: str = "sft"                         # what a run on it trains: sft (targets' likelihood) or dpo (pairs)

    @property
    def fields(self) -> tuple[str, ...]:
        return self.required + self.optional

    @property
    def selectable_metrics(self) -> tuple[str, ...]:
        """Every metric eval.metric may name for this format."""
        return LOWER_IS_BETTER + self.metrics


PAIR_METRICS = ("preference_accuracy", "reward_accuracy")

# An encoder-decoder needs a prompt and a target; a classifier needs labels.
FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("instruction", ("instruction", "output"), ("input", "system"), tasks=("causal-lm", "seq2seq")),
    Format("chat", ("messages",)),
    Format("translation", ("source", "target"), tasks=("causal-lm", "seq2seq"), reference="target",
           metrics=("bleu", "chrf"), default_metric="chrf"),
    Format("completion", ("prompt", "completion"), tasks=("causal-lm", "seq2seq")),
    Format("text", ("text",)),
    Format("qa", ("question", "answer"), ("context",), tasks=("causal-lm", "seq2seq"), reference="answer",
           metrics=("exact_match", "f1"), default_metric="exact_match"),
    Format("classification", ("text", "label"), ("text_pair",), tasks=("classification",),
           metrics=("accuracy", "macro_f1"), default_metric="macro_f1"),
    # A prompt (text, or a conversation ending on a user turn) and two replies; judged by the share of
    # held-out pairs whose chosen reply the model finds likelier, and whose DPO reward is higher.
    Format("preference", ("prompt", "chosen", "rejected"), ("system",), metrics=PAIR_METRICS,
           default_metric="preference_accuracy", objective="dpo"),
    Format("chat-preference", ("messages", "chosen", "rejected"), metrics=PAIR_METRICS,
           default_metric="preference_accuracy", objective="dpo"),
)}

# Every metric any format computes, in registry order (eval.metric's choices besides auto).
METRICS: tuple[str, ...] = LOWER_IS_BETTER + tuple(m for f in FORMATS.values() for m in f.metrics)


def formats_for_task(task: str) -> tuple[str, ...]:
    """Names of the formats a model.task can learn, in registry order."""
    return tuple(name for name, spec in FORMATS.items() if task in spec.tasks)


def formats_for_objective(objective: str) -> tuple[str, ...]:
    """Names of the formats an objective trains on, in registry order."""
    return tuple(name for name, spec in FORMATS.items() if spec.objective == objective)


def generated_formats() -> tuple[str, ...]:
    """Formats whose eval rows are scored on generated text against a reference field."""
    return tuple(name for name, spec in FORMATS.items() if spec.reference is not None)
