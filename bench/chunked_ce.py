"""Peak memory of one forward+backward with plain vs chunked cross-entropy (train.loss_chunk_tokens).

Each mode runs in its own subprocess, so the peaks do not mask each other. On CPU the figure is
the rise of the process's peak RSS (getrusage ru_maxrss) over its level once model and batch
exist; on CUDA it is torch.cuda.max_memory_allocated over the same baseline.

    .venv/bin/python bench/chunked_ce.py                       # CPU, vocab 65536, 4 x 512 tokens
    .venv/bin/python bench/chunked_ce.py --device cuda --vocab 128256 --length 2048
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(args) -> dict:
    """One mode, in this process: returns peak memory above baseline (MiB) and step seconds."""
    import resource

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from launcher.model.loss import task_loss_sum
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(args.device)
    ids = torch.randint(0, args.vocab, (args.batch, args.length), device=args.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    cuda = args.device == "cuda"

    def peak() -> float:
        if cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() / 2**20 if cuda else peak()
    started = time.perf_counter()
    total, count = task_loss_sum(model, batch, "causal-lm", args.chunk)
    total.backward()
    if cuda:
        torch.cuda.synchronize()
    return {"chunk": args.chunk, "peak_mib": round(peak() - base, 1), "seconds": round(time.perf_counter() - started, 3),
            "loss": round((total / count).item(), 6)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--chunks", default="0,1024,256", help="comma-separated loss_chunk_tokens values; 0 is plain CE")
    parser.add_argument("--chunk", type=int, default=None, help=argparse.SUPPRESS)  # one mode, run as a child
    args = parser.parse_args()
    if args.chunk is not None:
        print(json.dumps(measure(args)))
        return
    logits_mib = args.batch * args.length * args.vocab * 4 / 2**20
    print(f"device {args.device}; vocab {args.vocab}, hidden {args.hidden}, batch {args.batch} x {args.length}; "
          f"one full fp32 logits tensor = {logits_mib:.0f} MiB")
    print(f"{'loss_chunk_tokens':>17} | {'peak MiB over baseline':>22} | {'vs plain':>8} | {'step s':>7} | loss")
    plain = None
    for chunk in [int(c) for c in args.chunks.split(",")]:
        child = [sys.executable, __file__, "--chunk", str(chunk), "--device", args.device, "--vocab", str(args.vocab),
                 "--hidden", str(args.hidden), "--batch", str(args.batch), "--length", str(args.length)]
        result = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        plain = plain or result
        ratio = result["peak_mib"] / plain["peak_mib"]
        print(f"{chunk or 'plain':>17} | {result['peak_mib']:>22.1f} | {ratio:>8.2f} | {result['seconds']:>7.3f} | {result['loss']}")


if __name__ == "__main__":
    main()
