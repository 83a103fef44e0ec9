"""QLoRA, 8-bit loading, bitsandbytes optimisers and `launcher merge`, on a tiny Llama on CPU.

Runs go through real launcher processes (as users start them); what bitsandbytes built is checked
in-process, by module and parameter type and by byte count.
"""
import sys

import pytest

from launcher.cli import main
from launcher.recipe.schema import Recipe
from support import build_tiny_llama, eval_losses, launch, run_here, tiny_recipe, train_losses, validate_refusal, without_eval, write_recipe

FAST_EVAL = {"samples": 0, "generate_rows": 0}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """Wide enough (128) that 4-bit block scales are a small share of each weight, as in real models."""
    return build_tiny_llama(tmp_path_factory.mktemp("qlora-llama"), hidden=128, layers=2)


def qlora_recipe(model, run_dir, **train) -> dict:
    return tiny_recipe(model, run_dir, method="qlora", eval=FAST_EVAL,
                       train={"max_steps": 6, "lr": 2e-2, "optimizer": "adamw-8bit", **train})


@pytest.fixture(scope="module")
def qlora_run(llama, tmp_path_factory):
    """Six QLoRA steps with bitsandbytes' 8-bit AdamW; shared by the training, resume and merge tests."""
    folder = tmp_path_factory.mktemp("qlora-run")
    result = run_here([write_recipe(qlora_recipe(llama, folder / "run"), folder / "r.yaml")])
    assert result.returncode == 0, result.stderr
    return folder / "run", result.stdout


def test_qlora_base_weights_are_4bit_and_checkpointing_stays_as_asked(llama, tmp_path):
    import bitsandbytes as bnb
    import torch

    from launcher.memory import counts as memory

    from launcher.model import loading as modeling
    recipe = Recipe.model_validate(tiny_recipe(llama, tmp_path / "run", method="qlora"))
    model = modeling.load_model(str(llama), recipe, on_gpu=False)
    linears = [m for m in model.get_base_model().modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 2 * 7  # q k v o gate up down, per block; the head stays in float
    logical = packed = state = 0
    for layer in linears:
        weight = layer.weight
        assert isinstance(weight, bnb.nn.Params4bit) and weight.dtype == torch.uint8 and weight.quant_state.quant_type == "nf4"
        assert weight.numel() * weight.element_size() * 2 == weight.quant_state.shape.numel()  # two weights per byte
        logical += weight.quant_state.shape.numel()
        packed += weight.numel()
        state += memory.quant_state_bytes(weight)
    assert (packed + state) * 8 / logical < 5.0, "nf4 with double quantisation: about 4.1-4.5 bits per weight"
    assert not model.get_base_model().is_activation_checkpointing  # peft's k-bit preparation would have turned it on
    count = memory.count_parameters(model, "adamw-8bit")
    assert count.quantised == logical and count.quantised_bytes == packed + state
    assert count.total == sum(p.numel() for p in modeling.load_base(str(llama), recipe.model_copy(update={"method": "lora"}),
                                                                     on_gpu=False).parameters()) + count.trainable
    assert count.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    assert "quantised" in count.line() and "adamw-8bit state" in count.line()


def test_8bit_loading_makes_int8_layers(llama, tmp_path):
    import bitsandbytes as bnb
    import torch

    from launcher.model import loading as modeling
    recipe = Recipe.model_validate(tiny_recipe(llama, tmp_path / "run", method="qlora", quant={"bits": 8},
                                               train={"gradient_checkpointing": True}))
    model = modeling.load_model(str(llama), recipe, on_gpu=False)
    linears = [m for m in model.get_base_model().modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(linears) == 14 and all(m.weight.dtype == torch.int8 for m in linears)
    assert model.get_base_model().is_activation_checkpointing
    batch = torch.randint(0, 1000, (2, 16))
    model(input_ids=batch, labels=batch).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_qlora_with_8bit_adamw_trains_and_loss_falls(qlora_run):
    run, stdout = qlora_run
    losses, evals = train_losses(run), eval_losses(run)
    assert sorted(losses) == list(range(1, 7))
    assert evals[-1] < evals[0] - 0.05, evals
    assert "quantised" in stdout and "adamw-8bit state" in stdout
    assert (run / "final" / "adapter_model.safetensors").is_file()


def test_qlora_resume_is_exact(llama, tmp_path):
    """No eval data in either run: on CPUs with avx512-bf16, bitsandbytes repacks 4-bit weights into a CPU
    inference layout at the first no-grad forward (an eval) and keeps computing with it, so a run that
    evaluated before training is not bitwise comparable with one resumed without that eval (docs/platform.md)."""
    runs = {}
    for name in ("straight", "split"):
        recipe = qlora_recipe(llama, tmp_path / name)
        recipe = without_eval(recipe)
        runs[name] = write_recipe(recipe, tmp_path / f"{name}.yaml")
    assert run_here([runs["straight"]]).returncode == 0
    first = run_here([runs["split"], "train.max_steps=3"])
    assert first.returncode == 0, first.stderr
    second = run_here([runs["split"]])
    assert second.returncode == 0, second.stderr
    assert "resuming from" in second.stdout and "step-3" in second.stdout
    straight = train_losses(tmp_path / "straight")
    assert sorted(straight) == list(range(1, 7))
    assert train_losses(tmp_path / "split") == straight  # bitwise: 4-bit base reloaded, adapter + 8-bit state restored


def test_qlora_trains_under_ddp_with_two_processes(llama, tmp_path):
    recipe = write_recipe(qlora_recipe(llama, tmp_path / "ddp", max_steps=3), tmp_path / "r.yaml")
    result = launch([recipe], env={"ACCELERATE_USE_CPU": "1"},
                    prefix=[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "launcher"])
    assert result.returncode == 0, result.stderr
    assert "steps of 8 examples" in result.stdout  # micro 2 x accum 2 x 2 processes
    assert sorted(train_losses(tmp_path / "ddp")) == [1, 2, 3]


def test_paged_optimizer_is_refused_on_cpu_before_anything_loads(llama, tmp_path):
    recipe = write_recipe(tiny_recipe(llama, tmp_path / "run", train={"optimizer": "paged-adamw-8bit"}), tmp_path / "r.yaml")
    result = run_here([recipe])
    assert result.returncode == 2
    assert "train.optimizer paged-adamw-8bit: paging moves optimiser state" in result.stderr and "adamw-8bit" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["adamw", "adamw-8bit", "adafactor", "sgd"])
def test_optimizer_steps_and_its_state_is_as_announced(name):
    """The start-up summary's optimiser bytes are known before the first step; here they are checked after it."""
    import torch

    from launcher.memory.counts import state_bytes
    from launcher.training.optim import build_optimizer
    from launcher.recipe.schema import TrainSection
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 8), torch.nn.LayerNorm(8))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = build_optimizer(model, TrainSection(optimizer=name, lr=1e-2))
    model(torch.randn(4, 64)).square().sum().backward()
    optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    storages = {t.untyped_storage().data_ptr(): t.numel() * t.element_size()  # bitsandbytes shares its code books
                for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t) and t.dim() > 0}
    expected = state_bytes(list(model.parameters()), name)
    assert expected <= sum(storages.values()) <= expected + 2 * 256 * 4, (name, storages, expected)
    if name == "adamw-8bit":
        assert {t.dtype for t in optimizer.state[model[0].weight].values() if torch.is_tensor(t) and t.dim() == 2} == {torch.uint8}


