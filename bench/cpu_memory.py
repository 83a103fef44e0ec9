"""CPU calibration of the memory planner: planned against measured peak memory growth of a full fine-tune.

A random-init Llama of about 100M parameters (weights, gradients and AdamW state in float32: about
1.7 GB together) is built in a fresh subprocess; the launcher's own optimiser (launcher/optim.py) and
loss (launcher/loss.py) then run three steps on micro-batches of random full-length rows. Measured:
the process's peak resident memory at the end (ru_maxrss) minus its current resident memory once the
model was built, so the weights themselves are left out. Planned: `launcher plan`'s peak for the same
recipe with CPU dtypes, minus its weights.

    python bench/cpu_memory.py            # prints one JSON line: planned, measured, ratio
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
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


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        print(json.dumps(calibrate(Path(folder))))
