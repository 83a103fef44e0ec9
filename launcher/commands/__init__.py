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
