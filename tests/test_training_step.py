"""One optimiser step, in-process: what `train_step` computes and what it reports."""
from __future__ import annotations

import threading

import pytest
import torch
from support import tiny_recipe, without_eval

from launcher.model.loss import target_count, task_loss_sum
from launcher.training.optim import lr_multiplier
from launcher.recipe.schema import Recipe
from launcher.training.loop import setup, train_step


def session_for(tiny_model, tmp_path, **train):
    """A one-process run set up in this process: plain SGD (update = -lr * grad), no dropout, no clipping, no eval."""
    recipe = tiny_recipe(tiny_model, tmp_path / "run", lora={"r": 4, "alpha": 8, "dropout": 0.0},
                         train={"optimizer": "sgd", "max_grad_norm": None, "schedule": "linear", "warmup_steps": 0, **train})
    recipe = without_eval(recipe)
    return setup(Recipe.model_validate(recipe))


def trainable(session) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in session.model.named_parameters() if p.requires_grad}


def mean_loss_and_grads(session, batches) -> tuple[float, dict[str, torch.Tensor]]:
    """The definition: summed cross-entropy over every target of the step, divided by their number."""
    model = session.model
    total = sum(task_loss_sum(model, batch, "causal-lm")[0] for batch in batches)
    targets = sum(target_count(batch["labels"], "causal-lm") for batch in batches)
    (total / targets).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return (total / targets).item(), grads


@pytest.mark.parametrize("micro,accum", [(4, 1), (2, 2), (1, 4)])
def test_loss_is_normalised_over_every_target_of_the_step_however_it_is_split(tiny_model, tmp_path, micro, accum):
    """Micro-batches with different target counts: a per-micro-batch mean would weigh the small one more; the step must not."""
    session = session_for(tiny_model, tmp_path, micro_batch_size=micro, grad_accum=accum, lr=0.5)
    batches = session.micro_batches(0)
    counts = {int(target_count(b["labels"], "causal-lm")) for b in batches}
    assert len(batches) == accum and len(counts) >= (2 if accum > 1 else 1), "micro-batches must differ in target count"
    expected_loss, grads = mean_loss_and_grads(session, batches)
    before = trainable(session)
    stats = train_step(session, batches)
    assert stats.loss == pytest.approx(expected_loss, rel=1e-6)
    after = trainable(session)
    for name, grad in grads.items():
        torch.testing.assert_close(after[name] - before[name], -stats.lr * grad, rtol=1e-4, atol=1e-7)


def test_reported_learning_rate_is_the_one_the_update_used(tiny_model, tmp_path):
    """With warmup the rate changes every step: step 1 trains at lr x 1/4, and must say so (not step 2's 2/4)."""
    session = session_for(tiny_model, tmp_path, micro_batch_size=2, grad_accum=1, lr=0.2, warmup_steps=3)
    batches = session.micro_batches(0)
    _, grads = mean_loss_and_grads(session, batches)
    before = trainable(session)
    stats = train_step(session, batches)
    assert stats.lr == pytest.approx(0.2 * lr_multiplier(0, session.recipe.train, session.total_steps)) == pytest.approx(0.05)
    after = trainable(session)
    for name, grad in grads.items():
        torch.testing.assert_close(after[name] - before[name], -stats.lr * grad, rtol=1e-4, atol=1e-7)
    later = train_step(session, session.micro_batches(1))
    assert later.lr == pytest.approx(0.1), "step 2 trains at lr x 2/4"


def test_step_counts_tokens_and_padding_slots(tiny_model, tmp_path):
    session = session_for(tiny_model, tmp_path, micro_batch_size=2, grad_accum=2)
    batches = session.micro_batches(0)
    stats = train_step(session, batches)
    assert stats.tokens == sum(int(b["attention_mask"].sum()) for b in batches)
    assert stats.slots == sum(b["attention_mask"].numel() for b in batches) >= stats.tokens
    assert stats.grad_norm is None and stats.seconds > 0


def test_a_whole_run_in_process_exports_a_config_that_generates_with_its_cache(tiny_model, tmp_path):
    """setup -> fit -> finish without a subprocess; training switches the KV cache off per call, never in the saved config."""
    import json

    from launcher.training.loop import StopRequest, finish, fit
    recipe = tiny_recipe(tiny_model, tmp_path / "run", method="full", train={"max_steps": 2, "micro_batch_size": 2})
    recipe = without_eval(recipe)
    session = setup(Recipe.model_validate(recipe))
    try:
        assert fit(session, StopRequest()) is False and session.step == 2
        final = finish(session)
    finally:
        session.console.close()
    assert json.loads((final / "config.json").read_text()).get("use_cache") is not False
    records = list(map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()))
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]


def test_an_unpadded_step_takes_the_causal_attention_kernel_and_starts_no_thread(tiny_model, tmp_path):
    """Issue #29: a batch without padding must reach SDPA with no explicit mask and is_causal set (the fast
    causal kernel), and a training step must not start a thread that competes with torch's for the cores."""
    session = session_for(tiny_model, tmp_path, micro_batch_size=1, grad_accum=1)
    batches = session.micro_batches(0)
    assert bool(batches[0]["attention_mask"].all()), "one row per micro-batch: nothing to pad"
    threads = set(threading.enumerate())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as profiled:
        train_step(session, batches)
    assert set(threading.enumerate()) == threads
    calls = [e for e in profiled.events() if e.name == "aten::scaled_dot_product_attention"]
    assert len(calls) == session.model.config.num_hidden_layers  # one forward call per layer
    for call in calls:  # inputs: query, key, value, attn_mask, dropout_p, is_causal, ...
        assert call.input_shapes[3] == [] and call.concrete_inputs[5] is True
