"""Keys read only under another key's value (rules.SCOPES): given where the run would ignore them they are
refused naming the key; a dump leaves them out; a base's or an overridden file's such keys are left out."""
from __future__ import annotations

import copy

import pytest
import yaml
from pydantic import ValidationError

from launcher.cli import main
from launcher.errors import UserError
from launcher.recipe.files import load_recipe, load_run
from launcher.recipe.reference import fields
from launcher.recipe.rules import SCOPES, lookup
from launcher.recipe.schema import Recipe

BASE = {"model": {"path": "x"}, "method": "lora", "data": {"train": "t.jsonl", "format": "translation"}, "output_dir": "o"}

# For each scope, a recipe change under which its keys are NOT read, and one under which they are.
AWAY_AND_BACK = {
    "quant": ({}, {"method": "qlora"}),
    "freeze": ({}, {"method": "full"}),
    "quant.type": ({"method": "qlora", "quant": {"bits": 8}}, {"method": "qlora"}),
    "lora": ({"method": "full"}, {}),
    "dpo": ({}, {"data": {"train": "t.jsonl", "format": "preference"}}),
    "distributed.deepspeed": ({}, {"distributed": {"strategy": "deepspeed", "deepspeed": "zero2"}}),
    "distributed.fsdp": ({}, {"distributed": {"strategy": "fsdp"}}),
    "data.packing": ({"model": {"path": "x", "task": "seq2seq"}}, {}),
    "data.labels": ({}, {"model": {"path": "x", "task": "classification"}, "method": "full",
                         "data": {"train": "t.jsonl", "format": "classification"}}),
    "eval.max_new_tokens": ({"model": {"path": "x", "task": "classification"}, "method": "full",
                             "data": {"train": "t.jsonl", "format": "classification"}}, {}),
    "eval.generate_rows": ({"data": {"train": "t.jsonl", "format": "text", "eval_fraction": 0.2}},
                           {"data": {**BASE["data"], "eval_fraction": 0.2}}),
    "data.prompt_template": ({"data": {"train": "t.jsonl", "format": "text"}}, {}),
    "data.qa_template": ({}, {"data": {"train": "t.jsonl", "format": "qa"}}),
    "data.system_prompt": ({"data": {"train": "t.jsonl", "format": "text"}}, {}),
    "train.epochs": ({"train": {"max_steps": 5}}, {}),
    "train.decay_rate": ({"train": {"schedule": "cosine"}}, {"train": {"schedule": "exponential"}}),
    "data.max_eval_rows": ({"data": {**BASE["data"], "eval_fraction": 0.2}}, {"data": {**BASE["data"], "eval": "t.jsonl"}}),
    "train.eval_every": ({}, {"data": {**BASE["data"], "eval_fraction": 0.2}}),
    "train.eval_batch_size": ({}, {"data": {**BASE["data"], "eval_fraction": 0.2}}),
    "report.project": ({}, {"report": {"trackers": ["tensorboard"]}}),
}
# A value each key may take where it is read (sections: empty, all defaults).
VALUES = {"data.packing": True, "data.labels": ["a", "b"], "eval.max_new_tokens": 8, "eval.generate_rows": 4,
          "data.prompt_template": "{source}", "data.qa_template": "{question}", "data.system_prompt": "Be brief.",
          "train.decay_rate": 0.5, "data.max_eval_rows": 4, "train.eval_every": 2, "report.project": "p",
          "distributed.deepspeed": "zero2", "quant.type": "fp4", "train.eval_batch_size": 2, "train.epochs": 2.0}


def merged(*changes: dict) -> dict:
    recipe = copy.deepcopy(BASE)
    for change in copy.deepcopy(changes):
        for key, value in change.items():
            recipe[key] = {**recipe[key], **value} if isinstance(value, dict) and isinstance(recipe.get(key), dict) else value
    return recipe


def given(recipe: dict, key: str) -> dict:
    *sections, last = key.split(".")
    node = recipe
    for section in sections:
        node = node.setdefault(section, {})
    node[last] = copy.deepcopy(VALUES.get(key, {}))
    return recipe


def test_every_scope_names_schema_keys_and_each_scope_is_exercised_here():
    leaves = {key.replace("[]", "") for key, _ in fields()}
    for scope in SCOPES:
        for key in scope.keys:
            assert key in leaves or any(leaf.startswith(key + ".") for leaf in leaves), key
    assert {scope.keys[0] for scope in SCOPES} == set(AWAY_AND_BACK)


@pytest.mark.parametrize("key", AWAY_AND_BACK)
def test_a_key_the_run_would_ignore_is_refused_naming_it_and_accepted_where_read(key):
    away, back = AWAY_AND_BACK[key]
    with pytest.raises(ValidationError, match=f"{key}: applies only "):
        Recipe.model_validate(given(merged(away), key))
    recipe = Recipe.model_validate(given(merged(back), key))
    dumped = recipe.model_dump(mode="json")
    assert Recipe.model_validate(dumped).model_dump(mode="json") == dumped  # the dump validates again, unchanged
    assert lookup(Recipe.model_validate(merged(away)).model_dump(mode="json"), key) is None  # left out of a dump


