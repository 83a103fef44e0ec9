"""The LoRA variants are really in effect, not just accepted keys; the adapter layout fits every architecture;
combinations that cannot work are refused before anything loads."""
import json
import re

import pytest
from architectures import ARCHITECTURES, CLASSIFY, LABELS, Trained, batch, build, logits, recipe_for
from support import build_tiny_llama, small_tokenizer, tiny_recipe, validate_refusal, write_recipe

from launcher.cli import main
from launcher.recipe.schema import Recipe
from launcher.errors import UserError


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("variants-llama"), chat=False, hidden=64)


def adapted(model):
    from peft.tuners.lora import LoraLayer
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def original_weights(path):
    from transformers import AutoModelForCausalLM
    return dict(AutoModelForCausalLM.from_pretrained(path).named_parameters())


# ---------------------------------------------------------------- layout on every architecture (skeletons, no weights)

@pytest.fixture(scope="module")
def skeletons(tmp_path_factory):
    tokenizer = small_tokenizer()
    return {name: build(name, tmp_path_factory.mktemp(name), tokenizer) for name in ARCHITECTURES}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_linear_layer_but_the_heads_is_adapted_and_heads_are_trained_in_full(arch, skeletons, tmp_path):
    from launcher.model.adapters import is_linear
    from launcher.model.loading import adapter_placement, skeleton
    task = ARCHITECTURES[arch][2]
    recipe = Recipe.model_validate(recipe_for(skeletons[arch], task, "qlora", tmp_path))
    labels = LABELS if task == CLASSIFY else None
    where = adapter_placement(str(skeletons[arch]), recipe, labels)
    model = skeleton(str(skeletons[arch]), recipe, labels)
    output = [n for n, m in model.named_modules() if m is model.get_output_embeddings()]
    linears = [n for n, m in model.named_modules() if is_linear(m)]
    outside = [n for n in linears if not any(n == h or n.startswith(h + ".") for h in where.trained_in_full + output)]
    assert outside and all(re.fullmatch(where.targets, n) for n in outside)  # every body linear, Conv1D included
    assert not any(re.fullmatch(where.targets, n) for n in linears if n not in outside)  # never a head
    assert set(where.unquantised) == set(where.trained_in_full + output)
    expected_heads = {"bert": ["classifier"], "roberta": ["classifier"], "distilbert": ["classifier", "pre_classifier"]}
    assert where.trained_in_full == expected_heads.get(arch, [])


def test_a_head_named_in_target_modules_and_trained_in_full_is_refused(skeletons, tmp_path):
    from launcher.model.loading import adapter_placement
    recipe = Recipe.model_validate(recipe_for(skeletons["distilbert"], CLASSIFY, "lora", tmp_path,
                                              target_modules=["q_lin", "classifier"]))
    with pytest.raises(UserError, match="adapted or trained in full, not both"):
        adapter_placement(str(skeletons["distilbert"]), recipe, LABELS)


# ---------------------------------------------------------------- variants in effect

