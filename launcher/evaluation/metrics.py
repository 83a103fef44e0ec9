"""Evaluation metrics for the four task kinds: pure functions over lists of strings.

Who does what:
- BLEU and chrF come from sacrebleu, at corpus level, so scores match what papers report
  (sentence-level averages do not). Scale 0-100, as sacrebleu reports them.
- Accuracy, macro-F1 and the confusion matrix are hand-written: scikit-learn is not a
  dependency, and pulling it in for three loops is not worth it. They follow sklearn's
  conventions (labels = union of gold and predicted, F1 of a class with no support and no
  predictions is 0, matrix rows are gold and columns predicted). Scale 0-1.
- EM and token F1 are the SQuAD v1.1/v2.0 evaluation script's definitions, restated here
  because that script is not a package. Per pair 0-1; `qa_scores` reports means in 0-100
  as SQuAD does.
- Perplexity is exp(mean token loss), returning inf instead of raising on overflow.

Nothing here imports torch, so the CLI can score a predictions file without it.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

from sacrebleu.metrics import BLEU, CHRF

__all__ = [
    "bleu", "chrf", "accuracy", "macro_f1", "confusion_matrix",
    "normalize_answer", "exact_match", "token_f1", "qa_scores", "perplexity",
]

References = Sequence[str] | Sequence[Sequence[str]]


def _check_pair(a: Sequence, b: Sequence, what: str) -> None:
    """Mismatched or empty lists mean a broken eval loop; fail loudly, never score 0."""
    if len(a) != len(b):
        raise ValueError(f"{what}: {len(a)} predictions but {len(b)} references")
    if len(a) == 0:
        raise ValueError(f"{what}: nothing to score (empty lists)")


def _ref_streams(predictions: Sequence[str], references: References) -> list[list[str]]:
    """sacrebleu wants one stream per reference set; accept one ref or a list per example."""
    _check_pair(predictions, references, "references")
    if all(isinstance(r, str) for r in references):
        return [list(references)]
    counts = {len(r) for r in references}
    if len(counts) != 1:
        raise ValueError("every example needs the same number of references")
    return [list(stream) for stream in zip(*references)]


def bleu(predictions: Sequence[str], references: References, tokenize: str = "13a") -> float:
    """Corpus BLEU, 0-100. `references`: one string per prediction, or a list of them."""
    refs = _ref_streams(predictions, references)
    return float(BLEU(tokenize=tokenize).corpus_score(list(predictions), refs).score)


def chrf(predictions: Sequence[str], references: References, word_order: int = 0) -> float:
    """Corpus chrF, 0-100 (word_order=2 gives chrF++). Kinder than BLEU to morphology."""
    refs = _ref_streams(predictions, references)
    return float(CHRF(word_order=word_order).corpus_score(list(predictions), refs).score)


def accuracy(pred: Sequence, gold: Sequence) -> float:
    """Fraction of exact label matches, 0-1."""
    _check_pair(pred, gold, "accuracy")
    return sum(p == g for p, g in zip(pred, gold)) / len(gold)


def macro_f1(pred: Sequence, gold: Sequence, labels: Sequence | None = None) -> float:
    """Unweighted mean of per-class F1, 0-1; unlike accuracy it is not fooled by a big class.

    `labels` defaults to every label seen in gold or pred (sklearn's default).
    """
    _check_pair(pred, gold, "macro_f1")
    labels = sorted(set(gold) | set(pred), key=str) if labels is None else list(labels)
    if not labels:
        raise ValueError("macro_f1: no labels")
    scores = []
    for label in labels:
        tp = sum(p == label and g == label for p, g in zip(pred, gold))
        fp = sum(p == label and g != label for p, g in zip(pred, gold))
        fn = sum(p != label and g == label for p, g in zip(pred, gold))
        denom = 2 * tp + fp + fn  # F1 = 2PR/(P+R) = 2TP/(2TP+FP+FN), no 0/0 in P or R
        scores.append(2 * tp / denom if denom else 0.0)
    return sum(scores) / len(scores)


def confusion_matrix(pred: Sequence, gold: Sequence, labels: Sequence) -> list[list[int]]:
    """Counts with rows = gold label, columns = predicted label, both in `labels` order.

    A label outside `labels` raises: silently dropping it would hide a model that answers
    off the label set (e.g. a generative classifier writing free text).
    """
    _check_pair(pred, gold, "confusion_matrix")
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for p, g in zip(pred, gold):
        for label in (p, g):
            if label not in index:
                raise ValueError(f"confusion_matrix: label {label!r} is not in labels {list(labels)}")
        matrix[index[g]][index[p]] += 1
    return matrix


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation, drop a/an/the, squash spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _golds(gold: str | Sequence[str]) -> list[str]:
    golds = [gold] if isinstance(gold, str) else list(gold)
    if not golds:
        raise ValueError("an example needs at least one gold answer")
    return golds


def _f1_one(pred: str, gold: str) -> float:
    pred_toks, gold_toks = normalize_answer(pred).split(), normalize_answer(gold).split()
    if not pred_toks or not gold_toks:  # SQuAD v2: empty matches only empty
        return float(pred_toks == gold_toks)
    same = sum((Counter(pred_toks) & Counter(gold_toks)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_toks), same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def exact_match(pred: str, gold: str | Sequence[str]) -> float:
    """1.0 if pred equals a gold answer after normalisation, else 0.0 (best over golds)."""
    return max(float(normalize_answer(pred) == normalize_answer(g)) for g in _golds(gold))


def token_f1(pred: str, gold: str | Sequence[str]) -> float:
    """Bag-of-tokens F1 after normalisation, 0-1; credits partly right answers EM misses."""
    return max(_f1_one(pred, g) for g in _golds(gold))


def qa_scores(preds: Sequence[str], golds: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """Mean exact match and token F1 over a set, 0-100: {"exact_match": .., "f1": ..}."""
    _check_pair(preds, golds, "qa_scores")
    em = sum(exact_match(p, g) for p, g in zip(preds, golds))
    f1 = sum(token_f1(p, g) for p, g in zip(preds, golds))
    return {"exact_match": 100.0 * em / len(preds), "f1": 100.0 * f1 / len(preds)}


def perplexity(mean_loss: float) -> float:
    """exp(mean per-token cross-entropy in nats); inf instead of OverflowError early in training."""
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return math.inf
