"""More bad inputs, by class (issue 24): what two readers read differently, caches that miss a changed file,
rows the chat template cannot render, recipe keys the schema let through, and data whose meaning changed
silently. Each is refused before any model loads (exit 2, one `error:` line naming file:row: field or the key,
no traceback, output_dir as it was) or accepted by validate and train with the same meaning.

The train side of the data cases reads the rows as train does (`load_table`, the table it tokenises)
instead of launching a run; two cases run `train` end to end.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from launcher.cli import main
from launcher.data.rows import file_rows
from launcher.data.sources import Source, load_table, sources_of
from launcher.errors import UserError
from launcher.recipe.files import load_recipe

REPO = Path(__file__).resolve().parents[1]
TRANSLATION = {"format": "translation", "fields": {"source": "en", "target": "es"}}
CHAT = {"format": "chat", "fields": {}}
CLASSIFY = {"format": "classification", "fields": {}}


def jsonl(rows: list) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def pairs(count: int = 6) -> list[dict]:
    return [{"en": f"verse {i}", "es": f"verso {i}"} for i in range(1, count + 1)]


def chats(count: int = 6, bad: int | None = None, messages=None) -> bytes:
    rows = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}]}
            for i in range(1, count + 1)]
    if bad:
        rows[bad - 1] = {"messages": messages}
    return jsonl(rows)


def labelled(labels: list) -> bytes:
    return jsonl([{"text": f"text {i}", "label": label} for i, label in enumerate(labels)])


@dataclass
class Case:
    name: str
    expected: str                                   # the one error line contains this
    files: dict[str, bytes] = field(default_factory=dict)
    data: dict = field(default_factory=dict)        # the recipe's data section (train defaults to the first file)
    recipe: dict = field(default_factory=dict)      # top-level keys merged over the recipe
    text: str | None = None                         # the recipe file's text, verbatim (YAML the dumper cannot write)
    raw: bytes | None = None                        # the recipe file's bytes, verbatim
    argv: tuple[str, ...] = ()                      # overrides


def reader_cases() -> list[Case]:
    """Class 1: what validate and train would read differently is refused, named at its row."""
    far = jsonl(pairs(700))
    return [
        Case("jsonl-duplicate-key", "t.jsonl:5: es: this key appears twice in one object",
             {"t.jsonl": jsonl(pairs(4)) + b'{"en": "a", "es": "b", "es": "c"}\n'}, TRANSLATION),
        Case("json-duplicate-key", "t.json:3: es: this key appears twice in one object",
             {"t.json": b'[{"en": "a", "es": "b"}, {"en": "a", "es": "b"}, {"en": "a", "es": "b", "es": "c"}]'}, TRANSLATION),
        Case("chat-turn-duplicate-key", "c.jsonl:7: content: this key appears twice",
             {"c.jsonl": chats() + b'{"messages": [{"role": "user", "content": "a", "content": "b"}]}\n'}, CHAT),
        Case("csv-duplicate-header", "t.csv: header: es: column name appears twice (columns 2 and 3)",
             {"t.csv": b"en,es,es\na,b,c\n"}, TRANSLATION),
        Case("jsonl-lone-surrogate", "t.jsonl:701: es: a lone surrogate \\ud800",
             {"t.jsonl": far + b'{"en": "a", "es": "b\\ud800"}\n'}, TRANSLATION),
        Case("jsonl-lone-low-surrogate-in-label", "l.jsonl:3: label: a lone surrogate \\udfff",
             {"l.jsonl": labelled(["a", "b"]) + b'{"text": "t", "label": "\\udfff"}\n'}, CLASSIFY,
             {"model": {"task": "classification"}, "method": "full"}),
        Case("datasets-folder-split-is-the-one-read", "saved:2: es: null, expected text",
             {}, {**TRANSLATION, "train": [{"path": "saved", "split": "validation"}]}),
    ]


def template_cases() -> list[Case]:
    """Class 3: a chat row whose turn a template cannot read is named at its row."""
    user, reply = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}
    return [
        Case("chat-user-content-null", "c.jsonl:4: messages[0].content: null, expected text",
             {"c.jsonl": chats(bad=4, messages=[{"role": "user", "content": None}, reply])}, CHAT),
        Case("chat-system-without-content", "c.jsonl:2: messages[0].content: missing",
             {"c.jsonl": chats(bad=2, messages=[{"role": "system"}, user, reply])}, CHAT),
        Case("chat-reply-first", "c.jsonl:3: messages[0].role: the first turn is the assistant's",
             {"c.jsonl": chats(bad=3, messages=[reply, user, reply])}, CHAT),
        Case("prompt-template-unknown-placeholder", "data.prompt_template: unknown placeholder {src}",
             {"t.jsonl": jsonl(pairs())}, {**TRANSLATION, "prompt_template": "Say {src}"}),
        Case("qa-template-unclosed-brace", "data.qa_template: not a valid template",
             {"q.jsonl": jsonl([{"question": "q", "answer": "a"}])}, {"format": "qa", "qa_template": "Q: {question"}),
    ]


def schema_cases() -> list[Case]:
    """Class 7 and 9: the recipe's keys, types and paths."""
    base = "model: {path: MODEL}\ndata: {train: t.jsonl, format: translation, fields: {source: en, target: es}}\n"
    return [
        Case("second-train-section", "key 'train' appears twice (lines 3 and 5)",
             {"t.jsonl": jsonl(pairs())}, text=base + "train: {max_steps: 1, micro_batch_size: 2}\noutput_dir: OUT\n"
                                                       "train: {max_steps: 1, micro_batch_size: 8}\n"),
        Case("nested-duplicate-key", "key 'lora.r' appears twice (lines 5 and 7)",
             {"t.jsonl": jsonl(pairs())}, text=base + "output_dir: OUT\nlora:\n  r: 4\n  alpha: 8\n  r: 8\n"),
        Case("second-data-section", "key 'data' appears twice (lines 2 and 4)",
             {"t.jsonl": jsonl(pairs())}, text=base + "output_dir: OUT\ndata: {format: text}\n"),
        Case("micro-batch-true", "key 'train.micro_batch_size': Input should be a valid integer (got True)",
             {"t.jsonl": jsonl(pairs())}, TRANSLATION, {"train": {"max_steps": 1, "micro_batch_size": True}}),
        Case("packing-one", "key 'data.packing': Input should be a valid boolean (got 1)",
             {"t.jsonl": jsonl(pairs())}, {**TRANSLATION, "packing": 1}),
        Case("lr-as-text", "key 'train.lr': Input should be a valid number (got '0.001')",
             {"t.jsonl": jsonl(pairs())}, TRANSLATION, {"train": {"max_steps": 1, "lr": "0.001"}}),
        Case("output-dir-empty", "key 'output_dir': empty path", {"t.jsonl": jsonl(pairs())}, TRANSLATION,
             {"output_dir": ""}),
        Case("data-train-blank", "key 'data.train': empty path", {}, {**TRANSLATION, "train": "  "}),
        Case("quant-with-full", "quant: applies only with method qlora (this recipe has full)", {"t.jsonl": jsonl(pairs())},
             TRANSLATION, {"method": "full", "quant": {"bits": 4, "type": "nf4"}}),
        Case("freeze-pattern-not-a-regex", "key 'freeze.patterns[0]': not a valid regular expression",
             {"t.jsonl": jsonl(pairs())}, TRANSLATION, {"method": "full", "freeze": {"patterns": ["layers.(0"]}}),
        Case("modules-to-save-not-a-regex", "key 'lora.modules_to_save[1]': not a valid regular expression",
             {"t.jsonl": jsonl(pairs())}, TRANSLATION, {"lora": {"modules_to_save": ["lm_head", "*score"]}}),
        Case("latin1-comment", "byte 0xe9 at offset 14 (line 2) is not UTF-8; save the recipe as UTF-8",
             {"t.jsonl": jsonl(pairs())}, raw=b"# recipe\n# caf\xe9 au lait\n"),
        Case("override-base", "override 'base=other.yaml': base is read from the recipe file",
             {"t.jsonl": jsonl(pairs())}, TRANSLATION, argv=("base=other.yaml",)),
        Case("weight-zero", "key 'data.train[1].weight': Input should be greater than 0 (got 0)",
             {"t.jsonl": jsonl(pairs())}, {**TRANSLATION, "train": [{"path": "t.jsonl", "weight": 1}, {"path": "t.jsonl", "weight": 0}]}),
        Case("weight-negative", "key 'data.train[0].weight': Input should be greater than 0 (got -1)",
             {"t.jsonl": jsonl(pairs())}, {**TRANSLATION, "train": [{"path": "t.jsonl", "weight": -1}]}),
        Case("weight-inf", "key 'data.train[0].weight': Input should be a finite number (got inf)",
             {"t.jsonl": jsonl(pairs())}, {**TRANSLATION, "train": [{"path": "t.jsonl", "weight": math.inf}]}),
        Case("weight-nan", "key 'data.train[0].weight': Input should be a finite number (got nan)",
             {"t.jsonl": jsonl(pairs())}, {**TRANSLATION, "train": [{"path": "t.jsonl", "weight": math.nan}]}),
        Case("empty-source-list", "data.train: an empty list of sources", {}, {**TRANSLATION, "train": []}),
        Case("eval-empty-list", "data.eval: an empty list of sources", {"t.jsonl": jsonl(pairs())}, {**TRANSLATION, "eval": []}),
        Case("epochs-zero", "key 'data.train[0].epochs': Input should be greater than 0 (got 0)",
             {"t.jsonl": jsonl(pairs())}, {**TRANSLATION, "train": [{"path": "t.jsonl", "epochs": 0}]}),
        Case("max-steps-fraction", "key 'train.max_steps': Input should be a valid integer (got 2.5)",
             {"t.jsonl": jsonl(pairs())}, TRANSLATION, {"train": {"max_steps": 2.5}}),
        Case("gguf-file-empty", "key 'model.gguf_file': empty path", {"t.jsonl": jsonl(pairs())}, TRANSLATION,
             {"model": {"gguf_file": ""}}),
        Case("labels-listed-twice", "data.labels: 'good' is listed twice", {"l.jsonl": labelled(["good", "bad"])},
             {**CLASSIFY, "labels": ["good", "bad", "good"]}, {"model": {"task": "classification"}, "method": "full"}),
        Case("labels-without-classification", "data.labels: applies only with model.task classification",
             {"t.jsonl": jsonl(pairs())}, {**TRANSLATION, "labels": ["a", "b"]}),
    ] + scoped_and_checked_cases()


