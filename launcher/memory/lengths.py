"""The real lengths of a recipe's rows, for planning the largest batch its data can form.

Batches are padded to their longest row (launcher/data/batching.py `collate`), so the worst micro-batch
the data can form is micro_batch_size rows of its longest row, and no longer than data.max_length. The
lengths come from `launcher preprocess`'s saved data when it matches the recipe, else from tokenising the
first SAMPLE_ROWS rows of each source (then a longer row further on is not seen: the plan says so). With
data.packing every training row is filled to data.max_length, so the train length stays there.
"""
from __future__ import annotations

from dataclasses import dataclass

from launcher.data import cache
from launcher.data.encode import load_datasets
from launcher.model import loading
from launcher.recipe.schema import Recipe

SAMPLE_ROWS = 2000


@dataclass(frozen=True)
class Lengths:
    """Token counts of the longest train and eval rows, and where they were read."""
    train: int
    eval: int | None
    source: str
    max_length: int

    @property
    def longest(self) -> int:
        return max(self.train, self.eval or 0)


def data_lengths(recipe: Recipe) -> Lengths:
    """The longest rows of the recipe's data, from the preprocess cache or a tokenised sample."""
    tokenizer = loading.load_tokenizer(loading.resolve_weights(recipe), recipe)
    found = cache.load_preprocessed(recipe, tokenizer)
    source = f"the preprocessed data in {cache.folder(recipe)} (every row)"
    if found is None:
        data = recipe.data
        limits = {"max_train_rows": min(data.max_train_rows or SAMPLE_ROWS, SAMPLE_ROWS),
                  "max_eval_rows": min(data.max_eval_rows or SAMPLE_ROWS, SAMPLE_ROWS)}
        sampled = recipe.model_copy(update={"data": data.model_copy(update=limits)})
        found = load_datasets(sampled, tokenizer, pack=False)
        source = (f"a tokenised sample (the first {limits['max_train_rows']} train and {limits['max_eval_rows']} eval "
                  "rows of each source)")
    train = data_longest(found.train.dataset)
    if recipe.data.packing:
        train, source = recipe.data.max_length, source + "; packed rows are full length"
    evaluation = data_longest(found.eval.dataset) if found.eval is not None else None
    return Lengths(train, evaluation, source, recipe.data.max_length)


def data_longest(dataset) -> int:
    return max((len(ids) for ids in dataset["input_ids"]), default=0)


def at_data_lengths(recipe: Recipe, lengths: Lengths) -> Recipe:
    """The recipe planned at its data's longest row instead of data.max_length (never longer)."""
    longest = min(max(lengths.longest, 1), recipe.data.max_length)
    return recipe.model_copy(update={"data": recipe.data.model_copy(update={"max_length": longest})})
