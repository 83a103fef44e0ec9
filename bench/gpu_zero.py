"""ZeRO on one GPU: the launcher's ZeRO-2 and ZeRO-3 recipes against a plain transformers loop.

One command on a GPU machine with no network:

    python bench/gpu_zero.py                # random-init TinyLlama-1.1B shape, seq 2048
    python bench/gpu_zero.py --dry          # tiny shape on CPU: checks the script end to end

It builds a random-init Llama of TinyLlama's shape and a word-level tokenizer (no hub), writes
random-token training rows, runs the launcher (torchrun, 1 process) with strategy deepspeed zero2
and zero3, and a plain loop (bf16 autocast, fused AdamW, SDPA) on the same shapes, each in its own
process. It prints tokens/s (steps after warm-up) and peak GPU memory (polled from outside, the
same way for all three) and the ratios to the plain loop. No timing is asserted: this is a
measurement, not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1000)


def build_model(folder: Path, shape: dict, seq: int) -> None:
    """Random-init Llama saved with a word-level tokenizer whose every id is one word 'wN'."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    if (folder / "config.json").is_file():
        return
    vocab = {f"w{i}": i for i in range(shape["vocab_size"] - 1)}
    vocab["<eos>"] = shape["vocab_size"] - 1
    core = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>", unk_token="w0")
    torch.manual_seed(0)
    config = LlamaConfig(**shape, max_position_embeddings=max(seq, 2048), eos_token_id=vocab["<eos>"],
                         pad_token_id=vocab["<eos>"], bos_token_id=None, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def write_rows(path: Path, rows: int, seq: int, vocab: int) -> None:
    """Rows of exactly `seq` tokens (seq - 1 words + eos), so every step carries the same token count."""
    rng = random.Random(0)
    with path.open("w") as handle:
        for _ in range(rows):
            handle.write(json.dumps({"text": " ".join(f"w{rng.randrange(1, vocab - 1)}" for _ in range(seq - 1))}) + "\n")


class PeakMemory:
    """Peak GPU memory in use on the device while a child process runs, polled from outside."""

    def __init__(self, on_gpu: bool) -> None:
        self.on_gpu, self.peak, self._stop = on_gpu, 0, threading.Event()

    def _used(self) -> int:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True)
        return int(out.stdout.split()[0]) * 2**20 if out.returncode == 0 and out.stdout.strip() else 0

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._used())
            time.sleep(0.2)

    def __enter__(self):
        if self.on_gpu and shutil.which("nvidia-smi"):
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()


def run_launcher(stage: str, model: Path, data: Path, work: Path, args, on_gpu: bool) -> dict:
    import yaml
    run_dir = work / f"run-{stage}"
    shutil.rmtree(run_dir, ignore_errors=True)
    recipe = {"model": {"path": str(model)}, "method": "full",
              "data": {"train": str(data), "format": "text", "max_length": args.seq, "chat_template": "never"},
              "train": {"max_steps": args.steps, "micro_batch_size": args.micro, "grad_accum": 1, "lr": 1e-5,
                        "schedule": "constant", "precision": "bf16" if on_gpu else "fp32", "max_grad_norm": 1.0,
                        "gradient_checkpointing": args.gradient_checkpointing},
              "distributed": {"strategy": "deepspeed", "deepspeed": stage, "num_processes": 1},
              "output_dir": str(run_dir)}
    path = work / f"{stage}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", "29561",
               "-m", "launcher", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4"), "HF_HUB_OFFLINE": "1"}
    with PeakMemory(on_gpu) as memory:
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"launcher {stage} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s.get("kind") == "train"][args.warmup:]
    tokens = sum(s["tokens"] for s in steps)
    seconds = sum(s["step_seconds"] for s in steps)
    shutil.rmtree(run_dir, ignore_errors=True)  # a 1.1B checkpoint is ~18 GB
    return {"name": f"launcher {stage}", "tokens_per_s": tokens / seconds, "peak_bytes": memory.peak}


def plain_loop(args) -> None:
    """The reference: transformers + torch only, the same shapes, bf16 autocast, fused AdamW."""
    import torch
    from transformers import AutoModelForCausalLM
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa").to(device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=on_gpu)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    timed_tokens, timed_seconds = 0, 0.0
    for step in range(args.steps):
        ids = torch.randint(1, vocab - 1, (args.micro, args.seq), generator=generator).to(device)
        if on_gpu:
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=on_gpu):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.synchronize()
        if step >= args.warmup:
            timed_tokens += ids.numel()
            timed_seconds += time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if on_gpu else 0
    print(json.dumps({"tokens_per_s": timed_tokens / timed_seconds, "allocated_peak_bytes": peak}))


def run_plain(args, on_gpu: bool) -> dict:
    command = [sys.executable, __file__, "--plain", "--model", str(args.model), "--seq", str(args.seq),
               "--micro", str(args.micro), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    command += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
    with PeakMemory(on_gpu) as memory:
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        sys.exit(f"plain loop failed:\n{result.stderr[-6000:]}")
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    return {"name": "plain transformers loop", "tokens_per_s": numbers["tokens_per_s"], "peak_bytes": memory.peak,
            "allocated_peak_bytes": numbers["allocated_peak_bytes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="tiny shape, short sequences; runs on CPU")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu_zero"), help="model, data and runs go here")
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--micro", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    defaults = dict(seq=64, micro=2, steps=4, warmup=1) if args.dry else dict(seq=2048, micro=4, steps=12, warmup=3)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.plain:
        return plain_loop(args)

    import torch
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.dry:
        sys.exit("no GPU: run with --dry for the CPU check")
    shape = TINY if args.dry else TINYLLAMA
    args.work.mkdir(parents=True, exist_ok=True)
    args.model = args.work / ("model-tiny" if args.dry else "model-tinyllama-1.1b")
    build_model(args.model, shape, args.seq)
    data = args.work / f"rows-{args.seq}.jsonl"
    write_rows(data, rows=args.micro * args.steps, seq=args.seq, vocab=shape["vocab_size"])

    results = [run_plain(args, on_gpu)] + [run_launcher(stage, args.model, data, args.work, args, on_gpu)
                                           for stage in ("zero2", "zero3")]
    base = results[0]
    print(f"\nshape {'tiny (dry)' if args.dry else 'TinyLlama-1.1B'}, micro batch {args.micro} x {args.seq} tokens, "
          f"{args.steps} steps ({args.warmup} warm-up not timed), device {'cuda' if on_gpu else 'cpu'}")
    print(f"{'run':<26}{'tokens/s':>12}{'peak GiB':>10}{'speed vs plain':>16}{'memory vs plain':>17}")
    for row in results:
        speed = row["tokens_per_s"] / base["tokens_per_s"]
        memory = f"{row['peak_bytes'] / base['peak_bytes']:.2f}" if base["peak_bytes"] else "n/a"
        peak = f"{row['peak_bytes'] / 2**30:.1f}" if row["peak_bytes"] else "n/a"
        print(f"{row['name']:<26}{row['tokens_per_s']:>12.0f}{peak:>10}{speed:>16.2f}{memory:>17}")


if __name__ == "__main__":
    main()
