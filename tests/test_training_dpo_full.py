"""Full fine-tuning DPO: the reference's log-probabilities are scored once, before training, by the model as
loaded (launcher/data/reference_logps.py), saved beside the data, and read back instead of scored again.

One 1-process run (in-process) is the straight run; a 1-process run in two halves must equal it bitwise, a
2-process ZeRO-3 run in two halves must match it per step and reuse its own reference file on resume, and
2-process DDP and FSDP2 runs must match it per step and in their final weights, scoring the reference once for both ranks.
Every 2-process run holds one model per rank: each rank's parameters alive after the reference pass are the model's own.

Full DPO under ZeRO-1/2 is not run: the launcher has no code of its own per ZeRO stage (the stage is DeepSpeed's
JSON), so its reference pass is ZeRO-3's engine forward (tested here) on unsharded weights (DDP's, tested here)."""
from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import yaml

from support import PAIRS, launch_two, load_tensors, ok, pair_recipe, rank_record, run_here, train_losses, write_recipe

from launcher.data.batching import collate_pairs
from launcher.data.encode import Encoder
from launcher.data.fingerprint import WHOLE, sampled_digest
from launcher.data.reference_logps import computed_values, model_identity
from launcher.model.preference import reply_logps
from launcher.recipe.schema import DataSection

STEPS = 4


def full_recipe(model, folder) -> dict:
    """4 full fine-tuning DPO steps of 4 pairs (2 x 2 accumulated on one process); eval pairs scored, nothing generated."""
    return pair_recipe(model, folder, method="full", dpo={"beta": 0.5}, eval={"samples": 0},
                       train={"max_steps": STEPS, "lr": 2e-3, "micro_batch_size": 2, "grad_accum": 2})


def reference_file(run):
    return rank_record(run, 0, "reference_file")


def one_model_held(run, share: float) -> None:
    """Each rank's parameters, all of them alive in the process after the reference pass, are the trained model's own
    (`share` of the whole model): a reference copy, loaded whole or sharded, would add its own bytes."""
    for rank in (0, 1):
        model, alive = rank_record(run, rank, "parameter_bytes"), rank_record(run, rank, "process_parameter_bytes")
        assert alive["process_parameter_bytes"] == model["parameter_bytes"], (rank, alive, model)
        assert model["parameter_bytes"] == pytest.approx(share * model["full_parameter_bytes"], rel=0.02), (rank, model)


