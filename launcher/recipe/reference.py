"""The recipe reference table, generated from the schema: every key (nested sections included), its
allowed values, default and meaning.

docs/reference.md holds it between markers; `launcher reference --readme docs/reference.md` rewrites that
block, and tests check the page is current and lists every schema field, so the docs cannot drift from the schema.
"""
from __future__ import annotations

import types
import typing
from typing import Any, Iterator

from pydantic import BaseModel

from launcher.recipe import rules
from launcher.recipe.schema import Recipe


def _section(annotation: Any) -> type[BaseModel] | None:
    """The section class of a field that holds one (also when it is optional: `FsdpSection | None`)."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def allowed(annotation: Any) -> str:
    """Allowed values of a field, read from its type: the choices of a Literal, or the type's name."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:  # a checked str (a path, a regex) is still a str
        return allowed(args[0])
    if origin is typing.Literal:
        return " / ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " / ".join(allowed(a) for a in args)
    if origin is list:
        return f"list of {allowed(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def fields(cls: type[BaseModel] = Recipe, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, pydantic field) for every leaf key of the schema, nested sections walked."""
    for name, field in cls.model_fields.items():
        section, entries = _section(field.annotation), _entries(field.annotation)
        if section is not None and not entries:
            yield from fields(section, f"{prefix}{name}.")
            continue
        yield f"{prefix}{name}", field
        for entry, joint in entries:  # data.train: a path, or a list of source entries with keys of their own
            yield from fields(entry, f"{prefix}{name}{joint}")


def _entries(annotation: Any) -> list[tuple[type[BaseModel], str]]:
    """Models a field holds besides plain values: (model, "[].") for a list of them, (model, ".") for one
    that may also be a plain value (`str | SourceEntry`); none for a plain section."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    plain = [o for o in options if o is not type(None) and not (isinstance(o, type) and issubclass(o, BaseModel))]
    found = []
    for option in options:
        if typing.get_origin(option) is list:
            found += [(item, "[].") for item in typing.get_args(option) if isinstance(item, type) and issubclass(item, BaseModel)]
        elif isinstance(option, type) and issubclass(option, BaseModel) and plain:
            found.append((option, "."))
    return found


def reference_markdown() -> str:
    """The reference as a markdown table: key, allowed values, default, meaning."""
    lines = ["| key | allowed | default | meaning |", "|---|---|---|---|"]
    for key, field in fields():
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        scoped = rules.used_only(key.replace("[]", ""))
        meaning = ((field.description or "") + (f" Used only {scoped} (refused otherwise)." if scoped else "")).replace("|", "\\|")
        lines.append(f"| `{key}` | {allowed(field.annotation).replace('|', '/')} | `{default.replace('|', '/')}` | {meaning} |")
    return "\n".join(lines)


REFERENCE_START, REFERENCE_END = "<!-- recipe-reference:start -->", "<!-- recipe-reference:end -->"


def readme_with_reference(readme: str) -> str:
    """A markdown page (docs/reference.md) with its generated reference block replaced by the current schema's."""
    head, _, rest = readme.partition(REFERENCE_START)
    _, _, tail = rest.partition(REFERENCE_END)
    return f"{head}{REFERENCE_START}\n{reference_markdown()}\n{REFERENCE_END}{tail}"
