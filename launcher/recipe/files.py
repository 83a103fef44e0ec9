"""Reading a recipe file: YAML, `base:` chains, paths relative to the file that names them,
`key=value` overrides, and every failure as one line naming the file and key.

The schema and its cross-field rules are launcher/recipe.py; this module turns files into it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from launcher.recipe.schema import Recipe, unknown_key

from launcher.errors import UserError

# The resolved recipe a run writes into its output_dir (launcher/rundir/paths.py places it; `load_run` reads it).
RESOLVED_RECIPE = "recipe.yaml"


def _section_fields(location: tuple) -> list[str]:
    """Field names allowed at a nested location of the recipe, for suggestions."""
    if not location:
        return [*Recipe.model_fields, "base"]
    cls: Any = Recipe
    for part in location:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        cls = field.annotation
    return list(getattr(cls, "model_fields", {}))


def _describe(error: dict) -> str:
    loc = tuple(str(p) for p in error["loc"])
    key = ".".join(loc)
    if error["type"] == "extra_forbidden":
        return unknown_key(".".join(loc[:-1]), loc[-1], _section_fields(loc[:-1]))
    if error["type"] == "missing":
        return f"missing key '{key}'"
    if not loc:  # a cross-field rule
        return error["msg"].removeprefix("Value error, ")
    return f"key '{key}': {error['msg']} (got {error.get('input')!r})"


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe is a mapping of keys, got {type(data).__name__}")
    return data


def _deep_merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        merged[key] = _deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def _resolve_bases(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Follow `base:` links (relative to the recipe that names them); later files win."""
    path = path.resolve()
    if path in seen:
        raise UserError(f"{path}: 'base' forms a cycle: {' -> '.join(p.name for p in seen + (path,))}")
    data = _read_yaml(path)
    base = data.pop("base", None)
    _absolutise_paths(data, path.parent)
    if base is None:
        return data
    if not isinstance(base, str):
        raise UserError(f"{path}: key 'base' must be a path to another recipe")
    return _deep_merge(_resolve_bases(path.parent / base, seen + (path,)), data)


def _absolutise_paths(data: dict, folder: Path) -> None:
    """Data paths are relative to the recipe that names them; so is a model path starting with ./ or ../."""
    for section, key in (("data", "train"), ("data", "eval"), ("data", "preprocessed_dir"), ("model", "path"), ("distributed", "deepspeed")):
        node = data.get(section)
        value = node.get(key) if isinstance(node, dict) else None
        if section == "data" and isinstance(value, (list, dict)):  # source entries: each path is relative to this recipe
            for entry in value if isinstance(value, list) else [value]:
                if isinstance(entry, dict) and isinstance(entry.get("path"), str) and not entry["path"].startswith(("hf:", "~")):
                    entry["path"] = os.path.normpath(folder / entry["path"])
            continue
        if not isinstance(value, str) or os.path.isabs(value) or value.startswith(("pkg:", "hf:", "~")):
            continue
        if section == "data" or value.startswith(("./", "../")) or value.endswith(".json"):
            node[key] = os.path.normpath(folder / value)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (['train', 'lr'], 1e-4); values are YAML scalars or lists."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(f"override '{text}' is not of the form key.path=value")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for part in keys[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override '{text}': '{part}' is not a section")
        node[keys[-1]] = value
    return data


def load_recipe(path: str | os.PathLike, overrides: list[str] = ()) -> Recipe:
    """Read, merge bases, apply overrides and validate; every failure is a UserError."""
    data = apply_overrides(_resolve_bases(Path(path)), list(overrides))
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        # An unknown key first: a misspelled required key (`paht:`) is also reported missing, and the typo is the news.
        first = sorted(exc.errors(), key=lambda error: error["type"] != "extra_forbidden")[0]
        more = len(exc.errors()) - 1
        suffix = f" (and {more} more problem{'s' * (more > 1)})" if more else ""
        raise UserError(f"{path}: {_describe(first)}{suffix}") from None
    check_paths(recipe, Path(path))
    return recipe


def load_run(run_dir: str | os.PathLike, overrides: list[str] = ()) -> Recipe:
    """The resolved recipe a run wrote (RUN/recipe.yaml), its output_dir pointing at the run wherever it now is."""
    run_dir = Path(run_dir)
    resolved = run_dir / RESOLVED_RECIPE
    if not resolved.is_file():
        raise UserError(f"{run_dir} is not a launcher run (no {RESOLVED_RECIPE}); give a recipe file or the output_dir of a run")
    return load_recipe(resolved, [*overrides, f"output_dir={run_dir}"])


def check_paths(recipe: Recipe, path: Path) -> None:
    for key in ("train", "eval"):
        for entry in recipe.data.entries(key):
            if not entry.path.startswith("hf:") and not Path(entry.path).exists():
                raise UserError(f"{path}: key 'data.{key}': file not found: {entry.path}")
    model_path = recipe.model.path
    looks_local = model_path.startswith(("/", ".", "~")) or os.path.isabs(model_path)
    if looks_local and not Path(model_path).expanduser().exists():
        raise UserError(f"{path}: key 'model.path': folder not found: {model_path}")


def resolved_yaml(recipe: Recipe) -> str:
    """The fully resolved recipe, as written into the run directory."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
