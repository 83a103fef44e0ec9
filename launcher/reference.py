"""The recipe reference table, generated from the schema's field descriptions.

README embeds it between markers; `launcher reference --readme README.md` rewrites that block and a
test checks the README is current, so documentation cannot drift from the schema.
"""
from __future__ import annotations

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

    walk(Recipe, "")
    return "\n".join(lines)


REFERENCE_START, REFERENCE_END = "<!-- recipe-reference:start -->", "<!-- recipe-reference:end -->"


def readme_with_reference(readme: str) -> str:
    """README text with its generated recipe reference block replaced by the current schema's."""
    head, _, rest = readme.partition(REFERENCE_START)
    _, _, tail = rest.partition(REFERENCE_END)
    return f"{head}{REFERENCE_START}\n{reference_markdown()}\n{REFERENCE_END}{tail}"
