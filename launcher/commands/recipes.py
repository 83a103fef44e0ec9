"""`launcher recipes [copy NAME DEST]`: the shipped recipes, listed or copied out with their data."""
from __future__ import annotations

import argparse
from pathlib import Path

from launcher.preflight.locations import check_folder
from launcher.recipe import catalog


def add_options(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action")
    copy = actions.add_parser("copy", help="copy a shipped recipe (and the data it names) to DEST")
    copy.add_argument("name", help="recipe name as listed, e.g. quickstart")
    copy.add_argument("dest", help="a folder, or a .yaml path")


def run(args: argparse.Namespace) -> int:
    if args.action == "copy":
        dest = Path(args.dest)
        check_folder(dest.parent if dest.suffix in (".yaml", ".yml") else dest, "recipes copy: DEST", "choose another DEST")
        print(f"copied {args.name} to {catalog.copy(args.name, args.dest)}")
    else:
        print(catalog.listing())
    return 0