def scoped_and_checked_cases() -> list[Case]:
    """Keys another key's value makes the run ignore (rules.SCOPES), and values the run could not use."""
    text = {"t.jsonl": jsonl(pairs())}
    classifier = {"model": {"task": "classification"}, "method": "full"}
    return [
        Case("seed-beyond-numpy", "key 'train.seed': Input should be less than or equal to 4294967295", text,
             TRANSLATION, {"train": {"max_steps": 1, "seed": 2**40}}),
        Case("two-fields-one-column", "data.fields: source and target both read column 'en'", text,
             {"format": "translation", "fields": {"source": "en", "target": "en"}}),
        Case("empty-column-name", "data.fields.source: an empty column name", text,
             {"format": "translation", "fields": {"source": " ", "target": "es"}}),
        Case("target-modules-empty", "key 'lora.target_modules': List should have at least 1 item", text, TRANSLATION,
             {"lora": {"target_modules": []}}),
        Case("tracker-twice", "key 'report.trackers': 'tensorboard' is listed twice", text, TRANSLATION,
             {"report": {"trackers": ["tensorboard", "tensorboard"]}}),
        Case("lora-section-with-full", "lora: applies only with method lora or qlora (this recipe has full)", text,
             TRANSLATION, {"method": "full", "lora": {"r": 8}}),
        Case("lora-override-with-full", "lora: applies only with method lora or qlora", text, TRANSLATION,
             {"method": "full"}, argv=("lora.r=8",)),
        Case("override-given-twice", "override key 'train.lr' is given twice (train.lr=0.1 and train.lr=0.2)", text,
             TRANSLATION, argv=("train.lr=0.1", "train.lr=0.2")),
        Case("decay-with-cosine", "train.decay_rate: applies only with train.schedule exponential (this recipe has cosine)",
             text, TRANSLATION, {"train": {"max_steps": 1, "schedule": "cosine", "decay_rate": 0.5}}),
        Case("beams-for-a-classifier", "eval.num_beams: applies only with model.task causal-lm or seq2seq",
             {"l.jsonl": labelled(["good", "bad"] * 2)}, CLASSIFY, {**classifier, "eval": {"num_beams": 2}}),
        Case("project-without-trackers", "report.project: applies only when report.trackers is set", text, TRANSLATION,
             {"report": {"project": "p"}}),
        Case("eval-every-without-eval", "train.eval_every: applies only when data.eval or data.eval_fraction is set", text,
             TRANSLATION, {"train": {"max_steps": 1, "eval_every": 2}}),
        Case("max-eval-rows-with-a-fraction", "data.max_eval_rows: applies only when data.eval is set", text,
             {**TRANSLATION, "eval_fraction": 0.25, "max_eval_rows": 2}),
        Case("fsdp-section-under-ddp", "distributed.fsdp: applies only with distributed.strategy fsdp (this recipe has ddp)",
             text, TRANSLATION, {"distributed": {"fsdp": {"cpu_offload": True}}}),
        Case("qa-template-for-translation", "data.qa_template: applies only with data.format qa (this recipe has translation)",
             text, {**TRANSLATION, "qa_template": "Q: {question}"}),
        Case("generate-rows-for-instruction", "eval.generate_rows: applies only with data.format (of the eval rows) "
             "translation or qa", {"i.jsonl": jsonl([{"instruction": "a", "output": "b"}] * 6)},
             {"format": "instruction", "eval_fraction": 0.5}, {"eval": {"generate_rows": 4}}),
    ]


