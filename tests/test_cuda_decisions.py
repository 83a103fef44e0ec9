"""The decisions the CUDA and cluster paths rest on, checked on CPU in-process (issue 25).

No line of the CUDA path runs here: each test checks the function that decides what that path
does, or drives the same code with the real component (a real GradScaler) where CPU allows it.
bench/gpu_smoke.py exercises the GPU side; docs/gpu-checks.md says which is which.
"""
from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta

import pytest
import torch
from support import DATA, REPO, gpt2_tokenizer, tiny_recipe, without_eval, write_recipe

from launcher.checkpoint import layouts
from launcher.data.packing import VARLEN_KEYS, collate_packed, varlen_attention
from launcher.errors import NonFiniteError, UserError
from launcher.model.loading import absent_linears, checkpoint_keys, load_model, skeleton
from launcher.distributed import waiting
from launcher.distributed.launch import native_bf16
from launcher.distributed.slurm import SlurmJob, sbatch_script
from launcher.distributed.strategies import Fsdp2, fsdp_param_dtype, quant_storage_dtype
from launcher.recipe.schema import DistributedSection, Recipe
from launcher.evaluation.evaluate import main_process_metrics, synced_generation
from launcher.training import guard
from launcher.training.loop import setup, train_step


# ---------------------------------------------------------------- 2: an fp16 overflow is a skipped step

def scaled_session(tiny_model, tmp_path, skip_nonfinite: int):
    """A one-process CPU run whose optimiser steps through a real GradScaler, as fp16 runs do on a GPU.
    The initial scale (2^127) overflows fp32 at once, so the first step is a loss-scale overflow."""
    recipe = tiny_recipe(tiny_model, tmp_path / "run", lora={"r": 4, "alpha": 8, "dropout": 0.0},
                         train={"optimizer": "sgd", "max_grad_norm": 1.0, "skip_nonfinite": skip_nonfinite,
                                "micro_batch_size": 2, "grad_accum": 2, "lr": 0.1})
    recipe = without_eval(recipe)
    session = setup(Recipe.model_validate(recipe))
    accelerator = session.accelerator
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127, growth_interval=1000)
    session.optimizer = accelerator.prepare_optimizer(session.optimizer.optimizer, device_placement=False)
    session.scheduler.optimizers = [session.optimizer]
    return session


@pytest.mark.parametrize("skip_nonfinite", [0, 2])
def test_a_loss_scale_overflow_is_a_skipped_step_not_divergence(tiny_model, tmp_path, skip_nonfinite):
    session = scaled_session(tiny_model, tmp_path, skip_nonfinite)
    scaler = session.accelerator.scaler
    before = {n: p.detach().clone() for n, p in session.model.named_parameters() if p.requires_grad}
    first = train_step(session, session.micro_batches(0))
    assert first.overflow and not first.skipped and not guard.finite(first.grad_norm)
    assert guard.finite(first.loss), "the loss itself is finite: only the scaled gradients overflowed"
    guard.check_step(1, first.loss, None if first.overflow else first.grad_norm, first.skipped, lambda: None)  # no stop
    assert scaler.get_scale() == 2.0 ** 126, "the scaler's update ran: the scale halved"
    assert session.totals.get("skipped", 0) == 0, "an overflow does not use up train.skip_nonfinite"
    for name, param in session.model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.detach(), before[name], rtol=0, atol=0)
    second = train_step(session, session.micro_batches(0))  # the steps go on: unscale_ does not raise
    assert scaler.get_scale() == (2.0 ** 125 if second.overflow else 2.0 ** 126)
    scaler.update(2.0 ** 8)
    applied = train_step(session, session.micro_batches(1))
    assert not applied.overflow and guard.finite(applied.grad_norm)
    assert any(not torch.equal(p.detach(), before[n]) for n, p in session.model.named_parameters() if p.requires_grad)


def test_without_a_scaler_an_inf_gradient_norm_still_stops_or_is_skipped():
    totals: dict = {}
    assert guard.skip_update(float("inf"), False, totals, 1) and totals["skipped"] == 1
    assert not guard.skip_update(float("inf"), False, totals, 1), "the limit is used up"
    assert not guard.skip_update(float("inf"), True, {}, 0), "under a scaler its own step decides"
    with pytest.raises(NonFiniteError):
        guard.check_step(3, 1.0, float("inf"), False, lambda: None)


# ---------------------------------------------------------------- 3: the optimiser's step counter after a ZeRO resume

