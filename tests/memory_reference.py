"""Recipes that reproduce the settings of a line of tests/data/h200-peak-memory.jsonl (see tests/data/README.md)."""
from __future__ import annotations

import json
from pathlib import Path

REFERENCE = Path(__file__).resolve().parent / "data" / "h200-peak-memory.jsonl"
DATA = Path(__file__).resolve().parents[1] / "recipes" / "data" / "bible_en_es" / "train.jsonl"
TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def reference_lines() -> list[dict]:
    return [json.loads(line) for line in REFERENCE.read_text().splitlines() if line.strip()]


def config_folder(line: dict, root: Path) -> Path:
    """A config.json of the line's shape (no weights: the planner needs none)."""
    shape = line["shape"]
    folder = root / line["label"]
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": [shape["architecture"]], "model_type": "llama", "hidden_act": "silu",
              "max_position_embeddings": max(4096, line["seq_len"]), "rms_norm_eps": 1e-5,
              **{key: value for key, value in shape.items() if key != "architecture"}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def recipe_for(line: dict, model: Path) -> dict:
    """The launcher recipe with the line's method, dtypes, loss, optimiser, micro-batch, length and strategy."""
    method, precision, strategy = line["method"], line["precision"], line["strategy"]
    recipe = {
        "model": {"path": str(model), "attn_implementation": line.get("attention", "sdpa"),
                  "dtype": "float32" if method == "full" else "bfloat16"},
        "method": method,
        "data": {"train": str(DATA), "format": "translation", "fields": {"source": "en", "target": "es"},
                 "max_length": line["seq_len"]},
        "train": {"micro_batch_size": line["micro_batch_size"], "gradient_checkpointing": line["gradient_checkpointing"],
                  "optimizer": "adamw", "max_steps": 10,
                  # autocast only where the line says so; DeepSpeed's bf16 mode casts the weights instead
                  "precision": "bf16" if "bf16 autocast" in precision or "DeepSpeed bf16" in precision else "fp32"},
        "output_dir": "runs/reference",
    }
    if line["loss"].startswith("chunked"):
        recipe["train"]["loss_chunk_tokens"] = int(line["loss"].split("chunked CE, ")[1].split("-token")[0])
    if "lora" in line:
        lora = line["lora"]
        recipe["lora"] = {"r": lora["r"], "alpha": lora["alpha"], "dropout": 0.0,  # peft's default
                          "target_modules": [TARGETS[t] for t in lora["targets"].split(",")]}
    if method == "qlora":
        recipe["quant"] = {"bits": 4, "type": "nf4", "double_quant": "double quant on" in precision,
                           "compute_dtype": "bfloat16", "fp32_non_quantised": "upcast" in precision and "no k-bit" not in precision}
    if "ZeRO" in strategy:
        recipe["distributed"] = {"strategy": "deepspeed", "deepspeed": f"zero{strategy.split('ZeRO-')[1][0]}"}
    return recipe
