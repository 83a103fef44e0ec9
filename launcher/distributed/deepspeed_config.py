"""The DeepSpeed JSON a recipe names: found, checked against the recipe, its "auto" values filled.

Accelerate would take the "auto" values from a prepared DataLoader, which the loop does not use, so
the launcher fills them itself. This is also the one place the ZeRO stage is read (`zero_section`):
preflight, the planner and the strategy objects all ask it. No torch here.
"""
from __future__ import annotations

import json
from pathlib import Path

from launcher.errors import UserError
from launcher.recipe.schema import Recipe
from launcher.shipped import DS_CONFIGS


def deepspeed_path(recipe: Recipe) -> Path:
    name = recipe.distributed.deepspeed or ""
    return Path(name) if name.endswith(".json") else DS_CONFIGS / f"{name}.json"


def _read_deepspeed_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"distributed.deepspeed: DeepSpeed config not found: {path}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"distributed.deepspeed: {path} line {exc.lineno}: not valid JSON ({exc.msg})") from None
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise UserError(f"distributed.deepspeed: {path} has a '{section}' section; the launcher builds the optimiser "
                            "and schedule from train.* (lr, schedule, weight_decay): remove it")
    stage = config.setdefault("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise UserError(f"distributed.deepspeed: {path}: unknown ZeRO stage {stage!r} (use 0, 1, 2 or 3)")
    return config


def deepspeed_config(recipe: Recipe, world_size: int | None, precision: str | None = None) -> dict:
    """The recipe's DeepSpeed JSON, checked against the recipe, with every "auto" the launcher knows filled.

    Called by preflight (world_size from distributed.num_processes, maybe unknown) and again at
    launch with the real world size.
    """
    path, train = deepspeed_path(recipe), recipe.train
    config = _read_deepspeed_json(path)
    wanted = {"train_micro_batch_size_per_gpu": (train.micro_batch_size, "train.micro_batch_size"),
              "gradient_accumulation_steps": (train.grad_accum, "train.grad_accum"),
              "gradient_clipping": (train.max_grad_norm or 0.0, "train.max_grad_norm")}
    if world_size is not None:
        split = recipe.distributed.sequence_parallel  # a sequence group reads one batch between its ranks
        wanted["train_batch_size"] = (train.micro_batch_size * train.grad_accum * (world_size // split),
                                      "micro_batch_size x grad_accum x processes" + (f" / sequence_parallel {split}" if split > 1 else ""))
    for key, (value, recipe_key) in wanted.items():
        given = config.get(key, "auto")
        if given == "auto":
            config[key] = value
        elif given != value:
            raise UserError(f"distributed.deepspeed: {path} hard-codes {key}={given} but the recipe gives {recipe_key}={value}; "
                            f"set it to \"auto\" in the JSON (the launcher fills it) or make them agree")
    if recipe.distributed.sequence_parallel > 1:  # ZeRO-3's zero.Init reads its data-parallel count from this, having no groups yet
        config["sequence_parallel_size"] = recipe.distributed.sequence_parallel
    for kind in ("bf16", "fp16") if precision is not None else ():
        block = config.setdefault(kind, {})
        if block.get("enabled", "auto") == "auto":
            block["enabled"] = precision == kind
        elif bool(block["enabled"]) != (precision == kind):
            raise UserError(f"distributed.deepspeed: {path} sets {kind}.enabled={block['enabled']} but train.precision "
                            f"resolves to {precision}; set it to \"auto\" or make them agree")
    return config


def zero_section(recipe: Recipe) -> dict:
    """The recipe's `zero_optimization` block, stage included (0 when the JSON names none): how ZeRO-3 is recognised,
    whatever the file is called."""
    zero = deepspeed_config(recipe, None)["zero_optimization"]
    zero.setdefault("stage", 0)
    return zero
