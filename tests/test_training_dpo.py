"""Preference tuning (objective dpo): the recipe's refusals, the pair format's rows and masking, the DPO loss
against a hand-worked computation from the model's log-probabilities, and one real LoRA DPO run."""
from __future__ import annotations

import json
import math

import pytest
import yaml
from pydantic import ValidationError

from support import PAIRS, launch_two, load_tensors, ok, pair_recipe, run_here, train_losses, validate_refusal, without_eval, write_recipe

from launcher.data.batching import collate_pairs
from launcher.data.encode import Encoder
from launcher.model.preference import dpo_loss_sum, pair_terms
from launcher.recipe.formats import IGNORE
from launcher.recipe.objective import reference_precomputed
from launcher.recipe.schema import DataSection, DpoSection, Recipe


# ---------------------------------------------------------------- recipe keys

@pytest.mark.parametrize("change, expected", [
    ({"data": {"packing": True}}, "data.packing with objective dpo"),
    ({"train": {"loss_chunk_tokens": 64}}, "train.loss_chunk_tokens with objective dpo"),
    ({"objective": "sft"}, "objective sft cannot train on data.format preference"),
    ({"model": {"path": "x", "task": "classification"}}, "model.task classification cannot train on data.format preference"),
])
def test_refused_combinations_are_one_line_each(change, expected):
    recipe = {"model": {"path": "x"}, "data": {"train": "x.jsonl", "format": "preference"}, "output_dir": "o"}
    for key, value in change.items():
        recipe[key] = {**recipe[key], **value} if isinstance(value, dict) and key in recipe else value
    with pytest.raises(ValidationError, match=expected):
        Recipe.model_validate(recipe)


def test_the_objective_follows_the_format_and_survives_a_reload():
    recipe = Recipe.model_validate({"model": {"path": "x"}, "data": {"train": "x.jsonl", "format": "chat-preference"},
                                    "dpo": {"beta": 0.2, "loss": "ipo"}, "output_dir": "o"})
    assert recipe.objective == "dpo" and recipe.eval.chosen("chat-preference") == ("eval_preference_accuracy", True)
    assert Recipe.model_validate(recipe.model_dump(mode="json")).dpo == DpoSection(beta=0.2, loss="ipo")
    sft = Recipe.model_validate({"model": {"path": "x"}, "data": {"train": "x.jsonl"}, "output_dir": "o"})
    assert sft.objective == "sft" and Recipe.model_validate(sft.model_dump(mode="json")).objective == "sft"
    full = Recipe.model_validate({"model": {"path": "x"}, "method": "full", "data": {"train": "x.jsonl", "format": "preference"},
                                  "output_dir": "o"})
    assert reference_precomputed(full) and not reference_precomputed(recipe), "an adapter's reference is the base, disabled"
    with pytest.raises(ValidationError, match="dpo: applies only with objective dpo"):
        Recipe.model_validate({"model": {"path": "x"}, "data": {"train": "x.jsonl"}, "dpo": {"beta": 0.5}, "output_dir": "o"})
    with pytest.raises(ValidationError, match="mix formats for objective sft and dpo"):
        Recipe.model_validate({"model": {"path": "x"}, "data": {"train": "x.jsonl", "format": "preference",
                                                                "eval": {"path": "e.jsonl", "format": "completion"}},
                               "output_dir": "o"})


# ---------------------------------------------------------------- rows

@pytest.mark.parametrize("row, expected", [
    ({"prompt": "p", "rejected": "r"}, ":2: chosen: missing"),
    ({"prompt": "p", "chosen": "c", "rejected": "  "}, ":2: rejected: empty text"),
    ({"prompt": "p", "chosen": "same", "rejected": "same "}, ":2: rejected: the same text as chosen"),
    ({"prompt": "p", "chosen": None, "rejected": "r"}, ":2: chosen: null, expected text"),
])
def test_bad_pairs_are_refused_by_validate_with_file_row_field(tiny_model, tmp_path, capsys, row, expected):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(PAIRS[0]) + "\n" + json.dumps(row) + "\n")
    line = validate_refusal(tiny_model, tmp_path, capsys, {"data": {"train": str(bad), "format": "preference", "fields": {},
                                                                    "max_train_rows": None, "eval": None}})
    assert f"{bad}{expected}" in line


