"""Reading a recipe file: YAML, `base:` chains, paths relative to the file that names them,
`key=value` overrides, and every failure as one line naming the file and key.

The schema and its cross-field rules are launcher/recipe.py; this module turns files into it.
"""
from __future__ import annotations

import copy
import os
import re
import reprlib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from launcher.recipe.rules import lookup, without
from launcher.recipe.schema import Recipe, ignored_keys, unknown_key

from launcher.errors import UserError

# How a refused value is shown: whole when short, cut when long (a 50 kB string, a list of thousands)
SHOWN = reprlib.Repr()
SHOWN.maxstring = SHOWN.maxother = 120
SHOWN.maxlist = SHOWN.maxdict = 8
# Values a recipe may expand to: aliases repeated inside aliases can make a few lines of YAML into billions.
MAX_VALUES = 100_000

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


BRANCH_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}  # pydantic's names for the branches of a union


def _shown_location(loc: tuple) -> tuple[str, ...]:
    """An error's location as the user wrote it: list indices as [i], pydantic's union branch tags
    (`str`, `list[SourceEntry]`) dropped, so a bad weight reads `data.train[0].weight`."""
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            parts[-1:] = [f"{parts[-1]}[{part}]"] if parts else [f"[{part}]"]
        elif not (re.search(r"[\[\]-]", str(part)) or str(part)[:1].isupper() or part in BRANCH_TAGS):
            parts.append(str(part))
    return tuple(parts)


def _describe(error: dict) -> str:
    loc = _shown_location(error["loc"])
    key = ".".join(loc)
    if error["type"] == "extra_forbidden":
        return unknown_key(".".join(loc[:-1]), loc[-1], _section_fields(tuple(p.split("[")[0] for p in loc[:-1])))
    if error["type"] == "missing":
        return f"missing key '{key}'"
    message = error["msg"].removeprefix("Value error, ")
    if not loc or (error["type"] == "value_error" and isinstance(error.get("input"), dict)):  # a rule between keys
        return message
    return f"key '{key}': {message} (got {SHOWN.repr(error.get('input'))}){_yaml_hint(error)}"


def _yaml_hint(error: dict) -> str:
    """What YAML made of text the user wrote, where that is the likely mistake: `no` and `on` read as booleans,
    `0777` or `1e3` as numbers, a section left with no keys as null."""
    found = error.get("input")
    if error["type"] == "string_type" and isinstance(found, (bool, int, float)):
        return "; YAML reads unquoted yes/no/on/off as booleans and digits as numbers: put the value in quotes"
    if error["type"] == "model_type" and found is None:
        return "; an empty section: give it keys, or remove it for the defaults"
    return ""


def _first_error(errors: list[dict]) -> dict:
    """The error to show: an unknown key first (a misspelled required key is also reported missing, and the typo
    is the news); then the deepest, so a union's matching branch (a bad source entry) wins over `not a string`."""
    return sorted(errors, key=lambda error: (error["type"] != "extra_forbidden", -len(error["loc"])))[0]


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading 1e-4 as a number (YAML 1.2 does; PyYAML's 1.1 rules make it a string)."""


_RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                    list("-+0123456789"))


def _decoded(path: Path) -> str:
    """The recipe's text; a byte that is not UTF-8 is named by its offset and line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise UserError(f"{path}: byte 0x{raw[exc.start]:02x} at offset {exc.start} (line {line}) is not UTF-8; "
                        "save the recipe as UTF-8") from None


def _refuse_duplicate_keys(node, path: Path, where: str = "", inside: tuple = (), checked: set | None = None) -> None:
    """A key written twice in one mapping, at any depth: YAML would keep the last one silently. A node an alias
    repeats is checked once (`checked`: a chain of aliases would otherwise cost exponential time); an alias to a
    node it is inside (`inside`) would make the recipe contain itself, and is refused."""
    checked = set() if checked is None else checked
    if any(node is outer for outer in inside):
        raise UserError(f"{path} line {node.start_mark.line + 1}: key '{where}': an alias (*name) refers to a node "
                        "it is inside, so the recipe would contain itself; write the value out")
    if id(node) in checked:
        return
    checked.add(id(node))
    inside = (*inside, node)
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _refuse_duplicate_keys(item, path, f"{where}[{index}]", inside, checked)
    if not isinstance(node, yaml.MappingNode):
        return
    seen: dict[str, int] = {}
    for key_node, value_node in node.value:
        key = str(key_node.value)
        dotted = f"{where}.{key}" if where else key
        line = key_node.start_mark.line + 1
        if key in seen and key != "<<":
            raise UserError(f"{path}: key '{dotted}' appears twice (lines {seen[key]} and {line}); "
                            "YAML would keep only the last: keep one")
        seen[key] = line
        _refuse_duplicate_keys(value_node, path, dotted, inside, checked)


def _refuse_expansion(node, path: Path) -> None:
    """Refused when the document expands to more than MAX_VALUES values (counted once per node, aliases by
    what they repeat)."""
    sizes: dict[int, int] = {}

    def size(node) -> int:
        if id(node) not in sizes:
            items = node.value if isinstance(node, yaml.SequenceNode) else \
                [item for pair in node.value for item in pair] if isinstance(node, yaml.MappingNode) else []
            sizes[id(node)] = min(1 + sum(size(item) for item in items), MAX_VALUES + 1)
        return sizes[id(node)]
    if size(node) > MAX_VALUES:
        raise UserError(f"{path}: expands to more than {MAX_VALUES} values (aliases repeated inside aliases); "
                        "a recipe is a few dozen keys: write the values out")


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"recipe file {'is a folder, not a file' if path.is_dir() else 'not found'}: {path}")
    loader = _RecipeLoader(_decoded(path))
    try:
        node = loader.get_single_node()
        if node is not None:
            _refuse_duplicate_keys(node, path)
            _refuse_expansion(node, path)
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    finally:
        loader.dispose()
    if data is None:
        raise UserError(f"{path}: holds no keys (empty, or only comments); a recipe needs at least model, data and "
                        "output_dir (`launcher recipes copy NAME DEST` gives a complete one to edit)")
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
    own, inherited = _own_and_inherited(path, seen)
    return _deep_merge(inherited, own)


def _own_and_inherited(path: Path, seen: tuple[Path, ...] = ()) -> tuple[dict, dict]:
    """A recipe file's own keys, and what its `base:` chain gives it ({} without one)."""
    path = path.resolve()
    if path in seen:
        raise UserError(f"{path}: 'base' forms a cycle: {' -> '.join(p.name for p in seen + (path,))}")
    data = _read_yaml(path)
    base = data.pop("base", None)
    _absolutise_paths(data, path.parent)
    if base is None:
        return data, {}
    if not isinstance(base, str):
        raise UserError(f"{path}: key 'base' must be a path to another recipe")
    return data, _resolve_bases(path.parent / base, seen + (path,))


