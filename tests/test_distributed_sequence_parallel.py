"""Ulysses sequence parallelism (distributed.sequence_parallel 2) on 2 CPU processes over gloo, against one process.

The two processes form one sequence group: both read the same rows, each trains on half of every
row (the 64-token rows are longer than one rank's share), and DeepSpeed's attention all-to-alls
heads for sequence so each still attends over the whole row. Per-step losses and gradient norms
must equal a 1-process run on the same global batches within 1e-5, and so must the saved weights: LoRA under ZeRO-2 against an
in-process DDP run (eval loss and metrics too: eval runs whole rows), full fine-tuning under ZeRO-3
against a 1-process ZeRO-3 run (the same engine: DeepSpeed sums a full model's squared gradients in
another order than torch's clip_grad_norm_, about 1e-5 apart on their own). ZeRO-2 and ZeRO-3
average the gradients over different counts under the split, so both are covered.
"""
import json

import pytest
import yaml

from launcher.cli import main
from launcher.data.batching import collate
from launcher.distributed.sequence import split_batch
from launcher.model.loss import objective_count, target_count
from launcher.recipe.formats import IGNORE
from launcher.recipe.schema import Recipe
from support import comparable_recipe, launch, launch_two, load_tensors, ok, rank_record, tiny_recipe

RTOL = 1e-5
WEIGHT_ATOL = 1e-5


def _steps(run) -> dict[int, tuple[float, float]]:
    """step -> (loss, grad_norm) from metrics.jsonl."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in records if r.get("kind") == "train"}


def _evals(run) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if isinstance(v, float)} for r in records if r.get("kind") == "eval"]


def _same_steps(seen: dict, expected: dict) -> None:
    assert sorted(seen) == sorted(expected) and len({loss for loss, _ in expected.values()}) == len(expected)
    for step, (loss, norm) in expected.items():
        assert seen[step][0] == pytest.approx(loss, rel=RTOL), f"step {step} loss: {seen} vs {expected}"
        assert seen[step][1] == pytest.approx(norm, rel=RTOL), f"step {step} gradient norm: {seen} vs {expected}"


def _with_eval(path, model):
    """The comparable recipe with the tiny recipe's eval rows put back (its dropout stays 0)."""
    recipe = yaml.safe_load(path.read_text())
    recipe["data"].update({key: tiny_recipe(model, path)["data"][key] for key in ("eval", "max_eval_rows")})
    path.write_text(yaml.safe_dump(recipe))
    return path


def _full(path):
    recipe = yaml.safe_load(path.read_text())
    recipe.pop("lora", None)  # tiny_recipe drops it already under method full
    path.write_text(yaml.safe_dump(recipe))
    return path


def _same_weights(run, reference) -> None:
    """The saved adapter (or model) equals the 1-process one: every gradient of every step went into it."""
    import torch
    got, want = load_tensors(run / "final"), load_tensors(reference / "final")
    assert got.keys() == want.keys() and got
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, atol=WEIGHT_ATOL, rtol=0, msg=name)


def _split_on_every_rank(run) -> None:
    """DeepSpeed's engine ran with the sequence group (its all-to-all attention registered) on both processes."""
    assert [rank_record(run, rank, "sequence_parallel")["sequence_parallel"] for rank in (0, 1)] == [2, 2]


@pytest.mark.multiproc
@pytest.mark.slow
def test_lora_split_over_two_processes_matches_one(tiny_model, tmp_path):
    one = _with_eval(comparable_recipe(tiny_model, tmp_path / "one", "lora", {}), tiny_model)
    assert main(["train", str(one)]) == 0  # in-process: micro 2 x accum 2 on one process
    split = _with_eval(comparable_recipe(tiny_model, tmp_path / "split", "lora",
                                         {"strategy": "deepspeed", "deepspeed": "zero2", "sequence_parallel": 2}), tiny_model)
    result = ok(launch_two([split]))
    assert "2 micro x 2 accum x 1 sequence groups of 2 processes" in result.stdout
    _split_on_every_rank(tmp_path / "split" / "run")
    _same_steps(_steps(tmp_path / "split" / "run"), _steps(tmp_path / "one" / "run"))
    _same_weights(tmp_path / "split" / "run", tmp_path / "one" / "run")
    seen, expected = _evals(tmp_path / "split" / "run"), _evals(tmp_path / "one" / "run")
    assert len(seen) == len(expected) == 2 and "eval_loss" in expected[0]
    for got, want in zip(seen, expected):
        assert got == pytest.approx(want, rel=RTOL)


