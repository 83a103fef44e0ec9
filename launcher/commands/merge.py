"""`launcher merge RUN_DIR`: fold a run's adapter into its base and save a plain model folder.

PEFT's merge_and_unload does the arithmetic. What is kept here: finding the base the adapter was
trained on (the run's resolved recipe), dequantising a QLoRA base first, so the merged weights are
the ones the adapter learnt against, and checking the saved folder, reloaded with plain
`from_pretrained`, against the unmerged adapter model on a few prompts.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from launcher.checkpoint import verify
from launcher.data.encode import class_labels
from launcher.errors import UserError
from launcher.model import loading as modeling
from launcher.recipe.files import load_run
from launcher.recipe.schema import Recipe
from launcher.rundir.paths import RunDir

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# Largest |merged - adapter| logit difference accepted, relative to the largest |logit|: the merged
# weight W + BA is rounded once to the saved dtype, where the adapter model adds BAx in float32.
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}
CHECK_PROMPTS = ["The quick brown fox jumps over the lazy dog.",
           "Translate from English to Spanish:\nIn the beginning God created the heaven and the earth.",
           "Question: What is the capital of France?\nAnswer:"]


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="output_dir of a finished lora or qlora run")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="dtype of the merged weights (default bf16)")
    parser.add_argument("--out", help="where to save (default RUN_DIR/merged)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing merged folder")


def run(args: argparse.Namespace) -> int:
    merge(args.run_dir, args.dtype, args.out, args.overwrite)
    return 0


def load_dequantised_base(recipe: Recipe, dtype: str):
    """The base in `dtype`; a QLoRA base is loaded quantised, as in training, then dequantised.

    Not modeling.load_base: that one loads a base for training, quantised when the recipe says so.
    """
    import torch
    plain = recipe.model_copy(deep=True)
    plain.model.dtype = dtype
    on_gpu = torch.cuda.is_available()
    model = modeling.load_base(modeling.resolve_weights(plain), plain, on_gpu, class_labels(plain))
    if recipe.method == "qlora":
        model = model.dequantize()  # also drops quantization_config: the merged folder is a plain model
    return model.to(getattr(torch, dtype))


def logits(model, batch):
    """Float32 logits on CPU, padding positions zeroed, wherever the model lives. An encoder-decoder's
    decoder reads the prompt too (teacher forcing), so every position of both stacks is compared."""
    import torch
    device = next(model.parameters()).device
    inputs = dict(batch)
    if getattr(model.config, "is_encoder_decoder", False):
        inputs.update(decoder_input_ids=batch["input_ids"], decoder_attention_mask=batch["attention_mask"])
    with torch.no_grad():
        out = model(**{k: v.to(device) for k, v in inputs.items()}).logits.float().cpu()
    return out * batch["attention_mask"][..., None] if out.dim() == 3 else out


def restore_conv1d(merged, skeleton) -> None:
    """bitsandbytes loads GPT-2's Conv1D layers as (transposed) Linear4bit; dequantised they are nn.Linear of
    shape [out, in], which GPT-2's code and checkpoints do not expect: put them back as Conv1D [in, out]."""
    import torch
    from transformers.pytorch_utils import Conv1D
    expected = {name for name, module in skeleton.named_modules() if isinstance(module, Conv1D)}
    for name, module in list(merged.named_modules()):
        if name in expected and isinstance(module, torch.nn.Linear):
            conv = Conv1D(module.out_features, module.in_features)
            conv.weight = torch.nn.Parameter(module.weight.detach().t().contiguous())
            conv.bias = torch.nn.Parameter(module.bias.detach().clone())
            parent, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent) if parent else merged, child, conv)


def check_mergeable(adapter: Path) -> None:
    """Refuse, before loading anything, adapters merge_and_unload cannot fold into plain weights."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise UserError(f"{adapter}: peft_type {config.get('peft_type')}; launcher merge folds LoRA adapters "
                        "(including DoRA, rsLoRA and converted PiSSA/OLoRA) only")


def write_merged(recipe: Recipe, adapter: Path, staging: Path, torch_dtype: str):
    """Merge into `staging` and reload it with plain from_pretrained; returns (max |logit difference|, adapter logits)."""
    import torch
    from peft import PeftModel
    model = PeftModel.from_pretrained(load_dequantised_base(recipe, torch_dtype), adapter).eval()
    device = next(model.parameters()).device
    tokenizer = modeling.load_tokenizer(str(adapter), recipe)
    batch = dict(tokenizer(CHECK_PROMPTS, return_tensors="pt", padding=True))
    expected = logits(model, batch)
    merged = model.merge_and_unload()
    restore_conv1d(merged, modeling.skeleton(modeling.resolve_weights(recipe), recipe, class_labels(recipe)))
    shutil.rmtree(staging, ignore_errors=True)
    written = verify.before_export(merged, None)
    merged.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    verify.after_export(staging, written)  # read back: every tensor's checksum as saved
    del model, merged
    reloaded = modeling.auto_class(recipe.model.task).from_pretrained(staging, dtype=getattr(torch, torch_dtype),
                                                                      device_map={"": device}).eval()
    return (logits(reloaded, batch) - expected).abs().max().item(), expected


def merge(run_dir: str | Path, dtype: str = "bf16", out: str | Path | None = None, overwrite: bool = False) -> float:
    """Write the merged model; returns the verified max logit difference."""
    run = RunDir(run_dir)
    recipe = load_run(run.root)
    adapter = run.export("final")
    if not (adapter / "adapter_config.json").is_file():
        what = "a full model: nothing to merge" if (adapter / "config.json").is_file() else "not there: train to the end first"
        raise UserError(f"{adapter} is {what} (merge needs the adapter of a lora or qlora run)")
    target = Path(out) if out else run.merged  # beside final/, so uploading final/ uploads the adapter alone
    if target.exists() and not overwrite:
        raise UserError(f"{target} exists; pass --overwrite to replace it, or --out to write elsewhere")
    check_mergeable(adapter)
    staging = RunDir.staging(target)
    try:
        difference, expected = write_merged(recipe, adapter, staging, DTYPES[dtype])
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a failed merge leaves nothing behind
        raise
    torch_dtype = DTYPES[dtype]
    scale = max(1.0, expected.abs().max().item())
    limit = TOLERANCE[torch_dtype] * scale
    verdict = "ok" if difference <= limit else "FAILED"
    print(f"merged {adapter} into {recipe.model.path} ({torch_dtype}); reloaded with from_pretrained: "
          f"max |logit difference| vs the adapter model on {len(CHECK_PROMPTS)} prompts = {difference:.3g} "
          f"(tolerance {limit:.3g}) {verdict}")
    if difference > limit:
        shutil.rmtree(staging, ignore_errors=True)
        raise RuntimeError(f"merged model disagrees with the adapter model by {difference:.3g} > {limit:.3g}; nothing written")
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    print(f"saved {target}")
    return difference