def test_dora_rslora_and_loraplus_are_in_effect_in_memory_and_on_disk(llama, tmp_path):
    import torch
    from safetensors import safe_open
    run = Trained(recipe_for(llama, "causal-lm", "dora", tmp_path / "run", rslora=True, plus_lr_ratio=16), tmp_path)
    try:
        layers = adapted(run.model)
        assert len(layers) == 2 * 7
        for layer in layers.values():
            assert layer.scaling["default"] == 8 / 4 ** 0.5  # rsLoRA: alpha / sqrt(r), not alpha / r = 2
            magnitude = layer.lora_magnitude_vector["default"].weight
            assert magnitude.requires_grad and magnitude.shape == (layer.out_features,)
        groups = run.session.optimizer.optimizer.param_groups
        b_ids = {id(p) for n, p in run.model.named_parameters() if ".lora_B." in n}
        for group in groups:  # LoRA+: every B matrix, and only those, at 16 x train.lr
            kinds = {id(p) in b_ids for p in group["params"]}
            assert len(kinds) == 1 and group["lr"] == pytest.approx(1e-2 * (16 if kinds.pop() else 1))
        assert sum(len(g["params"]) for g in groups if g["lr"] > 1e-2) == len(b_ids) == 14
    finally:
        run.close()
    config = json.loads((run.run_dir / "final" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["use_rslora"] is True
    with safe_open(run.run_dir / "final" / "adapter_model.safetensors", "pt") as saved:
        magnitudes = [k for k in saved.keys() if "lora_magnitude_vector" in k]
        assert len(magnitudes) == 14
        trained = saved.get_tensor(magnitudes[0])
    name = magnitudes[0].removeprefix("base_model.model.").removesuffix(".lora_magnitude_vector")
    initial = original_weights(llama)[name + ".weight"].detach().norm(dim=1)  # DoRA starts at the row norms of W
    assert not torch.allclose(trained, initial, atol=1e-4), "the magnitudes were trained"


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_start_from_the_weights_and_export_plain_lora_on_the_original_base(init, llama, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from launcher.model import loading as modeling
    recipe = Recipe.model_validate(recipe_for(llama, "causal-lm", "lora", tmp_path / "load", init=init))
    model, original = modeling.load_model(str(llama), recipe, on_gpu=False), original_weights(llama)
    for name, layer in adapted(model).items():
        key = name.removeprefix("base_model.model.") + ".weight"
        residual, a, b = layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert not torch.allclose(residual, original[key], atol=1e-3)  # the base in memory is a residual
        torch.testing.assert_close(residual + layer.scaling["default"] * b @ a, original[key], atol=1e-5, rtol=0)
        if init == "pissa":  # the adapter holds the top-r singular directions of W
            u, s, vh = torch.linalg.svd(original[key].detach())
            top = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
            torch.testing.assert_close(layer.scaling["default"] * b @ a, top, atol=1e-4, rtol=0)
        else:  # OLoRA: B is the first r columns of W's Q factor, orthonormal
            torch.testing.assert_close(b.T @ b, torch.eye(4), atol=1e-5, rtol=0)

    run = Trained(recipe_for(llama, "causal-lm", "lora", tmp_path / "run", init=init), tmp_path)
    try:
        inputs = batch(llama)
        trained = logits(run.model, inputs)
    finally:
        run.close()
    config = json.loads((run.run_dir / "final" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 8  # converted: rank 2r on the original base
    base = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    reloaded = logits(PeftModel.from_pretrained(base, run.run_dir / "final").eval(), inputs)
    assert (reloaded - trained).abs().max().item() < 1e-4 * max(1.0, trained.abs().max().item())


# ---------------------------------------------------------------- refused before anything loads

REFUSED = [
    ({"method": "full", "lora": {"dora": True}}, "lora: applies only with method lora or qlora (this recipe has full)"),
    ({"method": "full", "lora": {"plus_lr_ratio": 16}}, "lora: applies only with method lora or qlora (this recipe has full)"),
    ({"method": "qlora", "lora": {"init": "pissa"}}, "lora.init pissa with method: qlora"),
    ({"method": "qlora", "lora": {"init": "olora"}}, "lora.init olora with method: qlora"),
    ({"method": "lora", "lora": {"init": "pissa", "dora": True}}, "lora.init pissa with lora.dora"),
    ({"lora": {"init": "olora"}, "distributed": {"strategy": "fsdp"}}, "lora.init olora with sharded parameters"),
    ({"method": "lora", "lora": {"init": "loftq"}}, "lora.init loftq initialises adapters against a 4-bit nf4 base"),
    ({"method": "qlora", "quant": {"bits": 8}, "lora": {"init": "loftq"}}, "needs method: qlora with quant.bits 4"),
    ({"method": "qlora", "lora": {"init": "loftq", "dora": True}}, "peft's LoftQ initialises plain LoRA matrices only"),
    ({"method": "qlora", "lora": {"init": "loftq"}}, "lora.init loftq: peft computes LoftQ's quantisation residuals on a CUDA"),
]


@pytest.mark.parametrize("changes,expected", REFUSED, ids=[r[1][:40] for r in REFUSED])
def test_unsupported_adapter_combination_is_refused_by_validate(llama, tmp_path, capsys, changes, expected):
    assert expected in validate_refusal(llama, tmp_path, capsys, changes)


@pytest.mark.slow
def test_shipped_classify_recipe_trains_and_evaluates_with_qlora(tmp_path):
    """all-MiniLM-L6-v2 with method=qlora: the new head stays unquantised and trained in full, so the eval
    forward works (it failed in bitsandbytes with a quantised 5-row head) and the head is saved."""
    from safetensors import safe_open

    from support import REPO, train_losses
    run = tmp_path / "run"
    status = main([str(REPO / "recipes" / "classify.yaml"), "method=qlora", f"output_dir={run}", "train.max_steps=2",
                   "train.warmup_steps=1", "train.micro_batch_size=4", "data.max_train_rows=16", "data.max_eval_rows=8", "eval.samples=0"])
    assert status == 0 and sorted(train_losses(run)) == [1, 2]
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert [e["step"] for e in evals] == [0, 2] and all("eval_accuracy" in e for e in evals)
    with safe_open(run / "final" / "adapter_model.safetensors", "pt") as saved:
        assert any(k.endswith("classifier.weight") for k in saved.keys())


def test_fsdp_qlora_stores_4bit_weights_in_the_compute_dtype_and_counts_their_stored_bytes(tmp_path):
    """FSDP2 shards only parameters of one dtype per block: the packed 4-bit weights are stored as float32
    here (8 weights per element); the memory count stays the packed size, not 32 bits per weight."""
    import bitsandbytes as bnb
    import torch

    from launcher.memory import counts as memory

    from launcher.model import loading as modeling
    llama = build_tiny_llama(tmp_path / "llama", chat=False, hidden=128)
    recipe = Recipe.model_validate(tiny_recipe(llama, tmp_path / "run", method="qlora", distributed={"strategy": "fsdp"}))
    model = modeling.load_model(str(llama), recipe, on_gpu=False)
    packed = [m.weight for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(packed) == 14 and all(w.dtype == torch.float32 and w.quant_state.dtype == torch.float32 for w in packed)
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # one dtype: FSDP2 can flatten each block
    count = memory.count_parameters(model)
    assert count.quantised == sum(w.quant_state.shape.numel() for w in packed)
    assert 4.0 < 8 * count.quantised_bytes / count.quantised < 5.0


# ---------------------------------------------------------------- merge refusals

def fake_run(llama, run, adapter_config: dict):
    """A run directory as training leaves it, with an adapter folder holding only `adapter_config`."""
    (run / "final").mkdir(parents=True)
    write_recipe(tiny_recipe(llama, run), run / "recipe.yaml")
    (run / "final" / "adapter_config.json").write_text(json.dumps(adapter_config))
    return run


def test_merge_refuses_an_adapter_it_cannot_fold_before_loading_anything(llama, tmp_path, capsys):
    run = fake_run(llama, tmp_path / "run", {"peft_type": "IA3", "base_model_name_or_path": str(llama)})
    assert main(["merge", str(run)]) == 2
    err = capsys.readouterr().err
    assert "peft_type IA3; launcher merge folds LoRA adapters" in err and err.count("\n") == 1
    assert not (run / "merged").exists() and not (run / "merged.tmp").exists()


def test_a_merge_that_fails_midway_leaves_no_staging_folder(llama, tmp_path):
    from launcher.commands.merge import merge
    run = fake_run(llama, tmp_path / "run", {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
                                            "task_type": "CAUSAL_LM", "base_model_name_or_path": str(llama)})
    (run / "merged.tmp").mkdir()  # left by an earlier crash
    (run / "merged.tmp" / "config.json").write_text("{}")
    with pytest.raises(Exception):  # the adapter weights are missing: peft fails after the base has loaded
        merge(run, "fp32")
    assert not (run / "merged.tmp").exists() and not (run / "merged").exists()
