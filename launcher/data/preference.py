"""Preference pairs as two sequences: the prompt with its chosen reply, and the same prompt with its rejected one.

Each reply is encoded exactly as an SFT target would be (same prompt layout, chat template and
masking), so only reply tokens carry labels. The encoder tokenises the chosen sequences and the
rejected ones in two passes over the same rows; this module says how a row becomes its rejected
twin and how the two encodings become one row of the tokenised set. Under full fine-tuning a run adds
one more column, REFERENCE: each pair's reference log-probabilities, precomputed (data/reference_logps.py).
"""
from __future__ import annotations

from launcher.recipe.schema import DataSection

REJECTED = "rejected_"  # prefix of the rejected sequence's columns (input_ids, labels) in a tokenised pair
REFERENCE = "reference_logps"  # full fine-tuning: the column of [chosen, rejected] reference log-probabilities (reference_logps.py)


def rejected_twin(row: dict, data: DataSection) -> dict:
    """The row with its rejected reply in the chosen field, so one prompt builder serves both replies."""
    return {**row, data.field("chosen"): row[data.field("rejected")]}


def last_reply_only(segments: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """A conversation's earlier assistant turns are prompt: only the reply being compared is trained."""
    last = max(index for index, (_, trained) in enumerate(segments) if trained)
    return [(text, trained and index == last) for index, (text, trained) in enumerate(segments)]


def joined(chosen: dict[str, list], rejected: dict[str, list]) -> dict[str, list]:
    """One tokenised row per pair: the chosen encoding's columns, the rejected ids and labels beside them;
    a pair is dropped or counted as cut when either sequence is."""
    out = dict(chosen)
    out[REJECTED + "input_ids"], out[REJECTED + "labels"] = rejected["input_ids"], rejected["labels"]
    out["drop"] = [mine or theirs for mine, theirs in zip(chosen["drop"], rejected["drop"])]
    out["cut"] = [mine or theirs for mine, theirs in zip(chosen["cut"], rejected["cut"])]
    return out
