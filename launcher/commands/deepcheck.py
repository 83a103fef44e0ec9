"""`launcher validate --deep`: the rows max_length truncates or leaves with nothing to train, before a run.

The torch-free pass (launcher/rowcheck.py) cannot see tokens; this one loads the tokenizer (not
the model) and runs the same tokenising pass as training, so the counts and the refusal under
data.skipped_share_refuse are exactly those the run would meet.
"""
from __future__ import annotations

from rich.console import Console
from rich.text import Text

from launcher.recipe.schema import Recipe


def deep_check(recipe: Recipe, console: Console | None = None) -> None:
    """Print each source's tally of dropped and truncated rows, and the warnings the run would give."""
    from launcher.model import loading as modeling
    from launcher.data.encode import load_datasets
    console = console or Console(highlight=False, soft_wrap=True)
    tokenizer = modeling.load_tokenizer(modeling.resolve_weights(recipe), recipe)
    found = load_datasets(recipe, tokenizer, pack=False)
    for name, source in (("train", found.train), ("eval", found.eval if recipe.data.eval else None)):
        if source is not None:
            console.print(f"{name}: {source.rows} rows, {source.tally.line()}")
    for warning in found.warnings:
        console.print(Text(f"warning: {warning}", style="bold yellow"))