def test_a_chat_pair_must_answer_a_user_turn(tiny_model, tmp_path, capsys):
    bad = tmp_path / "chat.jsonl"
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    bad.write_text(json.dumps({"messages": conversation, "chosen": "a", "rejected": "b"}) + "\n")
    line = validate_refusal(tiny_model, tmp_path, capsys, {"data": {"train": str(bad), "format": "chat-preference",
                                                                    "fields": {}, "max_train_rows": None, "eval": None}})
    assert f"{bad}:1: messages[1].role: the conversation must end on a user turn" in line


# ---------------------------------------------------------------- masking

@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.mark.parametrize("template", ["auto", "never"])
def test_each_reply_is_encoded_and_masked_exactly_as_an_sft_completion(tokenizer, template):
    pair = Encoder(tokenizer, DataSection(train="x.jsonl", format="preference", chat_template=template))(PAIRS[0])
    sft = Encoder(tokenizer, DataSection(train="x.jsonl", format="completion", chat_template=template))
    chosen = sft({"prompt": PAIRS[0]["prompt"], "completion": PAIRS[0]["chosen"]})
    rejected = sft({"prompt": PAIRS[0]["prompt"], "completion": PAIRS[0]["rejected"]})
    assert (pair["input_ids"], pair["labels"], pair["prompt_len"]) == (chosen["input_ids"], chosen["labels"], chosen["prompt_len"])
    assert (pair["rejected_input_ids"], pair["rejected_labels"]) == (rejected["input_ids"], rejected["labels"])
    assert pair["labels"][: pair["prompt_len"]] == [IGNORE] * pair["prompt_len"]


def test_a_chat_pair_trains_only_the_compared_reply(tokenizer):
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
                    {"role": "user", "content": "and now?"}]
    pair = Encoder(tokenizer, DataSection(train="x.jsonl", format="chat-preference"))(
        {"messages": conversation, "chosen": "now we part", "rejected": "never"})
    chat = Encoder(tokenizer, DataSection(train="x.jsonl", format="chat"))(
        {"messages": conversation + [{"role": "assistant", "content": "now we part"}]})
    assert pair["input_ids"] == chat["input_ids"]
    trained = [token for token, label in zip(pair["input_ids"], pair["labels"]) if label != IGNORE]
    assert tokenizer.decode(trained) == "now we part<|im_end|>\n"
    assert pair["prompt_len"] == len(pair["input_ids"]) - len(trained)
    assert tokenizer.decode([t for t, label in zip(pair["rejected_input_ids"], pair["rejected_labels"]) if label != IGNORE]) \
        == "never<|im_end|>\n"


# ---------------------------------------------------------------- the loss, by hand

def summed_logp(model, ids: list[int], labels: list[int]) -> float:
    """One unpadded sequence's log-probability of its labelled tokens, term by term."""
    import torch
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    return sum(logp[t - 1, labels[t]].item() for t in range(1, len(ids)) if labels[t] != IGNORE)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_one_batch_equals_a_hand_worked_computation(tiny_model, tokenizer, loss):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float64)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)).eval()
    encoder = Encoder(tokenizer, DataSection(train="x.jsonl", format="preference"))
    rows = [encoder(pair) for pair in PAIRS]
    settings = DpoSection(beta=0.3, loss=loss)
    total, pairs, sums = dpo_loss_sum(model, collate_pairs(rows, tokenizer.pad_token_id), settings)

    expected = {"loss": 0.0, "rewards_chosen": 0.0, "rewards_rejected": 0.0, "reward_accuracy": 0, "preference_accuracy": 0}
    for row in rows:
        policy = [summed_logp(model, row[k + "input_ids"], row[k + "labels"]) for k in ("", "rejected_")]
        with model.disable_adapter():
            reference = [summed_logp(model, row[k + "input_ids"], row[k + "labels"]) for k in ("", "rejected_")]
        chosen, rejected = 0.3 * (policy[0] - reference[0]), 0.3 * (policy[1] - reference[1])
        margin = (chosen - rejected) / 0.3
        expected["loss"] += math.log1p(math.exp(-0.3 * margin)) if loss == "sigmoid" else (margin - 1 / 0.6) ** 2
        expected["rewards_chosen"] += chosen
        expected["rewards_rejected"] += rejected
        expected["reward_accuracy"] += chosen > rejected
        expected["preference_accuracy"] += policy[0] > policy[1]
    assert pairs.item() == 3
    assert abs(total.item() - expected.pop("loss")) < 1e-6
    for name, value in expected.items():
        assert abs(sums[name].item() - value) < 1e-6, name
    assert abs(sums["reward_margin"].item() - (expected["rewards_chosen"] - expected["rewards_rejected"])) < 1e-6
    assert expected["rewards_chosen"] != 0  # the random adapter moved the policy off the reference


