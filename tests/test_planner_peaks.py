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
