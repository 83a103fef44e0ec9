"""`launcher inspect`: see exactly what the model will be trained on, before training it."""
from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table
from rich.text import Text

from launcher.commands import whole
from launcher.data.encode import load_datasets
from launcher.model import loading as modeling
from launcher.preflight.checks import checked_recipe
from launcher.recipe.formats import IGNORE
from launcher.recipe.schema import Recipe


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--examples", type=whole(0), default=3, help="examples to show")
    parser.add_argument("--plain", action="store_true",
                        help="token ids, labels and pieces in columns (also whenever stdout is not a terminal)")


def run(args: argparse.Namespace) -> int:
    recipe = checked_recipe(args)
    show(recipe, args.examples, plain=args.plain or not sys.stdout.isatty())
    return 0


def highlighted(tokenizer, ids: list[int], labels: list[int]) -> Text:
    """Trained tokens in bold green, masked ones dim: the boundary between prompt and target is visible."""
    text = Text()
    for token, label in zip(ids, labels):
        piece = tokenizer.decode([token])
        text.append(piece, style="bold green" if label != IGNORE else "dim")
    return text


def token_columns(tokenizer, ids: list[int], labels: list[int]) -> str:
    """One line per token: position, id, label (-100: not trained) and the decoded piece, quoted so
    spaces and newlines show; readable in a log file, where colours are lost."""
    lines = [f"{'pos':>5} {'id':>7} {'label':>7}  piece"]
    for position, (token, label) in enumerate(zip(ids, labels)):
        lines.append(f"{position:>5} {token:>7} {label:>7}  {tokenizer.decode([token])!r}")
    return "\n".join(lines)


def length_histogram(lengths: list[int], bins: int = 8) -> list[tuple[str, int]]:
    if not lengths:
        return []
    top = max(lengths)
    width = max(1, -(-top // bins))
    counts = [0] * bins
    for length in lengths:
        counts[min((length - 1) // width, bins - 1)] += 1
    return [(f"{i * width + 1}-{(i + 1) * width}", c) for i, c in enumerate(counts)]


def show(recipe: Recipe, examples: int, console: Console | None = None, plain: bool = False) -> dict:
    """Print the first `examples` tokenised train rows and the data's counts; returns the counts.

    plain: tokens in columns (token_columns) instead of highlighted text."""
    console = console or Console(highlight=False, soft_wrap=True)
    weights = modeling.resolve_weights(recipe)
    tokenizer = modeling.load_tokenizer(weights, recipe)
    found = load_datasets(recipe, tokenizer, pack=False)  # one example per row, as before packing
    train, evaluation = found.train, found.eval
    dataset = train.dataset
    for index in range(min(examples, len(dataset))):
        row = dataset[index]
        console.rule(f"example {index} ({len(row['input_ids'])} tokens)")
        if plain:
            console.print(token_columns(tokenizer, row["input_ids"], row["labels"] if not found.labels else [IGNORE] * len(row["input_ids"])),
                          markup=False)
            if found.labels:
                console.print(f"class: {found.labels[row['labels'][0]]}", markup=False)
        elif found.labels:  # a classifier's label is one class id for the whole row
            console.print(Text(tokenizer.decode(row["input_ids"]), style="dim") + Text(f"  -> {found.labels[row['labels'][0]]}", style="bold green"))
        else:
            console.print(highlighted(tokenizer, row["input_ids"], row["labels"]))
    lengths = [len(ids) for ids in dataset["input_ids"]]
    trained = sum(sum(label != IGNORE for label in labels) for labels in dataset["labels"])
    tally = train.tally
    counts = {"rows": train.rows, "kept": len(dataset), "dropped": train.dropped,
              "dropped_share": tally.share(sum(tally.dropped.values())), "truncated": tally.truncated,
              "truncated_share": tally.share(tally.truncated), "tokens": sum(lengths),
              "trained_fraction": trained / max(1, sum(lengths)),
              "eval_rows": len(evaluation.dataset) if evaluation else 0}
    if found.labels:
        counts["labels"] = found.labels
    for stat in train.mixture:  # several sources: what each gives the mixture
        counts[f"source {stat['source']}"] = (f"{stat['rows']} rows ({stat['row_share']:.1%}), "
                                              f"{stat['tokens']} tokens ({stat['token_share']:.1%})")
    table = Table(title="training data")
    table.add_column("what")
    table.add_column("value")
    for key, value in counts.items():
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value or "none"))
    console.print(table)
    for warning in found.warnings:
        console.print(Text(f"warning: {warning}", style="bold yellow"))
    histogram = Table(title="length (tokens)")
    histogram.add_column("range")
    histogram.add_column("rows")
    for span, count in length_histogram(lengths):
        histogram.add_row(span, f"{count} " + "#" * min(count, 60))
    console.print(histogram)
    return counts