@pytest.fixture(scope="module")
def straight(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dpo-full")
    ok(run_here(["train", write_recipe(full_recipe(tiny_model, folder), folder / "full.yaml")]))
    return folder


def test_the_run_starts_at_its_reference_on_train_and_eval_pairs_and_learns(straight):
    records = [json.loads(line) for line in (straight / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6), "the precomputed reference is the initial policy"
    assert evals[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6) and evals[0]["eval_reward_margin"] == 0
    assert steps[-1]["loss"] < steps[0]["loss"] and evals[-1]["eval_reward_margin"] > 0
    record = reference_file(straight / "run")
    assert record["reference_logps"] == "computed" and record["reference_pairs"] == 12 + 6
    import torch
    saved = torch.load(record["reference_file"], weights_only=True)
    assert saved["train"].shape == (12, 2) and saved["eval"].shape == (6, 2) and (saved["train"] < 0).all()


def test_a_resumed_full_dpo_run_is_bitwise_the_straight_one_and_reuses_its_reference(straight, tmp_path):
    recipe = yaml.safe_load((straight / "full.yaml").read_text())
    recipe["output_dir"] = str(tmp_path / "run")
    path = write_recipe(recipe, tmp_path / "split.yaml")
    first = ok(run_here(["train", path, "train.max_steps=2"])).stdout
    target = reference_file(tmp_path / "run")["reference_file"]
    written = os.stat(target).st_mtime_ns
    second = ok(run_here(["train", path])).stdout
    assert "reference log-probabilities of 18 pairs: computed" in first
    assert "reference log-probabilities of 18 pairs: reused (not recomputed)" in second and "resuming from" in second
    assert os.stat(target).st_mtime_ns == written
    assert train_losses(tmp_path / "run") == train_losses(straight / "run")  # bitwise
    ours, theirs = load_tensors(tmp_path / "run" / "final"), load_tensors(straight / "run" / "final")
    assert ours.keys() == theirs.keys() and all(ours[name].equal(theirs[name]) for name in theirs)


@pytest.mark.multiproc
def test_two_zero3_processes_match_one_and_a_resume_does_not_score_again(straight, tmp_path):
    recipe = yaml.safe_load((straight / "full.yaml").read_text())
    recipe["train"]["micro_batch_size"] = 1  # 1 x 2 accumulated x 2 ranks = the same 4 pairs a step
    recipe["distributed"], recipe["output_dir"] = {"strategy": "deepspeed", "deepspeed": "zero3"}, str(tmp_path / "run")
    path = write_recipe(recipe, tmp_path / "zero3.yaml")
    first = ok(launch_two(["train", path, "train.max_steps=2"]))
    target = reference_file(tmp_path / "run")["reference_file"]
    written = os.stat(target).st_mtime_ns
    second = ok(launch_two(["train", path]))
    assert "pairs: computed" in first.stdout and "reused (not recomputed)" in second.stdout
    assert os.stat(target).st_mtime_ns == written
    records = [json.loads(line) for line in (tmp_path / "run" / "logs" / "rank-1.jsonl").read_text().splitlines()]
    assert [r["reference_logps"] for r in records if "reference_logps" in r] == ["computed", "reused"]
    one_model_held(tmp_path / "run", share=0.5)  # ZeRO-3: one partitioned model, no second copy for the reference
    one, two = train_losses(straight / "run"), train_losses(tmp_path / "run")
    assert sorted(two) == list(range(1, STEPS + 1))
    for step, loss in one.items():
        assert two[step] == pytest.approx(loss, rel=1e-5, abs=1e-7), step


@pytest.mark.multiproc
@pytest.mark.parametrize("distributed", [{"strategy": "ddp"}, {"strategy": "fsdp"}], ids=["ddp", "fsdp2"])
def test_two_processes_match_one_and_share_one_reference_pass(straight, tmp_path, distributed):
    """One launch each: the ranks score their shares of one pass (under FSDP2 on the sharded model, once rank 1,
    built on meta, has received its shards), the main process writes one file, and both train from it."""
    import torch
    from launcher.distributed.rules import rules_for
    from launcher.recipe.schema import Recipe
    recipe = yaml.safe_load((straight / "full.yaml").read_text())
    recipe["train"]["micro_batch_size"] = 1  # 1 x 2 accumulated x 2 ranks = the same 4 pairs a step
    recipe["distributed"], recipe["output_dir"] = distributed, str(tmp_path / "run")
    run = ok(launch_two(["train", write_recipe(recipe, tmp_path / "two.yaml")]))
    assert run.stdout.count("reference log-probabilities of 18 pairs: computed") == 1
    records = [reference_file(tmp_path / "run")] + [rank_record(tmp_path / "run", 1, "reference_file")]
    assert [r["reference_logps"] for r in records] == ["computed", "computed"]
    assert records[0]["reference_file"] == records[1]["reference_file"], "one file for both ranks"
    ours = torch.load(records[0]["reference_file"], weights_only=True)
    theirs = torch.load(reference_file(straight / "run")["reference_file"], weights_only=True)
    for split in ("train", "eval"):
        assert torch.allclose(ours[split], theirs[split], rtol=1e-5, atol=1e-5), split
    reads = [rank_record(tmp_path / "run", rank, "read_weights")["read_weights"] for rank in (0, 1)]
    rules = rules_for(Recipe.model_validate(recipe))
    assert reads == [rules.reads_weights(2, rank) for rank in (0, 1)]
    assert reads == ([True, False] if distributed["strategy"] == "fsdp" else [True, True])
    one_model_held(tmp_path / "run", share=0.5 if distributed["strategy"] == "fsdp" else 1.0)
    one, two = train_losses(straight / "run"), train_losses(tmp_path / "run")
    assert sorted(two) == list(range(1, STEPS + 1))
    for step, loss in one.items():
        assert two[step] == pytest.approx(loss, rel=1e-5, abs=1e-7), step
    final, expected = load_tensors(tmp_path / "run" / "final"), load_tensors(straight / "run" / "final")
    assert final.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.allclose(final[name], tensor, rtol=0, atol=1e-5), name


def test_a_killed_pass_restarts_from_its_written_parts_and_never_trusts_a_broken_one(tiny_model, tmp_path):
    """Parts of 4 pairs: a complete part is read back (marked here so that reuse shows), a broken one and a
    leftover temporary file are ignored and scored again, and the finished file replaces the parts."""
    import datasets
    import torch
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    encoder = Encoder(tokenizer, DataSection(train="x.jsonl", format="preference"))
    rows = datasets.Dataset.from_list([encoder(pair) for pair in PAIRS * 4])
    accelerator = Accelerator()  # the process-wide state other in-process runs already set, on whatever device
    model = AutoModelForCausalLM.from_pretrained(tiny_model).to(accelerator.device).train()
    target = tmp_path / "store" / "key.pt"
    expected = computed_values(accelerator, model, {"train": rows}, target, 3, tokenizer.pad_token_id, part_pairs=4)["train"]
    assert model.training and target.is_file() and not (tmp_path / "store" / "key.parts").exists()
    with torch.no_grad():
        batch = collate_pairs(rows.select([0, 1, 2]), tokenizer.pad_token_id)
        first = reply_logps(model.eval(), {name: tensor.to(accelerator.device) for name, tensor in batch.items()}).cpu()
    assert torch.equal(expected[:3].T.reshape(-1), first), "row i holds [chosen, rejected] of pair i"
    target.unlink()
    parts = tmp_path / "store" / "key.parts"
    parts.mkdir()
    torch.save(expected[:4] - 100, parts / "train-00000.pt")             # complete: reused as it is
    (parts / "train-00001.pt").write_bytes(b"PK\x03\x04 cut short")        # broken: scored again
    (parts / "train-00002.pt.tmp-999").write_bytes(b"half")              # a temporary name is never read
    again = computed_values(accelerator, model, {"train": rows}, target, 3, tokenizer.pad_token_id, part_pairs=4)["train"]
    assert torch.equal(again[:4], expected[:4] - 100) and torch.equal(again[4:], expected[4:])
    assert torch.equal(torch.load(target, weights_only=True)["train"], again) and not parts.exists()


def test_preprocessing_again_keeps_the_reference_values(tiny_model, tmp_path):
    """`launcher preprocess` replaces its folder whole; the reference values beside the data are keyed by their own
    inputs, so they move into the new folder instead of being lost."""
    path = write_recipe(full_recipe(tiny_model, tmp_path), tmp_path / "full.yaml")
    ok(run_here(["preprocess", path]))
    kept = tmp_path / "run" / "preprocessed" / "reference-logps" / "0123456789abcdef.pt"
    kept.parent.mkdir()
    kept.write_bytes(b"values")
    ok(run_here(["preprocess", path]))
    assert kept.read_bytes() == b"values" and (tmp_path / "run" / "preprocessed" / "fingerprint.json").is_file()


def test_launcher_eval_compares_base_and_final_against_the_base_as_reference(straight):
    """`launcher eval` has no training pass: it scores the eval pairs with the base first, and gets the run's own numbers."""
    last = [json.loads(line) for line in (straight / "run" / "metrics.jsonl").read_text().splitlines()
            if json.loads(line).get("kind") == "eval"][-1]
    ok(run_here(["eval", straight / "full.yaml"]))
    results = json.loads((straight / "run" / "eval.json").read_text())
    base, final = results["base"], results[str(straight / "run" / "final")]
    assert base["eval_loss"] == pytest.approx(math.log(2), abs=1e-6) and base["eval_reward_margin"] == 0
    for name in ("eval_loss", "eval_reward_margin", "eval_preference_accuracy"):
        assert final[name] == pytest.approx(last[name], abs=1e-5), name


def test_the_reference_model_is_known_by_content_so_a_copied_checkpoint_is_not_scored_again(tiny_model, tmp_path):
    """The key of the saved values names the model by content (not its folder or file times): a copy is the same
    model; one changed weight is another. Files above WHOLE bytes are sampled: every tensor at start, middle, end."""
    import torch
    from safetensors.torch import load_file, save_file
    copy = shutil.copytree(tiny_model, tmp_path / "copy")
    os.utime(copy / "model.safetensors", (1, 1))
    assert model_identity(str(copy)) == model_identity(str(tiny_model))
    weights = load_file(copy / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-3
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    assert model_identity(str(copy)) != model_identity(str(tiny_model))
    big = {"a": torch.zeros(WHOLE // 4 + 1), "b": torch.zeros(1000)}  # float32: over WHOLE bytes, so sampled
    save_file(big, tmp_path / "big.safetensors")
    sampled = sampled_digest(tmp_path / "big.safetensors")
    shutil.copy(tmp_path / "big.safetensors", tmp_path / "same.safetensors")
    assert sampled_digest(tmp_path / "same.safetensors") == sampled
    for tensor, index in (("a", len(big["a"]) // 2), ("b", 999)):  # the middle of a large tensor, the end of a small one
        changed = {key: value.clone() for key, value in big.items()}
        changed[tensor][index] = 1.0
        save_file(changed, tmp_path / "changed.safetensors")
        assert sampled_digest(tmp_path / "changed.safetensors") != sampled, tensor