@pytest.mark.parametrize("fused", [False, True])
def test_restored_step_counter_is_where_torchs_adamw_keeps_it(fused):
    """Checked against torch's own AdamW on CPU, then the device rule on a parameter elsewhere (meta)."""
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=0.1, fused=fused)
    param.grad = torch.ones(3)
    optimizer.step()
    made = optimizer.state[param]["step"]
    restored = layouts.step_tensor(7, param, optimizer.param_groups[0])
    assert (restored.device, restored.dtype, restored.shape) == (made.device, made.dtype, made.shape)
    assert restored.item() == 7
    elsewhere = torch.nn.Parameter(torch.ones(3, device="meta"))
    expected = "meta" if fused else "cpu"  # fused CUDA AdamW reads the counter on the parameter's device
    assert layouts.step_tensor(7, elsewhere, optimizer.param_groups[0]).device.type == expected
    assert layouts.group_of(optimizer, elsewhere) is optimizer.param_groups[0], "a ZeRO-3 partition outside every group"


# ---------------------------------------------------------------- 8: CUDA RNG of this device only

def test_cuda_rng_restores_on_a_process_that_sees_fewer_devices():
    one = torch.arange(16, dtype=torch.uint8)
    old_format = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]  # every visible device, as saved before
    assert layouts.cuda_rng_for(one, 0) is one and layouts.cuda_rng_for(one, 3) is one
    assert layouts.cuda_rng_for(old_format, 2) is old_format[2]
    assert layouts.cuda_rng_for(old_format[:1], 5) is old_format[0], "a device the checkpoint never saw: no IndexError"
    assert "cuda" not in layouts.capture_rng() or not isinstance(layouts.capture_rng()["cuda"], list)


# ---------------------------------------------------------------- 9: every trainable parameter in float32

def test_a_bf16_base_trains_its_new_head_and_adapters_in_fp32(tiny_model, tmp_path):
    """A classifier on a bf16 base: peft upcasts the LoRA layers, the launcher the new head (modules_to_save)."""
    recipe = tiny_recipe(tiny_model, tmp_path / "run", model={"task": "classification", "dtype": "bfloat16"},
                         data={"train": str(DATA / "bbc_news" / "train.jsonl"), "eval": None, "format": "classification",
                               "fields": {}, "max_length": 32})
    model = load_model(str(tiny_model), Recipe.model_validate(recipe), on_gpu=False, labels=["a", "b", "c"])
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert any("modules_to_save" in n for n in trainable) and any("lora_" in n for n in trainable)
    assert set(trainable.values()) == {torch.float32}, {n: d for n, d in trainable.items() if d != torch.float32}
    assert any(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad), "the base stays bf16"
    ids = torch.tensor([[5, 6, 7, 8]])
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([1]))  # no autocast on CPU
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------- 10: main-process I/O waited out on a group of its own

def test_exports_and_checkpoints_wait_on_a_long_gloo_group_not_the_training_group():
    options = waiting.wait_group_options(waiting.EXPORT_WAIT_MINUTES)
    assert options["backend"] == "gloo", "a CPU barrier: NCCL's watchdog would abort a long wait"
    assert options["timeout"] >= timedelta(hours=2) > timedelta(minutes=DistributedSection().timeout_minutes)
    assert waiting.wait_group_options(120)["timeout"] == timedelta(minutes=120)


# ---------------------------------------------------------------- 11: the Slurm job asks for CPUs and memory

def sbatch_lines(tmp_path, **job) -> tuple[list[str], str]:
    script = sbatch_script(tmp_path / "r.yaml", tmp_path / "run", SlurmJob(python="py", **job))
    lines = script.splitlines()
    return [line for line in lines if line.startswith("#SBATCH")], next(line for line in lines if line.startswith("srun "))


def test_slurm_jobs_ask_for_whole_nodes_unless_told_otherwise(tmp_path):
    sbatch, srun = sbatch_lines(tmp_path, gpus_per_node=8)
    assert {"#SBATCH --gres=gpu:8", "#SBATCH --exclusive", "#SBATCH --mem=0"} <= set(sbatch)
    assert '--cpus-per-task="${SLURM_CPUS_ON_NODE:-1}"' in srun, "the one task per node gets every CPU"
    expanded = subprocess.run(["bash", "-c", f"echo {srun.split('--cpus-per-task=')[1].split()[0]}"], text=True,
                              capture_output=True, env={"SLURM_CPUS_ON_NODE": "96", "PATH": "/usr/bin:/bin"}).stdout
    assert expanded.strip() == "96"
    _, two_tasks = sbatch_lines(tmp_path, gpus_per_node=8, tasks_per_node=2)
    assert "--cpus-per-task=$(( ${SLURM_CPUS_ON_NODE:-2} / 2 ))" in two_tasks

    sbatch, srun = sbatch_lines(tmp_path, gpus_per_node=8, cpus_per_task=12, extra_sbatch=["mem=500G"])
    assert "#SBATCH --cpus-per-task=12" in sbatch and "--cpus-per-task=12" in srun
    assert "#SBATCH --mem=500G" in sbatch and "#SBATCH --mem=0" not in sbatch and "#SBATCH --exclusive" in sbatch

    sbatch, srun = sbatch_lines(tmp_path, gpus_per_node=4, resources="as-given")
    assert sbatch.count("#SBATCH --exclusive") == 0 and "#SBATCH --mem=0" not in sbatch and "--cpus-per-task" not in srun