def test_validate_refuses_in_one_line(tmp_path, capsys):
    (tmp_path / "t.jsonl").write_text('{"source": "a", "target": "b"}\n')
    recipe = merged({"method": "full", "lora": {"r": 8}, "data": {**BASE["data"], "train": str(tmp_path / "t.jsonl")},
                     "output_dir": str(tmp_path / "run")})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lora: applies only with method lora or qlora (this recipe has full)" in err


def test_a_base_or_an_override_that_makes_keys_ignored_leaves_them_out_but_own_ones_are_refused(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"source": "a", "target": "b"}\n')
    base = merged({"lora": {"r": 8}, "train": {"schedule": "exponential", "decay_rate": 0.5}})
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "full.yaml").write_text("base: base.yaml\nmethod: full\n")
    full = load_recipe(tmp_path / "full.yaml")
    assert "lora" not in full.model_dump(mode="json") and full.train.decay_rate == 0.5
    # an override cannot delete a key, so the file's keys it makes ignored go; the override's own are refused
    cosine = load_recipe(tmp_path / "base.yaml", ["train.schedule=cosine", "method=full"])
    assert "decay_rate" not in cosine.model_dump(mode="json")["train"] and "lora" not in cosine.model_dump(mode="json")
    with pytest.raises(UserError, match="lora: applies only with method lora or qlora"):
        load_recipe(tmp_path / "full.yaml", ["lora.r=4"])
    (tmp_path / "own.yaml").write_text("base: base.yaml\nmethod: full\nlora: {alpha: 4}\n")
    with pytest.raises(UserError, match="lora: applies only with method lora or qlora"):
        load_recipe(tmp_path / "own.yaml")


def test_a_run_whose_recipe_yaml_kept_ignored_keys_still_resumes(tmp_path):
    """A run directory written before these keys were left out of dumps: its recipe.yaml is the launcher's, not
    the user's, so what it holds that the run ignores is left out again (an override's own is still refused)."""
    (tmp_path / "t.jsonl").write_text('{"source": "a", "target": "b"}\n')
    dumped = merged({"method": "full", "lora": {"r": 16}, "train": {"schedule": "cosine", "decay_rate": 0.96},
                     "report": {"project": None}, "output_dir": str(tmp_path)})
    dumped["data"]["train"] = str(tmp_path / "t.jsonl")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(dumped))
    recipe = load_run(tmp_path)
    assert recipe.method == "full" and "lora" not in recipe.model_dump(mode="json")
    with pytest.raises(UserError, match="train.decay_steps: applies only with train.schedule exponential"):
        load_run(tmp_path, ["train.decay_steps=10"])


@pytest.mark.parametrize("key,value", [("eval.samples", 2), ("eval.samples", 0), ("eval.generate_rows", 8)])
def test_what_only_an_evaluation_reads_is_refused_without_eval_data_unless_an_override_removed_it(tmp_path, key, value):
    """eval.samples and eval.generate_rows are read by the evaluations only (no other command draws samples);
    the other generation keys are also read by `launcher generate`, so they stay allowed without eval data."""
    (tmp_path / "t.jsonl").write_text('{"source": "a", "target": "b"}\n')
    section, last = key.split(".")
    data = {**BASE["data"], "train": str(tmp_path / "t.jsonl")}
    eval_keys = {"eval": {last: value}} if section == "eval" else {}
    with pytest.raises(ValidationError, match=f"{key}: applies only when data.eval or data.eval_fraction is set"):
        Recipe.model_validate(merged({"data": data}, eval_keys))
    assert Recipe.model_validate(merged({"data": {**data, "eval_fraction": 0.2}}, eval_keys))
    assert Recipe.model_validate(merged({"data": data}, {"eval": {"max_new_tokens": 8, "num_beams": 2}}))
    # eval data removed by an override: the file's key is moot and left out; given by the override itself, refused
    written = merged({"data": {**data, "eval_fraction": 0.2}, "output_dir": str(tmp_path / "o")}, eval_keys)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(written))
    assert lookup(load_recipe(tmp_path / "r.yaml", ["data.eval_fraction=0"]).model_dump(mode="json"), key) is None
    with pytest.raises(UserError, match=f"{key}: applies only when data.eval"):
        load_recipe(tmp_path / "r.yaml", ["data.eval_fraction=0", f"{key}={value}"])


def test_the_eval_batch_is_read_without_eval_data_by_full_dpo_reference_pass():
    pairs = {"data": {"train": "t.jsonl", "format": "preference"}, "train": {"eval_batch_size": 2}}
    assert Recipe.model_validate(merged(pairs, {"method": "full"})).train.eval_batch() == 2
    with pytest.raises(ValidationError, match="train.eval_batch_size: applies only when data.eval or"):
        Recipe.model_validate(merged(pairs))  # lora: the reference is the adapter disabled, no reference pass