def meaning_cases() -> list[Case]:
    """Class 8: data whose meaning would change between the rows and the run."""
    classify = {"model": {"task": "classification"}, "method": "full"}
    return [
        Case("label-integer-among-text", "l.jsonl:4: label: an integer (1), but the label of row 1 is text",
             {"l.jsonl": labelled(["good", "bad", "good", 1, "bad"])}, CLASSIFY, classify),
        Case("label-text-among-integers", "l.jsonl:3: label: text ('2'), but the label of row 1 is an integer",
             {"l.jsonl": labelled([0, 1, "2"])}, CLASSIFY, classify),
        Case("eval-label-unseen-in-train", "e.jsonl:3: label: 'meh' is not one of the classes (the labels of l.jsonl: bad, good)",
             {"l.jsonl": labelled(["good", "bad"] * 3), "e.jsonl": labelled(["good", "bad", "meh"])},
             {**CLASSIFY, "eval": "e.jsonl"}, classify),
        Case("train-label-not-listed", "l.jsonl:2: label: 'meh' is not one of the classes (data.labels: bad, good)",
             {"l.jsonl": labelled(["good", "meh"])}, {**CLASSIFY, "labels": ["good", "bad"]}, classify),
        Case("eval-fraction-leaves-no-train-row", "data.eval_fraction 0.5: of 1 train row it holds out 1, leaving 0",
             {"t.jsonl": jsonl(pairs(1))}, {**TRANSLATION, "eval_fraction": 0.5}),
        Case("eval-fraction-after-max-rows", "data.eval_fraction 0.9: of 3 train rows it holds out 3, leaving 0",
             {"t.jsonl": jsonl(pairs(50))}, {**TRANSLATION, "eval_fraction": 0.9, "max_train_rows": 3}),
    ]


