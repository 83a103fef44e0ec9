"""The verbs: train (the default for a .yaml), validate, inspect, reference.

User mistakes surface as one `error:` line and exit status 2; anything else keeps its traceback,
since it is ours to fix.
"""
from __future__ import annotations

import argparse
import os
import sys

from launcher.recipe import UserError, load_recipe

VERBS = ("train", "validate", "inspect", "reference")


def _recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="override recipe keys, e.g. train.lr=1e-4")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launcher", description="Fine-tune language models from one YAML recipe.")
    verbs = parser.add_subparsers(dest="verb", required=True)
    train = verbs.add_parser("train", help="train (the default when the first argument is a .yaml file)")
    _recipe_args(train)
    train.add_argument("--overwrite", action="store_true", help="discard a previous run in output_dir and start fresh")
    validate = verbs.add_parser("validate", help="check the recipe and peek at the data; loads no model")
    _recipe_args(validate)
    inspect = verbs.add_parser("inspect", help="show tokenised examples with trained tokens highlighted, and data counts")
    _recipe_args(inspect)
    inspect.add_argument("-n", "--examples", type=int, default=3, help="examples to show")
    reference = verbs.add_parser("reference", help="print the recipe reference (every key, default and meaning)")
    reference.add_argument("--readme", metavar="PATH", help="rewrite the reference block inside this README instead")
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    if argv and argv[0] not in VERBS and argv[0].endswith((".yaml", ".yml")):
        argv = ["train", *argv]
    return build_parser().parse_args(argv)


def cmd_validate(args) -> int:
    from launcher.train import check_inputs
    recipe = load_recipe(args.recipe, args.overrides)
    check_inputs(recipe)
    print(f"{args.recipe}: ok ({recipe.method} on {recipe.model.path}, data format {recipe.data.format}, output {recipe.output_dir})")
    return 0


def cmd_train(args) -> int:
    from launcher.train import check_inputs, run
    recipe = load_recipe(args.recipe, args.overrides)
    check_inputs(recipe)
    return run(recipe, overwrite=args.overwrite)


def cmd_inspect(args) -> int:
    from launcher.inspect import show
    recipe = load_recipe(args.recipe, args.overrides)
    from launcher.train import check_inputs
    check_inputs(recipe)
    show(recipe, args.examples)
    return 0


def cmd_reference(args) -> int:
    from pathlib import Path

    from launcher.recipe import readme_with_reference, reference_markdown
    if args.readme:
        Path(args.readme).write_text(readme_with_reference(Path(args.readme).read_text()))
    else:
        print(reference_markdown())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    handler = {"train": cmd_train, "validate": cmd_validate, "inspect": cmd_inspect, "reference": cmd_reference}[args.verb]
    try:
        return handler(args)
    except UserError as exc:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        prefix = f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""
        print(f"{prefix}error: {exc}", file=sys.stderr)
        return 2
