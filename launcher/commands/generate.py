"""`launcher generate RUN_DIR`: a quick look at what a run learnt, with the prompt its data was trained on.

A prompt is put into the recipe's data format (the first eval source's, else the first train
source's: the translation template, the QA template, the instruction layout or chat template)
exactly as training rows were, then generated greedily with the recipe's eval settings by the
run's final (or best) model; `--checkpoint base` answers with the base model for comparison.
Interactive on a terminal, one prompt per line otherwise.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from launcher.commands import whole
from launcher.data.encode import Encoder
from launcher.data.sources import sources_of
from launcher.errors import UserError
from launcher.evaluation.evaluate import generate
from launcher.model import loading as modeling
from launcher.recipe.files import load_run
from launcher.recipe.formats import FORMATS
from launcher.recipe.schema import DataSection, Recipe
from launcher.rundir.paths import RunDir

# The canonical field a user's prompt fills, per data format; the format's other required field is the (empty) target.
PROMPT_FIELD = {"translation": "source", "qa": "question", "instruction": "instruction", "completion": "prompt",
                "text": "text", "chat": "messages", "preference": "prompt"}


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="output_dir of a finished run")
    given = parser.add_mutually_exclusive_group()
    given.add_argument("--prompt", action="append", help="a prompt (repeatable); without --prompt or --file: interactive "
                       "on a terminal, else one prompt per line of standard input")
    given.add_argument("--file", help="a text file with one prompt per line")
    parser.add_argument("--checkpoint", choices=["final", "best", "base"], default="final",
                        help="which model answers: the run's final (default) or best, or the base model")
    parser.add_argument("--max-new-tokens", type=whole(1), help="default: the recipe's eval.max_new_tokens")


def run(args: argparse.Namespace) -> int:
    return answer_prompts(args.run_dir, args.checkpoint, args.prompt, args.file, args.max_new_tokens)


def prompt_data(recipe: Recipe) -> DataSection:
    """The data settings prompts are put in: the first eval source's (its format and fields), else the first train source's."""
    return (sources_of(recipe, "eval") or sources_of(recipe, "train"))[0].data


def prompt_rows(prompts: list[str], data: DataSection) -> list[dict]:
    """Each prompt as a data row of `data`'s format, its target left empty."""
    fmt, col = data.format, data.field
    if fmt not in PROMPT_FIELD:
        raise UserError(f"generate: data.format {fmt} is scored from logits, not generated; use `launcher eval` instead")
    if fmt == "chat":
        return [{col("messages"): [{"role": "user", "content": p}, {"role": "assistant", "content": ""}]} for p in prompts]
    target = [f for f in FORMATS[fmt].required if f != PROMPT_FIELD[fmt]]
    return [{col(PROMPT_FIELD[fmt]): p, **{col(t): "" for t in target}} for p in prompts]


def answerer(run_dir: str | Path, checkpoint: str, max_new_tokens: int | None = None) -> Callable[[list[str]], list[str]]:
    """Loads a run's `final`, `best` or `base` model once; the function it returns answers prompts greedily,
    each put in the recipe's prompt format."""
    import datasets
    import torch
    from accelerate import PartialState
    run_dir = Path(run_dir)
    recipe = load_run(run_dir)
    if recipe.model.task == "classification":
        raise UserError("generate: a classification run predicts labels; use `launcher eval` instead")
    if max_new_tokens:
        recipe.eval.max_new_tokens = max_new_tokens
    folder = run_dir if checkpoint == "base" else RunDir(run_dir).export(checkpoint)
    if checkpoint != "base" and not folder.is_dir():
        raise UserError(f"generate: {folder} does not exist (train to the end first, or pick --checkpoint final|best|base)")
    weights = modeling.resolve_weights(recipe)
    tokenizer = modeling.load_tokenizer(weights if checkpoint == "base" else str(folder), recipe)
    data = prompt_data(recipe)
    encoder = Encoder(tokenizer, data, recipe.model.task)
    on_gpu, state = torch.cuda.is_available(), PartialState()
    model = (modeling.load_base(weights, recipe, on_gpu) if checkpoint == "base"
             else modeling.load_trained(str(folder), recipe, on_gpu))
    if recipe.method != "qlora":  # a quantised base was placed on its device as it loaded, and cannot be moved
        model = model.to(state.device)
    model.eval()

    def answer(prompts: list[str]) -> list[str]:
        rows = datasets.Dataset.from_dict(encoder.batch(_columns(prompt_rows(prompts, data))))
        out = generate(state, model, tokenizer, rows, len(prompts), recipe, recipe.eval.generate_batch_size or 8)
        return [row["output"] for row in out]
    return answer


def answers(run_dir: str | Path, checkpoint: str, prompts: list[str], max_new_tokens: int | None = None) -> list[str]:
    """Greedy answers of a run's `final`, `best` or `base` model to `prompts`, in the recipe's prompt format."""
    return answerer(run_dir, checkpoint, max_new_tokens)(prompts)


def _columns(rows: list[dict]) -> dict[str, list]:
    return {key: [row[key] for row in rows] for key in rows[0]}


def answer_prompts(run_dir: str, checkpoint: str, prompts: list[str] | None, file: str | None,
                   max_new_tokens: int | None) -> int:
    """The verb: prompts from --prompt, --file, a terminal session, or standard input."""
    if file:
        if not Path(file).is_file():
            raise UserError(f"generate --file: {file} {'is a folder, not a file' if Path(file).is_dir() else 'not found'}")
        try:
            prompts = [line for line in Path(file).read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as exc:
            raise UserError(f"generate --file: {file}: byte 0x{exc.object[exc.start]:02x} at offset {exc.start} is not "
                            "UTF-8; save the prompts as UTF-8") from None
    if prompts:
        for prompt, answer in zip(prompts, answers(run_dir, checkpoint, prompts, max_new_tokens)):
            print(f"> {prompt}\n{answer}\n")
        return 0
    if not sys.stdin.isatty():
        prompts = [line for line in sys.stdin.read().splitlines() if line.strip()]
        if not prompts:
            raise UserError("generate: no prompt; give --prompt TEXT, --file PATH, or prompts on standard input")
        return answer_prompts(run_dir, checkpoint, prompts, None, max_new_tokens)
    answer = answerer(run_dir, checkpoint, max_new_tokens)
    print(f"{run_dir} ({checkpoint}): type a prompt, an empty line or Ctrl-D to stop")
    while True:
        try:
            prompt = input("> ")
        except EOFError:
            return 0
        if not prompt.strip():
            return 0
        print(answer([prompt])[0])
