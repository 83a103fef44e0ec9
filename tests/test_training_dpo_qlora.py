"""QLoRA DPO: the reference is the 4-bit base with the adapter disabled, so the run holds one quantised model
and its first step compares the policy with itself (loss log 2). One 1-process run (in-process, logging to
TensorBoard) is the straight run; a copy of it cut back to its step-2 checkpoint must resume to the same steps and
adapter bitwise, and a 2-process FSDP2 run (the 4-bit base sharded) must match it per step."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import yaml

from support import launch_two, load_tensors, ok, pair_recipe, rewind, run_here, train_losses, without_eval, write_recipe

STEPS = 4


@pytest.fixture(scope="module")
def straight(tiny_model, tmp_path_factory):
    """4 QLoRA DPO steps of 4 pairs (2 x 2 accumulated), a checkpoint every 2, no dropout; TensorBoard offline."""
    folder = tmp_path_factory.mktemp("dpo-qlora")
    recipe = pair_recipe(tiny_model, folder, method="qlora", dpo={"beta": 0.5}, eval={"samples": 0}, lora={"dropout": 0.0},
                         train={"max_steps": STEPS, "lr": 2e-2, "micro_batch_size": 2, "grad_accum": 2, "save_every": 2},
                         report={"trackers": ["tensorboard"], "project": "dpo"})
    result = ok(run_here(["train", write_recipe(recipe, folder / "qlora.yaml")]))
    return folder, result.stdout


def records(run, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("kind") == kind]


def test_a_qlora_dpo_run_starts_at_its_4bit_reference_and_learns(straight):
    folder, stdout = straight
    steps, evals = records(folder / "run", "train"), records(folder / "run", "eval")
    assert "quantised" in stdout, "the base is loaded in 4 bits"
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the adapter starts at 0: policy = reference
    assert evals[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6) and evals[0]["eval_reward_margin"] == 0
    assert steps[-1]["loss"] < steps[0]["loss"] and steps[-1]["reward_margin"] > 0
    assert evals[-1]["eval_loss"] < math.log(2) and evals[-1]["eval_reward_accuracy"] > evals[0]["eval_reward_accuracy"]


def test_the_trackers_receive_the_dpo_metrics(straight):
    """metrics.jsonl's DPO numbers reach the recipe's trackers (report/trackers.py, one mapping for every tracker):
    rewards, reward accuracy and margin per step; held-out preference accuracy per evaluation."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    folder, _ = straight
    runs = EventMultiplexer().AddRunsFromDirectory(str(folder / "run" / "tb")).Reload()
    tags = set(runs.GetAccumulator("dpo").Tags()["scalars"])
    pairs = ("rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin", "preference_accuracy")
    assert {f"train/{name}" for name in ("loss", *pairs)} <= tags and {f"eval/{name}" for name in ("loss", *pairs)} <= tags
    logged = {e.step: e.value for e in runs.Scalars("dpo", "train/reward_margin")}
    assert logged == pytest.approx({s["step"]: s["reward_margin"] for s in records(folder / "run", "train")}, abs=1e-6)
    held_out = [(e.step, e.value) for e in runs.Scalars("dpo", "eval/preference_accuracy")]
    assert held_out == [(r["step"], pytest.approx(r["eval_preference_accuracy"])) for r in records(folder / "run", "eval")]


def test_a_resumed_qlora_dpo_run_is_bitwise_the_straight_one(straight, tmp_path):
    """The straight run's folder, cut back to its step-2 checkpoint (metrics of later steps dropped), trains again:
    one more run, which reloads the 4-bit base and the adapter and must give the same losses and adapter bitwise."""
    folder, _ = straight
    shutil.copytree(folder / "run", tmp_path / "run")
    rewind(tmp_path / "run", 2)
    kept = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if json.loads(line).get("step", 0) <= 2]
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
    recipe = yaml.safe_load((folder / "qlora.yaml").read_text())
    recipe["output_dir"] = str(tmp_path / "run")
    resumed = ok(run_here(["train", write_recipe(recipe, tmp_path / "resume.yaml")])).stdout
    assert "resuming from" in resumed and "step-2" in resumed
    assert [s["step"] for s in records(tmp_path / "run", "train")] == list(range(1, STEPS + 1))
    assert train_losses(tmp_path / "run") == train_losses(folder / "run")  # bitwise, not approx
    ours, theirs = load_tensors(tmp_path / "run" / "final"), load_tensors(folder / "run" / "final")
    assert ours.keys() == theirs.keys() and all(ours[name].equal(theirs[name]) for name in theirs)


@pytest.mark.multiproc
def test_two_fsdp2_processes_match_one_per_step(straight, tmp_path):
    """FSDP2 shards the 4-bit base (stored in the compute dtype); the reference is still that base, adapter disabled."""
    folder, _ = straight
    recipe = yaml.safe_load((folder / "qlora.yaml").read_text())
    recipe["train"]["micro_batch_size"] = 1  # 1 x 2 accumulated x 2 ranks = the same 4 pairs a step
    recipe["distributed"], recipe["output_dir"] = {"strategy": "fsdp"}, str(tmp_path / "run")
    recipe.pop("report")
    ok(launch_two(["train", write_recipe(without_eval(recipe), tmp_path / "fsdp.yaml")]))  # evaluation changes no step
    one, two = train_losses(folder / "run"), train_losses(tmp_path / "run")
    assert sorted(two) == list(range(1, STEPS + 1))
    for step, loss in one.items():
        assert two[step] == pytest.approx(loss, rel=1e-5, abs=1e-7), step