def _absolutise_paths(data: dict, folder: Path) -> None:
    """Data paths are relative to the recipe that names them; so is a model path starting with ./ or ../."""
    for section, key in (("data", "train"), ("data", "eval"), ("data", "preprocessed_dir"), ("model", "path"), ("distributed", "deepspeed")):
        node = data.get(section)
        value = node.get(key) if isinstance(node, dict) else None
        if section == "data" and isinstance(value, (list, dict)):  # source entries: each path is relative to this recipe
            for entry in value if isinstance(value, list) else [value]:
                if isinstance(entry, dict) and _relative(entry.get("path")) and not entry["path"].startswith("pkg:"):
                    entry["path"] = os.path.normpath(folder / entry["path"])
            continue
        if not _relative(value) or value.startswith("pkg:"):
            continue
        if section == "data" or value.startswith(("./", "../")) or value.endswith(".json"):
            node[key] = os.path.normpath(folder / value)


def _relative(value: Any) -> bool:
    """A path written relative to its recipe (blank ones are left for the schema to refuse)."""
    return isinstance(value, str) and bool(value.strip()) and not os.path.isabs(value) and not value.startswith(("hf:", "~"))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (['train', 'lr'], 1e-4); values are YAML scalars or lists."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(f"override '{text}' is not of the form key.path=value")
    if key == "base":
        raise UserError(f"override '{text}': base is read from the recipe file (it names the recipe that file "
                        "extends), not from the command line; write `base: ...` in the recipe")
    try:
        value = yaml.load(raw, Loader=_RecipeLoader) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`key=value` overrides applied in place; a key given twice is refused, as one written twice in a recipe is."""
    keys = [text.partition("=")[0] for text in overrides]
    twice = next((key for key in keys if keys.count(key) > 1), None)
    if twice is not None:
        given = [text for text in overrides if text.partition("=")[0] == twice]
        raise UserError(f"override key '{twice}' is given twice ({' and '.join(given)}); only the last would count: give it once")
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for part in keys[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override '{text}': '{part}' is not a section")
        node[keys[-1]] = value
    return data


def _merged(path: Path, overrides: list[str], dumped: bool = False) -> dict:
    """The recipe file over its bases, with the overrides applied. A key its settings make the run ignore
    (rules.SCOPES) is left out when a base gave it, when an override changed what it depends on (a command
    line cannot delete a key), or when the launcher wrote the file (`dumped`: a run's recipe.yaml, perhaps from
    a version that kept such keys); written in the file for the file's own settings, or by an override, it stays
    for validation to refuse."""
    own, inherited = _own_and_inherited(path)
    in_file = _deep_merge(inherited, own)
    merged = apply_overrides(copy.deepcopy(in_file), overrides)
    ignored, by_file = ignored_keys(merged) or [], [] if dumped else ignored_keys(in_file)
    by_file = ignored if by_file is None else by_file
    set_here = apply_overrides({}, overrides)
    return without(merged, [key for key in ignored if lookup(set_here, key) is None and
                            (key not in by_file or lookup(own, key) is None)])


def load_recipe(path: str | os.PathLike, overrides: list[str] = (), dumped: bool = False) -> Recipe:
    """Read, merge bases, apply overrides and validate; every failure is a UserError. `dumped`: the file is a
    run's resolved recipe, written by the launcher (see `_merged`)."""
    data = _merged(Path(path), list(overrides), dumped)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        first = _first_error(exc.errors())
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
    return load_recipe(resolved, [*overrides, f"output_dir={run_dir}"], dumped=True)


def check_paths(recipe: Recipe, path: Path) -> None:
    for key in ("train", "eval"):
        for entry in recipe.data.entries(key):
            if not entry.path.startswith("hf:") and not Path(entry.path).exists():
                raise UserError(f"{path}: key 'data.{key}': file not found: {entry.path}")
    model_path = recipe.model.path
    looks_local = model_path.startswith(("/", ".", "~")) or os.path.isabs(model_path)
    if looks_local and not Path(model_path).exists():
        raise UserError(f"{path}: key 'model.path': folder not found: {model_path}")


def resolved_yaml(recipe: Recipe) -> str:
    """The fully resolved recipe, as written into the run directory."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
