"""The verbs: train (the default for a .yaml), validate, inspect, reference, eval, slurm (render, submit).

User mistakes surface as one `error:` line and exit status 2; anything else keeps its traceback,
since it is ours to fix.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Callable

from launcher.report.console import quiet_libraries
from launcher.errors import UserError
from launcher.recipe.files import load_recipe, load_run

def _recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="override recipe keys, e.g. train.lr=1e-4")


def _train_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="discard a previous run in output_dir and start fresh")
    parser.add_argument("--allow-data-change", action="store_true",
                        help="resume even though a data file changed since the checkpoint (refused otherwise)")


def _validate_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--deep", action="store_true", help="also tokenise every row: count rows truncated or left "
                        "with nothing to train by max_length (loads the tokenizer, not the model)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="check support for this device instead of this "
                        "machine's (e.g. --device cuda on a CPU login node for a GPU job)")


def _inspect_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--examples", type=int, default=3, help="examples to show")
    parser.add_argument("--plain", action="store_true", help="token ids, labels and pieces in columns (also whenever stdout is not a terminal)")


def _reference_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--readme", metavar="PATH", help="rewrite the reference block inside this README instead")


def _eval_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", metavar="PATH|base", help="a saved folder (output_dir/final, output_dir/best) or base")


def _merge_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="output_dir of a finished lora or qlora run")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="dtype of the merged weights (default bf16)")
    parser.add_argument("--out", help="where to save (default RUN_DIR/merged)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing merged folder")


def _slurm_options(parser: argparse.ArgumentParser) -> None:
    from launcher.distributed.slurm import add_cli_options  # imports no torch
    actions = parser.add_subparsers(dest="action", required=True)
    for action, text in (("render", "print the sbatch script for the recipe"),
                         ("submit", "validate the recipe, write the script to output_dir/slurm/ and sbatch it")):
        _recipe_args(actions.add_parser(action, help=text, description=text))
        add_cli_options(actions.choices[action])


def _generate_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="output_dir of a finished run")
    given = parser.add_mutually_exclusive_group()
    given.add_argument("--prompt", action="append", help="a prompt (repeatable); without --prompt or --file: interactive "
                       "on a terminal, else one prompt per line of standard input")
    given.add_argument("--file", help="a text file with one prompt per line")
    parser.add_argument("--checkpoint", choices=["final", "best", "base"], default="final", help="which model answers: the run's final (default) or best, or the base model")
    parser.add_argument("--max-new-tokens", type=int, help="default: the recipe's eval.max_new_tokens")


def _recipes_options(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action")
    copy = actions.add_parser("copy", help="copy a shipped recipe (and the data it names) to DEST")
    copy.add_argument("name", help="recipe name as listed, e.g. quickstart")
    copy.add_argument("dest", help="a folder, or a .yaml path")


def build_parser() -> argparse.ArgumentParser:
    from launcher import __version__
    parser = argparse.ArgumentParser(prog="launcher", description="Fine-tune language models from one YAML recipe.")
    parser.add_argument("--version", action="version", version=f"launcher {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True)
    for name, verb in VERBS.items():
        sub = verbs.add_parser(name, help=verb.help, description=verb.help)
        if verb.takes_recipe:
            _recipe_args(sub)
        if verb.options is not None:
            verb.options(sub)
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    if argv and argv[0] not in VERBS and argv[0].endswith((".yaml", ".yml")):
        argv = ["train", *argv]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse gives up on key=value overrides placed after options (`R --nodes 2 lr=1e-4`); take them here.
    if extra and (not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def recipe_or_run(path: str, overrides: list[str]):
    """A recipe file, or a run directory (its resolved recipe.yaml)."""
    from pathlib import Path
    return load_run(path, overrides) if Path(path).is_dir() else load_recipe(path, overrides)


def checked_recipe(args, target=None):
    """The recipe (or a run directory's), validated and preflighted (every check that needs no torch), before anything loads."""
    from launcher.preflight import checks as preflight
    recipe = recipe_or_run(args.recipe, args.overrides)
    preflight.check(recipe, target)
    return recipe


def cmd_validate(args) -> int:
    from launcher.preflight.checks import Target
    from launcher.distributed.launch import launched_world_size
    recipe = checked_recipe(args, Target(args.device, launched_world_size()) if args.device else None)
    if args.deep:
        from launcher.commands.deepcheck import deep_check
        deep_check(recipe)
    print(f"{args.recipe}: ok ({recipe.method} on {recipe.model.path}, data format {recipe.data.format}, output {recipe.output_dir})")
    return 0


def cmd_train(args) -> int:
    recipe = checked_recipe(args)
    from launcher.training.loop import run
    return run(recipe, overwrite=args.overwrite, allow_data_change=args.allow_data_change)


def cmd_inspect(args) -> int:
    recipe = checked_recipe(args)
    from launcher.commands.inspect import show
    show(recipe, args.examples, plain=args.plain or not sys.stdout.isatty())
    return 0


def cmd_preprocess(args) -> int:
    """Data checks only: a CPU job may preprocess for a GPU or multi-process recipe."""
    recipe = load_recipe(args.recipe, args.overrides)
    from launcher.data.cache import check_sources, preprocess
    check_sources(recipe)
    print(f"preprocessed data written to {preprocess(recipe)}")
    return 0


def cmd_eval(args) -> int:
    recipe = checked_recipe(args)
    from launcher.evaluation.evaluate import compare
    compare(recipe, args.checkpoint)
    return 0


def cmd_slurm(args) -> int:
    from pathlib import Path

    from launcher.distributed import slurm
    from launcher.preflight.checks import Target
    recipe = load_recipe(args.recipe, args.overrides)
    spec, run_dir = slurm.job_from_cli(args), Path(recipe.output_dir)
    if args.action == "render":
        print(slurm.render(args.recipe, run_dir, spec, args.overrides), end="")
        return 0
    from launcher.rundir.directory import plan
    checked_recipe(args, Target("cuda" if spec.gpus_per_node else "cpu", spec.world_size))  # as the job will see it
    resume = plan(run_dir, recipe.model_dump(mode="json"), overwrite=False).resume_from  # refuse now, not once queued
    script = slurm.write_script(args.recipe, run_dir, spec, args.overrides)
    job = slurm.submit(script)
    log = slurm.log_path(run_dir, spec, job)
    print(f"submitted job {job}: {spec.nodes} node(s), {spec.world_size} process(es); script {script}"
          + (f"; resumes from {resume}" if resume else ""))
    print(f"log: {log}\nfollow: tail -f {log}    status: squeue -j {job}    stop: scancel {job}")
    return 0


def cmd_merge(args) -> int:
    from launcher.commands.merge import merge
    merge(args.run_dir, args.dtype, args.out, args.overwrite)
    return 0


def cmd_generate(args) -> int:
    from launcher.commands.generate import answer_prompts
    return answer_prompts(args.run_dir, args.checkpoint, args.prompt, args.file, args.max_new_tokens)


def cmd_recipes(args) -> int:
    from launcher.recipe import catalog
    if args.action == "copy":
        print(f"copied {args.name} to {catalog.copy(args.name, args.dest)}")
    else:
        print(catalog.listing())
    return 0


def cmd_plan(args) -> int:
    from launcher.memory.advice import cmd_plan as plan
    return plan(args)


def _plan_options(parser: argparse.ArgumentParser) -> None:
    from launcher.memory.advice import add_options  # imports no torch until it plans
    add_options(parser)


def cmd_reference(args) -> int:
    from pathlib import Path

    from launcher.recipe.reference import readme_with_reference, reference_markdown
    if args.readme:
        Path(args.readme).write_text(readme_with_reference(Path(args.readme).read_text()))
    else:
        print(reference_markdown())
    return 0


@dataclass(frozen=True)
class Verb:
    """One command: its handler, help line, whether it takes `recipe [key=value ...]`, and its own options."""
    handler: Callable[[argparse.Namespace], int]
    help: str
    takes_recipe: bool = True
    options: Callable[[argparse.ArgumentParser], None] | None = None


# One line per verb; a new verb is a handler above and a line here.
VERBS: dict[str, Verb] = {
    "train": Verb(cmd_train, "train (the default when the first argument is a .yaml file)", options=_train_options),
    "validate": Verb(cmd_validate, "check the recipe, the model's whereabouts, output_dir and every row of every data "
                     "file (which takes a while on large files: some 15 s per million short rows); loads no model and "
                     "imports no torch", options=_validate_options),
    "inspect": Verb(cmd_inspect, "show tokenised examples with trained tokens highlighted, and data counts", options=_inspect_options),
    "preprocess": Verb(cmd_preprocess, "tokenise (and pack) once and save it beside a fingerprint, for train to reuse"),
    "eval": Verb(cmd_eval, "score the base model and output_dir/final (or one --checkpoint); RECIPE may be a run directory",
                 options=_eval_options),
    "generate": Verb(cmd_generate, "answer prompts with a run's final (or best) model and its recipe's template",
                     takes_recipe=False, options=_generate_options),
    "merge": Verb(cmd_merge, "fold a lora/qlora run's adapter into its base; save and verify RUN_DIR/merged",
                  takes_recipe=False, options=_merge_options),
    "recipes": Verb(cmd_recipes, "list the shipped recipes, or copy one: recipes copy NAME DEST", takes_recipe=False,
                    options=_recipes_options),
    "reference": Verb(cmd_reference, "print the recipe reference (every key, allowed values, default and meaning)",
                      takes_recipe=False, options=_reference_options),
    "slurm": Verb(cmd_slurm, "Slurm batch jobs: print the sbatch script, or submit it (docs/slurm.md)", takes_recipe=False,
                  options=_slurm_options),
    "plan": Verb(cmd_plan, "predict per-GPU peak memory (no weights, no GPU) and the cheapest changes that make it fit",
                 options=_plan_options),
}


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        status = VERBS[args.verb].handler(args)
        sys.stdout.flush()  # inside the try: a reader that left early surfaces here
        return status
    except UserError as exc:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        prefix = f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""
        print(f"{prefix}error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `launcher reference | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
