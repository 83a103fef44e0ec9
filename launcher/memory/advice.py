"""The cheapest recipe changes that make a memory plan fit (`launcher plan` shows them), and train's check before it loads weights.

The numbers come from memory/estimate.py. A change is a list of recipe overrides; each candidate
recipe is validated and held to its strategy's rules as a user's would be (so refused combinations
are never suggested) and planned again. Step-time costs are rough, relative to the recipe as written: recomputing activations costs
about a third of a step, sharding adds communication, offload moves state over PCIe each step.
"""
from __future__ import annotations

import resource
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import combinations

from pydantic import ValidationError

from launcher.memory import estimate as planner
from launcher.memory.estimate import GIB, Plan
from launcher.recipe.schema import Recipe, applicable
from launcher.errors import UserError
from launcher.recipe.files import apply_overrides, load_recipe
from launcher.distributed import mesh
from launcher.distributed.rules import DeepSpeedRules, FsdpRules, rules_for

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
    return changes + sequence_splits(recipe, world)


def sequence_splits(recipe: Recipe, world: int) -> list[Change]:
    """Splitting every sequence over 2, 4 or 8 of the processes (DeepSpeed Ulysses, or FSDP2's context parallelism
    on GPUs): each rank's activations and logits shrink with the split, the all-to-all of each attention layer
    costs about a tenth of a step per doubling (an estimate)."""
    dist = recipe.distributed
    if dist.sequence_parallel * dist.context_parallel > 1 or dist.strategy not in (DeepSpeedRules.name, FsdpRules.name):
        return []
    key, what = (("sequence_parallel", "sequence parallelism (Ulysses)") if dist.strategy == DeepSpeedRules.name
                 else ("context_parallel", "context parallelism"))
    return [Change(f"{what} over {split} processes", (f"distributed.{key}={split}",), 1 + 0.1 * split.bit_length() - 0.1)
            for split in (2, 4, 8) if world % split == 0]


def _changed(recipe: Recipe, overrides: list[str], world: int) -> Recipe | None:
    """The recipe with these overrides, or None when validation or the strategy's rules refuse the combination."""
    data = recipe.model_dump(mode="json")
    if any(o.startswith("distributed.strategy=") for o in overrides):  # the old strategy's own section goes with it
        data["distributed"] = {key: data["distributed"][key] for key in ("num_processes", "timeout_minutes")}
    try:
        changed = Recipe.model_validate(applicable(apply_overrides(data, overrides)))
        rules_for(changed).refuse()
        mesh.check_keys(changed)  # the mesh as preflight takes it (a sequence split the loop cannot train is left out)
        mesh.mesh_for(changed, world)
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
            changed = _changed(recipe, [o for change in group for o in change.overrides], world)
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

TRAINING, EVALUATION = "training", planner.EVALUATION  # the passes measured apart


@dataclass
class MemoryCheck:
    """The plan train checked (None without a GPU memory to check against) and what it measures from."""
    plan: Plan | None
    device: str
    world: int
    rss_before_kib: int  # this process's peak resident memory before the model loaded
    passes: dict = field(default_factory=dict)  # pass -> {"exact": GiB, "bound": GiB}, see measured_pass
    earlier_gib: float = 0.0  # on a GPU: the allocator's peak before the first measured pass reset it


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


@contextmanager
def measured_pass(check: MemoryCheck | None, name: str):
    """Measure the peak of one training step or evaluation apart from the other pass. On a GPU the allocator's peak
    statistics are reset as it begins, so its peak is its own. On CPU the only peak is the process's high-water mark
    (ru_maxrss), taken as growth since before the model loaded: exact when the pass raised it, else only a bound."""
    if check is None:
        yield
        return
    if check.device == "cuda":
        import torch
        check.earlier_gib = max(check.earlier_gib, torch.cuda.max_memory_allocated() / GIB)
        torch.cuda.reset_peak_memory_stats()
    before = peak_rss_kib()
    try:
        yield
    finally:
        figures = check.passes.setdefault(name, {"exact": 0.0, "bound": 0.0})
        if check.device == "cuda":
            figures["exact"] = max(figures["exact"], torch.cuda.max_memory_allocated() / GIB)
        else:
            after = peak_rss_kib()
            growth = (after - check.rss_before_kib) * 1024 / GIB
            figures["exact" if after > before else "bound"] = max(figures["exact" if after > before else "bound"], growth)


def measured_passes(check: MemoryCheck) -> dict:
    """Each measured pass's peak (GiB) and whether it is only an upper bound (CPU: it never raised the high-water
    mark, so its own peak was at most the mark at its end)."""
    return {name: {"gib": round(max(f.values()), 3), "upper_bound": f["bound"] > f["exact"]} for name, f in check.passes.items()}


def predicted_and_measured(check: MemoryCheck, recipe: Recipe) -> dict:
    """The plan's peaks beside the ones measured, training and evaluation apart, for the summary and metrics.jsonl:
    on a GPU torch.cuda.max_memory_allocated; on CPU the growth of the process's peak resident memory (ru_maxrss)
    since before the model loaded, against a plan with the dtypes a CPU run resolves."""
    passes = measured_passes(check)
    where = {"device": check.device, "world_size": check.world,
             **{f"measured_{name}_peak_gib": figures["gib"] for name, figures in passes.items()},
             "upper_bounds": [name for name, figures in passes.items() if figures["upper_bound"]]}
    if check.device == "cuda":
        import torch
        measured = max([torch.cuda.max_memory_allocated() / GIB, check.earlier_gib] + [f["gib"] for f in passes.values()])
        how = "torch.cuda.max_memory_allocated"
    else:
        measured = (peak_rss_kib() - check.rss_before_kib) * 1024 / GIB
        how = "growth of peak resident memory (ru_maxrss) since before the model loaded"
    try:
        predicted = (check.plan if check.device == "cuda" and check.plan
                     else planner.plan(recipe, check.world, device="cpu" if check.device != "cuda" else "cuda"))
    except Exception as exc:  # reported, never fatal after a finished run
        return {"predicted_peak_gib": None, "measured_peak_gib": round(measured, 3), "measured_by": how, **where,
                "no_plan": f"{type(exc).__name__}: {exc}"}
    evaluation = predicted.eval_peak_bytes
    return {"predicted_peak_gib": round(predicted.peak_gib, 3), "measured_peak_gib": round(measured, 3), "measured_by": how,
            "predicted_training_peak_gib": round(predicted.train_peak_bytes / GIB, 3),
            "predicted_evaluation_peak_gib": None if evaluation is None else round(evaluation / GIB, 3), **where}


def bench_line(recipe_path: str, overrides: list[str] = (), world: int | None = None, gpu_gib: float | None = None) -> dict:
    """For bench scripts: the plan of a measured GPU run, to print beside its measured peak."""
    result = planner.plan(load_recipe(recipe_path, list(overrides)), world, gpu_gib)
    return {"predicted_peak_gib": round(result.peak_gib, 2), "peak_moment": result.peak_moment,
            "components_gib": {key: round(value / GIB, 2) for key, value in result.moments[result.peak_moment].items()}}
