"""The cheapest recipe changes that make a memory plan fit (`launcher plan` shows them), and train's check before it loads weights.

The numbers come from memory/estimate.py. A change is a list of recipe overrides; each candidate
recipe is validated and held to its strategy's rules as a user's would be (so refused combinations
are never suggested) and planned again. Step-time costs are rough, relative to the recipe as written: recomputing activations costs
about a third of a step, sharding adds communication, offload moves state over PCIe each step.
"""
from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from itertools import combinations

from pydantic import ValidationError

from launcher.memory import estimate as planner
from launcher.memory.estimate import GIB, Plan
from launcher.recipe.schema import Recipe, applicable
from launcher.errors import UserError
from launcher.recipe.files import apply_overrides, load_recipe
from launcher.distributed.rules import rules_for

MAX_COMBINED = 3  # changes tried together when no single one fits
SHOWN = 5
# Changes of strategy the planner may suggest: (what it does, recipe overrides, rough step time vs. unsharded,
# whether it saves memory with one process: only offload does, and FSDP2 leaves one process unsharded).
SHARDING_CHANGES = (
    ("ZeRO-2: shard gradients and optimiser state", ("distributed.strategy=deepspeed", "distributed.deepspeed=zero2"), 1.05, False),
    ("ZeRO-3: shard weights, gradients and optimiser state", ("distributed.strategy=deepspeed", "distributed.deepspeed=zero3"), 1.2, False),
    ("FSDP2 full sharding", ("distributed.strategy=fsdp",), 1.15, False),
    ("ZeRO-3 with weights and optimiser in CPU memory", ("distributed.strategy=deepspeed", "distributed.deepspeed=zero3_offload"), 3.0, True),
    ("FSDP2 with CPU offload", ("distributed.strategy=fsdp", "distributed.fsdp.cpu_offload=true"), 3.0, False),
)


@dataclass(frozen=True)
class Change:
    what: str
    overrides: tuple[str, ...]
    cost: float  # step time relative to the recipe as written


def candidate_changes(recipe: Recipe, world: int) -> list[Change]:
    """Every single change that can lower this recipe's peak, with its rough step-time cost."""
    train, changes = recipe.train, []
    if train.micro_batch_size > 1:
        half = train.micro_batch_size // 2
        changes.append(Change(f"micro-batch {half} with grad_accum {train.grad_accum * 2} (same global batch)",
                              (f"train.micro_batch_size={half}", f"train.grad_accum={train.grad_accum * 2}"), 1.1))
        if half > 1:
            changes.append(Change(f"micro-batch 1 with grad_accum {train.grad_accum * train.micro_batch_size} (same global batch)",
                                  ("train.micro_batch_size=1", f"train.grad_accum={train.grad_accum * train.micro_batch_size}"), 1.25))
    evaluates = recipe.data.eval or recipe.data.eval_fraction
    eval_batch = train.eval_batch()
    if evaluates and eval_batch > 1:
        changes.append(Change(f"eval batch {eval_batch // 2}", (f"train.eval_batch_size={eval_batch // 2}",), 1.0))
    if not train.gradient_checkpointing:
        changes.append(Change("gradient checkpointing", ("train.gradient_checkpointing=true",), 1.33))
    if recipe.model.task == "causal-lm" and not train.loss_chunk_tokens:
        changes.append(Change("chunked cross-entropy (1024 tokens)", ("train.loss_chunk_tokens=1024",), 1.03))
    if recipe.method == "lora":
        changes.append(Change("QLoRA: base weights in 4 bits", ("method=qlora",), 1.3))
    if recipe.method == "full" and train.optimizer == "adamw":
        changes.append(Change("8-bit AdamW state", ("train.optimizer=adamw-8bit",), 1.02))
    for what, overrides, cost, alone in SHARDING_CHANGES:
        if world > 1 or alone:
            changes.append(Change(what, overrides, cost))
    return changes


def _changed(recipe: Recipe, overrides: list[str]) -> Recipe | None:
    """The recipe with these overrides, or None when validation or the strategy's rules refuse the combination."""
    data = recipe.model_dump(mode="json")
    if any(o.startswith("distributed.strategy=") for o in overrides):  # the old strategy's own section goes with it
        data["distributed"] = {key: data["distributed"][key] for key in ("num_processes", "timeout_minutes")}
    try:
        changed = Recipe.model_validate(applicable(apply_overrides(data, overrides)))
        rules_for(changed).refuse()
    except (ValidationError, UserError):
        return None
    return changed