# ---------------------------------------------------------------- 14: QLoRA leaves newly initialised modules unquantised

@pytest.fixture(scope="module")
def bert_without_pooler(tmp_path_factory):
    """A tiny BERT saved as BertForMaskedLM saves it: no pooler, which a classifier creates new."""
    from transformers import BertConfig, BertForMaskedLM
    folder = tmp_path_factory.mktemp("mlm-bert")
    tokenizer = gpt2_tokenizer(folder, chat=False)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_qlora_keeps_modules_the_checkpoint_lacks_out_of_4bit(bert_without_pooler, tmp_path):
    recipe = tiny_recipe(bert_without_pooler, tmp_path / "run", method="qlora", model={"task": "classification"},
                         data={"train": str(DATA / "bbc_news" / "train.jsonl"), "eval": None, "format": "classification",
                               "fields": {}, "max_length": 32})
    recipe = Recipe.model_validate(recipe)
    keys = checkpoint_keys(str(bert_without_pooler))
    assert keys and not any("pooler" in key for key in keys)
    assert absent_linears(skeleton(str(bert_without_pooler), recipe, ["a", "b"]), keys) == ["bert.pooler.dense", "classifier"]
    model = load_model(str(bert_without_pooler), recipe, on_gpu=False, labels=["a", "b"])
    pooler = model.get_submodule("base_model.model.bert.pooler.dense")
    assert getattr(pooler, "base_layer", pooler).weight.dtype == torch.float32, "the new pooler is a plain float layer"
    quantised = [n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]
    assert any("attention" in n for n in quantised), "the layers the checkpoint holds are still 4-bit"
    ids = torch.tensor([[5, 6, 7, 8]])
    model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([1])).loss.backward()


# ---------------------------------------------------------------- 5: packed batches tell flash-attention their bounds

def test_packed_batches_carry_varlen_bounds_for_flash_attention():
    rows = [{"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, -100, 5], "lengths": [3, 2]},
            {"input_ids": [6, 7, 8], "labels": [-100, 7, 8], "lengths": [3]}]
    batch = collate_packed(rows, pad_id=0, varlen=True)
    # row 0: examples of 3 and 2; row 1: one of 3, then its padding tail of 2; laid end to end
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == [0, 3, 5, 8, 10]
    assert batch["cu_seq_lens_q"].dtype == torch.int32 and batch["cu_seq_lens_q"][-1] == batch["input_ids"].numel()
    assert batch["max_length_q"] == batch["max_length_k"] == 3
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 0, 1]]
    assert not set(VARLEN_KEYS) & set(collate_packed(rows, pad_id=0)), "sdpa and eager read position_ids alone"
    assert varlen_attention("flash_attention_2") and varlen_attention("kernels-community/flash-attn3")
    assert not varlen_attention("sdpa") and not varlen_attention(None)



# ---------------------------------------------------------------- 1, 6, 7, 12, 13: the strategy's decisions

def fsdp_recipe(tiny_model, tmp_path, **changes) -> Recipe:
    """The tiny recipe under FSDP2 with `changes` given as sections (tiny_recipe then drops what they make moot)."""
    distributed = {"strategy": "fsdp", **changes.pop("distributed", {})}
    return Recipe.model_validate(tiny_recipe(tiny_model, tmp_path / "run", distributed=distributed, **changes))


def test_fsdp2_cpu_offload_gets_a_cpu_backend_beside_nccl(tiny_model, tmp_path):
    offload = Fsdp2(fsdp_recipe(tiny_model, tmp_path, distributed={"fsdp": {"cpu_offload": True}}))
    assert offload.backend(on_gpu=True, world=8) == "cpu:gloo,cuda:nccl"
    plain = Fsdp2(fsdp_recipe(tiny_model, tmp_path))
    assert plain.backend(on_gpu=True, world=8) is None, "accelerate's NCCL"
    assert plain.backend(on_gpu=False, world=2) == offload.backend(on_gpu=False, world=2) == "gloo"


def test_fsdp2_full_fine_tuning_reduce_scatters_every_micro_batch(tiny_model, tmp_path):
    assert Fsdp2(fsdp_recipe(tiny_model, tmp_path, method="full")).reduces_every_micro_batch()
    assert not Fsdp2(fsdp_recipe(tiny_model, tmp_path)).reduces_every_micro_batch(), "adapters: once per step"


