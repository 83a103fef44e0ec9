"""The user's data files, loaded as `datasets` tables to tokenise.

Kept apart from data.py (which turns rows into tokens) because which files are readable is known
before torch or any tokenizer exists: launcher/rowcheck.py reads every row of them first.
"""
from __future__ import annotations

from pathlib import Path

from launcher.recipe import DataSection, UserError


def kind_of(path: Path) -> str:
    """How `datasets` reads a data source: json, csv, parquet or folder; anything else is refused."""
    if path.is_dir():
        return "folder"
    suffix = path.suffix.lower()
    kinds = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
    if suffix not in kinds:
        raise UserError(f"{path}: unsupported data file type '{suffix}' (use .jsonl, .json, .csv, .parquet or a datasets folder)")
    return kinds[suffix]


def load_table(path: str | Path):
    """A `datasets.Dataset` from any supported source."""
    import datasets
    path = Path(path)
    kind = kind_of(path)
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
