"""The user's data files: read cheaply to fail early, loaded as `datasets` tables to tokenise.

Kept apart from data.py (which turns rows into tokens) because these checks run before torch or
any tokenizer exists: `launcher validate` peeks at every file.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from launcher.formats import FORMATS
from launcher.recipe import DataSection, Recipe, UserError

PEEK_ROWS = 5


def _kind(path: Path) -> str:
    if path.is_dir():
        return "folder"
    suffix = path.suffix.lower()
    kinds = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
    if suffix not in kinds:
        raise UserError(f"{path}: unsupported data file type '{suffix}' (use .jsonl, .json, .csv, .parquet or a datasets folder)")
    return kinds[suffix]


def peek_rows(path: str | Path, limit: int = PEEK_ROWS) -> list[dict]:
    """The first rows of a data file, read cheaply so bad data fails before any model loads."""
    path = Path(path)
    kind = _kind(path)
    if kind == "json" and path.suffix == ".jsonl":
        rows = []
        with path.open() as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path} row {number}: not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise UserError(f"{path} row {number}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
                if len(rows) == limit:
                    break
        return rows
    if kind == "json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
        if not isinstance(data, list) or not all(isinstance(row, dict) for row in data[:limit]):
            raise UserError(f"{path}: a .json data file must hold a list of objects")
        return data[:limit]
    if kind == "csv":
        with path.open(newline="") as handle:
            return [row for _, row in zip(range(limit), csv.DictReader(handle))]
    if kind == "parquet":
        import pyarrow.parquet as pq
        table = pq.ParquetFile(path).read_row_group(0)
        return table.slice(0, limit).to_pylist()
    from datasets import load_from_disk
    return load_from_disk(str(path)).select(range(limit)).to_list()


def check_rows(path: str | Path, data: DataSection) -> None:
    """Fail on the first peeked row that lacks a field the format needs, naming file, row and field."""
    rows = peek_rows(path)
    if not rows:
        raise UserError(f"{path}: no rows")
    for number, row in enumerate(rows, start=1):
        for canonical in FORMATS[data.format].required:
            column = data.field(canonical)
            if column not in row:
                hint = f" (set data.fields.{canonical} to one of: {', '.join(map(str, row))})"
                raise UserError(f"{path} row {number}: missing field '{column}' needed by format {data.format}{hint}")
            value = row[column]
            if canonical == "messages":
                _check_messages(path, number, value)
            elif canonical == "label":
                if isinstance(value, bool) or not isinstance(value, (str, int)):
                    raise UserError(f"{path} row {number}: field '{column}' must be a label name or integer, got {value!r}")
            elif not isinstance(value, str):
                raise UserError(f"{path} row {number}: field '{column}' must be text, got {type(value).__name__}")


def _check_messages(path: Any, number: int, messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{path} row {number}: field 'messages' must be a non-empty list of {{role, content}}")
    for turn, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise UserError(f"{path} row {number}: messages[{turn}] needs role system, user or assistant")
        if not isinstance(message.get("content"), str):
            raise UserError(f"{path} row {number}: messages[{turn}].content must be text")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{path} row {number}: messages has no assistant turn to train on")


def check_sources(recipe: Recipe) -> None:
    """Peek at the train and eval files: bad data fails here, before torch or any model loads."""
    check_rows(recipe.data.train, recipe.data)
    if recipe.data.eval:
        check_rows(recipe.data.eval, recipe.data)


def load_table(path: str | Path):
    """A `datasets.Dataset` from any supported source."""
    import datasets
    path = Path(path)
    kind = _kind(path)
    if kind == "folder":
        loaded = datasets.load_from_disk(str(path))
        return loaded["train"] if isinstance(loaded, datasets.DatasetDict) else loaded
    return datasets.load_dataset(kind, data_files=str(path), split="train")


def label_names(path: str | Path, data: DataSection, limit: int | None) -> list[str]:
    """Class names of a classification train file: its sorted unique labels (id i is names[i])."""
    table = load_table(path)
    if limit is not None:
        table = table.select(range(min(limit, len(table))))
    return sorted({str(label) for label in table[data.field("label")]})
