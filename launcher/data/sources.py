"""The user's data sources: every row checked (and its prompt built) before any model loads, and the same
rows as the `datasets` tables train tokenises.

A local file is parsed once, by data/rows.py, for both: `validate` checks the rows it yields, and train's
table is built from those same rows (`Dataset.from_generator`), cached under a key made of the file's
content hash, the data settings and the reader's code: a file replaced with its old size and modification
time is read again, never served from the cache. Torch-free: `launcher validate` runs all of it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from launcher.data import fingerprint, prompts, rows
from launcher.data.readers import FILE_TYPES, every_row
from launcher.data.rows import checked_rows, field_plan, file_rows
from launcher.errors import UserError
from launcher.recipe.schema import DataSection, Recipe


def _refuse_unreadable_type(path: Path) -> None:
    if not path.is_dir() and path.suffix.lower() not in FILE_TYPES:
        raise UserError(f"{path}: unsupported data file type '{path.suffix.lower()}' (use {', '.join(FILE_TYPES)}, "
                        "a datasets folder, or hf:org/name)")


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
    """Every row of a data file of a type read here; the first malformed row fails, named."""
    _refuse_unreadable_type(Path(path))  # before any row is read
    rows.check_file(path, data)


def source_rows(source: Source) -> Iterator[tuple[int, dict]]:
    """(row number, table row) of every row of a source, each checked: what validate checks and train reads."""
    if source.local_path is None:
        return checked_rows(source.label, enumerate(load_table(source), start=1), source.data)
    _refuse_unreadable_type(source.local_path)
    return file_rows(source.path, source.data, source.split)


def check_sources(recipe: Recipe) -> None:
    """Every row of every train and eval source, its prompt built with the model's chat template, its label
    one of the classes: bad data fails here, before torch or any model loads. A hub source is read through
    `datasets` (from its cache offline), which is also the check that it resolves."""
    template = prompts.recipe_template(recipe)
    classes = Classes(recipe.data.labels)
    train_rows = 0
    for which in ("train", "eval"):
        for index, source in enumerate(sources_of(recipe, which)):
            count = 0
            for number, row in source_rows(source):
                count += 1
                problem = prompts.prompt_problem(row, source.data, template, recipe.model.task)
                if problem:
                    raise UserError(f"{source.label if source.hub_id else source.path}:{number}: {problem}")
                if source.data.format == "classification" and (source.max_rows is None or number <= source.max_rows):
                    classes.check(source, number, row, defines=which == "train" and index == 0)
            classes.close(source)
            if source.data.format == "chat" and template is None and prompts.has_tokenizer_files(recipe):
                raise UserError(f"data.format chat needs a tokenizer with a chat template; {recipe.model.path} has none")
            train_rows += min(count, source.max_rows or count) if which == "train" else 0
    if recipe.data.eval_fraction and not recipe.data.eval:
        train_rows = eval_split(train_rows, recipe.data.eval_fraction)[0]
    batch = recipe.train.micro_batch_size * recipe.train.grad_accum  # times the processes, at least one
    if train_rows < batch:  # before tokenising drops any: train would refuse it after tokenising
        raise UserError(f"data.train: {train_rows} rows is less than one global batch (micro_batch_size x grad_accum = "
                        f"{batch}, times the processes); lower them, or add rows")


class Classes:
    """A classifier's classes: data.labels when listed, else the labels of the first train source's rows; a row
    of any other source whose label is not among them is refused (it would be dropped, or named a new class)."""

    def __init__(self, listed: list[str] | None):
        self.known: set[str] | None = set(listed) if listed else None
        self.origin = "data.labels"
        self.collecting: set[str] | None = None

    def check(self, source: Source, number: int, row: dict, defines: bool) -> None:
        label = row[source.data.field("label")]
        if self.known is None and defines:
            self.collecting = (self.collecting or set()) | {label}
            return
        if self.known is not None and label not in self.known:
            shown = ", ".join(sorted(self.known)[:8]) + (", ..." if len(self.known) > 8 else "")
            raise UserError(f"{source.label if source.hub_id else source.path}:{number}: {source.data.field('label')}: "
                            f"{label!r} is not one of the classes ({self.origin}: {shown}); list every class "
                            "in data.labels to keep it")

    def close(self, source: Source) -> None:
        if self.collecting is not None and self.known is None:
            if len(self.collecting) < 2:  # one class: its head would learn nothing a constant does not say
                raise UserError(f"{source.label}: every row's label is {next(iter(self.collecting))!r}; a classifier "
                                "needs at least two classes (list them in data.labels when the others are in other sources)")
            self.known, self.origin = self.collecting, f"the labels of {source.label}"


def eval_split(rows: int, fraction: float) -> tuple[int, int]:
    """(train rows, eval rows) of data.eval_fraction over `rows`, as `datasets.train_test_split` counts them;
    refused in one line when either side would be empty."""
    held = math.ceil(fraction * rows)
    if rows - held < 1 or held < 1:
        raise UserError(f"data.eval_fraction {fraction}: of {rows} train row{'s' * (rows != 1)} it holds out {held}, "
                        f"leaving {rows - held} to train on; lower it, add rows, or give data.eval")
    return rows - held, held


def load_table(source: Source | str | Path):
    """A `datasets.Dataset` from any supported source (a bare path reads every field of its train split).

    A local source is read by data/rows.py (checked, and only the fields its format reads, when the source
    carries data settings) and cached under its content hash."""
    import datasets
    if not isinstance(source, Source):
        source = Source(str(source), None)  # type: ignore[arg-type]  # no data settings: every field, unchecked
    if source.hub_id:
        return _load_hub(source)
    path = Path(source.path)
    _refuse_unreadable_type(path)
    datasets.disable_progress_bars()
    key = {"path": str(path), "split": source.split, "data": source.data.model_dump_json() if source.data else "",
           "content": fingerprint.content_digest(path), "reader": fingerprint.content_digest(Path(rows.__file__))}
    try:
        table = datasets.Dataset.from_generator(_table_rows, features=_features(source.data), gen_kwargs=key)
    except datasets.exceptions.DatasetGenerationError as exc:
        if isinstance(exc.__cause__, UserError):
            raise exc.__cause__ from None
        raise
    return table


def _table_rows(path: str, split: str, data: str, content: str, reader: str) -> Iterator[dict]:
    """The rows of a table, for `from_generator`; content and reader only key its cache."""
    settings = DataSection.model_validate_json(data) if data else None
    for _, row in file_rows(path, settings, split) if settings else every_row(path, split):
        yield row


def _features(data: DataSection | None):
    """Column types of a checked table: text, labels as text, chat turns as role and content (None: inferred)."""
    import datasets
    if data is None:
        return None
    text = datasets.Value("string")
    return datasets.Features({column: datasets.List({"role": text, "content": text}) if canonical == "messages" else text
                              for canonical, column, _ in field_plan(data)})


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
    """Class names of a classification train source: data.labels when listed, else its sorted unique labels
    (id i is names[i])."""
    if data.labels:
        return list(data.labels)
    table = load_table(source)
    if limit is not None:
        table = table.select(range(min(limit, len(table))))
    return sorted({str(label) for label in table[data.field("label")]})