@pytest.mark.multiproc
@pytest.mark.slow
def test_full_fine_tuning_split_under_zero3_matches_one(tiny_model, tmp_path):
    zero3 = {"strategy": "deepspeed", "deepspeed": "zero3"}
    one = _full(comparable_recipe(tiny_model, tmp_path / "one", "full", zero3, micro_batch_size=2))
    ok(launch([one]))
    split = _full(comparable_recipe(tiny_model, tmp_path / "split", "full", {**zero3, "sequence_parallel": 2}))
    ok(launch_two([split]))
    _split_on_every_rank(tmp_path / "split" / "run")
    _same_steps(_steps(tmp_path / "split" / "run"), _steps(tmp_path / "one" / "run"))
    _same_weights(tmp_path / "split" / "run", tmp_path / "one" / "run")


def test_split_keeps_targets_masks_and_positions(tiny_model, tmp_path):
    """A collated batch of rows with masked prompts, split in two: the targets are shifted before the split (the
    target of rank 0's last position is rank 1's first token), masked targets stay masked, positions stay global."""
    rows = [{"input_ids": [11, 12, 13, 14, 15, 16, 17], "labels": [IGNORE, IGNORE, IGNORE, IGNORE, 15, 16, 17]},
            {"input_ids": [21, 22, 23, 24], "labels": [IGNORE, IGNORE, 23, 24]}]
    batch = collate(rows, pad_id=0, multiple=2)
    assert batch["input_ids"].shape == (2, 8), "7 tokens padded to 8: each rank takes 4"
    first, second = split_batch(batch, 2, 0), split_batch(batch, 2, 1)
    assert first["input_ids"].tolist() == [[11, 12, 13, 14], [21, 22, 23, 24]]
    assert second["input_ids"].tolist() == [[15, 16, 17, 0], [0, 0, 0, 0]]
    assert first["shift_labels"].tolist() == [[IGNORE, IGNORE, IGNORE, 15], [IGNORE, 23, 24, IGNORE]]
    assert second["shift_labels"].tolist() == [[16, 17, IGNORE, IGNORE], [IGNORE] * 4]
    assert first["position_ids"].tolist() == [[0, 1, 2, 3]] * 2 and second["position_ids"].tolist() == [[4, 5, 6, 7]] * 2
    assert (first["attention_mask"].sum() + second["attention_mask"].sum()).item() == 11
    recipe = Recipe.model_validate(tiny_recipe(tiny_model, tmp_path / "run"))
    halves = objective_count(first, recipe) + objective_count(second, recipe)
    assert halves.item() == target_count(batch["labels"], "causal-lm").item() == 5


def test_resume_holds_the_global_batch_of_sequence_groups(tiny_model, tmp_path):
    """A sequence group reads one batch: 2 processes split 2 ways read micro 2 x accum 2 = 4 rows a step, and so
    resume as they were; 4 processes are 2 groups, which hold those 4 rows with grad_accum 1."""
    from launcher.training.rescale import hold_global_batch
    split = {"strategy": "deepspeed", "deepspeed": "zero2", "sequence_parallel": 2}
    recipe = Recipe.model_validate(tiny_recipe(tiny_model, tmp_path / "run", distributed=split))
    state = {"world_size": 2, "global_batch": 4}
    assert hold_global_batch(recipe, state, 2) == (recipe, None)
    held, line = hold_global_batch(recipe, state, 4)
    assert held.train.grad_accum == 1 and "train.grad_accum 2 -> 1" in line


def test_a_split_the_attention_heads_do_not_share_is_refused_in_one_line():
    from types import SimpleNamespace

    from launcher.distributed.sequence import check_heads
    from launcher.errors import UserError
    check_heads(SimpleNamespace(num_attention_heads=32, num_key_value_heads=8), 8)  # Llama-3.1-8B split 8 ways
    check_heads(SimpleNamespace(num_attention_heads=32, num_key_value_heads=2), 8)  # each rank gets a copy of a KV head
    with pytest.raises(UserError, match="^distributed.sequence_parallel 4: the model has 2 attention heads") as refused:
        check_heads(SimpleNamespace(num_attention_heads=2, num_key_value_heads=2), 4)
    assert "\n" not in str(refused.value)
