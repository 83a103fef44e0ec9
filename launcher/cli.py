"""The verbs: train (the default for a .yaml), validate, inspect, reference, eval, slurm (render, submit).

User mistakes surface as one `error:` line and exit status 2; anything else keeps its traceback,
since it is ours to fix.
"""
from __future__ import annotations

import argparse
import os
import sys

from launcher.recipe import UserError, load_recipe

VERBS = ("train", "validate", "inspect", "reference", "eval", "slurm", "merge", "plan")


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
    evaluate = verbs.add_parser("eval", help="score the base model and output_dir/final (or one --checkpoint) on the eval data")
    _recipe_args(evaluate)
    evaluate.add_argument("--checkpoint", metavar="PATH|base", help="a saved folder (output_dir/final, output_dir/best) or base")
    from launcher.slurm import add_cli_options  # imports no torch
    from launcher.planning import add_cli as add_plan_verb  # imports no torch until it plans
    add_plan_verb(verbs)
    merge = verbs.add_parser("merge", help="fold a lora/qlora run's adapter into its base; save and verify a plain model folder")
    merge.add_argument("run_dir", help="output_dir of a finished lora or qlora run")
    merge.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="dtype of the merged weights (default bf16)")
    merge.add_argument("--out", help="where to save (default RUN_DIR/final/merged)")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing merged folder")
    slurm = verbs.add_parser("slurm", help="Slurm batch jobs: print the sbatch script, or submit it (docs/slurm.md)")
    actions = slurm.add_subparsers(dest="action", required=True)
    for action, text in (("render", "print the sbatch script for the recipe"),
                         ("submit", "validate the recipe, write the script to output_dir/slurm/ and sbatch it")):
        _recipe_args(actions.add_parser(action, help=text, description=text))
        add_cli_options(actions.choices[action])
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


def checked_recipe(args, target=None):
    """The recipe, validated and preflighted (every check that needs no torch), before anything loads."""
    from launcher import preflight
    recipe = load_recipe(args.recipe, args.overrides)
    preflight.check(recipe, target)
    return recipe


def cmd_validate(args) -> int:
    recipe = checked_recipe(args)
    print(f"{args.recipe}: ok ({recipe.method} on {recipe.model.path}, data format {recipe.data.format}, output {recipe.output_dir})")
    return 0


def cmd_train(args) -> int:
    recipe = checked_recipe(args)
    from launcher.train import run
    return run(recipe, overwrite=args.overwrite)


def cmd_inspect(args) -> int:
    recipe = checked_recipe(args)
    from launcher.inspection import show
    show(recipe, args.examples)
    return 0


def cmd_eval(args) -> int:
    recipe = checked_recipe(args)
    from launcher.evaluate import compare
    compare(recipe, args.checkpoint)
    return 0


def cmd_slurm(args) -> int:
    from pathlib import Path

    from launcher import slurm
    from launcher.preflight import Target
    recipe = load_recipe(args.recipe, args.overrides)
    spec, run_dir = slurm.job_from_cli(args), Path(recipe.output_dir)
    if args.action == "render":
        print(slurm.render(args.recipe, run_dir, spec, args.overrides), end="")
        return 0
    from launcher.checkpoint import plan_run_dir
    checked_recipe(args, Target("cuda" if spec.gpus_per_node else "cpu", spec.world_size))  # as the job will see it
    resume = plan_run_dir(run_dir, recipe.model_dump(mode="json"), overwrite=False)  # refuse now, not once queued
    script = slurm.write_script(args.recipe, run_dir, spec, args.overrides)
    job = slurm.submit(script)
    log = slurm.log_path(run_dir, spec, job)
    print(f"submitted job {job}: {spec.nodes} node(s), {spec.world_size} process(es); script {script}"
          + (f"; resumes from {resume}" if resume else ""))
    print(f"log: {log}\nfollow: tail -f {log}    status: squeue -j {job}    stop: scancel {job}")
    return 0


def cmd_merge(args) -> int:
    from launcher.merge import merge
    merge(args.run_dir, args.dtype, args.out, args.overwrite)
    return 0


def cmd_plan(args) -> int:
    from launcher.planning import cmd_plan as plan
    return plan(args)


def cmd_reference(args) -> int:
    from pathlib import Path

    from launcher.reference import readme_with_reference, reference_markdown
    if args.readme:
        Path(args.readme).write_text(readme_with_reference(Path(args.readme).read_text()))
    else:
        print(reference_markdown())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    handler = {"train": cmd_train, "validate": cmd_validate, "inspect": cmd_inspect, "reference": cmd_reference,
               "eval": cmd_eval, "slurm": cmd_slurm, "merge": cmd_merge, "plan": cmd_plan}[args.verb]
    try:
        return handler(args)
    except UserError as exc:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        prefix = f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""
        print(f"{prefix}error: {exc}", file=sys.stderr)
        return 2