CASES = reader_cases() + template_cases() + schema_cases() + meaning_cases()


def build(tmp_path: Path, case: Case) -> tuple[Path, Path]:
    """The case's files, an empty model folder and the recipe; returns (recipe, output_dir)."""
    model, output_dir = tmp_path / "model", tmp_path / "run"
    model.mkdir()
    for name, content in case.files.items():
        (tmp_path / name).write_bytes(content)
    if case.name == "datasets-folder-split-is-the-one-read":
        import datasets
        bad = pairs(3)
        bad[1]["es"] = None
        datasets.DatasetDict({"train": datasets.Dataset.from_list(pairs(3)), "validation": datasets.Dataset.from_list(bad)}
                             ).save_to_disk(str(tmp_path / "saved"))
    path = tmp_path / "recipe.yaml"
    if case.raw is not None or case.text is not None:
        text = case.text.replace("MODEL", str(model)).replace("OUT", str(output_dir)) if case.text else None
        path.write_bytes(case.raw if case.raw is not None else text.encode())
        return path, output_dir
    data = {"train": next(iter(case.files), "t.jsonl"), **case.data}
    recipe = {"model": {"path": str(model)}, "method": "lora", "data": data,
              "train": {"max_steps": 1, "micro_batch_size": 2}, "output_dir": str(output_dir)}
    for key, value in case.recipe.items():
        recipe[key] = {**recipe[key], **value} if isinstance(value, dict) and isinstance(recipe.get(key), dict) else value
    path.write_text(yaml.safe_dump(recipe))
    return path, output_dir


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*")} if folder.is_dir() else {"absent": True}


