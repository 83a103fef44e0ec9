"""`launcher eval RECIPE|RUN_DIR [--checkpoint PATH|base]`: the same metrics for the base model and trained
folders, side by side."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from launcher.data.encode import load_eval_data
from launcher.data.reference_logps import with_base_reference
from launcher.distributed.strategies import strategy_for
from launcher.errors import UserError
from launcher.evaluation.evaluate import eval_rows, evaluate
from launcher.model import loading as modeling
from launcher.preflight.checks import checked_recipe
from launcher.recipe.schema import Recipe
from launcher.report.console import Console as Progress
from launcher.rundir.paths import RunDir


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", metavar="PATH|base", help="a saved folder (output_dir/final, output_dir/best) or base")


def run(args: argparse.Namespace) -> int:
    recipe = checked_recipe(args)
    compare_checkpoints(recipe, args.checkpoint)
    return 0


def compare_checkpoints(recipe: Recipe, checkpoint: str | None = None, console=None) -> dict[str, dict]:
    """`launcher eval`: the same metrics for the base model and trained folders, side by side.

    Without --checkpoint it scores the base model and output_dir/final, so before -> after is one
    command; a classifier's base gets a fresh head seeded by train.seed (chance level, as at step 0).
    """
    from accelerate.utils import set_seed

    targets = [checkpoint] if checkpoint else ["base", str(RunDir(recipe.output_dir).export("final"))]
    for target in targets:
        if target != "base" and not (Path(target) / "config.json").is_file() and not (Path(target) / "adapter_config.json").is_file():
            raise UserError(f"--checkpoint {target}: not a saved model folder (give output_dir/final, output_dir/best or 'base')")
    accelerator = strategy_for(recipe).make_accelerator()
    on_gpu = accelerator.device.type == "cuda"
    weights = modeling.resolve_weights(recipe)
    tokenizer = modeling.load_tokenizer(weights, recipe)
    eval_data, labels = load_eval_data(recipe, tokenizer)  # no train row is tokenised (unless eval_fraction splits them)
    if eval_data is None:
        raise UserError("eval: the recipe has no eval data; set data.eval or data.eval_fraction")
    if recipe.objective == "dpo":  # the reference of every checkpoint: the base, scored once
        base = modeling.load_base(weights, recipe, on_gpu, labels).to(accelerator.device)
        eval_data.dataset = with_base_reference(accelerator, base, eval_data.dataset, recipe.train.eval_batch(), tokenizer.pad_token_id)
        del base
    results: dict[str, dict] = {}
    shown = Progress(accelerator.is_main_process)
    for target in targets:
        set_seed(recipe.train.seed)
        loader = modeling.load_base if target == "base" else modeling.load_trained
        model = loader(weights if target == "base" else target, recipe, on_gpu, labels).to(accelerator.device)
        with shown.phase(f"evaluation of {Path(target).name}", eval_rows(eval_data.dataset, recipe)) as phase:
            found = evaluate(accelerator, model, tokenizer, eval_data.dataset, recipe, labels, progress=phase.advance)
        results[target] = {**found.metrics, "predictions": found.predictions, "confusion": found.confusion}
        del model
    shown.close()
    console = console or Console(highlight=False, soft_wrap=True)
    table = Table(title=f"eval on {len(eval_data.dataset)} rows of {', '.join(entry.path for entry in recipe.data.entries('eval') or recipe.data.entries())}")
    table.add_column("metric")
    for target in targets:
        table.add_column(Path(target).name)
    for key in [k for k, v in results[targets[0]].items() if k.startswith("eval_")]:
        table.add_row(key, *(f"{results[t][key]:.4f}" for t in targets))
    if accelerator.is_main_process:
        console.print(table)
        run = RunDir(recipe.output_dir)
        if run.root.is_dir():
            run.eval_results.write_text(json.dumps(results, indent=1))
    return results
