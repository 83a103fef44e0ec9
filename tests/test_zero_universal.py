"""DeepSpeed ZeRO full fine-tuning resumed on another process count, through a universal checkpoint.

A straight run trains 6 steps on 1 process (micro 2 x accum 4). The same recipe on 2 processes
(accum 2) stops at step 3 and resumes on 1 process: the launcher converts step-3 to a universal
checkpoint once, holds the global batch (accum 2 -> 4), and steps 4-6 must equal the straight run.
It then rewinds to step 3 and resumes again, reusing the conversion. ZeRO-2 only, to keep the suite
short: the launcher's code is the same for every stage (DeepSpeed's converter reads the stage), and
ZeRO-3 was checked by hand the same way.
"""
import pytest

from support import build_tiny_llama, launch, launch_two, ok, rewind, tiny_recipe, train_losses, write_recipe

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

STEPS, HALF = 6, 3
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("zero-llama"))


def full_recipe(model, folder, stage: str, grad_accum: int):
    recipe = tiny_recipe(model, folder / "run", method="full", distributed={"strategy": "deepspeed", "deepspeed": stage},
                         train={"max_steps": STEPS, "save_every": HALF, "keep_last": 3, "grad_accum": grad_accum, "lr": 1e-3})
    recipe.pop("lora")
    for key in ("eval", "max_eval_rows"):
        recipe["data"].pop(key)
    folder.mkdir(parents=True, exist_ok=True)
    return write_recipe(recipe, folder / "recipe.yaml")


def assert_continues(run, losses: dict) -> None:
    seen = train_losses(run)
    for step in range(HALF + 1, STEPS + 1):
        assert seen[step] == pytest.approx(losses[step], rel=LOSS_RTOL), f"step {step}: {seen} vs {losses}"


def test_zero2_full_fine_tuning_resumes_on_one_process_and_reuses_the_conversion(model, tmp_path):
    ok(launch([full_recipe(model, tmp_path / "straight", "zero2", grad_accum=4)]))
    straight_losses = train_losses(tmp_path / "straight" / "run")
    assert len(set(straight_losses.values())) == STEPS, "losses should vary from step to step"
    recipe = full_recipe(model, tmp_path / "two", "zero2", grad_accum=2)
    run = tmp_path / "two" / "run"
    ok(launch_two([recipe, f"train.max_steps={HALF}"]))
    first = ok(launch([recipe]))
    assert "train.grad_accum 2 -> 4" in first.stdout
    assert "converted " in first.stdout and "to a DeepSpeed universal checkpoint" in first.stdout
    assert_continues(run, straight_losses)
    converted = run / "checkpoints" / f"step-{HALF}" / "universal"
    assert not converted.with_name("universal.tmp").exists()
    marker = converted / "pytorch_model" / "zero" / "optimizer_state.pt"
    written = marker.stat().st_mtime_ns
    rewind(run, HALF)
    second = ok(launch([recipe]))
    assert "reusing the conversion of" in second.stdout and "converted " not in second.stdout
    assert marker.stat().st_mtime_ns == written
    assert_continues(run, straight_losses)