REFUSED = [
    ({"method": "qlora", "distributed": {"strategy": "deepspeed", "deepspeed": "zero3"}},
     "method: qlora with DeepSpeed ZeRO-3"),
    ({"method": "qlora", "quant": {"bits": 8}, "distributed": {"strategy": "fsdp"}},
     "method: qlora with quant.bits 8 and distributed.strategy: fsdp"),
    ({"method": "full", "train": {"optimizer": "adamw-8bit"}, "distributed": {"strategy": "fsdp"}},
     "train.optimizer adamw-8bit with distributed.strategy: fsdp"),
    ({"method": "lora", "train": {"optimizer": "paged-adamw"}, "distributed": {"strategy": "deepspeed", "deepspeed": "zero2"}},
     "train.optimizer paged-adamw with distributed.strategy: deepspeed"),
    ({"method": "lora", "quant": {"bits": 8}}, "quant: applies only with method qlora"),
    ({"method": "qlora", "quant": {"bits": 8, "type": "fp4"}}, "quant.type: applies only with quant.bits 4"),
    ({"method": "lora", "train": {"optimizer": "paged-adamw-8bit"}}, "which a cpu device lacks"),  # validate checks what train refuses
]


@pytest.mark.parametrize("changes,expected", REFUSED, ids=[r[1][:40] for r in REFUSED])
def test_unsupported_combination_is_refused_by_validate(llama, tmp_path, capsys, changes, expected):
    assert expected in validate_refusal(llama, tmp_path, capsys, changes)


@pytest.mark.parametrize("changes", [{"method": "qlora", "quant": {"type": "fp4", "double_quant": False}},
                                     {"method": "qlora", "quant": {"bits": 8}},
                                     {"method": "lora", "train": {"optimizer": "adamw-8bit"}},
                                     {"method": "qlora", "distributed": {"strategy": "fsdp"}},
                                     {"method": "qlora", "distributed": {"strategy": "deepspeed", "deepspeed": "zero2"}}])
def test_supported_combination_validates(llama, tmp_path, capsys, changes):
    recipe = tiny_recipe(llama, tmp_path / "run", **changes)
    assert main(["validate", str(write_recipe(recipe, tmp_path / "r.yaml"))]) == 0


def test_merge_reloads_with_plain_from_pretrained_and_matches_the_adapter(qlora_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from launcher.commands.merge import CHECK_PROMPTS, load_dequantised_base, logits
    from launcher.recipe.files import load_run
    run, _ = qlora_run
    result = run_here(["merge", run, "--dtype", "fp32"])
    assert result.returncode == 0, result.stderr
    assert "max |logit difference|" in result.stdout and " ok" in result.stdout
    merged_dir = run / "merged"  # beside final/, which stays the adapter alone
    assert not (run / "final" / "merged").exists()
    assert not (merged_dir / "adapter_config.json").exists() and "quantization_config" not in (merged_dir / "config.json").read_text()

    recipe = load_run(run)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    adapter = PeftModel.from_pretrained(load_dequantised_base(recipe, "float32"), run / "final").eval()
    from launcher.model.loading import load_tokenizer
    batch = dict(load_tokenizer(str(merged_dir), recipe)(CHECK_PROMPTS, return_tensors="pt", padding=True))
    expected = logits(adapter, batch)
    with adapter.disable_adapter():
        base = logits(adapter, batch)
    difference, learnt = (logits(merged, batch) - expected).abs().max().item(), (expected - base).abs().max().item()
    assert difference < 1e-4, difference  # the stated float32 tolerance
    assert learnt > 100 * difference, "the adapter must change the logits, or the check proves nothing"

    again = run_here(["merge", run])
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr
