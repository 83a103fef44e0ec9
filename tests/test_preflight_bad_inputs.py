"""A corpus of bad inputs, each refused before any model loads: exit status 2, one line naming the
file, row and field (or the key), no traceback, and the output directory left as it was.

Each case runs in-process through the CLI's `main`, as `validate` and as `train` (the model folder
holds no weights, so a case that got as far as loading a model would fail differently). A few run in a
fresh process to show that no traceback reaches the terminal.
"""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from launcher.cli import main
from support import header_only_model

REPO = Path(__file__).resolve().parents[1]
ROWS = 1000   # rows in each data file
FAR = 700     # the row, far into the file, that is broken in the "far" cases


def good_rows(count: int = ROWS) -> list[dict]:
    return [{"en": f"verse {i}", "es": f"verso {i}"} for i in range(1, count + 1)]


def encode(name: str, rows: list) -> bytes:
    """Rows as the bytes of a .jsonl, .json, .csv or .parquet file."""
    suffix = Path(name).suffix
    if suffix == ".jsonl":
        return "".join(json.dumps(row) + "\n" for row in rows).encode()
    if suffix == ".json":
        return json.dumps(rows).encode()
    if suffix == ".csv":
        columns = list(dict.fromkeys(key for row in rows for key in row))
        out = io.StringIO()
        writer = csv.DictWriter(out, columns)
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue().encode()
    import pyarrow as pa
    import pyarrow.parquet as pq
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue()


def with_row(name: str, number: int, row, count: int = ROWS) -> bytes:
    """A file of good rows whose row `number` (from 1) is replaced."""
    rows = good_rows(count)
    rows[number - 1] = row
    return encode(name, rows)


def with_line(number: int, raw: bytes, count: int = ROWS) -> bytes:
    """A .jsonl file of good rows whose line `number` is replaced by raw bytes."""
    lines = encode("t.jsonl", good_rows(count)).splitlines(keepends=True)
    lines[number - 1] = raw + b"\n"
    return b"".join(lines)


@dataclass
class Case:
    name: str
    expected: str                                  # the error line must contain this (the file's name, row, field)
    files: dict[str, bytes] = field(default_factory=dict)
    recipe: dict = field(default_factory=dict)     # dotted key -> value
    argv: tuple[str, ...] = ()                     # extra validate options (then validate only: train checks this machine)
    typo: tuple[str, str] | None = None            # (dotted key, the name the user typed instead)


def row_cases() -> list[Case]:
    """Every kind of bad row, at row 1 and far into the file, in each file type that can hold it."""
    cases = []
    kinds = [("missing", {"en": "a"}, "es: missing (data.fields.target)"),
             ("null", {"en": "a", "es": None}, "es: null, expected text"),
             ("empty", {"en": "a", "es": ""}, "es: empty text"),
             ("blank", {"en": "   ", "es": "b"}, "en: empty text"),
             ("list", {"en": "a", "es": ["b"]}, "es: expected text, got list"),
             ("number", {"en": 7, "es": "b"}, "en: expected text, got int"),
             ("object", {"en": "a", "es": {"text": "b"}}, "es: expected text, got dict")]
    for suffix in (".jsonl", ".json"):
        for kind, row, what in kinds:
            for number in (1, FAR):
                cases.append(Case(f"{suffix[1:]}-{kind}-row{number}", f"t{suffix}:{number}: {what}",
                                  {f"t{suffix}": with_row(f"t{suffix}", number, row)}))
    for kind, row, what in kinds[1:4]:  # a parquet column has one type; nulls and empty strings fit in it
        cases.append(Case(f"parquet-{kind}-row{FAR}", f"t.parquet:{FAR}: {what}", {"t.parquet": with_row("t.parquet", FAR, row)}))
    cases += [
        Case("parquet-missing-column", "t.parquet:1: es: missing", {"t.parquet": encode("t.parquet", [{"en": "a", "spanish": "b"}] * 3)}),
        Case("parquet-number-column", "t.parquet:1: es: expected text, got int", {"t.parquet": encode("t.parquet", [{"en": "a", "es": 3}] * 3)}),
        Case("parquet-not-parquet", "t.parquet: not a readable parquet file", {"t.parquet": b"PAR1 this is not parquet"}),
        Case("csv-empty-cell-row1", "t.csv:1: es: empty text", {"t.csv": with_row("t.csv", 1, {"en": "a", "es": ""})}),
        Case(f"csv-empty-cell-row{FAR}", f"t.csv:{FAR}: en: empty text", {"t.csv": with_row("t.csv", FAR, {"en": "", "es": "b"})}),
        Case("csv-missing-column", "t.csv:1: es: missing", {"t.csv": b"en,target\na,b\n"}),
        Case(f"csv-extra-cells-row{FAR}", f"t.csv:{FAR}: 1 more cell(s) than the header's 2 columns",
             {"t.csv": encode("t.csv", good_rows()).replace(b"verse 700,verso 700", b"verse 700,verso 700,oops")}),
        Case(f"csv-unclosed-quote-row{FAR}", f"t.csv:{FAR}: not valid CSV (unexpected end of data)",
             {"t.csv": encode("t.csv", good_rows()).replace(b"verso 700", b'"verso 700')}),
        Case(f"csv-not-utf8-row{FAR}", f"t.csv:{FAR}: es: not UTF-8 text (byte 0xff)",
             {"t.csv": encode("t.csv", good_rows()).replace(b"verso 700", b"verso \xff700")}),
    ]
    return cases


def raw_cases() -> list[Case]:
    """Bytes that are not rows: broken JSON, undecodable text, empty files, rows that are not objects."""
    return [
        Case("jsonl-invalid-json-row1", "t.jsonl:1: not valid JSON", {"t.jsonl": with_line(1, b'{"en": "a", "es": ')}),
        Case(f"jsonl-invalid-json-row{FAR}", f"t.jsonl:{FAR}: not valid JSON", {"t.jsonl": with_line(FAR, b'{"en": "a" "es": "b"}')}),
        Case(f"jsonl-not-utf8-row{FAR}", f"t.jsonl:{FAR}: es: not UTF-8 text (byte 0xe9)",
             {"t.jsonl": with_line(FAR, b'{"en": "a", "es": "caf\xe9"}')}),
        Case("jsonl-not-utf8-outside-strings-row6", "t.jsonl:6: not valid JSON", {"t.jsonl": with_line(6, b'{"en": "a", \xff}')}),
        Case(f"jsonl-not-an-object-row{FAR}", f"t.jsonl:{FAR}: expected a JSON object, got list", {"t.jsonl": with_line(FAR, b'["a", "b"]')}),
        Case(f"json-not-an-object-row{FAR}", f"t.json:{FAR}: expected a JSON object, got str", {"t.json": with_row("t.json", FAR, "a row")}),
        Case("json-not-utf8", "t.json:3: es: not UTF-8 text (byte 0xff)",
             {"t.json": encode("t.json", good_rows(5)).replace(b"verso 3", b"verso \xff")}),
        Case("json-syntax", "t.json: line 1 column", {"t.json": encode("t.json", good_rows(5))[:-2]}),
        Case("json-not-a-list", "t.json: a .json data file must hold a list of objects, got dict", {"t.json": b'{"en": "a"}'}),
        Case("jsonl-empty-file", "t.jsonl: no rows", {"t.jsonl": b"\n\n"}),
        Case("jsonl-all-rows-empty", "t.jsonl:1: en: empty text", {"t.jsonl": encode("t.jsonl", [{"en": "", "es": ""}] * 5)}),
        Case("csv-all-rows-empty", "t.csv:1: en: empty text", {"t.csv": b"en,es\n,\n,\n,\n"}),
        Case("unsupported-type", "t.xml: unsupported data file type '.xml'", {"t.xml": b"<a/>\n"}),
        Case(f"eval-file-row{FAR}", f"e.jsonl:{FAR}: es: null",
             {"t.jsonl": encode("t.jsonl", good_rows()), "e.jsonl": with_row("e.jsonl", FAR, {"en": "a", "es": None})},
             {"data.eval": "e.jsonl"}),
    ]


CHAT = {"data.format": "chat", "data.fields": {}}


def chat_file(number: int, messages) -> bytes:
    rows = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}]} for i in range(ROWS)]
    rows[number - 1] = {"messages": messages}
    return encode("c.jsonl", rows)


def format_cases() -> list[Case]:
    """Chat, classification and instruction rows: their own fields and types."""
    user = {"role": "user", "content": "hi"}
    instruction = {"data.format": "instruction", "data.fields": {}}
    classify = {"data.format": "classification", "data.fields": {}, "model.task": "classification", "method": "full"}
    return [
        Case(f"chat-bad-role-row{FAR}", f"c.jsonl:{FAR}: messages[1].role: expected system, user or assistant, got 'bot'",
             {"c.jsonl": chat_file(FAR, [user, {"role": "bot", "content": "yo"}])}, CHAT),
        Case(f"chat-content-list-row{FAR}", f"c.jsonl:{FAR}: messages[0].content: expected text, got list",
             {"c.jsonl": chat_file(FAR, [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "yo"}])}, CHAT),
        Case("chat-no-assistant-row1", "c.jsonl:1: messages: no assistant turn to train on", {"c.jsonl": chat_file(1, [user])}, CHAT),
        Case(f"chat-empty-reply-row{FAR}", f"c.jsonl:{FAR}: messages[1].content: empty text",
             {"c.jsonl": chat_file(FAR, [user, {"role": "assistant", "content": ""}])}, CHAT),
        Case("chat-messages-not-list-row1", "c.jsonl:1: messages: expected a non-empty list", {"c.jsonl": chat_file(1, "hi")}, CHAT),
        Case(f"classification-label-null-row{FAR}", f"l.jsonl:{FAR}: label: null, expected a label name or integer",
             {"l.jsonl": with_label(FAR, None)}, classify),
        Case(f"classification-label-float-row{FAR}", f"l.jsonl:{FAR}: label: expected a label name or integer, got float",
             {"l.jsonl": with_label(FAR, 0.5)}, classify),
        Case(f"instruction-input-list-row{FAR}", f"i.jsonl:{FAR}: input: expected text, got list",
             {"i.jsonl": with_instruction(FAR, {"input": ["a"]})}, instruction),
        Case(f"instruction-system-number-row{FAR}", f"i.jsonl:{FAR}: system: expected text, got int",
             {"i.jsonl": with_instruction(FAR, {"system": 3})}, instruction),
        Case(f"qa-context-list-row{FAR}", f"q.jsonl:{FAR}: context: expected text, got list",
             {"q.jsonl": encode("q.jsonl", [{"question": "q", "answer": "a", "context": ["c"] if i == FAR else "c"}
                                            for i in range(1, ROWS + 1)])}, {"data.format": "qa", "data.fields": {}}),
        Case(f"classification-pair-number-row{FAR}", f"l.jsonl:{FAR}: text_pair: expected text, got int",
             {"l.jsonl": encode("l.jsonl", [{"text": "t", "label": "good", **({"text_pair": 5} if i == FAR else {})}
                                            for i in range(1, ROWS + 1)])}, classify),
        Case("instruction-output-renamed-row1", "i.jsonl:1: output: missing; format instruction needs field 'output'; this row has: instruction, response",
             {"i.jsonl": encode("i.jsonl", [{"instruction": "a", "response": "b"}])}, instruction),
    ]


def with_label(number: int, label) -> bytes:
    rows = [{"text": f"text {i}", "label": "good" if i % 2 else "bad"} for i in range(ROWS)]
    rows[number - 1]["label"] = label
    return encode("l.jsonl", rows)


def with_instruction(number: int, extra: dict) -> bytes:
    rows = [{"instruction": f"do {i}", "output": f"done {i}"} for i in range(ROWS)]
    rows[number - 1].update(extra)
    return encode("i.jsonl", rows)


def recipe_cases() -> list[Case]:
    """Recipe keys, output_dir, the model's whereabouts and the device: what train would refuse later."""
    read_only = "/sys/launcher-test-run" if os.geteuid() == 0 else "READONLY/run"  # root writes through permission bits
    return [
        Case("misspelled-required-model-path", "unknown key 'model.paht'; did you mean 'path'?", typo=("model.path", "paht")),
        Case("misspelled-required-data-train", "unknown key 'data.trian'; did you mean 'train'?", typo=("data.train", "trian")),
        Case("misspelled-base", "unknown key 'baes'; did you mean 'base'?", recipe={"baes": "base.yaml"}),
        Case("output-dir-is-a-file", "output_dir {tmp}/taken: is a file, not a folder", {"taken": b"keep me\n"}, {"output_dir": "taken"}),
        Case("output-dir-under-a-file", "output_dir {tmp}/taken/run: {tmp}/taken is a file, so the folder cannot be made",
             {"taken": b"keep me\n"}, {"output_dir": "taken/run"}),
        Case("output-dir-read-only", "is not writable; choose a folder you can write to", recipe={"output_dir": read_only}),
        Case("hub-id-offline-not-cached", "model.path nobody-here/no-such-model: config.json is not in the local Hugging Face cache "
             "and HF_HUB_OFFLINE is set", recipe={"model.path": "nobody-here/no-such-model"}),
        Case("package-not-installed", "model.path: package 'no_such_model_pkg' is not installed", recipe={"model.path": "pkg:no_such_model_pkg"}),
        Case("paged-optimizer-on-cpu", "train.optimizer paged-adamw: paging moves optimiser state",
             recipe={"train.optimizer": "paged-adamw"}, argv=("--device", "cpu")),
        Case("compile-on-gpu-without-triton", "train.compile on cuda needs triton",
             recipe={"train.compile": True}, argv=("--device", "cuda")),
        Case("fp16-on-cpu", "train.precision: fp16 needs a GPU", recipe={"train.precision": "fp16"}, argv=("--device", "cpu")),
        Case("skipped-share-out-of-range", "key 'data.skipped_share_warn': Input should be less than or equal to 1",
             recipe={"data.skipped_share_warn": 5}),
    ]


CORPUS = row_cases() + raw_cases() + format_cases() + recipe_cases()


def build(tmp_path: Path, case: Case) -> tuple[str, Path]:
    """Write the case's files and recipe; returns the recipe path and output_dir."""
    model = header_only_model(tmp_path / "model")
    for name, content in case.files.items():
        (tmp_path / name).write_bytes(content)
    data_file = next((name for name in case.files if name.startswith(("t.", "c.", "l.", "i.", "q."))), "t.jsonl")
    if not (tmp_path / data_file).exists():
        (tmp_path / data_file).write_bytes(encode(data_file, good_rows(8)))
    recipe = {"model": {"path": str(model)}, "method": "lora",
              "data": {"train": data_file, "format": "translation", "fields": {"source": "en", "target": "es"}},
              "train": {"max_steps": 1, "micro_batch_size": 2}, "output_dir": str(tmp_path / "run")}
    for dotted, value in case.recipe.items():
        *parents, last = dotted.split(".")
        node = recipe
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value if dotted != "output_dir" or value.startswith("/") else str(tmp_path / value.replace("READONLY/", "ro/"))
    if case.typo:
        section, key = case.typo[0].split(".")
        recipe[section][case.typo[1]] = recipe[section].pop(key)
    if "READONLY" in str(case.recipe.get("output_dir", "")):
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path), Path(recipe["output_dir"])


def snapshot(folder: Path) -> dict:
    """What output_dir holds (a file's bytes; a folder's listing), to compare before and after."""
    if folder.is_file():
        return {"file": folder.read_bytes()}
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*")} if folder.is_dir() else {"absent": True}


RUNS = [(case, verb) for case in CORPUS for verb in (("validate",) if case.argv else ("validate", "train"))]


@pytest.mark.parametrize("case,verb", RUNS, ids=[f"{verb}-{case.name}" for case, verb in RUNS])
def test_bad_input_is_one_line_exit_2_and_output_dir_untouched(tmp_path, capsys, case, verb):
    recipe, output_dir = build(tmp_path, case)
    before = snapshot(output_dir)
    assert main([verb, recipe, *case.argv]) == 2
    err = capsys.readouterr().err
    assert case.expected.replace("{tmp}", str(tmp_path)) in err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert snapshot(output_dir) == before, "a refused run must leave output_dir as it was"


