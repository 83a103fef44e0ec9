"""The recipe reference table, generated from the schema's field descriptions.

README embeds it between markers; `launcher reference --readme README.md` rewrites that block and a
test checks the README is current, so documentation cannot drift from the schema.
"""
from __future__ import annotations

import typing

from pydantic import BaseModel

from launcher.recipe import Recipe


def reference_markdown() -> str:
    """The reference as a markdown table: key, default, meaning."""
    lines = ["| key | default | meaning |", "|---|---|---|"]

    def walk(cls: type[BaseModel], prefix: str) -> None:
        for name, field in cls.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name}.")
                continue
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            meaning = (field.description or "").replace("|", "\\|")
            lines.append(f"| `{prefix}{name}` | `{default.replace('|', '/')}` | {meaning} |")
            for entry in _list_items(annotation):  # e.g. data.train's source entries: data.train[].path
                walk(entry, f"{prefix}{name}[].")

    walk(Recipe, "")
    return "\n".join(lines)


def _list_items(annotation) -> list[type[BaseModel]]:
    """The models a field may hold a list of (`str | list[SourceEntry]` -> [SourceEntry])."""
    found = []
    for option in typing.get_args(annotation) or (annotation,):
        if typing.get_origin(option) is list:
            found += [item for item in typing.get_args(option) if isinstance(item, type) and issubclass(item, BaseModel)]
    return found


REFERENCE_START, REFERENCE_END = "<!-- recipe-reference:start -->", "<!-- recipe-reference:end -->"


def readme_with_reference(readme: str) -> str:
    """README text with its generated recipe reference block replaced by the current schema's."""
    head, _, rest = readme.partition(REFERENCE_START)
    _, _, tail = rest.partition(REFERENCE_END)
    return f"{head}{REFERENCE_START}\n{reference_markdown()}\n{REFERENCE_END}{tail}"