RUNS = [(case, verb) for case in CASES for verb in ("validate", "train")]


@pytest.mark.parametrize("case,verb", RUNS, ids=[f"{verb}-{case.name}" for case, verb in RUNS])
def test_refused_in_one_line_naming_where(tmp_path, capsys, case, verb):
    recipe, output_dir = build(tmp_path, case)
    before = snapshot(output_dir)
    capsys.readouterr()  # what building the case printed (datasets' progress bars) is not the command's
    assert main([verb, str(recipe), *case.argv]) == 2
    err = capsys.readouterr().err
    assert case.expected in err, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert snapshot(output_dir) == before
    assert not (tmp_path / "~").exists()


def test_the_new_corpus_covers_every_class():
    assert len(CASES) >= 40
    for group in (reader_cases(), template_cases(), schema_cases(), meaning_cases()):
        assert len(group) >= 5


# ---------------------------------------------------------------- accepted by both, with one meaning

def use_model(recipe: Path, tmp_path: Path, model: Path) -> None:
    """A recipe that validate accepts needs a real model folder (config, weights, tokenizer)."""
    recipe.write_text(recipe.read_text().replace(str(tmp_path / "model"), str(model)))


def train_rows(recipe_path: Path) -> list[dict]:
    """The rows of the first train source as train's table holds them."""
    return load_table(sources_of(load_recipe(recipe_path))[0]).to_list()


def validated_rows(recipe_path: Path) -> list[dict]:
    return [row for _, row in file_rows(sources_of(load_recipe(recipe_path))[0].path, load_recipe(recipe_path).data)]


@pytest.mark.parametrize("name,content", [
    ("bom.csv", "\ufeffen,es\nhola,hello\nadios,bye\n".encode()),
    ("index.csv", b",en,es\n0,hola,hello\n1,adios,bye\n"),  # pandas' df.to_csv() with its unnamed index column
    ("short.csv", b"en,es,note\nhola,hello\nadios,bye,x\n"),  # a short row: its missing optional cells are null
    ("extra.jsonl", b'{"en": "hola", "es": "hello", "id": 1}\n{"en": "adios", "es": "bye", "id": "x"}\n'),
])
def test_what_one_reader_accepts_the_other_reads_the_same(tmp_path, tiny_model, capsys, name, content):
    """A spreadsheet's byte-order mark, pandas' index column, and a column of mixed types the format does not read."""
    (tmp_path / name).write_bytes(content)
    recipe, _ = build(tmp_path, Case(name, "", data={**TRANSLATION, "train": name}))
    use_model(recipe, tmp_path, tiny_model)
    assert main(["validate", str(recipe)]) == 0
    assert train_rows(recipe) == validated_rows(recipe) == [{"en": "hola", "es": "hello"}, {"en": "adios", "es": "bye"}]


def test_an_eval_label_listed_in_data_labels_keeps_its_class(tmp_path, tiny_model, capsys):
    from launcher.data.encode import class_labels
    files = {"l.jsonl": labelled(["good", "bad"] * 3), "e.jsonl": labelled(["good", "meh"])}
    recipe, _ = build(tmp_path, Case("listed", "", files, {**CLASSIFY, "eval": "e.jsonl", "labels": ["good", "bad", "meh"]},
                                     {"model": {"task": "classification"}, "method": "full"}))
    use_model(recipe, tmp_path, tiny_model)
    assert main(["validate", str(recipe)]) == 0
    assert class_labels(load_recipe(recipe)) == ["good", "bad", "meh"]  # id i is labels[i], as listed


