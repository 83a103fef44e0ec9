"""Downstream tasks: formats, task/format rules, seq2seq and classification runs, eval and best checkpoints.

Runs go through `launcher.cli.main` in this process (as `python -m launcher` does, minus ~10 s of
imports per run) on tiny random models and the shipped data samples.
"""
import json
from pathlib import Path

import pytest
from support import DATA, gpt2_tokenizer, tiny_recipe, write_recipe

from launcher.cli import main
from launcher.data.batching import collate
from launcher.data.encode import Encoder
from launcher.recipe.formats import IGNORE
from launcher.recipe.schema import DataSection
from launcher.recipe.files import load_recipe


def build_tiny_bart(folder: Path) -> Path:
    """An encoder-decoder of BART's shape on GPT-2's BPE (BART's own tokenizer is GPT-2's)."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration
    tokenizer = gpt2_tokenizer(folder, chat=False)
    eos = tokenizer.eos_token_id
    torch.manual_seed(0)
    config = BartConfig(vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_position_embeddings=256, pad_token_id=eos, bos_token_id=eos, eos_token_id=eos,
                        decoder_start_token_id=eos, forced_eos_token_id=None)
    BartForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_bart(tmp_path_factory) -> Path:
    return build_tiny_bart(tmp_path_factory.mktemp("tiny-bart"))


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_model)


def task_recipe(model: Path, run: Path, task: str, **sections) -> dict:
    return tiny_recipe(model, run, model={"task": task}, **sections)


def records(run_dir: Path, kind: str = "eval") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


# ---------------------------------------------------------------- formats and rules (no model)

def test_qa_format_prompts_with_context_and_trains_the_answer(tokenizer):
    data = DataSection(train="unused.jsonl", format="qa", chat_template="never")
    out = Encoder(tokenizer, data)({"question": "Largest island?", "context": "Greenland is big.", "answer": "Greenland"})
    prompt = tokenizer.decode(out["input_ids"][: out["prompt_len"]])
    assert prompt == "Context: Greenland is big.\nQuestion: Largest island?\nAnswer:\n"
    trained = [t for t, label in zip(out["input_ids"], out["labels"]) if label != IGNORE]
    assert tokenizer.decode(trained) == "Greenland<|im_end|>"


def test_seq2seq_encoding_splits_prompt_and_target_and_collates_separately(tokenizer):
    data = DataSection(train="unused.jsonl", format="translation", fields={"source": "en", "target": "es"})
    encode = Encoder(tokenizer, data, task="seq2seq")
    rows = [encode({"en": "In the beginning", "es": "En el principio"}), encode({"en": "Light", "es": "Luz y más luz"})]
    assert tokenizer.decode(rows[0]["input_ids"]) == "Translate from English to Spanish:\nIn the beginning\n"
    assert tokenizer.decode(rows[0]["labels"]) == "En el principio<|im_end|>"
    batch = collate(rows, tokenizer.pad_token_id, "seq2seq")
    assert batch["labels"].shape[1] == max(len(r["labels"]) for r in rows) != batch["input_ids"].shape[1]
    assert batch["labels"][0, -1].item() in (IGNORE, tokenizer.eos_token_id)


def test_classification_encoding_and_unknown_label_is_dropped(tokenizer):
    data = DataSection(train="unused.jsonl", format="classification", max_length=8)
    encode = Encoder(tokenizer, data, task="classification", label2id={"sport": 0, "tech": 1})
    out = encode({"text": "word " * 20, "label": "tech"})
    assert out["labels"] == [1] and len(out["input_ids"]) == 8 and not out["drop"]
    assert encode({"text": "x", "label": "weather"})["drop"] == "label not among the training labels"
    batch = collate([out, encode({"text": "y", "label": "sport"})], tokenizer.pad_token_id, "classification")
    assert batch["labels"].tolist() == [1, 0]


RULES = [
    ({"model": {"task": "classification"}}, "model.task classification cannot train on data.format translation; use data.format: classification"),
    ({"data": {"format": "classification", "fields": {}}}, "cannot train on data.format classification; set model.task: classification"),
    ({"model": {"task": "seq2seq"}, "data": {"format": "chat", "fields": {}}}, "model.task seq2seq cannot train on data.format chat"),
    ({"eval": {"metric": "macro_f1"}}, "eval.metric macro_f1 is not computed for data.format translation"),
]


@pytest.mark.parametrize("change,expected", RULES)
def test_task_and_format_must_agree(tmp_path, capsys, change, expected):
    recipe = tiny_recipe(tmp_path, tmp_path / "run")
    for section, values in change.items():
        recipe[section] = {**recipe[section], **values}
    assert main(["validate", str(write_recipe(recipe, tmp_path / "r.yaml"))]) == 2
    assert expected in capsys.readouterr().err


def test_metric_direction_defaults(tmp_path):
    recipe = load_recipe(write_recipe(tiny_recipe(tmp_path, tmp_path / "run"), tmp_path / "r.yaml"))
    assert recipe.eval.chosen("translation") == ("eval_chrf", True)
    recipe.eval.metric = "loss"
    assert recipe.eval.chosen("translation") == ("eval_loss", False)


# ---------------------------------------------------------------- runs

def test_seq2seq_trains_generates_scores_and_keeps_the_best(tmp_path, tiny_bart):
    run = tmp_path / "run"
    recipe = task_recipe(tiny_bart, run, "seq2seq", method="full",
                         train={"max_steps": 8, "eval_every": 4, "lr": 3e-3},
                         eval={"samples": 2, "generate_rows": 4, "max_new_tokens": 8, "metric": "loss"})
    assert main([str(write_recipe(recipe, tmp_path / "r.yaml"))]) == 0
    evals = records(run)
    assert [e["step"] for e in evals] == [0, 4, 8]
    assert all({"eval_chrf", "eval_bleu", "eval_loss"} <= set(e) for e in evals)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    state = json.loads((run / "checkpoints" / "step-8" / "trainer_state.json").read_text())
    best = min(evals[1:], key=lambda e: e["eval_loss"])
    assert state["best"] == {"metric": "eval_loss", "value": best["eval_loss"], "step": best["step"], "greater_is_better": False}
    assert (run / "best" / "config.json").is_file() == (best["step"] < 8), "best at the final step is final/, not a copy"
    report = (run / "report.md").read_text()
    assert "| eval_chrf |" in report and "- best: eval_loss" in report and "**Prompt:**" in report


@pytest.mark.parametrize("method", ["full", "lora"])
def test_classifier_save_reload_predicts_the_same_labels(tmp_path, tiny_model, method):
    """The labels the run scored at its last eval are the labels final/ predicts after a reload."""
    run = tmp_path / "run"
    recipe = task_recipe(tiny_model, run, "classification", method=method,
                         data={"train": str(DATA / "bbc_news" / "train.jsonl"), "eval": str(DATA / "bbc_news" / "eval.jsonl"),
                               "format": "classification", "fields": {}, "max_length": 48,
                               "max_train_rows": 64, "max_eval_rows": 24},
                         train={"max_steps": 6, "lr": 1e-2})
    path = write_recipe(recipe, tmp_path / "r.yaml")
    assert main([str(path)]) == 0
    names = ["business", "entertainment", "politics", "sports", "tech"]
    last = records(run)[-1]
    assert last["confusion"]["labels"] == names and {"eval_accuracy", "eval_macro_f1"} <= set(last)

    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(run / "final")
    assert config.id2label == dict(enumerate(names))
    from launcher.commands.eval import compare_checkpoints
    found = compare_checkpoints(load_recipe(path), str(run / "final"))[str(run / "final")]
    assert found["confusion"]["matrix"] == last["confusion"]["matrix"]
    assert found["eval_accuracy"] == last["eval_accuracy"]
    if method == "lora":  # the new head is trained and saved with the adapter (peft's SEQ_CLS modules_to_save)
        from safetensors import safe_open
        with safe_open(run / "final" / "adapter_model.safetensors", "pt") as weights:
            assert any("score" in key for key in weights.keys())


def test_eval_verb_compares_base_and_final(tmp_path, tiny_model, capsys):
    run = tmp_path / "run"
    recipe = tiny_recipe(tiny_model, run, data={"train": str(DATA / "chatterbot_qa" / "train.jsonl"),
                                                "eval": str(DATA / "chatterbot_qa" / "eval.jsonl"), "format": "qa",
                                                "fields": {}, "max_length": 48, "max_train_rows": 32, "max_eval_rows": 6},
                         train={"max_steps": 2}, eval={"samples": 1, "generate_rows": 3, "max_new_tokens": 4})
    path = str(write_recipe(recipe, tmp_path / "r.yaml"))
    assert main([path]) == 0
    assert {"eval_exact_match", "eval_f1"} <= set(records(run)[0])
    capsys.readouterr()
    assert main(["eval", path]) == 0
    table = capsys.readouterr().out
    assert "eval_exact_match" in table and "base" in table and "final" in table
    results = json.loads((run / "eval.json").read_text())
    assert list(results) == ["base", str(run / "final")]
    assert results[str(run / "final")]["eval_loss"] == pytest.approx(records(run)[-1]["eval_loss"], rel=1e-4)
    assert main(["eval", path, "--checkpoint", str(tmp_path)]) == 2
