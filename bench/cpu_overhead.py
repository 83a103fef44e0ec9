"""CPU benchmark: the launcher's loop against a plain PyTorch loop, and padding efficiency with packing.

1. Step time: `python -m launcher` trains a small random Llama (full fine-tuning, AdamW) on the
   shipped Bible data; a plain loop then trains the same weights on exactly the same micro-batches
   (same StepPlan order, same collate) with torch.optim.AdamW. Median step seconds after warmup.
2. Padding efficiency (real tokens / token slots) on recipes/data/bible_en_es, padded batches in
   training order vs packed rows.
3. Preprocessing throughput (rows/s): the launcher's tokenisation of the Bible pairs through a
   ChatML template against TRL's SFT data path (`SFTTrainer._prepare_dataset`: template, tokenise,
   completion mask, labels, truncation) on the same pairs as prompt/completion conversations, and
   both packers on the same token rows. TRL is not a dependency; install it beside the venv with
   `pip install --no-deps --target /tmp/trl_pkg trl` and run with PYTHONPATH=/tmp/trl_pkg.

    OMP_NUM_THREADS=2 .venv/bin/python bench/cpu_overhead.py
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from support import DATA, build_tiny_llama, launch, tiny_recipe, write_recipe  # noqa: E402


def launcher_steps(model: Path, work: Path, steps: int, micro: int, length: int) -> list[float]:
    """step_seconds of a real launcher run (its own process, as users run it)."""
    recipe = tiny_recipe(model, work / "run", method="full", lora=None,
                         data={"eval": None, "max_train_rows": None, "max_length": length},
                         train={"max_steps": steps, "micro_batch_size": micro, "grad_accum": 1, "lr": 1e-4,
                                "schedule": "constant", "max_grad_norm": 1.0, "seed": 3})
    recipe.pop("lora")
    done = launch([write_recipe(recipe, work / "recipe.yaml")], env={"OMP_NUM_THREADS": "2"}, timeout=900)
    if done.returncode:
        raise SystemExit(done.stdout + done.stderr)
    lines = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    return [line["step_seconds"] for line in lines if line.get("kind") == "train"]


def plain_steps(model: Path, steps: int, micro: int, length: int) -> list[float]:
    """The same micro-batches through the shortest correct loop: forward, summed CE / tokens, backward, clip, step."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launcher.data.batching import StepPlan, collate
    from launcher.data.encode import tokenise
    from launcher.recipe.schema import DataSection
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(model)
    data = DataSection(train=str(DATA / "bible_en_es" / "train.jsonl"), format="translation",
                       fields={"source": "en", "target": "es"}, max_length=length)
    rows = tokenise(data.train, tokenizer, data, None).dataset
    torch.manual_seed(3)
    net = AutoModelForCausalLM.from_pretrained(model).train()
    net.config.use_cache = False  # as the launcher sets it: otherwise every training forward fills a KV cache
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.0)
    plan = StepPlan(len(rows), micro, 1, 1, 0, 3)
    seconds = []
    for step in range(steps):
        started = time.perf_counter()
        batch = collate(rows.select(plan.micro_batches(step)[0]), tokenizer.pad_token_id)
        logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        # (N, vocab) rows as transformers' own loss does; CE over a transposed (batch, vocab, time) view is ~2x slower on CPU
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                                 ignore_index=-100, reduction="sum")
        (loss / (targets != -100).sum()).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        seconds.append(time.perf_counter() - started)
    return seconds


def padding_table(model: Path, micro: int, length: int) -> None:
    import torch
    from transformers import AutoTokenizer

    from launcher.data.encode import tokenise
    from launcher.data.packing import pack_dataset, padding_efficiency
    from launcher.recipe.schema import DataSection
    tokenizer = AutoTokenizer.from_pretrained(model)
    data = DataSection(train=str(DATA / "bible_en_es" / "train.jsonl"), format="translation",
                       fields={"source": "en", "target": "es"}, max_length=length)
    rows = tokenise(data.train, tokenizer, data, None).dataset
    shuffled = rows.select(torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist())
    started = time.perf_counter()
    packed = pack_dataset(rows, length)
    pack_s = time.perf_counter() - started
    print(f"\npadding efficiency, bible_en_es train ({len(rows)} rows, GPT-2 tokenizer, max_length {length}, micro-batch {micro}):")
    print(f"{'layout':<28} | {'rows':>5} | {'real/slots':>10}")
    print(f"{'padded, training order':<28} | {len(rows):>5} | {padding_efficiency(shuffled, micro):>10.1%}")
    print(f"{'packed (BFD), training order':<28} | {len(packed):>5} | "
          f"{padding_efficiency(packed.shuffle(seed=0), micro):>10.1%}   (packing took {pack_s:.2f} s)")
    trl_packing(rows, length, len(packed), pack_s)


