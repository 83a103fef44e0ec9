"""QLoRA throughput and peak memory: the launcher's recipe vs a plain transformers+peft+bitsandbytes loop.

One command on a GPU machine with no network. It builds a random-init Llama-3-8B-shaped model
(saved once, bf16, to --workdir), a word-level tokenizer whose every word is one token, and rows
of random words cut to exactly --length tokens; then runs each arm in its own subprocess, so peak
memory is per arm. Both arms: nf4 + double quantisation, bf16 compute and autocast, LoRA r16 on
all linear layers, gradient checkpointing, fused AdamW, micro-batch --batch x --length tokens.
Timing skips --warmup steps. The launcher arm is `launcher.cli.main([recipe])`, the code path of
`python -m launcher recipe.yaml`; its tokens/s comes from the step_seconds it logs in metrics.jsonl.

    python bench/gpu_qlora.py                     # H200: 8B shape, 4 x 2048 tokens, 20 steps
    python bench/gpu_qlora.py --dry               # tiny shape, CPU is fine: checks the plumbing

Peak memory is torch.cuda.max_memory_allocated on GPU and peak RSS (ru_maxrss) on CPU.
Reference (plain loop, H200, docs/platform.md): about 6.3k tokens/s and 22 GiB, measured while that arm still
upcast embeddings, norms and head to fp32 (issue 25): rerun before comparing.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
LORA = dict(r=16, alpha=32, dropout=0.05)
LR = 1e-4


def prepare(args) -> tuple[Path, Path]:
    """Model, tokenizer and data under --workdir (reused when present)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    shape = TINY if args.dry else LLAMA3_8B
    folder = Path(args.workdir) / ("tiny" if args.dry else "llama3-8b-random")
    if not (folder / "config.json").is_file():
        vocab = {f"w{i}": i for i in range(shape["vocab_size"])}
        words = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
        words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w0", eos_token="w1", pad_token="w1")
        config = LlamaConfig(**shape, eos_token_id=1, pad_token_id=1, bos_token_id=None, tie_word_embeddings=False)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(config).to(torch.bfloat16)  # random init: no weights reach this machine
        staging = folder.with_name(folder.name + ".tmp")
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(folder)
        del model
    data = Path(args.workdir) / f"words-{args.length}.jsonl"
    if not data.is_file():
        rng = random.Random(0)
        rows = max(64, args.batch * (args.steps + 1))
        with open(data, "w") as handle:
            for _ in range(rows):  # longer than --length: every row is truncated to exactly that many tokens
                handle.write(json.dumps({"text": " ".join(f"w{rng.randrange(2, shape['vocab_size'])}"
                                                          for _ in range(args.length + 8))}) + "\n")
    return folder, data


def peak_memory_gib() -> float:
    import resource

    import torch
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def arm_plain(args, folder: Path) -> dict:
    """What a user writes by hand: the same settings, no launcher."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    compute = torch.bfloat16 if cuda else torch.float32
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=compute, device_map={"": device},
                                                 attn_implementation="sdpa")
    model.config.use_cache = False
    # as the launcher arm does by default (quant.fp32_non_quantised off): embeddings, norms and head stay in the compute
    # dtype; prepare_model_for_kbit_training would upcast them to fp32 and bias the memory ratio against this arm
    model.enable_input_require_grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, fused=cuda or None)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    seconds = []
    for step in range(args.steps):
        ids = torch.randint(2, vocab, (args.batch, args.length), generator=generator).to(device)
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # waits for the step, as the launcher's per-step loss does
        seconds.append(time.perf_counter() - started)
    timed = seconds[args.warmup:]
    return {"tokens_per_s": args.batch * args.length * len(timed) / sum(timed), "peak_gib": peak_memory_gib(),
            "steps": len(seconds), "last_loss": loss.item()}


def arm_launcher(args, folder: Path, data: Path) -> dict:
    import yaml

    from launcher.cli import main
    run_dir = Path(args.workdir) / "run-launcher"
    recipe = {
        "model": {"path": str(folder), "attn_implementation": "sdpa"},
        "method": "qlora",
        "quant": {"bits": 4, "type": "nf4", "double_quant": True},
        "lora": {**LORA, "target_modules": "all-linear"},
        "data": {"train": str(data), "format": "text", "max_length": args.length},
        "train": {"max_steps": args.steps, "micro_batch_size": args.batch, "grad_accum": 1, "lr": LR, "schedule": "constant",
                  "optimizer": "adamw", "gradient_checkpointing": True, "max_grad_norm": 1.0, "save_every": 0, "seed": 0},
        "output_dir": str(run_dir),
    }
    path = Path(args.workdir) / "launcher-qlora.yaml"
    path.write_text(yaml.safe_dump(recipe))
    status = main(["train", str(path), "--overwrite"])
    if status != 0:
        raise SystemExit(f"launcher exited {status}")
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s.get("kind") == "train"]
    timed = steps[args.warmup:]
    return {"tokens_per_s": sum(s["tokens"] for s in timed) / sum(s["step_seconds"] for s in timed),
            "peak_gib": peak_memory_gib(), "steps": len(steps), "last_loss": steps[-1]["loss"]}


def run_arm(args, arm: str) -> dict:
    command = [sys.executable, __file__, "--arm", arm, "--workdir", args.workdir, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--batch", str(args.batch), "--length", str(args.length)] + ["--dry"] * args.dry
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"arm {arm} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry", action="store_true", help="tiny shape, 64 tokens, 4 steps: checks the plumbing (CPU is fine)")
    parser.add_argument("--workdir", default="/tmp/gpu_qlora", help="model, data and runs (about 16 GB for the 8B shape)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of tokens/s")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--arm", choices=["plain", "launcher"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dry and "--steps" not in sys.argv:
        args.steps, args.warmup, args.batch, args.length = 4, 1, 2, 64
    return args


def report(args, results: dict) -> dict:
    plain, ours = results["plain"], results["launcher"]
    results["ratios"] = {"tokens_per_s": ours["tokens_per_s"] / plain["tokens_per_s"], "peak_memory": ours["peak_gib"] / plain["peak_gib"]}
    memory = "peak GiB" if "cuda" in results["device"] else "peak RSS GiB"
    print(f"QLoRA {'tiny (dry)' if args.dry else 'Llama-3-8B shape'}, {args.batch} x {args.length} tokens, "
          f"{args.steps} steps ({args.warmup} warm-up) on {results['device']}")
    print(f"{'arm':<10}{'tokens/s':>12}{memory:>16}{'wall s':>9}")
    for name in ("plain", "launcher"):
        r = results[name]
        print(f"{name:<10}{r['tokens_per_s']:>12.1f}{r['peak_gib']:>16.2f}{r['wall_s']:>9.1f}")
    print(f"launcher / plain: tokens/s x{results['ratios']['tokens_per_s']:.3f}, peak memory x{results['ratios']['peak_memory']:.3f}")
    if not args.dry:
        print("reference (plain loop, H200, docs/platform.md): about 6.3k tokens/s and 22 GiB")
    return results


def main() -> None:
    args = parse()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    folder, data = prepare(args)
    if args.arm:
        result = arm_plain(args, folder) if args.arm == "plain" else arm_launcher(args, folder, data)
        print(json.dumps(result))
        return
    import torch
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    results = {"device": ("cuda " + device) if device != "cpu" else "cpu", "plain": run_arm(args, "plain"),
               "launcher": run_arm(args, "launcher")}
    out = Path(args.workdir) / "gpu_qlora.json"
    out.write_text(json.dumps(report(args, results), indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
