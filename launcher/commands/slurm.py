"""`launcher slurm render|submit RECIPE`: the job's options (one per SlurmJob field), then the sbatch script printed,
or written under output_dir/slurm/ and submitted after the checks the job would make. Imports no torch."""
from __future__ import annotations

import argparse
import typing
from pathlib import Path

from pydantic import ValidationError

from launcher.commands import add_recipe_args
from launcher.distributed import mesh, slurm
from launcher.distributed.slurm import SlurmJob
from launcher.errors import SlurmError
from launcher.preflight.checks import Target, checked_recipe
from launcher.recipe.files import load_recipe
from launcher.rundir.directory import plan_run_dir

ACTIONS = {"render": "print the sbatch script for the recipe",
           "submit": "validate the recipe, write the script to output_dir/slurm/ and sbatch it"}


def add_options(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    for action, text in ACTIONS.items():
        sub = actions.add_parser(action, help=text, description=text)
        add_recipe_args(sub)
        job_options(sub)


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    spec, run_dir = job_from_args(args), Path(recipe.output_dir)
    # FSDP2 over several nodes: shard inside each node, replicate across them, unless the recipe chose its mesh
    args.overrides = [*args.overrides, *mesh.hybrid_overrides(recipe, spec.nodes, spec.world_size // spec.nodes)]
    # a job whose mesh its processes cannot form would die once it starts, hours later: refuse it now
    mesh.mesh_for(load_recipe(args.recipe, args.overrides), spec.world_size)
    if args.action == "render":
        print(slurm.sbatch_script(args.recipe, run_dir, spec, args.overrides), end="")
        return 0
    checked_recipe(args, Target("cuda" if spec.gpus_per_node else "cpu", spec.world_size))  # as the job will see it
    resume = plan_run_dir(run_dir, recipe.model_dump(mode="json"), overwrite=False).resume_from  # refuse now, not once queued
    script = slurm.write_script(args.recipe, run_dir, spec, args.overrides)
    job = slurm.submit(script)
    log = slurm.log_path(run_dir, spec, job)
    print(f"submitted job {job}: {spec.nodes} node(s), {spec.world_size} process(es); script {script}"
          + (f"; resumes from {resume}" if resume else ""))
    print(f"log: {log}\nfollow: tail -f {log}    status: squeue -j {job}    stop: scancel {job}")
    return 0


NOT_ON_CLI = ("program", "command")  # hooks for Python callers and tests


def job_options(parser: argparse.ArgumentParser) -> None:
    """One option per SlurmJob field, its help the field's docstring (`--gpus-per-node` for gpus_per_node)."""
    for name, info in SlurmJob.__pydantic_fields__.items():
        if name in NOT_ON_CLI:
            continue
        flag, text = "--" + name.replace("_", "-"), (info.description or "").replace("%", "%%")
        kind = typing.get_origin(info.annotation) or info.annotation
        if kind in (list, dict):
            parser.add_argument(flag, action="append", metavar="KEY=VALUE" if kind is dict else "TEXT",
                                help=f"{text} Repeat for more.")
            continue
        default = "" if info.default in (None, typing.Any) or info.default_factory else f" (default: {info.default})"
        number = int in (typing.get_args(info.annotation) or (info.annotation,))
        parser.add_argument(flag, type=int if number else str, metavar="N" if number else "TEXT", help=text + default)


def job_from_args(args: argparse.Namespace) -> SlurmJob:
    """The SlurmJob the options in `args` describe; unset options keep SlurmJob's defaults."""
    given = {name: getattr(args, name) for name in SlurmJob.__pydantic_fields__
             if name not in NOT_ON_CLI and getattr(args, name, None) is not None}
    if "env" in given:
        pairs = [item.partition("=") for item in given["env"]]
        if bad := [key for key, sep, _ in pairs if not sep or not key]:
            raise SlurmError(f"--env takes KEY=VALUE, got {bad[0]!r}")
        given["env"] = {key: value for key, _, value in pairs}
    try:
        return SlurmJob(**given)
    except ValidationError as exc:
        raise SlurmError("; ".join(f"{'--' + str(e['loc'][0]).replace('_', '-') + ': ' if e['loc'] else ''}"
                                   f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors())) from None