def suggestions(recipe: Recipe, world: int, gpu_gib: float) -> list[dict]:
    """The cheapest changes (alone, then up to three together) whose plan fits, cheapest first; with none that
    fits, the ones that come closest."""
    changes, found = candidate_changes(recipe, world), []
    for count in range(1, MAX_COMBINED + 1):
        for group in combinations(changes, count):
            keys = [o.split("=")[0] for change in group for o in change.overrides]
            if len(keys) != len(set(keys)):
                continue
            changed = _changed(recipe, [o for change in group for o in change.overrides])
            if changed is None:
                continue
            result = planner.plan(changed, world, gpu_gib)
            cost = 1.0
            for change in group:
                cost *= change.cost
            found.append({"change": " + ".join(c.what for c in group), "overrides": [o for c in group for o in c.overrides],
                          "peak_gib": round(result.peak_gib, 2), "fits": result.fits, "relative_step_time": round(cost, 2)})
        if any(item["fits"] for item in found):
            break
    fitting = sorted((i for i in found if i["fits"]), key=lambda i: (i["relative_step_time"], i["peak_gib"]))
    return fitting[:SHOWN] or sorted(found, key=lambda i: i["peak_gib"])[:3]


def plan_with_advice(recipe: Recipe, world: int | None = None, gpu_gib: float | None = None, nodes: int = 1,
                     node_gib: float | None = None) -> Plan:
    """The recipe's plan, with suggestions when it does not fit; a recipe its strategy cannot train is refused."""
    rules_for(recipe).refuse()
    result = planner.plan(recipe, world, gpu_gib, nodes=nodes, node_gib=node_gib)
    if not result.fits:
        result.suggestions = suggestions(recipe, result.world, result.gpu_gib)
    return result


# ---------------------------------------------------------------- train's check, and the calibration point it leaves

@dataclass
class MemoryCheck:
    """The plan train checked (None without a GPU memory to check against) and what it measures from."""
    plan: Plan | None
    device: str
    world: int
    rss_before_kib: int  # this process's peak resident memory before the model loaded


def peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def check_before_loading(recipe: Recipe, world: int, device: str) -> MemoryCheck:
    """Refuse (or warn, memory.over_budget: warn) before any weights load when the plan does not fit the GPU memory:
    memory.gpu_gib, else the visible GPU's. Without either (a CPU run) nothing is checked."""
    gpu_gib = recipe.memory.gpu_gib
    if gpu_gib is None and device == "cuda":
        import torch
        gpu_gib = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB
    check = MemoryCheck(None, device, world, peak_rss_kib())
    if gpu_gib is None:
        return check
    try:
        check.plan = planner.plan(recipe, world, gpu_gib)
    except Exception as exc:  # a model the planner cannot read must not stop a run that may well fit
        print(f"warning: no memory plan ({type(exc).__name__}: {exc}); training without the fit check", file=sys.stderr)
        return check
    if check.plan.fits:
        return check
    check.plan.suggestions = suggestions(recipe, world, gpu_gib)
    top = check.plan.suggestions[0] if check.plan.suggestions else None
    fix = (f"; cheapest fix: {top['change']} ({' '.join(top['overrides'])}: {top['peak_gib']:.2f} GiB)" if top and top["fits"]
           else "; no combination of up to three changes fits: use more GPUs")
    message = (f"memory plan: peak {check.plan.peak_gib:.2f} GiB per process at the {check.plan.peak_moment}, over the "
               f"{check.plan.usable_gib:.1f} GiB usable of {gpu_gib:g} GiB{fix}. `launcher plan` shows the breakdown; "
               "memory.over_budget: warn trains anyway")
    if recipe.memory.over_budget == "refuse":
        raise UserError(message)
    print(f"warning: {message}", file=sys.stderr)
    return check


def predicted_and_measured(check: MemoryCheck, recipe: Recipe) -> dict:
    """The plan's peak beside the one measured, for the summary and metrics.jsonl: on a GPU
    torch.cuda.max_memory_allocated; on CPU the growth of the process's peak resident memory (ru_maxrss) since
    before the model loaded, against a plan with the dtypes a CPU run resolves."""
    if check.device == "cuda":
        import torch
        measured, how = torch.cuda.max_memory_allocated() / GIB, "torch.cuda.max_memory_allocated"
        predicted = check.plan or planner.plan(recipe, check.world)
    else:
        measured = (peak_rss_kib() - check.rss_before_kib) * 1024 / GIB
        how = "growth of peak resident memory (ru_maxrss) since before the model loaded"
        try:
            predicted = planner.plan(recipe, check.world, device="cpu")
        except Exception as exc:  # reported, never fatal after a finished run
            return {"predicted_peak_gib": None, "measured_peak_gib": round(measured, 3), "measured_by": how,
                    "no_plan": f"{type(exc).__name__}: {exc}"}
    return {"predicted_peak_gib": round(predicted.peak_gib, 3), "measured_peak_gib": round(measured, 3), "measured_by": how}


def bench_line(recipe_path: str, overrides: list[str] = (), world: int | None = None, gpu_gib: float | None = None) -> dict:
    """For bench scripts: the plan of a measured GPU run, to print beside its measured peak."""
    result = planner.plan(load_recipe(recipe_path, list(overrides)), world, gpu_gib)
    return {"predicted_peak_gib": round(result.peak_gib, 2), "peak_moment": result.peak_moment,
            "components_gib": {key: round(value / GIB, 2) for key, value in result.moments[result.peak_moment].items()}}
