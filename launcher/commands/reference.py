"""`launcher reference [--readme PATH]`: the recipe reference, printed or written into a README."""
from __future__ import annotations

import argparse
from pathlib import Path

from launcher.recipe.reference import readme_with_reference, reference_markdown


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--readme", metavar="PATH", help="rewrite the reference block inside this README instead")


def run(args: argparse.Namespace) -> int:
    if args.readme:
        Path(args.readme).write_text(readme_with_reference(Path(args.readme).read_text()))
    else:
        print(reference_markdown())
    return 0
