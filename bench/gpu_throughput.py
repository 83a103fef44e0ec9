"""GPU throughput: 1.1B full fine-tuning at 4 x 2048, launcher loss path vs a plain loop; chunked CE and packing.

Random-init TinyLlama-1.1B shapes (config saved to disk, no network); variable-length rows drawn from
the shipped Bible data's length distribution, scaled up. Modes: plain loop (full logits, padded),
launcher loss path (task_loss_sum: padded; chunked CE; chunked CE + packing). Prints tokens/s
(real tokens), peak memory and ratios to the plain loop.

    .venv/bin/python bench/gpu_throughput.py --steps 10          # on one GPU
    .venv/bin/python bench/gpu_throughput.py --dry               # CPU: tiny shapes, checks the script runs
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
DRY = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)


def example_lengths(n: int, length: int, seed: int) -> list[int]:
    """Lengths shaped like the Bible data's token counts, stretched so the longest fills `length`."""
    import torch
    rows = [json.loads(line) for line in (REPO / "recipes/data/bible_en_es/train.jsonl").read_text().splitlines()]
    chars = torch.tensor([len(r["en"]) + len(r["es"]) for r in rows], dtype=torch.float)
    pick = chars[torch.randint(0, len(rows), (n,), generator=torch.Generator().manual_seed(seed))]
    return (pick / chars.max() * length).clamp(min=16).long().tolist()


def batches(lengths: list[int], micro: int, length: int, vocab: int, packing: bool) -> list[dict]:
    import datasets
    import torch

    from launcher.data.batching import collate
    from launcher.data.packing import collate_packed, pack_dataset
    generator = torch.Generator().manual_seed(0)
    rows = [{"input_ids": (ids := torch.randint(3, vocab, (n,), generator=generator).tolist()), "labels": ids} for n in lengths]
    table = datasets.Dataset.from_list(rows)
    if packing:
        table = pack_dataset(table, length)
    batch = collate_packed if packing else collate
    return [batch(list(table.select(range(i, min(i + micro, len(table))))), 0) for i in range(0, len(table) - micro + 1, micro)]


def run_mode(model, data: list[dict], steps: int, mode: str, chunk: int) -> dict:
    import torch

    from launcher.model.loss import task_loss_sum
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=torch.cuda.is_available())
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    tokens, seconds = 0, 0.0
    for step in range(steps + 2):  # two warmup steps are not timed
        batch = {k: v.to(device, non_blocking=True) for k, v in data[step % len(data)].items()}
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            if mode == "plain":
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
                total = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], reduction="sum")
                count = (batch["labels"][:, 1:] != -100).sum()
            else:
                total, count = task_loss_sum(model, batch, "causal-lm", chunk)
        (total / count).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= 2:
            seconds += time.perf_counter() - started
            tokens += int(batch["attention_mask"].sum())
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    del optimizer
    return {"tokens_per_s": tokens / seconds, "peak_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=2048, help="loss_chunk_tokens for the chunked modes")
    parser.add_argument("--dry", action="store_true", help="tiny shapes on CPU: checks the script, measures nothing")
    parser.add_argument("--out", default="bench/out/gpu_throughput", help="where the random-init config is saved")
    args = parser.parse_args()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    shapes, device = (DRY, "cpu") if args.dry else (TINYLLAMA, "cuda")
    length = 64 if args.dry else args.length
    config = LlamaConfig(**shapes, attn_implementation="sdpa", use_cache=False)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    config.save_pretrained(args.out)  # shapes on disk: the run is reproducible offline
    lengths = example_lengths(args.micro * (args.steps + 2) * 4, length, seed=0)
    padded = batches(lengths, args.micro, length, shapes["vocab_size"], packing=False)
    packed = batches(lengths, args.micro, length, shapes["vocab_size"], packing=True)
    modes = [("plain loop, padded", "plain", padded, 0), ("launcher, padded", "launcher", padded, 0),
             (f"launcher, chunked CE {args.chunk}", "launcher", padded, args.chunk),
             (f"launcher, chunked CE + packing", "launcher", packed, args.chunk)]
    print(f"{'mode':<34} | {'tokens/s':>10} | {'peak GiB':>8} | {'tok/s vs plain':>14} | {'mem vs plain':>12}")
    base = None
    for name, mode, data, chunk in modes:
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        result = run_mode(model, data, args.steps, mode, chunk)
        base = base or result
        print(f"{name:<34} | {result['tokens_per_s']:>10.0f} | {result['peak_gib']:>8.2f} | "
              f"{result['tokens_per_s'] / base['tokens_per_s']:>14.2f} | {result['peak_gib'] / base['peak_gib']:>12.2f}")
        del model
        if device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