def test_the_reference_is_the_policy_before_training():
    import torch
    logps = torch.tensor([-3.0, -5.0, -4.0, -2.0], dtype=torch.float64)
    losses, chosen, rejected = pair_terms(logps, logps.clone(), beta=0.1, loss="sigmoid")
    assert torch.allclose(losses, torch.full((2,), math.log(2), dtype=torch.float64)) and not chosen.any() and not rejected.any()


# ---------------------------------------------------------------- real runs: one straight, compared with 2 processes and a resume

@pytest.fixture(scope="module")
def straight(tiny_model, tmp_path_factory):
    """4 DPO LoRA steps in one process, global batch 4 pairs; no dropout, whose random masks differ by process count."""
    folder = tmp_path_factory.mktemp("dpo")
    recipe = pair_recipe(tiny_model, folder, train={"max_steps": 4, "lr": 2e-2, "micro_batch_size": 2, "grad_accum": 2},
                         dpo={"beta": 0.5}, eval={"samples": 1}, lora={"dropout": 0.0})
    ok(run_here(["train", write_recipe(recipe, folder / "dpo.yaml")]))
    return folder


def test_a_lora_dpo_run_logs_rewards_and_held_out_preference_accuracy(straight):
    records = [json.loads(line) for line in (straight / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    assert len(steps) == 4 and {"rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin"} <= set(steps[0])
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # LoRA starts as the reference: margin 0
    assert evals[0]["eval_reward_accuracy"] == 0 and evals[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evals[-1]["eval_loss"] < math.log(2) and evals[-1]["eval_reward_margin"] > 0
    assert "eval_ppl" not in evals[-1] and evals[0]["samples"][0]["reference"]
    assert "preference_accuracy" in (straight / "run" / "report.md").read_text()


def test_launcher_eval_scores_a_lora_dpo_run_against_its_base(straight):
    last = [json.loads(line) for line in (straight / "run" / "metrics.jsonl").read_text().splitlines()
            if json.loads(line).get("kind") == "eval"][-1]
    ok(run_here(["eval", straight / "dpo.yaml", "eval.samples=0"]))  # no generation: only the pair scores
    results = json.loads((straight / "run" / "eval.json").read_text())
    assert results["base"]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert results[str(straight / "run" / "final")]["eval_loss"] == pytest.approx(last["eval_loss"], abs=1e-5)


@pytest.mark.multiproc
def test_two_ddp_processes_match_one_per_step(straight, tmp_path):
    recipe = yaml.safe_load((straight / "dpo.yaml").read_text())
    recipe["train"]["micro_batch_size"], recipe["output_dir"] = 1, str(tmp_path / "ddp")  # 1 x 2 accum x 2 ranks = 4 pairs
    ok(launch_two(["train", write_recipe(recipe, tmp_path / "ddp.yaml")]))
    one, two = train_losses(straight / "run"), train_losses(tmp_path / "ddp")
    assert sorted(two) == [1, 2, 3, 4]
    for step, loss in one.items():
        assert two[step] == pytest.approx(loss, rel=1e-5, abs=1e-7), step


@pytest.mark.multiproc
@pytest.mark.parametrize("distributed", [{"strategy": "deepspeed", "deepspeed": "zero2"},
                                         {"strategy": "deepspeed", "deepspeed": "zero3"}, {"strategy": "fsdp"}],
                         ids=["zero2", "zero3", "fsdp2"])
def test_two_sharded_processes_match_one_per_step(straight, tmp_path, distributed):
    """LoRA DPO under ZeRO-2 (the adapters' gradients and optimiser state partitioned), ZeRO-3 and FSDP2 (the weights
    too): the reference (adapter disabled) runs inside the DeepSpeed engine or the sharded model."""
    recipe = yaml.safe_load((straight / "dpo.yaml").read_text())
    recipe["train"]["micro_batch_size"], recipe["distributed"], recipe["output_dir"] = 1, distributed, str(tmp_path / "run")
    recipe = without_eval(recipe)
    ok(launch_two(["train", write_recipe(recipe, tmp_path / "sharded.yaml")]))
    one, two = train_losses(straight / "run"), train_losses(tmp_path / "run")
    assert sorted(two) == [1, 2, 3, 4]
    for step, loss in one.items():
        assert two[step] == pytest.approx(loss, rel=1e-5, abs=1e-7), step


def test_a_resumed_dpo_run_is_bitwise_the_straight_one(straight, tmp_path):
    recipe = yaml.safe_load((straight / "dpo.yaml").read_text())
    recipe["output_dir"] = str(tmp_path / "split")
    path = write_recipe(recipe, tmp_path / "split.yaml")
    ok(run_here(["train", path, "train.max_steps=2"]))
    second = ok(run_here(["train", path]))
    assert "resuming from" in second.stdout
    assert train_losses(tmp_path / "split") == train_losses(straight / "run")  # bitwise, not approx
    assert load_tensors(tmp_path / "split" / "final").keys() == load_tensors(straight / "run" / "final").keys()
    for name, tensor in load_tensors(tmp_path / "split" / "final").items():
        assert tensor.equal(load_tensors(straight / "run" / "final")[name]), name


def test_the_loss_and_rewards_equal_trl_dpo_trainer(tiny_model, tokenizer):
    """TRL's DPOTrainer (the `test` extra) on the same model, adapter and token ids: its reference is the
    base with the adapter disabled too, once it made the adapter itself."""
    pytest.importorskip("trl")
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer
    base = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float32)
    config = DPOConfig(output_dir=str(tiny_model.parent / "trl"), beta=0.3, loss_type=["sigmoid"], report_to=[],
                       per_device_train_batch_size=3, use_cpu=True,
                       bf16=False)  # fp32 like ours; accelerate's process-wide state then suits the in-process runs after it
    trainer = DPOTrainer(model=base, args=config, train_dataset=datasets.Dataset.from_list(PAIRS), processing_class=tokenizer,
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    model = trainer.model.eval()
    torch.manual_seed(1)
    with torch.no_grad():  # B = 0 would make policy and reference equal, and every comparison trivial
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.2)
    encoder = Encoder(tokenizer, DataSection(train="x.jsonl", format="preference", chat_template="never"))
    batch = collate_pairs([encoder(pair) for pair in PAIRS], tokenizer.pad_token_id)
    theirs = trainer._compute_loss(model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                                           "completion_mask": (batch["labels"] != IGNORE).long()}, return_outputs=False)
    total, pairs, sums = dpo_loss_sum(model, batch, DpoSection(beta=0.3))
    logged = {name: values[-1] for name, values in trainer._metrics["eval"].items()}
    assert abs(theirs.item() - (total / pairs).item()) < 1e-4
    for ours, trl_name in (("rewards_chosen", "rewards/chosen"), ("rewards_rejected", "rewards/rejected"),
                           ("reward_accuracy", "rewards/accuracies"), ("reward_margin", "rewards/margins")):
        assert abs((sums[ours] / pairs).item() - logged[trl_name]) < 1e-4, ours
    assert logged["rewards/margins"] != 0
