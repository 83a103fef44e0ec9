"""Hybrid sharding (HSDP) on 4 CPU processes as a 2 x 2 mesh: FSDP2 shards each block inside a pair of
processes and all-reduces gradients across the pairs (distributed.replicate 2). Full fine-tuning, so
the checkpoint is torch.distributed.checkpoint shards laid out for that mesh.

One 4-process run of 5 steps (micro 2 x accum 1 x 4) against a 1-process run on the same global
batches (micro 2 x accum 4); then the 4-process run rewound to its step-3 checkpoint resumes on 1
process (replicate 1: the mesh is part of the launch, not of the run) with grad_accum 1 -> 4, and
again on 2 processes as a 1 x 2 mesh (plain FSDP2 over the pair) with grad_accum 1 -> 2. The one
4-process run serves every assertion.
"""
import json

import pytest

from support import build_tiny_llama, launch, launch_processes, launch_two, ok, rank_record, rewind, tiny_recipe, train_losses, without_eval, write_recipe

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

STEPS, SAVED = 5, 3
LOSS_RTOL = 1e-5


def recipe_for(model, folder, grad_accum: int):
    recipe = tiny_recipe(model, folder / "run", method="full", distributed={"strategy": "fsdp"},
                         train={"max_steps": STEPS, "save_every": SAVED, "keep_last": 2, "grad_accum": grad_accum})
    recipe.pop("lora", None)  # tiny_recipe drops it already under method full
    recipe = without_eval(recipe)
    folder.mkdir(parents=True, exist_ok=True)
    return write_recipe(recipe, folder / "recipe.yaml")


def test_two_by_two_hybrid_mesh_matches_one_process_and_resumes_on_one_and_on_one_by_two(tmp_path):
    model = build_tiny_llama(tmp_path / "model")
    ok(launch([recipe_for(model, tmp_path / "one", grad_accum=4)]))
    expected = train_losses(tmp_path / "one" / "run")
    assert len(set(expected.values())) == STEPS, "losses should vary from step to step"

    recipe, run = recipe_for(model, tmp_path / "mesh", grad_accum=1), tmp_path / "mesh" / "run"
    ok(launch_processes([recipe, "distributed.replicate=2"], 4, timeout=600))
    seen = train_losses(run)
    for step in range(1, STEPS + 1):
        assert seen[step] == pytest.approx(expected[step], rel=LOSS_RTOL), f"step {step}: {seen} vs {expected}"
    ranks = [rank_record(run, r, "parameter_bytes") for r in range(4)]
    full = ranks[0]["full_parameter_bytes"]
    assert all(0.45 * full <= r["parameter_bytes"] <= 0.55 * full for r in ranks), ranks  # halves: sharded in pairs

    rewind(run, SAVED)
    one = ok(launch([recipe, "distributed.replicate=1"]))
    assert f"step-{SAVED} at step {SAVED}" in one.stdout and "train.grad_accum 1 -> 4" in one.stdout
    resumed = train_losses(run)
    for step in range(SAVED + 1, STEPS + 1):
        assert resumed[step] == pytest.approx(expected[step], rel=LOSS_RTOL), f"step {step}: {resumed} vs {expected}"

    rewind(run, SAVED)  # the 2 x 2 checkpoint again, now on 2 processes: each reads its half of the 4 ranks' shards
    pair = ok(launch_two([recipe, "distributed.replicate=1"]))
    assert "(the checkpoint was written by 4): train.grad_accum 1 -> 2" in pair.stdout, pair.stdout[-3000:]
    assert f"step-{SAVED} at step {SAVED}" in pair.stdout
    resumed = train_losses(run)
    for step in range(SAVED + 1, STEPS + 1):
        assert resumed[step] == pytest.approx(expected[step], rel=LOSS_RTOL), f"1 x 2, step {step}: {resumed} vs {expected}"
    last = [[json.loads(line) for line in (run / "logs" / f"rank-{r}.jsonl").read_text().splitlines()
             if "parameter_bytes" in line][-1] for r in (0, 1)]  # this launch's records, after the earlier ones
    assert all(r["world_size"] == 2 and 0.45 * full <= r["parameter_bytes"] <= 0.55 * full for r in last), last
