"""The pieces of a run, each on its own: schedules, penalty, freezing, data order, inspect."""
import math

import pytest
import torch

from launcher.data.batching import StepPlan, eval_batches
from launcher.errors import UserError
from launcher.training.optim import l2_penalty, lr_multiplier
from launcher.recipe.schema import Recipe, TrainSection


def test_exponential_schedule_is_the_seed_formula():
    train = TrainSection(schedule="exponential", decay_rate=0.5, decay_steps=10, warmup_steps=0)
    for step in (0, 5, 10, 25):
        assert lr_multiplier(step, train, 100) == pytest.approx(0.5 ** (step / 10))


def test_warmup_then_linear_and_cosine_shapes():
    linear = TrainSection(schedule="linear", warmup_steps=4)
    assert [lr_multiplier(s, linear, 14) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lr_multiplier(4, linear, 14) == 1.0 and lr_multiplier(14, linear, 14) == 0.0
    cosine = TrainSection(schedule="cosine")
    assert lr_multiplier(50, cosine, 100) == pytest.approx(0.5)
    assert lr_multiplier(7, TrainSection(schedule="constant"), 10) == 1.0


def test_a_warmup_longer_than_the_steps_the_epochs_give_is_refused_naming_both():
    """max_steps is known to the schema; the steps epochs give are known once the rows are tokenised (before the
    model loads): 40 rows in global batches of 4 is 10 steps an epoch."""
    plan = StepPlan(rows=40, micro=2, accum=2, world=1, rank=0, seed=0)
    assert plan.total_steps(1.5, None, 15) == 15 and plan.total_steps(None, 3, 0) == 3
    with pytest.raises(UserError, match=r"train.warmup_steps 16 is more than the run's 15 steps \(train.epochs 1.5 x 10 "):
        plan.total_steps(1.5, None, 16)
    with pytest.raises(ValueError, match=r"train.warmup_steps 4 is more than the run's 3 steps \(train.max_steps\)"):
        TrainSection(max_steps=3, warmup_steps=4)


def test_l2_penalty_sums_squares_of_trainable_parameters_only():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model[1].requires_grad_(False)
    expected = 0.1 * sum(p.pow(2).sum() for p in model[0].parameters())
    assert l2_penalty(model, 0.1).item() == pytest.approx(expected.item())
    assert l2_penalty(model, 0.0) == 0.0


def test_freeze_embeddings_first_blocks_and_patterns(tiny_model):
    from transformers import AutoModelForCausalLM

    from launcher.model.loading import freeze
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    recipe = Recipe.model_validate({"model": {"path": "x"}, "method": "full", "data": {"train": "x.jsonl"},
                                    "output_dir": "x", "freeze": {"embeddings": True, "first_n_blocks": 1,
                                                                  "patterns": [r"layers\.1\.mlp\.up_proj"]}})
    frozen = set(freeze(model, recipe))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.embed_tokens.weight" in frozen
    assert {n for n in frozen if ".layers.0." in n} == {n for n, _ in model.named_parameters() if ".layers.0." in n}
    assert "model.layers.1.mlp.up_proj.weight" in frozen
    assert "model.layers.1.mlp.down_proj.weight" in trainable and "lm_head.weight" in trainable


def test_n_processes_see_the_same_global_batches_as_one():
    one = StepPlan(rows=40, micro=4, accum=2, world=1, rank=0, seed=1)
    two = [StepPlan(rows=40, micro=2, accum=2, world=2, rank=r, seed=1) for r in range(2)]
    for step in range(one.steps_per_epoch * 2):
        single = one.micro_batches(step)
        split = [plan.micro_batches(step) for plan in two]
        for a in range(2):
            assert single[a] == split[0][a] + split[1][a]
    first_epoch = [i for s in range(5) for batch in one.micro_batches(s) for i in batch]
    assert sorted(first_epoch) == list(range(40)), "an epoch visits every row once"
    assert one.micro_batches(0) != one.micro_batches(5), "each epoch reshuffles"
    assert one.total_steps(epochs=1.5, max_steps=None) == 8 and one.total_steps(None, 3) == 3


def test_eval_batches_give_every_rank_the_same_number_of_passes():
    per_rank = [list(eval_batches(rows=10, size=3, world=3, rank=r)) for r in range(3)]
    assert [len(batches) for batches in per_rank] == [2, 2, 2]
    real_rows = sorted(i for batches in per_rank for rows, real in batches if real for i in rows)
    assert real_rows == list(range(10))


def test_inspect_counts_trained_tokens(tmp_path, tiny_model):
    from rich.console import Console

    from launcher.commands.inspect import show
    from launcher.recipe.files import load_recipe
    from support import tiny_recipe, write_recipe
    recipe = load_recipe(write_recipe(tiny_recipe(tiny_model, tmp_path / "run", data={"max_train_rows": 20}), tmp_path / "r.yaml"))
    console = Console(record=True, width=200)
    counts = show(recipe, 1, console)
    assert counts["rows"] == counts["kept"] == 20
    assert 0.1 < counts["trained_fraction"] < 0.9
    assert "example 0" in console.export_text()


def test_compiled_training_matches_eager_and_saves_the_same_keys(tmp_path, tiny_model):
    from safetensors import safe_open

    from launcher.cli import main
    from support import tiny_recipe, train_losses, write_recipe
    from torch._dynamo.utils import counters
    finals = {}
    counters.clear()
    for compiled in (False, True):
        run = tmp_path / f"compile-{compiled}"
        recipe = tiny_recipe(tiny_model, run, lora={"r": 4, "alpha": 8, "dropout": 0.0},  # inductor draws its own dropout masks
                             data={"eval": None, "max_train_rows": 64}, train={"max_steps": 3, "compile": compiled})
        assert main([str(write_recipe(recipe, tmp_path / f"r-{compiled}.yaml"))]) == 0
        finals[compiled] = run
        assert (counters["stats"]["unique_graphs"] > 0) == compiled, "dynamo must trace the compiled run, and only it"
    eager, compiled = train_losses(finals[False]), train_losses(finals[True])
    assert list(compiled) == [1, 2, 3]
    assert [compiled[s] for s in compiled] == pytest.approx([eager[s] for s in eager], rel=1e-4)
    keys = {}
    for flag, run in finals.items():
        with safe_open(run / "final" / "adapter_model.safetensors", "pt") as weights:
            keys[flag] = set(weights.keys())
    assert keys[True] == keys[False] and not any("_orig_mod" in key for key in keys[True])


def test_compile_without_a_compiler_is_refused(tmp_path, monkeypatch):
    from launcher.preflight.checks import check_compiler
    from launcher.errors import UserError
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(UserError, match="train.compile on CPU needs a C\\+\\+ compiler"):
        check_compiler("cpu")