def test_qlora_under_fsdp2_refuses_a_param_dtype_that_would_cast_the_4bit_storage(tiny_model, tmp_path):
    recipe = fsdp_recipe(tiny_model, tmp_path, method="qlora", quant={"compute_dtype": "bfloat16"})
    storage = quant_storage_dtype(recipe, on_gpu=True)
    assert storage == torch.bfloat16
    assert fsdp_param_dtype("bf16", storage) == torch.bfloat16
    assert fsdp_param_dtype("no", storage) is None, "no mixed precision: FSDP2 casts nothing"
    with pytest.raises(UserError, match="train.precision fp16 .* packed as bfloat16"):
        fsdp_param_dtype("fp16", storage)
    assert quant_storage_dtype(fsdp_recipe(tiny_model, tmp_path), on_gpu=True) is None
    assert fsdp_param_dtype("fp16", None) == torch.float16


def test_generation_is_synced_when_weights_are_sharded_and_metrics_come_from_rank_0(tiny_model, tmp_path):
    assert synced_generation(2, Fsdp2(fsdp_recipe(tiny_model, tmp_path)).rules.shards_parameters)
    assert not synced_generation(1, True) and not synced_generation(4, False)

    class One:  # a one-process accelerator: nothing to broadcast
        num_processes = 1
    metrics = {"eval_loss": 1.0}
    assert main_process_metrics(One(), metrics) is metrics


def test_auto_precision_takes_bf16_only_where_the_gpu_has_it_in_hardware():
    assert native_bf16((8, 0)) and native_bf16((9, 0))
    assert not native_bf16((7, 0)) and not native_bf16((7, 5)), "V100 and T4 only emulate bf16"


PRECISION_PROBE = """
import sys, torch
from launcher.recipe.files import load_recipe
from launcher.training.loop import setup, train_step
session = setup(load_recipe(sys.argv[1]))
seen = []
block = next(m for m in session.model.modules() if type(m).__name__ == "LlamaMLP")
block.register_forward_hook(lambda module, inputs, output: seen.append(str(output.dtype)))
train_step(session, session.micro_batches(0))
print(sorted(set(seen)))
"""


def test_fsdp2_on_one_process_computes_in_the_requested_precision(tiny_model, tmp_path):
    """In its own process: accelerate keeps one precision per process, and other tests here set up fp32 runs."""
    recipe = tiny_recipe(tiny_model, tmp_path / "run", distributed={"strategy": "fsdp"}, train={"precision": "bf16"})
    recipe = without_eval(recipe)
    path = write_recipe(recipe, tmp_path / "r.yaml")
    done = subprocess.run([sys.executable, "-c", PRECISION_PROBE, str(path)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "['torch.bfloat16']", "train.precision bf16 must reach the forward"


def test_a_stop_signal_during_a_long_eval_ends_it_between_batches_and_checkpoints(tiny_model, tmp_path):
    """Item 13: SIGTERM sent once the step-1 eval has begun (32 losses, then 32 generated translations) is acted on
    before its next batch: the eval is dropped (no step-1 eval line), step 1 is checkpointed, exit 0."""
    import json
    import signal
    recipe = tiny_recipe(tiny_model, tmp_path / "run", train={"max_steps": 3, "micro_batch_size": 2, "eval_every": 1},
                         eval={"samples": 0, "generate_rows": 32, "max_new_tokens": 24})
    recipe["data"]["max_eval_rows"] = 32
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "launcher", str(write_recipe(recipe, tmp_path / "r.yaml"))], cwd=REPO,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        for line in process.stdout:
            seen.append(line)
            if line.startswith("evaluation (step 1)"):
                process.send_signal(signal.SIGTERM)
                break
        seen += process.stdout.readlines()
        assert process.wait(timeout=600) == 0, "".join(seen)[-3000:]
    finally:
        process.kill()
    output = "".join(seen)
    assert "stopped by SIGTERM during the evaluation after step 1/3; checkpoint written" in output, output[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-1"]


# ---------------------------------------------------------------- the smoke script itself does not rot on CPU

def test_the_gpu_smoke_script_runs_every_check_cpu_can():
    """GPU time is scarce: a smoke script that fails on its own recipes (e.g. a key a new rule refuses) would waste
    it. Its dry run lists every check and runs the CPU-runnable ones, each of which must say ok."""
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_smoke.py"), "--dry-run"], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    results = [line for line in done.stdout.splitlines() if line.startswith("#")]
    listed = [line.split()[0] for line in done.stdout.splitlines() if line.startswith("  #")]
    assert done.returncode == 0 and len(results) == len(listed) >= 10, done.stdout[-3000:] + done.stderr[-2000:]
    for line in results:
        assert ": ok" in line or "skipped (GPU only)" in line, line
    assert sum(": ok" in line for line in results) >= 6
