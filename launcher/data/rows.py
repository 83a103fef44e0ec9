"""The one checker of the user's data files: every row (parsed by data/readers.py) checked before any model
loads; and the tally of rows the tokenizer cut or dropped.

`validate` and `train` read every local file through `checked_rows` here: validate to check it, train to
build its `datasets` table from the very rows it yields (data/sources.py), so a row validate accepts is
read by train with the same meaning; no second parser (pyarrow's JSON or CSV reader) sees the file. What
two parsers would read differently is refused, named: a key twice in one JSON object, a CSV column name
twice, a lone surrogate, labels of two types. Rows stop at the first malformed one with
`file:row: field: what is wrong`. Row numbers count from 1: the line of a .jsonl
or .txt file, the element of a .json list, the data row of a .csv (the header is not counted), the
row of a .parquet file or datasets folder.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from launcher.data.readers import every_row
from launcher.recipe.formats import FORMATS
from launcher.recipe.schema import DataSection
from launcher.errors import UserError

FIRST_ROWS = 5  # row numbers listed per reason when rows are dropped or truncated
ROLES = ("system", "user", "assistant")
UNDECODABLE = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of a byte that is not UTF-8
SURROGATE = re.compile("[\ud800-\udfff]")      # no UTF-8 text holds one; a JSON \\ud800 escape alone makes one
LABEL_KINDS = {str: "text", int: "an integer"}


# ---------------------------------------------------------------- one row

def _undecodable(value: str) -> str | None:
    """What in a text is not UTF-8 text: a byte (as surrogateescape keeps it), or a lone UTF-16 surrogate."""
    found = None if value.isascii() else SURROGATE.search(value)
    if not found:
        return None
    if UNDECODABLE.fullmatch(found.group()):
        return f"not UTF-8 text (byte 0x{ord(found.group()) - 0xDC00:02x}); re-save the file as UTF-8"
    return f"a lone surrogate \\u{ord(found.group()):04x} (half of a UTF-16 pair), not text"


def _text_problem(value: Any, required: bool) -> str | None:
    """What is wrong with a value that should be text; None when it is fine."""
    if value is None:
        return "null, expected text" if required else None
    if not isinstance(value, str):
        return f"expected text, got {type(value).__name__}"
    undecodable = _undecodable(value)
    if undecodable:
        return undecodable
    if required and not value.strip():
        return "empty text"
    return None


def _label_problem(value: Any) -> str | None:
    if value is None:
        return "null, expected a label name or integer"
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return f"expected a label name or integer, got {type(value).__name__}"
    if isinstance(value, str):
        return "empty label" if not value.strip() else _undecodable(value)
    return f"integer {value} is out of range for a label" if abs(value) >= 2**63 else None


def _messages_problem(messages: Any, prompt_only: bool = False) -> tuple[str, str] | None:
    """(where, what) for a chat row's messages list, or None. prompt_only: the conversation a preference
    pair answers, so it ends on a user turn and needs no reply of its own."""
    if not isinstance(messages, list) or not messages:
        return "", f"expected a non-empty list of {{role, content}}, got {type(messages).__name__}"
    for turn, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"[{turn}]", f"expected an object with role and content, got {type(message).__name__}"
        if message.get("role") not in ROLES:
            return f"[{turn}].role", f"expected system, user or assistant, got {message.get('role')!r}"
        if "content" not in message:
            return f"[{turn}].content", "missing; every turn needs its text"
        problem = _text_problem(message["content"], required=message["role"] == "assistant") or \
            ("null, expected text" if message["content"] is None else None)
        if problem:
            return f"[{turn}].content", problem
    if messages[0]["role"] == "assistant":
        return "[0].role", "the first turn is the assistant's: a reply needs a system or user turn before it"
    if prompt_only and messages[-1]["role"] != "user":
        return f"[{len(messages) - 1}].role", "the conversation must end on a user turn (chosen and rejected are the replies to it)"
    if not prompt_only and not any(m["role"] == "assistant" for m in messages):
        return "", "no assistant turn to train on"
    return None


def field_plan(data: DataSection) -> list[tuple[str, str, bool]]:
    """(canonical field, the user's column, required) for every field of the recipe's format, worked out once per file."""
    spec = FORMATS[data.format]
    return [(canonical, data.field(canonical), canonical in spec.required) for canonical in spec.fields]


def row_problem(row: dict, data: DataSection, plan: list[tuple[str, str, bool]]) -> tuple[str, str] | None:
    """(column, what is wrong) for the first bad field of one row under the recipe's format, or None."""
    spec = FORMATS[data.format]
    for canonical, column, required in plan:
        if column not in row:
            if not required:
                continue
            mapped = "" if column == canonical else f" (data.fields.{canonical})"
            return column, (f"missing{mapped}; format {data.format} needs field '{canonical}'; this row has: "
                            f"{', '.join(map(str, row)) or 'no fields'}; map yours with data.fields.{canonical}")
        value = row[column]
        if canonical == "messages":
            found = _messages_problem(value, prompt_only=spec.objective == "dpo")
            if found:
                return column + found[0], found[1]
            continue
        what = _label_problem(value) if canonical == "label" else _text_problem(value, required)
        if what:
            return column, what
    if spec.objective == "dpo" and row[data.field("chosen")].strip() == row[data.field("rejected")].strip():
        return data.field("rejected"), "the same text as chosen; a pair must differ to say which reply is preferred"
    return None


def table_row(row: dict, plan: list[tuple[str, str, bool]]) -> dict:
    """A checked row as train's table holds it: only the fields its format reads (an absent optional one as
    null), a label as its text (train names classes by it), each chat turn as its role and content."""
    kept = {}
    for canonical, column, _ in plan:
        value = row.get(column)
        if canonical == "messages":
            value = [{"role": turn["role"], "content": turn["content"]} for turn in value]
        elif canonical == "label":
            value = str(value)
        kept[column] = value
    return kept


# ---------------------------------------------------------------- files and sources

def check_file(path: str | Path, data: DataSection) -> int:
    """Read every row of a data file; stop at the first malformed one. Returns the row count."""
    return sum(1 for _ in file_rows(path, data))


def file_rows(path: str | Path, data: DataSection, split: str = "train") -> Iterator[tuple[int, dict]]:
    """(row number, table row) for every row of a local file or datasets folder, each checked first."""
    try:
        yield from checked_rows(path, every_row(path, split), data)
    except OSError as exc:  # no read permission, a folder that is not a saved dataset, a vanished mount
        raise UserError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def check_rows_of(where: Any, rows: Iterable[tuple[int, Any]], data: DataSection) -> int:
    """Check numbered rows (of a file, or of any table) and stop at the first malformed one with
    `where:row: field: what is wrong`. Returns the row count."""
    return sum(1 for _ in checked_rows(where, rows, data))


def checked_rows(where: Any, rows: Iterable[tuple[int, Any]], data: DataSection) -> Iterator[tuple[int, dict]]:
    """(row number, table row) for each of `rows`, stopping at the first malformed one, named. Labels must all
    be text or all integers: 1 among "good" and "bad" would otherwise become a third class."""
    plan, count, first_label = field_plan(data), 0, None
    label = data.field("label") if "label" in FORMATS[data.format].fields else None
    for number, row in rows:
        if not isinstance(row, dict):
            raise UserError(f"{where}:{number}: expected a JSON object, got {type(row).__name__}")
        problem = row_problem(row, data, plan)
        if problem:
            raise UserError(f"{where}:{number}: {problem[0]}: {problem[1]}")
        if label is not None:
            first_label = first_label or (type(row[label]), number)
            if type(row[label]) is not first_label[0]:
                raise UserError(f"{where}:{number}: {label}: {LABEL_KINDS[type(row[label])]} ({row[label]!r}), but the "
                                f"label of row {first_label[1]} is {LABEL_KINDS[first_label[0]]}; give every label "
                                "as text, or every one as an integer")
        count += 1
        yield number, table_row(row, plan)
    if not count:
        raise UserError(f"{where}: no rows")


# ---------------------------------------------------------------- rows the tokenizer cut or dropped

@dataclass
class RowTally:
    """Rows of one source that max_length truncated, or left with nothing to train (dropped), by reason."""

    rows: int
    dropped: dict[str, int] = field(default_factory=dict)
    dropped_rows: dict[str, list[int]] = field(default_factory=dict)  # reason -> first row numbers
    truncated: int = 0
    truncated_rows: list[int] = field(default_factory=list)

    @classmethod
    def count(cls, drops: list[str], cuts: list[bool]) -> "RowTally":
        """From the tokenising pass's per-row drop reason ('' when kept) and truncation flag, in file order."""
        tally = cls(len(drops))
        for number, (reason, cut) in enumerate(zip(drops, cuts), start=1):
            if reason:
                tally.dropped[reason] = tally.dropped.get(reason, 0) + 1
                first = tally.dropped_rows.setdefault(reason, [])
                if len(first) < FIRST_ROWS:
                    first.append(number)
            elif cut:
                tally.truncated += 1
                if len(tally.truncated_rows) < FIRST_ROWS:
                    tally.truncated_rows.append(number)
        return tally

    @classmethod
    def combine(cls, tallies: list["RowTally"]) -> "RowTally":
        """Counts of several sources together; row numbers are per source, so each source's own line names them."""
        combined = cls(sum(t.rows for t in tallies), truncated=sum(t.truncated for t in tallies))
        for tally in tallies:
            for reason, count in tally.dropped.items():
                combined.dropped[reason] = combined.dropped.get(reason, 0) + count
        return combined

    def share(self, count: int) -> float:
        return count / max(1, self.rows)

    def line(self) -> str:
        """e.g. `9 dropped (56.2%; no target token within max_length: rows 3, 5, ...), 2 truncated (12.5%; rows 1, 4)`."""
        def rows(numbers: list[int], count: int) -> str:
            if not numbers:
                return "rows named per source"
            return f"row{'s' * (count > 1)} {', '.join(map(str, numbers))}{', ...' if count > len(numbers) else ''}"
        total = sum(self.dropped.values())
        reasons = "; ".join(f"{reason}: {rows(self.dropped_rows.get(reason, []), n)}" for reason, n in self.dropped.items())
        dropped = f"{total} dropped ({self.share(total):.1%}{'; ' + reasons if reasons else ''})"
        cut = f"; {rows(self.truncated_rows, self.truncated)}" if self.truncated else ""
        return f"{dropped}, {self.truncated} truncated ({self.share(self.truncated):.1%}{cut})"


def judge(tally: RowTally, source: str, data: DataSection) -> str | None:
    """A warning when dropped or truncated rows exceed data.skipped_share_warn; refused with data.skipped_share_refuse."""
    shares = {"dropped": tally.share(sum(tally.dropped.values())), "truncated": tally.share(tally.truncated)}
    over = {what: share for what, share in shares.items() if share > data.skipped_share_warn}
    if not over:
        return None
    what = " and ".join(f"{share:.1%} of its rows {name}" for name, share in over.items())
    message = (f"{source}: {what} at data.max_length {data.max_length} (threshold data.skipped_share_warn "
               f"{data.skipped_share_warn:.0%}): {tally.line()}; raise data.max_length or shorten those rows")
    if data.skipped_share_refuse:
        raise UserError(message + " (refused: data.skipped_share_refuse is true)")
    return message