def test_home_is_expanded_in_data_paths_and_output_dir(tmp_path, tiny_model):
    (tmp_path / "t.jsonl").write_bytes(jsonl(pairs()))
    recipe = {"model": {"path": str(tiny_model)}, "data": {"train": "~/t.jsonl", **TRANSLATION},
              "train": {"max_steps": 1}, "output_dir": "~/run"}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "launcher", "validate", str(tmp_path / "r.yaml")], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"output {tmp_path / 'run'})" in result.stdout
    assert not (tmp_path / "~").exists()


def test_numbers_with_an_exponent_are_numbers(tmp_path):
    (tmp_path / "t.jsonl").write_bytes(jsonl(pairs()))
    recipe, _ = build(tmp_path, Case("lr", "", data=TRANSLATION))
    recipe.write_text(recipe.read_text().replace("train:\n", "train:\n  lr: 3e-4\n"))
    assert load_recipe(recipe).train.lr == 3e-4
    assert load_recipe(recipe, ["train.lr=1e-5"]).train.lr == 1e-5


# ---------------------------------------------------------------- caches keyed by content

def test_a_file_replaced_with_its_old_modification_time_is_read_again(tmp_path):
    """`cp -p`, `rsync -a` and `touch -r` keep a file's mtime: train must still read the new rows."""
    (tmp_path / "t.jsonl").write_bytes(jsonl(pairs(8)))
    recipe, _ = build(tmp_path, Case("cache", "", data=TRANSLATION))
    assert len(train_rows(recipe)) == 8
    stat = (tmp_path / "t.jsonl").stat()
    (tmp_path / "t.jsonl").write_bytes(jsonl([{"en": f"new {i}", "es": f"nuevo {i}"} for i in range(30)]))
    os.utime(tmp_path / "t.jsonl", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    rows = train_rows(recipe)
    assert len(rows) == 30 and rows[0] == {"en": "new 0", "es": "nuevo 0"}


# ---------------------------------------------------------------- with a real tokenizer: the template, filtering

def model_with_template(tiny_model: Path, folder: Path, template: str) -> Path:
    shutil.copytree(tiny_model, folder)
    (folder / "chat_template.jinja").write_text(template)
    return folder


def test_a_row_the_models_template_refuses_is_named_by_validate_and_by_train(tmp_path, tiny_model, capsys):
    """A real template that refuses system turns (as Gemma's does): validate renders each row and names the first
    it cannot; the train reader builds prompts with the same renderer and names the same row."""
    from transformers import AutoTokenizer

    from launcher.data.encode import tokenise_train
    template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    model = model_with_template(tiny_model, tmp_path / "model-with-template", template)
    system = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    (tmp_path / "c.jsonl").write_bytes(chats(bad=5, messages=system))
    recipe, output_dir = build(tmp_path, Case("template", "", data={**CHAT, "train": "c.jsonl"}))
    recipe.write_text(recipe.read_text().replace(str(tmp_path / "model"), str(model)))
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    expected = "c.jsonl:5: messages: the chat template cannot render this row (TemplateError: System role not supported)"
    assert expected in err and err.count("\n") == 1 and not output_dir.exists()
    with pytest.raises(UserError, match=r"c.jsonl:5: the chat template cannot render this row \(TemplateError"):
        tokenise_train(load_recipe(recipe), AutoTokenizer.from_pretrained(model), None)


def test_an_eval_set_empty_after_filtering_is_refused_before_training(tmp_path, tiny_model, capsys):
    """Every eval row longer than max_length (no target token left): refused, never reported as eval_loss 0.0."""
    long = [{"en": " ".join(["word"] * 80), "es": "corto"} for _ in range(4)]
    files = {"t.jsonl": jsonl(pairs(8)), "e.jsonl": jsonl(long)}
    recipe, output_dir = build(tmp_path, Case("empty-eval", "", files, {**TRANSLATION, "eval": "e.jsonl", "max_length": 48}))
    recipe.write_text(recipe.read_text().replace(str(tmp_path / "model"), str(tiny_model)))
    for verb in (["validate", str(recipe), "--deep"], ["train", str(recipe)]):
        assert main(verb) == 2
        err = capsys.readouterr().err
        assert "error: e.jsonl: all 4 rows dropped, none left to use" in err and err.count("\n") == 1
    assert not (output_dir / "final").exists() and not (output_dir / "metrics.jsonl").exists()


# ---------------------------------------------------------------- malformed rows: validate and train agree

def table_bytes(kind: str, rows: list[dict]) -> bytes:
    if kind == ".jsonl":
        return jsonl(rows)
    if kind == ".json":
        return json.dumps(rows).encode()
    if kind == ".csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, list(dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue().encode()
    if kind == ".txt":
        return "".join(f"{row['text']}\n" for row in rows).encode()
    import pyarrow as pa
    import pyarrow.parquet as pq
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue()


FORMAT_ROWS = {  # format -> data settings, a good row
    "translation": (TRANSLATION, {"en": "hola amigo", "es": "hello friend"}),
    "chat": (CHAT, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}),
    "instruction": ({"format": "instruction", "fields": {}}, {"instruction": "count", "input": "to 3", "output": "1 2 3"}),
    "qa": ({"format": "qa", "fields": {}}, {"question": "who", "answer": "me", "context": "a story"}),
    "completion": ({"format": "completion", "fields": {}}, {"prompt": "2+2", "completion": "4"}),
    "text": ({"format": "text", "fields": {}}, {"text": "plain words"}),
    "classification": (CLASSIFY, {"text": "fine", "label": "good"}),
}
KINDS = {"translation": (".jsonl", ".json", ".csv", ".parquet"), "chat": (".jsonl", ".json", ".parquet"),
         "instruction": (".jsonl", ".csv"), "qa": (".json", ".csv"), "completion": (".jsonl",),
         "text": (".txt", ".jsonl"), "classification": (".jsonl", ".csv")}
