"""The command line: parse, then hand the verb to its module in launcher/commands/.

Verbs: train (the default for a .yaml), validate, inspect, preprocess, eval, generate, merge, plan,
recipes, reference, slurm (render, submit). Only the chosen verb's module is imported, so the light
ones (validate, plan --help, recipes, reference) never import torch.

User mistakes surface as one `error:` line and exit status 2; anything else keeps its traceback,
since it is ours to fix.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from launcher import __version__
from launcher.commands import add_recipe_args
from launcher.checkpoint.diskspace import write_errno
from launcher.errors import UserError
from launcher.training.stop import INTERRUPTED
from launcher.report.console import quiet_libraries

# verb -> (module in launcher/commands/, help line, takes `recipe [key=value ...]`); a new verb is a module and a line.
VERBS: dict[str, tuple[str, str, bool]] = {
    "train": ("train", "train (the default when the first argument is a .yaml file)", True),
    "validate": ("validate", "check the recipe, the model's whereabouts, output_dir and every row of every data "
                 "file (which takes a while on large files: some 15 s per million short rows); loads no model and "
                 "imports no torch", True),
    "inspect": ("inspect", "show tokenised examples with trained tokens highlighted, and data counts", True),
    "preprocess": ("preprocess", "tokenise (and pack) once and save it beside a fingerprint, for train to reuse", True),
    "eval": ("eval", "score the base model and output_dir/final (or one --checkpoint); RECIPE may be a run directory",
             True),
    "generate": ("generate", "answer prompts with a run's final (or best) model and its recipe's template", False),
    "merge": ("merge", "fold a lora/qlora run's adapter into its base; save and verify RUN_DIR/merged", False),
    "recipes": ("recipes", "list the shipped recipes, or copy one: recipes copy NAME DEST", False),
    "reference": ("reference", "print the recipe reference (every key, allowed values, default and meaning)", False),
    "slurm": ("slurm", "Slurm batch jobs: print the sbatch script, or submit it (docs/slurm.md)", False),
    "plan": ("plan", "predict per-GPU peak memory (no weights, no GPU) and the cheapest changes that make it fit; "
                     "given a run directory, beside the peaks the run measured", True),
}


def command(verb: str):
    """The module of `verb`, imported only now."""
    return importlib.import_module(f"launcher.commands.{VERBS[verb][0]}")


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """Every verb is listed; only `verb`'s module is imported to add its options (all of them without a verb)."""
    parser = argparse.ArgumentParser(prog="launcher", description="Fine-tune language models from one YAML recipe.")
    parser.add_argument("--version", action="version", version=f"launcher {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True)
    for name, (_, help_line, takes_recipe) in VERBS.items():
        sub = verbs.add_parser(name, help=help_line, description=help_line)
        if takes_recipe:
            add_recipe_args(sub)
        if verb is None or name == verb:
            command(name).add_options(sub)
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    if argv and argv[0] not in VERBS and argv[0].endswith((".yaml", ".yml")):
        argv = ["train", *argv]
    parser = build_parser(argv[0] if argv and argv[0] in VERBS else "")
    args, extra = parser.parse_known_args(argv)
    # argparse gives up on key=value overrides placed after options (`R --nodes 2 lr=1e-4`); take them here.
    if extra and (not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def refused(message: str) -> int:
    """One `error:` line (prefixed by the rank under several processes); exit status 2."""
    world, rank = os.environ.get("WORLD_SIZE", "1"), os.environ.get("RANK", "0")  # as set: they may be what is refused
    prefix = f"[rank {rank}] " if world.isdigit() and int(world) > 1 and rank.isdigit() else ""
    print(f"{prefix}error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    try:
        quiet_libraries()
        args = parse(sys.argv[1:] if argv is None else argv)  # imports the verb's module (torch): Ctrl-C may come here
        status = command(args.verb).run(args)
        sys.stdout.flush()  # inside the try: a reader that left early surfaces here
        return status
    except UserError as exc:
        return refused(str(exc))
    except BrokenPipeError:  # `launcher reference | head`: the reader left; say nothing more (before OSError: it is one)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # a report or log the filesystem would not take (full, read-only, no permission)
        if write_errno(exc) is None or not exc.filename:
            raise
        return refused(f"writing {exc.filename} failed: {exc.strerror}; free space or make it writable, "
                       f"then run the same command again (the last good checkpoint is kept)")
    except KeyboardInterrupt:  # Ctrl-C before training started (training turns it into a checkpoint and exit)
        print("\ninterrupted", file=sys.stderr)
        return INTERRUPTED