def trl_packing(rows, length: int, ours_rows: int, ours_s: float) -> None:
    """TRL's BFD packer on the same token rows, when TRL is importable."""
    try:
        from trl.data_utils import pack_dataset as trl_pack
    except ImportError as exc:
        print(f"TRL not importable ({exc}); no TRL comparison")
        return
    import trl
    started = time.perf_counter()
    packed = trl_pack(rows.select_columns(["input_ids"]), length, strategy="bfd")
    trl_s = time.perf_counter() - started
    print(f"\npacking the same {len(rows)} tokenised rows to {length} tokens (best-fit decreasing):")
    print(f"{'packer':<14} | {'rows out':>8} | {'seconds':>7} | {'rows/s':>8}")
    print(f"{'launcher':<14} | {ours_rows:>8} | {ours_s:>7.3f} | {len(rows) / ours_s:>8.0f}")
    print(f"{'trl ' + trl.__version__:<14} | {len(packed):>8} | {trl_s:>7.3f} | {len(rows) / trl_s:>8.0f}")
    print(f"launcher / trl time: {ours_s / trl_s:.2f}")


def preprocessing_table(chat_model: Path, length: int, work: Path) -> None:
    """Rows/s from the jsonl rows to trainable token rows (ids + masked labels), launcher vs TRL's SFT path."""
    from transformers import AutoTokenizer

    from launcher.data.encode import tokenise
    from launcher.data.sources import load_table
    from launcher.recipe.schema import DataSection
    source = DATA / "bible_en_es" / "train.jsonl"
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    data = DataSection(train=str(source), format="translation", fields={"source": "en", "target": "es"}, max_length=length)
    load_table(source)  # json -> Arrow once, outside both timings
    started = time.perf_counter()
    ours = tokenise(data.train, tokenizer, data, None).dataset
    ours_s = time.perf_counter() - started
    print(f"\npreprocessing {len(ours)} translation pairs, ChatML template, max_length {length}:")
    print(f"{'path':<30} | {'seconds':>7} | {'rows/s':>7} | {'trained tokens':>14}")
    print(f"{'launcher tokenise':<30} | {ours_s:>7.2f} | {len(ours) / ours_s:>7.0f} | "
          f"{sum(sum(t != -100 for t in row) for row in ours['labels']):>14}")
    try:
        import trl
        from transformers import AutoModelForCausalLM
        from trl import SFTConfig, SFTTrainer
    except ImportError as exc:
        print(f"TRL not importable ({exc}); no TRL comparison")
        return
    prompt = data.prompt_template
    conversations = load_table(source).map(lambda row: {
        "prompt": [{"role": "user", "content": prompt.format(source_lang="English", target_lang="Spanish", source=row["en"])}],
        "completion": [{"role": "assistant", "content": row["es"]}]}, remove_columns=["en", "es"])
    args = SFTConfig(output_dir=str(work / "trl"), max_length=length, report_to="none", dataset_num_proc=None,
                     bf16=False, use_cpu=True)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(chat_model), args=args,
                         train_dataset=conversations.select(range(8)), processing_class=tokenizer)
    started = time.perf_counter()
    theirs = trainer._prepare_dataset(conversations, tokenizer, args, False, None, "train")
    trl_s = time.perf_counter() - started
    print(f"{'trl ' + trl.__version__ + ' SFT _prepare_dataset':<30} | {trl_s:>7.2f} | {len(theirs) / trl_s:>7.0f} | "
          f"{sum(sum(t != -100 for t in row) for row in theirs['labels']):>14}")
    print(f"launcher rows/s / trl rows/s: {(len(ours) / ours_s) / (len(theirs) / trl_s):.2f}")


def plain_steps_in_own_process(model: Path, args) -> list[float]:
    """The plain loop in a fresh process too, so both arms start from the same process state."""
    import subprocess
    command = [sys.executable, __file__, "--plain-arm", str(model), "--steps", str(args.steps), "--micro", str(args.micro),
               "--length", str(args.length)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"}, timeout=900)
    if done.returncode:
        raise SystemExit(done.stdout + done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def step_table(model: Path, work: Path, args) -> None:
    plain = plain_steps_in_own_process(model, args)[5:]
    ours = launcher_steps(model, work, args.steps, args.micro, args.length)[5:]
    a, b = statistics.median(ours), statistics.median(plain)
    print(f"step time, random Llama hidden {args.hidden} x {args.layers} layers, full FT, AdamW, "
          f"micro-batch {args.micro}, max_length {args.length}, median of steps 6-{args.steps}:")
    print(f"{'loop':<10} | {'median s':>9} | {'mean s':>7}")
    print(f"{'launcher':<10} | {a:>9.4f} | {statistics.mean(ours):>7.4f}")
    print(f"{'plain':<10} | {b:>9.4f} | {statistics.mean(plain):>7.4f}")
    print(f"overhead (launcher / plain - 1): {a / b - 1:+.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--only-data", action="store_true", help="skip the step-time comparison")
    parser.add_argument("--plain-arm", type=Path, help=argparse.SUPPRESS)  # internal: run the plain loop on this model
    args = parser.parse_args()
    if args.plain_arm:
        print(json.dumps(plain_steps(args.plain_arm, args.steps, args.micro, args.length)))
        return
    import datasets
    datasets.disable_caching()  # every arm really computes: a rerun would otherwise read the last run's results
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_tiny_llama(work / "model", chat=False, hidden=args.hidden, layers=args.layers)
        if not args.only_data:
            step_table(model, work, args)
        padding_table(model, args.micro, args.length)
        preprocessing_table(build_tiny_llama(work / "chat-model", chat=True, hidden=64, layers=1), args.length, work)


if __name__ == "__main__":
    main()
