"""Resuming on another process count holds the global batch (launcher/rescale.py), in-process."""
import pytest

from launcher.training.rescale import hold_global_batch
from launcher.recipe.schema import Recipe
from launcher.errors import UserError


def recipe(micro: int, accum: int) -> Recipe:
    return Recipe.model_validate({"model": {"path": "m"}, "data": {"train": "t.jsonl"}, "output_dir": "o",
                                  "train": {"micro_batch_size": micro, "grad_accum": accum}})


def test_two_to_one_process_doubles_accumulation_and_says_so():
    held, message = hold_global_batch(recipe(2, 2), {"world_size": 2, "global_batch": 8}, world=1)
    assert (held.train.micro_batch_size, held.train.grad_accum) == (2, 4)
    assert "train.grad_accum 2 -> 4" in message and "global batch of 8" in message and "written by 2" in message


def test_one_to_two_processes_halves_accumulation():
    held, message = hold_global_batch(recipe(2, 2), {"world_size": 1, "global_batch": 4}, world=2)
    assert held.train.grad_accum == 1 and "train.grad_accum 2 -> 1" in message


def test_same_count_changes_nothing_and_says_nothing():
    original = recipe(2, 2)
    held, message = hold_global_batch(original, {"world_size": 2, "global_batch": 8}, world=2)
    assert held is original and message is None


def test_user_changed_micro_and_accum_with_the_same_product_is_accepted():
    held, message = hold_global_batch(recipe(4, 1), {"world_size": 2, "global_batch": 8}, world=2)
    assert held.train.grad_accum == 1 and message is None


def test_checkpoint_without_a_recorded_batch_uses_the_recipe_on_the_count_that_wrote_it():
    held, _ = hold_global_batch(recipe(2, 2), {"world_size": 2}, world=1)
    assert held.train.grad_accum == 4


def test_count_that_does_not_divide_the_batch_is_refused_naming_counts_that_do():
    with pytest.raises(UserError) as refused:
        hold_global_batch(recipe(2, 2), {"world_size": 2, "global_batch": 8}, world=3)
    assert "does not split over 3 processes" in str(refused.value) and "1, 2, 4, 8" in str(refused.value)


def test_micro_batch_that_does_not_divide_is_refused_naming_values_that_hold_it():
    with pytest.raises(UserError) as refused:
        hold_global_batch(recipe(4, 1), {"world_size": 1, "global_batch": 12}, world=2)
    message = str(refused.value)
    assert "global batch of 12" in message
    assert "micro_batch_size 2 with grad_accum 3" in message and "micro_batch_size 3 with grad_accum 2" in message
