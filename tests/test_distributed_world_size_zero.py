"""ZeRO-1, 2 and 3 full fine-tuning resumed on another process count, through DeepSpeed universal checkpoints.

ZeRO saves each rank's flat slice of the weights and optimiser state, laid out for the process count
that wrote it; the launcher converts such a checkpoint once into `universal/` beside it
(launcher/checkpoint/universal.py) and loads that on the new count, holding the global batch. For each
stage, on the Bible sample with no dropout (fp32 on CPU, so only the reduction order differs):
- straight: 6 steps on 1 process at micro 2 x accum 4 (global batch 8), saving every 3 steps;
- 2 -> 1: 3 steps on 2 processes at micro 2 x accum 2, resumed on 1 process (converted, accum 2 -> 4):
  steps 4-6 and the final weights equal the straight run's;
- second resume: that run rewound to step 3 and resumed on 1 process again reuses the conversion,
  its files untouched, and gives the same steps 4-6;
- 1 -> 2: the straight run rewound to step 3 and resumed on 2 processes (converted, accum 4 -> 2).
Five launches a stage (10-25 s each), so each stage is one test.
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
STAGES = ["zero1", "zero2", "zero3"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("zero-world-llama"))


def recipe_for(model: Path, folder: Path, stage: str, grad_accum: int) -> Path:
    return comparable_recipe(model, folder, "full", {"strategy": "deepspeed", "deepspeed": stage},
                             max_steps=STEPS, save_every=HALF, grad_accum=grad_accum)


def assert_continues_the_straight_run(run: Path, losses: dict, weights: dict) -> None:
    """Steps 4-6 as the straight run's (steps 1-3 came from before the stop), and the same final weights."""
    import torch
    seen = train_losses(run)
    assert sorted(seen) == list(range(1, STEPS + 1))
    for step in range(HALF + 1, STEPS + 1):
        assert seen[step] == pytest.approx(losses[step], rel=LOSS_RTOL), f"step {step}: {seen} vs {losses}"
    got = load_tensors(run / "final")
    assert got.keys() == weights.keys()
    for key, value in weights.items():
        torch.testing.assert_close(got[key].float(), value.float(), atol=WEIGHT_ATOL, rtol=0, msg=key)


def assert_converted(stdout: str, checkpoint: Path) -> None:
    assert stdout.count("converted ") == 1 and "DeepSpeed universal checkpoint" in stdout, stdout[-3000:]
    assert (checkpoint / "universal").is_dir() and not (checkpoint / "universal.tmp").exists()


def written_by(checkpoint: Path) -> int:
    return json.loads((checkpoint / "trainer_state.json").read_text())["world_size"]


def conversion_times(converted: Path) -> dict:
    return {str(f.relative_to(converted)): f.stat().st_mtime_ns for f in converted.rglob("*") if f.is_file()}


@pytest.mark.parametrize("stage", STAGES)
def test_zero_full_fine_tuning_resumes_on_another_process_count(stage, model, tmp_path):
    straight = recipe_for(model, tmp_path / "straight", stage, grad_accum=4)
    two = recipe_for(model, tmp_path / "two", stage, grad_accum=2)
    run, losses, weights = straight_then_stopped(straight, two, HALF)
    assert sorted(losses) == list(range(1, STEPS + 1))
    stopped = tmp_path / "two" / "run"
    checkpoint = stopped / "checkpoints" / f"step-{HALF}"
    assert written_by(checkpoint) == 2 and not (checkpoint / "universal").exists()
    to_one = ok(launch([two]))
    assert "resuming on 1 process (the checkpoint was written by 2)" in to_one.stdout
    assert "train.grad_accum 2 -> 4" in to_one.stdout
    assert_converted(to_one.stdout, checkpoint)
    assert_continues_the_straight_run(stopped, losses, weights)

    converted = conversion_times(checkpoint / "universal")
    assert any(name.endswith("optimizer_state.pt") for name in converted), sorted(converted)
    rewind(stopped, HALF)
    again = ok(launch([two]))
    assert "reusing the conversion of" in again.stdout and "converted " not in again.stdout, again.stdout[-3000:]
    assert conversion_times(checkpoint / "universal") == converted
    assert_continues_the_straight_run(stopped, losses, weights)

    rewind(run, HALF)
    to_two = ok(launch_two([straight]))
    assert "resuming on 2 processes (the checkpoint was written by 1)" in to_two.stdout
    assert "train.grad_accum 4 -> 2" in to_two.stdout
    assert_converted(to_two.stdout, run / "checkpoints" / f"step-{HALF}")
    assert_continues_the_straight_run(run, losses, weights)
    assert written_by(run / "checkpoints" / f"step-{STEPS}") == 2
    shutil.rmtree(tmp_path)
