"""`launcher train RECIPE` (or `launcher RECIPE.yaml`): preflight, then the training loop."""
from __future__ import annotations

import argparse

from launcher.model.loading import check_against_config
from launcher.preflight.checks import checked_recipe
from launcher.rundir.directory import release_live_locks
from launcher.training import loop


def add_options(parser: argparse.ArgumentParser) -> None:
    start = parser.add_mutually_exclusive_group()  # a fresh start has no checkpoint whose data could have changed
    start.add_argument("--overwrite", action="store_true", help="discard a previous run in output_dir and start fresh")
    start.add_argument("--allow-data-change", action="store_true",
                        help="resume even though a data file changed since the checkpoint (refused otherwise)")


def run(args: argparse.Namespace) -> int:
    recipe = checked_recipe(args)
    check_against_config(recipe)  # the model's module tree from its config: names that match nothing, before any weight
    try:
        return loop.run(recipe, overwrite=args.overwrite, allow_data_change=args.allow_data_change)
    finally:  # however the run ended: its output_dir is free again, also when this process goes on (tests, notebooks)
        release_live_locks()
