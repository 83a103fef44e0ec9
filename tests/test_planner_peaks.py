"""`launcher plan`, second edition: training and evaluation peaks apart, what chunked cross-entropy keeps alive
with gradient checkpointing, ZeRO-3's own allocations, host memory per node and the fixed overheads."""
from __future__ import annotations

import json

import pytest
from memory_reference import config_folder, recipe_for, reference_lines
from support import write_recipe

from launcher.cli import main
from launcher.memory import estimate as planner
from launcher.recipe.schema import Recipe


def reference_recipe(label: str, root, **sections) -> dict:
    """The recipe of one H200 reference line, with sections merged in."""
    line = next(line for line in reference_lines() if line["label"] == label)
    data = recipe_for(line, config_folder(line, root))
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    return data


@pytest.mark.parametrize("eval_batch, binds", [(48, "evaluation"), (1, "training")])
def test_plan_json_gives_training_and_eval_peaks_apart_and_which_binds(tmp_path, capsys, eval_batch, binds):
    """A large eval batch holds float32 logits for every token of 48 rows, more than a checkpointed, chunked training
    step; an eval batch of one row holds far less than the step."""
    data = reference_recipe("1b-full", tmp_path, train={"gradient_checkpointing": True, "loss_chunk_tokens": 1024,
                                                        "eval_batch_size": eval_batch})
    data["data"]["eval_fraction"] = 0.1
    assert main(["plan", str(write_recipe(data, tmp_path / "r.yaml")), "--gpu-memory", "141", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["binding"] == binds
    train, evaluation = result["train_peak_gib"], result["eval_peak_gib"]
    assert (evaluation > train) == (binds == "evaluation")
    assert result["peak_gib"] == max(train, evaluation)
    assert main(["plan", str(tmp_path / "r.yaml"), "--gpu-memory", "141"]) == 0
    assert f"{binds} binds" in capsys.readouterr().out


def test_plan_without_evaluation_has_no_eval_peak_and_training_binds(tmp_path):
    result = planner.plan(Recipe.model_validate(reference_recipe("1b-full", tmp_path)), 1, 141).as_dict()
    assert result["eval_peak_gib"] is None and result["binding"] == "training"
    assert result["train_peak_gib"] == result["peak_gib"]


def test_chunked_loss_with_checkpointing_peaks_in_the_last_blocks_backward_with_every_block_input_kept(tmp_path):
    """8B LoRA, checkpointed, chunked CE: the loss no longer dominates, so the peak is the last block's recompute while
    all 32 block inputs are still kept; the loss term grows by one chunk's three float32 vocabulary-wide tensors."""
    data = reference_recipe("8b-lora-gc", tmp_path, train={"loss_chunk_tokens": 1024})
    chunked = planner.plan(Recipe.model_validate(data), 1, 141)
    assert chunked.peak_moment == "last block's backward"
    tokens, hidden, vocab = 4 * 2048, 4096, 128256
    inputs = 32 * tokens * hidden * 2  # bf16 residual stream, one tensor per block
    assert chunked.moments["last block's backward"]["activations"] > inputs
    assert chunked.moments["end of forward"]["logits/loss"] == 12 * 1024 * vocab + 2 * tokens * hidden * 2
    data["train"]["loss_chunk_tokens"] = 2048
    wider = planner.plan(Recipe.model_validate(data), 1, 141).moments["end of forward"]["logits/loss"]
    assert wider - chunked.moments["end of forward"]["logits/loss"] == 12 * 1024 * vocab
    plain = planner.plan(Recipe.model_validate(reference_recipe("8b-lora-gc", tmp_path)), 1, 141)
    assert plain.peak_moment == "end of forward" and chunked.peak_gib < plain.peak_gib - 8
