"""Labels: which tokens each data format trains on, position by position."""
import pytest

from launcher.data.encode import Encoder
from launcher.recipe.formats import IGNORE
from launcher.recipe.schema import DataSection


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_model)


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode(tokenizer, row, **data):
    return Encoder(tokenizer, DataSection(train="unused.jsonl", **data))(row)


def trained_spans(tokenizer, encoded):
    """(start, decoded text) of each run of trained labels."""
    spans, start = [], None
    labels = encoded["labels"] + [IGNORE]
    for i, label in enumerate(labels):
        if label != IGNORE and start is None:
            start = i
        if label == IGNORE and start is not None:
            spans.append((start, tokenizer.decode(encoded["input_ids"][start:i])))
            start = None
    return spans


def test_completion_without_template_masks_exactly_the_prompt(tokenizer):
    row = {"prompt": "The capital of France is", "completion": " Paris."}
    out = encode(tokenizer, row, format="completion", chat_template="never")
    prompt = ids(tokenizer, "The capital of France is")
    target = ids(tokenizer, " Paris.<|im_end|>")
    assert out["input_ids"] == prompt + target
    assert out["labels"] == [IGNORE] * len(prompt) + target
    assert out["prompt_len"] == len(prompt)


def test_train_on_prompt_trains_every_token(tokenizer):
    row = {"prompt": "Q:", "completion": " A"}
    out = encode(tokenizer, row, format="completion", chat_template="never", train_on_prompt=True)
    assert out["labels"] == out["input_ids"]


def test_instruction_with_chat_template_trains_reply_and_end_tag(tokenizer):
    row = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    out = encode(tokenizer, row, format="instruction")
    prompt = "<|im_start|>user\nAdd the numbers.\n\n2 and 3<|im_end|>\n<|im_start|>assistant\n"
    assert trained_spans(tokenizer, out) == [(len(ids(tokenizer, prompt)), "5<|im_end|>\n")]
    assert tokenizer.decode(out["input_ids"]) == prompt + "5<|im_end|>\n"


def test_instruction_plain_template_without_input(tokenizer):
    row = {"instruction": "Say hi.", "output": "hi"}
    out = encode(tokenizer, row, format="instruction", chat_template="never")
    prompt = "### Instruction:\nSay hi.\n\n### Response:\n"
    assert trained_spans(tokenizer, out) == [(len(ids(tokenizer, prompt)), "hi<|im_end|>")]


def test_translation_prompt_names_languages_and_trains_target(tokenizer):
    row = {"en": "In the beginning", "es": "En el principio"}
    out = encode(tokenizer, row, format="translation", fields={"source": "en", "target": "es"},
                 source_lang="English", target_lang="Spanish", chat_template="never")
    prompt = "Translate from English to Spanish:\nIn the beginning\n"
    assert tokenizer.decode(out["input_ids"][: out["prompt_len"]]) == prompt
    assert trained_spans(tokenizer, out) == [(len(ids(tokenizer, prompt)), "En el principio<|im_end|>")]


def test_multi_turn_chat_trains_every_assistant_turn_only(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye"}]
    out = encode(tokenizer, {"messages": messages}, format="chat")
    first_prompt = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    second_prompt = first_prompt + "Hello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
    assert trained_spans(tokenizer, out) == [(len(ids(tokenizer, first_prompt)), "Hello<|im_end|>\n"),
                                             (len(ids(tokenizer, second_prompt)), "Goodbye<|im_end|>\n")]


def test_text_format_trains_everything(tokenizer):
    out = encode(tokenizer, {"text": "plain text"}, format="text")
    assert out["labels"] == out["input_ids"] == ids(tokenizer, "plain text<|im_end|>")


def test_field_mapping_reads_renamed_columns(tokenizer):
    row = {"q": "Why?", "a": "Because."}
    out = encode(tokenizer, row, format="completion", fields={"prompt": "q", "completion": "a"}, chat_template="never")
    assert trained_spans(tokenizer, out)[0][1] == "Because.<|im_end|>"


def test_truncation_that_removes_every_target_marks_the_row_dropped(tokenizer):
    row = {"prompt": "word " * 40, "completion": "target"}
    out = encode(tokenizer, row, format="completion", chat_template="never", max_length=16)
    assert len(out["input_ids"]) == 16
    assert out["drop"] == "no target token within max_length"
    kept = encode(tokenizer, {"prompt": "short", "completion": " target"}, format="completion",
                  chat_template="never", max_length=16)
    assert kept["drop"] == ""


def test_a_batch_of_rows_encodes_as_each_row_alone(tokenizer):
    """Training tokenises in batches (one tokenizer call for all segments); nothing may shift between rows."""
    rows = [{"messages": [{"role": "user", "content": f"question {i} " * i},
                          {"role": "assistant", "content": f"answer {i}"}]} for i in range(1, 6)]
    encoder = Encoder(tokenizer, DataSection(train="unused.jsonl", format="chat", max_length=40))
    batch = encoder.batch({"messages": [row["messages"] for row in rows]})
    for i, row in enumerate(rows):
        assert {key: values[i] for key, values in batch.items()} == encoder(row)
    assert len(set(map(tuple, batch["input_ids"]))) == len(rows)


def test_the_token_cache_key_follows_the_settings_and_the_tokenizer(tokenizer):
    """The tokenised data is cached under this key: a changed setting or tokenizer must miss the cache."""
    from transformers import AutoTokenizer
    key = Encoder(tokenizer, DataSection(train="unused.jsonl")).fingerprint("source")
    assert Encoder(tokenizer, DataSection(train="unused.jsonl")).fingerprint("source") == key
    assert Encoder(tokenizer, DataSection(train="unused.jsonl", max_length=64)).fingerprint("source") != key
    assert Encoder(tokenizer, DataSection(train="unused.jsonl")).fingerprint("other source") != key
    other = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    other.add_tokens(["<new>"])
    assert Encoder(other, DataSection(train="unused.jsonl")).fingerprint("source") != key


def test_generation_is_scored_against_the_whole_reference_even_when_max_length_cuts_the_target(tokenizer):
    row = {"en": "In the beginning", "es": "En el principio creó Dios los cielos y la tierra. " * 4}
    out = encode(tokenizer, row, format="translation", fields={"source": "en", "target": "es"},
                 chat_template="never", max_length=24)
    assert len(out["input_ids"]) == 24
    assert out["reference"] == row["es"]
