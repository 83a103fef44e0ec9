"""`launcher validate`: every check that needs no torch; with --deep also the rows max_length truncates or
leaves with nothing to train.

The torch-free pass (data/rows.py) cannot see tokens; --deep loads the tokenizer (not the model) and
runs the same tokenising pass as training, so the counts and the refusal under
data.skipped_share_refuse are exactly those the run would meet.
"""
from __future__ import annotations

import argparse

from rich.console import Console
from rich.text import Text

from launcher.data.encode import load_datasets
from launcher.distributed.launch import launched, launched_world_size
from launcher.model import loading as modeling
from launcher.preflight.checks import Target, checked_recipe, detect_device
from launcher.recipe.schema import Recipe


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--deep", action="store_true", help="also tokenise every row: count rows truncated or left "
                        "with nothing to train by max_length (loads the tokenizer, not the model)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="check support for this device instead of this "
                        "machine's (e.g. --device cuda on a CPU login node for a GPU job)")


def run(args: argparse.Namespace) -> int:
    # in a plain shell the run is not launched yet: its processes are the ones the recipe asks for
    recipe = checked_recipe(args, Target(args.device or detect_device(), launched_world_size(), ahead=not launched()))
    if args.deep:
        deep_check(recipe)
    print(f"{args.recipe}: ok ({recipe.method} on {recipe.model.path}, data format {recipe.data.format}, output {recipe.output_dir})")
    return 0


def deep_check(recipe: Recipe, console: Console | None = None) -> None:
    """Print each source's tally of dropped and truncated rows, and the warnings the run would give."""
    console = console or Console(highlight=False, soft_wrap=True)
    tokenizer = modeling.load_tokenizer(modeling.resolve_weights(recipe), recipe)
    found = load_datasets(recipe, tokenizer, pack=False)
    for name, source in (("train", found.train), ("eval", found.eval if recipe.data.eval else None)):
        if source is not None:
            console.print(f"{name}: {source.rows} rows, {source.tally.line()}")
    for warning in found.warnings:
        console.print(Text(f"warning: {warning}", style="bold yellow"))
