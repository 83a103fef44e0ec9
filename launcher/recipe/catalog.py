"""`launcher recipes`: the recipes shipped inside the package, listed and copied out.

The repository's recipes/ reaches the package through the symlink launcher/recipes (as ds_configs/
does), so a wheel carries the recipes and the sample data they train on. A copy brings the data
files the recipe names (and any `base:` recipe) along, at the same relative paths, so the copy
validates from wherever it lands. No torch: listing is instant.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from launcher.errors import UserError
from launcher.shipped import RECIPES

SHIPPED = RECIPES


def shipped() -> dict[str, Path]:
    return {path.stem: path for path in sorted(SHIPPED.glob("*.yaml"), key=lambda path: path.stem)}


def summary(path: Path) -> str:
    """The first comment line of a recipe: what it trains, on what."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").rstrip()
    return ""


def listing() -> str:
    recipes = shipped()
    width = max(map(len, recipes), default=0)
    lines = [f"{name.ljust(width)}  {summary(path)}" for name, path in recipes.items()]
    return "\n".join(lines + ["", "copy one to edit it: launcher recipes copy NAME DEST"])


def _chain(path: Path) -> list[Path]:
    """The recipe and every recipe it inherits from through `base:`."""
    found = [path]
    base = (yaml.safe_load(path.read_text()) or {}).get("base")
    return found + (_chain(path.parent / base) if isinstance(base, str) else [])


def _data_files(path: Path) -> list[str]:
    """Relative data paths a recipe file names (data.train, data.eval)."""
    data = (yaml.safe_load(path.read_text()) or {}).get("data") or {}
    found = []
    for key in ("train", "eval"):
        value = data.get(key)
        for entry in value if isinstance(value, list) else [value]:
            entry = entry.get("path") if isinstance(entry, dict) else entry
            if isinstance(entry, str) and not entry.startswith(("hf:", "~")) and not Path(entry).is_absolute():
                found.append(entry)
    return found


def copy(name: str, dest: str | Path) -> Path:
    """Copy recipe `name` to `dest` (a folder, or a .yaml path) with its base recipes and data; returns the new recipe."""
    recipes = shipped()
    if name not in recipes:
        raise UserError(f"recipes copy: no shipped recipe '{name}'; choose one of {', '.join(recipes)}")
    dest = Path(dest)
    target = dest if dest.suffix in (".yaml", ".yml") else dest / f"{name}.yaml"
    if target.exists():
        raise UserError(f"recipes copy: {target} exists; choose another DEST")
    target.parent.mkdir(parents=True, exist_ok=True)
    for index, path in enumerate(_chain(recipes[name])):
        shutil.copyfile(path, target if index == 0 else target.parent / path.name)
        for relative in _data_files(path):
            source, copied = path.parent / relative, target.parent / relative
            if not copied.exists():
                copied.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, copied)
    return target
