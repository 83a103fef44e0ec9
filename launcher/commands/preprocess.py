"""`launcher preprocess RECIPE`: tokenise (and pack) once, for train to reuse.

Data checks only, not the whole preflight: a CPU job may preprocess for a GPU or multi-process recipe.
"""
from __future__ import annotations

import argparse

from launcher.data.cache import folder, preprocess
from launcher.data.sources import check_sources
from launcher.preflight import locations
from launcher.recipe.files import load_recipe


def add_options(parser: argparse.ArgumentParser) -> None:
    """No options beyond the recipe and its overrides."""


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    where = "data.preprocessed_dir" if recipe.data.preprocessed_dir else "the preprocessed folder (output_dir/preprocessed)"
    locations.check_folder(folder(recipe), where, "choose a folder you can write to")
    locations.check_datasets_cache()
    check_sources(recipe)
    print(f"preprocessed data written to {preprocess(recipe)}")
    return 0