SWAPS = [None, 0, 1, True, 2.5, "", " ", [], {}, ["x"], {"content": "x"}, "\udc80"]


def malformed(rng: random.Random, kind: str, rows: list[dict]) -> bytes:
    """One mutation of a good file: a type swapped in one field, or bytes flipped, or the file cut short."""
    how = rng.choice(["swap", "flip", "cut"] if kind != ".parquet" else ["swap", "swap", "cut"])
    if how == "swap":
        row = rng.choice(rows)
        key = rng.choice(list(row))
        row[key] = rng.choice(SWAPS)
        try:
            return table_bytes(kind, rows)
        except Exception:  # a mixed-type column parquet cannot hold: the writer refuses, so no such file exists
            return table_bytes(kind, rows[:1])
    content = bytearray(table_bytes(kind, rows))
    if how == "cut":
        return bytes(content[: rng.randrange(1, len(content))])
    for _ in range(rng.randint(1, 3)):
        content[rng.randrange(len(content))] = rng.randrange(256)
    return bytes(content)


def test_malformed_rows_validate_refuses_or_train_reads_the_same_rows(tmp_path):
    """Seeded: for each format and file type, good rows mutated; validate's check either refuses the file, or
    train's table (built as a run builds it) holds exactly the rows validate read."""
    from launcher.recipe.schema import DataSection
    rng, agreed, refused = random.Random(24), 0, 0
    cases = [(fmt, kind) for fmt, kinds in KINDS.items() for kind in kinds] * 12
    for index, (fmt, kind) in enumerate(cases[:200]):
        settings, good = FORMAT_ROWS[fmt]
        path = tmp_path / f"case{index}{kind}"
        path.write_bytes(malformed(rng, kind, [json.loads(json.dumps(good)) for _ in range(4)]))
        data = DataSection.model_validate({"train": str(path), **settings})
        try:
            checked = [row for _, row in file_rows(path, data)]
        except UserError as exc:
            assert str(exc).startswith(str(path)), exc  # named by file (and row)
            refused += 1
            continue
        assert load_table(Source(str(path), data)).to_list() == checked, path.read_bytes()[:300]
        agreed += 1
    assert refused > 40 and agreed > 40, (refused, agreed)


# ---------------------------------------------------------------- names that must match the model, checked before it loads

