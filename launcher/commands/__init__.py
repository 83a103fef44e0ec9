"""One module per verb of the command line; `launcher/cli.py` parses and imports only the chosen verb's module.

Each module has `add_options(parser)` (the verb's own options) and `run(args) -> int` (its handler); the
verb's help line, and whether it takes `recipe [key=value ...]`, are in cli.VERBS so `--help` imports none.

train       preflight, then the training loop
validate    every check that needs no torch (--deep: tokenise every row)
inspect     tokenised examples with trained tokens highlighted, and data counts
preprocess  tokenise (and pack) once, for train to reuse
eval        base model and trained folders scored side by side
generate    answers from a run's model in its recipe's prompt format
merge       a LoRA adapter folded into its base, saved and verified
plan        predicted per-GPU peak memory and the cheapest changes that fit
recipes     the shipped recipes, listed or copied
reference   the recipe reference
slurm       an sbatch script, rendered or submitted
"""
import argparse


def add_recipe_args(parser: argparse.ArgumentParser) -> None:
    """The `recipe [key.path=value ...]` arguments of every verb that reads a recipe."""
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="override recipe keys, e.g. train.lr=1e-4")


def whole(minimum: int):
    """An option's type: a whole number no less than `minimum`, so `--gpus 0` is refused by the parser (usage
    line, exit 2) instead of read as the default, and `--max-new-tokens -5` before anything loads."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def positive(text: str) -> float:
    """An option's type: a finite number above 0 (GiB of memory)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value
