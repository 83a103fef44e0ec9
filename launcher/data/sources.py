"""The user's data files: read cheaply to fail early, loaded as `datasets` tables to tokenise.

Kept apart from data.py (which turns rows into tokens) because these checks run before torch or
any tokenizer exists: `launcher validate` reads every row of every file.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from launcher.recipe.schema import DataSection, Recipe

from launcher.errors import UserError
from launcher.data.rows import FILE_TYPES, check_file, check_rows_of


def _kind(path: Path) -> str:
    if path.is_dir():
        return "folder"
    suffix = path.suffix.lower()
    if suffix not in FILE_TYPES:
        raise UserError(f"{path}: unsupported data file type '{suffix}' (use {', '.join(FILE_TYPES)}, "
                        "a datasets folder, or hf:org/name)")
    return FILE_TYPES[suffix][0]


@dataclass(frozen=True)
class Source:
    """One data source as the run reads it: where, which split, the data settings its rows use
    (data.format and data.fields, or the entry's own), and its share of a mixture."""

    path: str                      # a local file or folder, or hf:org/name
    data: DataSection              # the data section with this source's format and fields
    name: str | None = None        # hub config name
    split: str = "train"
    weight: float | None = None
    epochs: float | None = None
    max_rows: int | None = None

    @property
    def hub_id(self) -> str | None:
        return self.path.removeprefix("hf:") if self.path.startswith("hf:") else None

    @property
    def local_path(self) -> Path | None:
        """The file or folder to check row by row; None for a hub source (checked as it is read)."""
        return None if self.hub_id else Path(self.path)

    @property
    def label(self) -> str:
        """A short name for reports and metric keys."""
        if self.hub_id:
            return self.path + (f"/{self.name}" if self.name else "") + (f":{self.split}" if self.split != "train" else "")
        return Path(self.path).name


def sources_of(recipe: Recipe, which: str = "train") -> list[Source]:
    """data.train or data.eval as sources; a source without its own max_rows takes data.max_train_rows / max_eval_rows."""
    data = recipe.data
    limit = data.max_train_rows if which == "train" else data.max_eval_rows
    found = []
    for entry in data.entries(which):
        own = data.model_copy(update={"format": entry.format or data.format,
                                      "fields": data.fields if entry.fields is None else entry.fields})
        found.append(Source(entry.path, own, entry.name, entry.split, entry.weight, entry.epochs, entry.max_rows or limit))
    return found


def check_rows(path: str | Path, data: DataSection) -> None:
    """Every row of a data file of a type read here (launcher/rowcheck.py); the first malformed row fails, named."""
    _kind(Path(path))  # an unsupported file type is refused before any row is read
    check_file(path, data)


def check_sources(recipe: Recipe) -> None:
    """Every row of every train and eval source: bad data fails here, before torch or any model loads.
    A hub source is read through `datasets` (from its cache offline), which is also the check that it resolves."""
    for source in sources_of(recipe, "train") + sources_of(recipe, "eval"):
        if source.local_path is not None:
            check_rows(source.path, source.data)
        else:
            check_rows_of(source.label, enumerate(load_table(source), start=1), source.data)


def load_table(source: Source | str | Path):
    """A `datasets.Dataset` from any supported source (a bare path reads its train split)."""
    import datasets
    if not isinstance(source, Source):
        source = Source(str(source), None)  # type: ignore[arg-type]  # data settings are not read here
    if source.hub_id:
        return _load_hub(source)
    path = Path(source.path)
    kind = _kind(path)
    if kind == "folder":
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if source.split not in loaded:
                raise UserError(f"{path}: no split '{source.split}' (it has: {', '.join(loaded)})")
            return loaded[source.split]
        return loaded
    if kind == "text":  # one row per non-empty line, in a column named text
        table = datasets.load_dataset("text", data_files=str(path), split="train")
        return table.filter(lambda batch: [bool(line.strip()) for line in batch["text"]], batched=True)
    if kind == "csv":  # every cell as text, as the peek reads it (pandas would make "42" an integer and "" a NaN)
        with path.open(newline="") as handle:
            header = next(csv.reader(handle), [])
        features = datasets.Features({column: datasets.Value("string") for column in header})
        return datasets.load_dataset("csv", data_files=str(path), split="train", features=features, keep_default_na=False)
    return datasets.load_dataset(kind, data_files=str(path), split="train")


def _load_hub(source: Source):
    """A hub dataset through datasets' own resolution (its cache when offline); any failure to resolve is the user's."""
    import datasets
    try:
        return datasets.load_dataset(source.hub_id, source.name, split=source.split)
    except (ConnectionError, FileNotFoundError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        offline = " (offline: a hub dataset must already be in the datasets cache, HF_DATASETS_CACHE)" \
            if datasets.config.HF_HUB_OFFLINE else ""
        raise UserError(f"data source {source.label}: cannot load it: {reason}{offline}") from None


def label_names(source: Source | str | Path, data: DataSection, limit: int | None) -> list[str]:
    """Class names of a classification train source: its sorted unique labels (id i is names[i])."""
    table = load_table(source)
    if limit is not None:
        table = table.select(range(min(limit, len(table))))
    return sorted({str(label) for label in table[data.field("label")]})