@pytest.mark.parametrize("changes,expected", [
    ({"lora": {"modules_to_save": ["lm_head", "scorer"]}},
     "lora.modules_to_save: 'scorer' names no module of LlamaForCausalLM (its top-level modules: model, lm_head)"),
    ({"method": "full", "freeze": {"patterns": ["embed_tokens", "layers\\.9\\."]}},
     "freeze.patterns: 'layers\\\\.9\\\\.' matches no parameter of LlamaForCausalLM"),
    ({"method": "full", "freeze": {"first_n_blocks": 3}}, "freeze.first_n_blocks is 3 but LlamaForCausalLM has 2 blocks"),
    ({"method": "full", "freeze": {"patterns": [""]}}, "freeze: freezes every parameter of LlamaForCausalLM"),
    ({"lora": {"target_modules": ["q_proj", "query"]}}, "lora.target_modules: 'query' names no linear layer of LlamaForCausalLM"),
])
def test_a_module_name_that_matches_nothing_is_refused_before_the_model_loads(tmp_path, tiny_model, capsys, changes, expected):
    (tmp_path / "t.jsonl").write_bytes(jsonl(pairs(8)))
    recipe, output_dir = build(tmp_path, Case("names", "", data=TRANSLATION, recipe=changes))
    recipe.write_text(recipe.read_text().replace(str(tmp_path / "model"), str(tiny_model)))
    assert main(["train", str(recipe)]) == 2
    out, err = capsys.readouterr()
    assert expected in err.splitlines()[-1] and err.count("error: ") == 1 and "Traceback" not in err
    assert "loading model" not in out + err and "Loading weights" not in out + err  # from the config alone
    assert not output_dir.exists()  # refused before the run directory is made


def edited_config(**changes):
    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return edit


@pytest.mark.parametrize("verb,edit,recipe,expected", [
    ("validate", edited_config(max_position_embeddings="512"), {},
     "config.json: max_position_embeddings is '512', not a positive whole number"),
    ("validate", lambda folder: (folder / "tokenizer_config.json").write_text("{bad"), {}, "tokenizer_config.json: not valid JSON"),
    ("validate", lambda folder: (folder / "tokenizer.json").write_text('{"version": "1.0"'), {}, "tokenizer.json: not valid JSON"),
    ("train", edited_config(model_type="llamax"), {}, "transformers cannot build a causal-lm model from its config"),
    ("train", None, {"model": {"attn_implementation": "nonsense"}}, "model.attn_implementation nonsense: Specified"),
], ids=["position-limit-text", "tokenizer-config-not-json", "tokenizer-json-cut", "model-type-unknown", "attention-unknown"])
def test_a_model_folder_or_setting_transformers_would_refuse_is_one_line_before_any_load(
        tmp_path, tiny_model, capsys, verb, edit, recipe, expected):
    (tmp_path / "t.jsonl").write_bytes(jsonl(pairs(8)))
    path, output_dir = build(tmp_path, Case("folder", "", data=TRANSLATION, recipe=recipe))
    model = Path(shutil.copytree(tiny_model, tmp_path / "copy"))
    if edit is not None:
        edit(model)
    path.write_text(path.read_text().replace(str(tmp_path / "model"), str(model)))
    assert main([verb, str(path)]) == 2
    out, err = capsys.readouterr()
    assert expected in err and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert "loading model" not in out and not output_dir.exists()


def test_a_world_size_left_in_the_shell_without_a_rendezvous_is_one_line(tmp_path, tiny_model):
    (tmp_path / "t.jsonl").write_bytes(jsonl(pairs(8)))
    path, _ = build(tmp_path, Case("world", "", data=TRANSLATION))
    use_model(path, tmp_path, tiny_model)
    env = {key: value for key, value in os.environ.items() if key not in ("MASTER_ADDR", "RANK")}
    result = subprocess.run([sys.executable, "-m", "launcher", "validate", str(path)], capture_output=True, text=True,
                            env={**env, "WORLD_SIZE": "2", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert result.returncode == 2 and "error: WORLD_SIZE=2 is set but MASTER_ADDR is not" in result.stderr
    assert result.stderr.count("\n") == 1


def test_the_gguf_conversion_cache_is_keyed_by_content(tmp_path):
    from launcher.model.loading import gguf_cache_folder
    source = tmp_path / "m.gguf"
    source.write_bytes(b"GGUF" + b"\0" * 64)
    before = gguf_cache_folder(source)
    stat = source.stat()
    source.write_bytes(b"GGUF" + b"\1" * 64)  # same size
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert gguf_cache_folder(source) != before
    shutil.copy2(source, tmp_path / "copy.gguf")
    assert gguf_cache_folder(tmp_path / "copy.gguf").name == gguf_cache_folder(source).name.replace("m-", "copy-")
