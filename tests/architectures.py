"""Tiny random models of eleven architectures (built from a config, no weights) and an in-process run that
keeps the trained model, so a test can compare it with what a plain transformers/peft reload gives."""
from __future__ import annotations

from pathlib import Path

from support import DATA, tiny_recipe, write_recipe

# name -> (transformers config class, keyword arguments, tasks it is tested on)
CAUSAL, SEQ2SEQ, CLASSIFY = "causal-lm", "seq2seq", "classification"
DECODER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
           "num_key_value_heads": 2, "max_position_embeddings": 256}
ENCODER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
           "max_position_embeddings": 256}
ARCHITECTURES = {
    "llama": ("LlamaConfig", {**DECODER, "tie_word_embeddings": False}, CAUSAL),
    "qwen2": ("Qwen2Config", DECODER, CAUSAL),
    "mistral": ("MistralConfig", {**DECODER, "sliding_window": None}, CAUSAL),
    "phi3": ("Phi3Config", DECODER, CAUSAL),
    "gemma2": ("Gemma2Config", {**DECODER, "head_dim": 16}, CAUSAL),
    "gpt2": ("GPT2Config", {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 256}, CAUSAL),
    "t5": ("T5Config", {"d_model": 32, "d_ff": 64, "d_kv": 16, "num_layers": 1, "num_heads": 2}, SEQ2SEQ),
    "bart": ("BartConfig", {"d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
                            "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
                            "max_position_embeddings": 256, "forced_eos_token_id": None}, SEQ2SEQ),
    "bert": ("BertConfig", ENCODER, CLASSIFY),
    "distilbert": ("DistilBertConfig", {"dim": 32, "hidden_dim": 64, "n_layers": 2, "n_heads": 2,
                                        "max_position_embeddings": 256}, CLASSIFY),
    "roberta": ("RobertaConfig", {**ENCODER, "max_position_embeddings": 300}, CLASSIFY),
}
LABELS = ["business", "entertainment", "politics", "sports", "tech"]


def build(name: str, folder: Path, tokenizer) -> Path:
    """save_pretrained a tiny random model of architecture `name` with `tokenizer` beside it."""
    import torch
    import transformers

    from launcher.model.loading import auto_class
    config_class, kwargs, task = ARCHITECTURES[name]
    eos = tokenizer.eos_token_id
    ids = {"pad_token_id": eos, "eos_token_id": eos, "bos_token_id": eos, "decoder_start_token_id": eos}
    config = getattr(transformers, config_class)(vocab_size=len(tokenizer), **ids, **kwargs)
    if task == CLASSIFY:
        config.num_labels = len(LABELS)
    torch.manual_seed(0)
    auto_class(task).from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def recipe_for(model: Path, task: str, method: str, run: Path, **lora) -> dict:
    """Three optimiser steps of two rows, no eval: the shipped Bible sample (BBC News for classifiers)."""
    data = ({"train": str(DATA / "bbc_news" / "train.jsonl"), "eval": None, "format": "classification", "fields": {}}
            if task == CLASSIFY else {"eval": None})
    adapter = {} if method == "full" else {"lora": {"r": 4, "alpha": 8, "dropout": 0.0, "dora": method == "dora", **lora}}
    recipe = tiny_recipe(model, run, method="lora" if method == "dora" else method, model={"task": task},
                         data={**data, "max_length": 128, "max_train_rows": 12},
                         train={"max_steps": 3, "grad_accum": 1, "lr": 1e-2, "warmup_steps": 0, "schedule": "constant"},
                         **adapter)  # a lora section under method full is refused
    return recipe


class Trained:
    """A finished in-process run whose model is still in memory."""

    def __init__(self, recipe: dict, folder: Path) -> None:
        from launcher.preflight import checks as preflight
        from launcher.training import loop as train
        from launcher.recipe.files import load_recipe
        self.recipe = load_recipe(write_recipe(recipe, folder / "recipe.yaml"))
        preflight.check(self.recipe)
        self.session = train.setup(self.recipe, overwrite=True)
        try:  # as train.run, keeping the model
            train.fit(self.session, train.StopRequest())
            train.finish(self.session)
        finally:
            self.session.console.close()
        self.model = self.session.accelerator.unwrap_model(self.session.model).eval()
        self.run_dir = Path(self.recipe.output_dir)

    def close(self) -> None:
        from launcher.training import loop as train
        self.model = None
        train.close(self.session)


def batch(tokenizer_folder: Path) -> dict:
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    tokenizer.pad_token = tokenizer.eos_token
    return dict(tokenizer(["In the beginning God created the heaven and the earth.", "And the earth was without form"],
                          return_tensors="pt", padding=True))


def logits(model, inputs: dict):
    from launcher.commands.merge import logits as masked_logits
    return masked_logits(model, inputs)


def reload(run: Trained, model_path: Path):
    """final/ loaded as a user would: plain transformers, plus peft for an adapter (on a 4-bit base for QLoRA)."""
    import torch
    from peft import PeftModel

    from launcher.model.loading import auto_class, keep_4bit_training_layout
    final, task = run.run_dir / "final", run.recipe.model.task
    if not (final / "adapter_config.json").is_file():
        return auto_class(task).from_pretrained(final, dtype=torch.float32).eval()
    kwargs = {"num_labels": len(LABELS)} if task == CLASSIFY else {}
    if run.recipe.method == "qlora":
        from transformers import BitsAndBytesConfig

        from launcher.model.loading import adapter_placement
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32,
            llm_int8_skip_modules=adapter_placement(str(model_path), run.recipe, LABELS if task == CLASSIFY else None).unquantised)
    base = auto_class(task).from_pretrained(model_path, dtype=torch.float32, **kwargs)
    if run.recipe.method == "qlora":
        # bitsandbytes repacks 4-bit weights for AVX512-BF16 CPUs at the first no-grad forward, and that repack needs
        # layers at least one 64-wide quantisation block across: these tiny shapes are narrower. Keep the stored layout.
        keep_4bit_training_layout(base)
    return PeftModel.from_pretrained(base, final).eval()
