"""Resuming on another process count: exact, with the global batch held, for DDP, ZeRO-2, ZeRO-3 and FSDP2.

Each case is a LoRA run (adapter-only checkpoints, launcher/layouts.py) on the Bible sample:
- straight: 6 steps on 1 process at micro 2 x accum 4 (global batch 8);
- 2 -> 1: 3 steps on 2 processes at micro 2 x accum 2, then the same recipe on 1 process, which
  re-derives accum 4; steps 4-6 and the final adapter must match the straight run;
- 1 -> 2: the straight run rewound to its step-3 checkpoint and resumed on 2 processes (accum 4 -> 2).
The 2-process checkpoint's size is checked against the adapter and its optimiser state.
"""
import json
import shutil
from pathlib import Path

import pytest

from support import build_tiny_llama, comparable_recipe, launch, launch_two, load_tensors, ok, rewind, straight_then_stopped, train_losses

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

STEPS, HALF = 6, 3
LOSS_RTOL = 1e-5   # fp32 on CPU: only the reduction order differs between 1 and 2 processes
WEIGHT_ATOL = 1e-5
CASES = {"ddp": {"strategy": "ddp"}, "zero2": {"strategy": "deepspeed", "deepspeed": "zero2"},
         "zero3": {"strategy": "deepspeed", "deepspeed": "zero3"}, "fsdp": {"strategy": "fsdp"}}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("world-llama"))


def recipe_for(model: Path, folder: Path, distributed: dict, grad_accum: int) -> Path:
    return comparable_recipe(model, folder, "lora", distributed, max_steps=STEPS, save_every=HALF, grad_accum=grad_accum)


def assert_continues_the_straight_run(run: Path, losses: dict, adapter: dict) -> None:
    import torch
    seen = train_losses(run)
    assert sorted(seen) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert seen[step] == pytest.approx(losses[step], rel=LOSS_RTOL), f"step {step}: {seen} vs {losses}"
    got = load_tensors(run / "final")
    assert got.keys() == adapter.keys()
    for key, value in adapter.items():
        torch.testing.assert_close(got[key], value, atol=WEIGHT_ATOL, rtol=0, msg=key)


def assert_adapter_only(checkpoint: Path, adapter: dict, base: Path) -> None:
    """Trainable weights + two Adam moments, plus schedule and RNG: a small multiple of the adapter, not the base."""
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapter.values())
    held = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
    base_bytes = (base / "model.safetensors").stat().st_size
    with_moments = 3 * adapter_bytes  # the weights and Adam's two moments, in fp32
    assert (checkpoint / "trainable.pt").stat().st_size <= 2 * with_moments, (held, adapter_bytes)
    assert held <= 3 * with_moments, f"checkpoint {held} bytes for an adapter of {adapter_bytes}"
    # the embedding and head are about 90% of the tiny base: a checkpoint holding either would pass a fifth of it
    assert held < base_bytes / 5, f"checkpoint {held} bytes against a base of {base_bytes}"


@pytest.mark.parametrize("name", list(CASES))
def test_resume_on_another_process_count_continues_the_straight_run(name, model, tmp_path):
    distributed = CASES[name]
    straight = recipe_for(model, tmp_path / "straight", distributed, grad_accum=4)
    two = recipe_for(model, tmp_path / "two", distributed, grad_accum=2)
    run, losses, adapter = straight_then_stopped(straight, two, HALF)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert_adapter_only(tmp_path / "two" / "run" / "checkpoints" / f"step-{HALF}", adapter, model)
    to_one = ok(launch([two]))
    assert "resuming on 1 process (the checkpoint was written by 2)" in to_one.stdout
    assert "train.grad_accum 2 -> 4" in to_one.stdout
    assert_continues_the_straight_run(tmp_path / "two" / "run", losses, adapter)

    rewind(run, HALF)
    to_two = ok(launch_two([straight]))
    assert "train.grad_accum 4 -> 2" in to_two.stdout
    assert_continues_the_straight_run(run, losses, adapter)
    assert json.loads((run / "checkpoints" / f"step-{STEPS}" / "trainer_state.json").read_text())["world_size"] == 2
    shutil.rmtree(tmp_path)
