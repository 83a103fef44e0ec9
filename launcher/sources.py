"""The user's data files: read cheaply to fail early, loaded as `datasets` tables to tokenise.

Kept apart from data.py (which turns rows into tokens) because these checks run before torch or
any tokenizer exists: `launcher validate` reads every row of every file.
"""
from __future__ import annotations

from pathlib import Path

from launcher.recipe import DataSection, Recipe, UserError
from launcher.rowcheck import check_file


def _kind(path: Path) -> str:
    if path.is_dir():
        return "folder"
    suffix = path.suffix.lower()
    kinds = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
    if suffix not in kinds:
        raise UserError(f"{path}: unsupported data file type '{suffix}' (use .jsonl, .json, .csv, .parquet or a datasets folder)")
    return kinds[suffix]


def check_rows(path: str | Path, data: DataSection) -> None:
    """Every row of a data file of a type read here (launcher/rowcheck.py); the first malformed row fails, named."""
    _kind(Path(path))  # an unsupported file type is refused before any row is read
    check_file(path, data)


def check_sources(recipe: Recipe) -> None:
    """Every row of the train and eval files: bad data fails here, before torch or any model loads."""
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
