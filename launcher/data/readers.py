"""Every row of a data file, as parsed values: one reader per file type (FILE_TYPES), shared by validate and train
through data/rows.py, which checks each row. What cannot be text at all (a UTF-16 or UTF-32 file) is refused
before any row; JSON that two parsers would read differently (a key twice in one object) is refused, named.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator

from launcher.errors import UserError


def _text(raw: bytes) -> str:
    """Bytes as text; bytes that are not UTF-8 become lone surrogates, found and named per field (data/rows.py)."""
    return raw.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")


class _DuplicateKey(ValueError):
    """A JSON object with a key twice: json keeps the last, other readers refuse it or keep the first."""


def _object(pairs: list[tuple[str, Any]]) -> dict:
    found = dict(pairs)
    if len(found) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(key for key, _ in pairs if key in seen or seen.add(key)))
    return found


def _parse_json(text: str) -> Any:
    return json.loads(text, object_pairs_hook=_object)


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line = _text(raw)
            if not line.strip():
                continue
            try:
                yield number, _parse_json(line)
            except _DuplicateKey as exc:
                raise UserError(f"{path}:{number}: {exc}: this key appears twice in one object; keep one") from None
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: not valid JSON ({exc.msg.removesuffix(' at')} at character "
                                f"{exc.pos + 1})") from None


def _json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    text = _text(path.read_bytes())
    try:
        data = _parse_json(text)
    except _DuplicateKey as exc:
        yield from _json_rows_to_duplicate(path, text, str(exc))
        return
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: line {exc.lineno} column {exc.colno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: a .json data file must hold a list of objects, got {type(data).__name__}")
    yield from enumerate(data, start=1)


class _Marked(dict):
    """A parsed JSON object that had a key twice (`duplicate`), kept to find the row that holds it."""
    duplicate: str | None = None


def _marked(pairs: list[tuple[str, Any]]) -> dict:
    found = _Marked(pairs)
    if len(found) != len(pairs):
        seen: set[str] = set()
        found.duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
    return found


def _duplicate_in(value: Any) -> str | None:
    if isinstance(value, list):
        return next(filter(None, map(_duplicate_in, value)), None)
    if isinstance(value, _Marked):
        return value.duplicate or next(filter(None, map(_duplicate_in, value.values())), None)
    return None


def _json_rows_to_duplicate(path: Path, text: str, key: str) -> Iterator[tuple[int, Any]]:
    """The rows of a .json list up to the one holding a key twice, which is then named."""
    data = json.loads(text, object_pairs_hook=_marked)
    for number, row in enumerate(data if isinstance(data, list) else [data], start=1):
        found = _duplicate_in(row)
        if found:
            raise UserError(f"{path}:{number}: {found}: this key appears twice in one object; keep one")
        yield number, row
    raise UserError(f"{path}: {key}: this key appears twice in one object; keep one")


def _csv_rows(path: Path) -> Iterator[tuple[int, Any]]:
    csv.field_size_limit(2**31 - 1)  # the reader's default (128 KiB a cell) would refuse long rows that pandas reads
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        reader = csv.DictReader(handle, strict=True)  # an unclosed quote would otherwise swallow every later row
        number = 0
        try:
            _refuse_duplicate_columns(path, reader.fieldnames or [])
            for number, row in enumerate(reader, start=1):
                if None in row:  # more cells than the header has columns
                    raise UserError(f"{path}:{number}: {len(row[None])} more cell(s) than the header's "
                                    f"{len(reader.fieldnames)} columns")
                yield number, row
        except csv.Error as exc:
            raise UserError(f"{path}:{number + 1}: not valid CSV ({exc})") from None


def _refuse_duplicate_columns(path: Path, names: list[str]) -> None:
    """One column name twice: a dict keeps the last cell, pandas renames the second; neither is what was meant."""
    for index, name in enumerate(names):
        if name in names[:index]:
            raise UserError(f"{path}: header: {name or '(unnamed)'}: column name appears twice (columns "
                            f"{names.index(name) + 1} and {index + 1}); rename or remove one")


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow
    import pyarrow.parquet as pq
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=4096)
    except pyarrow.ArrowException as exc:
        raise UserError(f"{path}: not a readable parquet file ({exc})") from None
    number = 0
    for batch in batches:
        for row in batch.to_pylist():
            number += 1
            yield number, row


def _folder_rows(path: Path, split: str = "train") -> Iterator[tuple[int, Any]]:
    import datasets
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict) and split not in loaded:
        raise UserError(f"{path}: no split '{split}' (it has: {', '.join(loaded)})")
    table = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    number = 0
    for batch in table.iter(batch_size=4096):
        for values in zip(*batch.values()):
            number += 1
            yield number, dict(zip(batch, values))


def _txt_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """One row per non-empty line, in a field named text."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line = _text(raw).rstrip("\r\n")
            if line.strip():
                yield number, {"text": line}


# Every data file type the launcher reads, by suffix, and its row reader (validate's and train's alike).
FILE_TYPES = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows, ".parquet": _parquet_rows, ".txt": _txt_rows}


def every_row(path: str | Path, split: str = "train") -> Iterator[tuple[int, Any]]:
    """(row number, row) for every row of a data file or datasets folder (FILE_TYPES says which types are read)."""
    path = Path(path)
    if path.is_dir():
        return _folder_rows(path, split)
    if path.suffix.lower() in TEXT_TYPES:
        _refuse_wide_text(path)
    return FILE_TYPES[path.suffix.lower()](path)


TEXT_TYPES = (".jsonl", ".json", ".csv", ".txt")
# Byte-order marks of the encodings in which ASCII text has NUL bytes (longest first: UTF-32 LE starts as UTF-16 LE's).
WIDE_MARKS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))


def _refuse_wide_text(path: Path) -> None:
    """A text file saved as UTF-16 or UTF-32 (as some Windows editors and PowerShell do): every row would fail
    to parse, or its fields hold a NUL between letters; said once, for the file, before any row."""
    with path.open("rb") as handle:
        head = handle.read(4)
    name = next((name for mark, name in WIDE_MARKS if head.startswith(mark)), "UTF-16 or UTF-32" if b"\0" in head else None)
    if name:
        raise UserError(f"{path}: saved as {name} text (it starts with bytes {head.hex(' ')}), not UTF-8; re-save it as UTF-8")