def test_the_corpus_is_large_and_covers_every_file_type():
    names = " ".join(case.name for case in CORPUS)
    assert len(CORPUS) >= 40
    for kind in ("jsonl", "json-", "csv", "parquet", f"row{FAR}", "row1"):
        assert kind in names


def test_misspelled_required_key_is_named_with_its_suggestion_not_as_missing(tmp_path, capsys):
    recipe, _ = build(tmp_path, Case("typo", "", typo=("model.path", "paht")))
    assert main(["validate", recipe]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'model.paht'; did you mean 'path'? (and 1 more problem)" in err
    assert "missing key" not in err


def launch(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "launcher", *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


@pytest.mark.parametrize("name", [f"jsonl-not-utf8-row{FAR}", f"parquet-null-row{FAR}"])
def test_no_traceback_reaches_the_terminal(tmp_path, name):
    case = next(case for case in CORPUS if case.name == name)
    recipe, output_dir = build(tmp_path, case)
    result = launch(recipe)  # a .yaml alone means train
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and case.expected in result.stderr and result.stderr.count("\n") == 1
    assert not output_dir.exists()


# ---------------------------------------------------------------- what passes: the checks refuse only what train would

def test_validate_for_a_gpu_node_from_this_cpu_node(tmp_path, capsys):
    """paged-adamw needs CUDA: refused for this machine (no GPU here), accepted with --device cuda (bitsandbytes installed)."""
    recipe, _ = build(tmp_path, Case("paged", "", recipe={"train.optimizer": "paged-adamw"}))
    assert main(["validate", recipe, "--device", "cpu"]) == 2
    assert main(["validate", recipe, "--device", "cuda"]) == 0
    assert ": ok (" in capsys.readouterr().out


def test_a_hub_id_in_the_local_cache_passes_offline(tmp_path):
    """The cache is laid out as huggingface_hub writes it; HF_HUB_CACHE points there (read when the hub library loads)."""
    repo = tmp_path / "hub" / "models--some-org--tiny"
    snapshot_dir = repo / "snapshots" / ("0" * 40)
    snapshot_dir.mkdir(parents=True)
    (snapshot_dir / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    recipe, _ = build(tmp_path, Case("cached", "", recipe={"model.path": "some-org/tiny"}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}

    def run() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "launcher", "validate", recipe], capture_output=True, text=True,
                              env=env, cwd=REPO, timeout=120)
    assert run().returncode == 0
    (snapshot_dir / "config.json").unlink()
    refused = run()
    assert refused.returncode == 2 and "model.path some-org/tiny: config.json is not in the local Hugging Face cache" in refused.stderr


def test_a_hub_id_whose_config_ships_with_the_launcher_passes_offline(tmp_path, capsys):
    from launcher.preflight.locations import SHIPPED_CONFIGS
    shipped = sorted(SHIPPED_CONFIGS.glob("*--*/config.json"))
    if not shipped:
        pytest.skip("no model configs ship in launcher/model_configs yet")
    org, name = shipped[0].parent.name.split("--", 1)
    recipe, _ = build(tmp_path, Case("shipped", "", recipe={"model.path": f"{org}/{name}"}))
    assert main(["validate", recipe]) == 0


def test_a_datasets_folder_is_read_row_by_row(tmp_path, capsys):
    import datasets
    rows = good_rows()
    rows[FAR - 1]["es"] = None
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    recipe, output_dir = build(tmp_path, Case("folder", "", recipe={"data.train": "saved"}))
    assert main(["validate", recipe]) == 2
    assert f"saved:{FAR}: es: null, expected text" in capsys.readouterr().err
    assert not output_dir.exists()
    (tmp_path / "plain").mkdir()  # a folder, but not one datasets saved
    (tmp_path / "second").mkdir()
    recipe, _ = build(tmp_path / "second", Case("not saved", "", recipe={"data.train": str(tmp_path / "plain")}))
    assert main(["validate", recipe]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'plain'}: cannot be read (" in err and err.count("\n") == 1
