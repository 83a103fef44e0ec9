"""`launcher plan RECIPE | RUN_DIR`: the predicted per-GPU peak and the cheapest changes that make it fit, as text or
JSON; for a run directory, the run's recorded recipe planned again beside the peaks the run measured.

The numbers come from memory/estimate.py and the changes from memory/advice.py; the plan builds the
model on torch's meta device, so planning imports torch, but `plan --help` does not. On several nodes an
FSDP2 recipe is planned with the HSDP mesh `launcher slurm submit` gives it (launcher/distributed/mesh.py).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from launcher.commands import positive, whole
from launcher.distributed import mesh
from launcher.distributed.rules import FsdpRules
from launcher.memory import estimate as planner
from launcher.memory.advice import plan_with_advice
from launcher.memory.estimate import DEFAULT_GPU_GIB, GIB, Plan
from launcher.memory.lengths import at_data_lengths, data_lengths
from launcher.recipe.files import load_recipe, load_run
from launcher.report.records import memory_rows, read_metrics
from launcher.rundir.paths import RunDir


def plan_report(result: Plan) -> str:
    """The plan as `launcher plan` prints it."""
    usable = result.usable_gib
    kept = ", ".join(f"{name} {value:.2f}" for name, value in result.overheads_gib.items())
    lines = [f"plan: {result.label}",
             f"GPU memory: {result.gpu_gib:g} GiB per process, {usable:.1f} GiB usable for tensors "
             f"(kept at this peak, GiB: {kept})",
             f"peak {result.peak_gib:.2f} GiB per process at the {result.peak_moment}: "
             + ("fits" if result.fits else f"does NOT fit ({result.peak_gib - usable:.2f} GiB over)"),
             binding_line(result), host_line(result)] + ([lengths_line(result.data_lengths)] if result.data_lengths else [])
    for name, value in result.moments[result.peak_moment].items():
        lines.append(f"  {name:<16} {value / GIB:8.2f} GiB")
    lines.append("moments: " + "; ".join(f"{name} {sum(parts.values()) / GIB:.2f}" for name, parts in result.moments.items()))
    if result.suggestions:
        fitting = any(item["fits"] for item in result.suggestions)
        lines.append("cheapest changes that fit:" if fitting else "no combination of up to three changes fits; closest:")
        for rank, item in enumerate(result.suggestions, 1):
            lines.append(f"  {rank}. {item['change']}: peak {item['peak_gib']:.2f} GiB, ~{item['relative_step_time']:.2f}x "
                         f"step time  [{' '.join(item['overrides'])}]")
    return "\n".join(lines)


def binding_line(result: Plan) -> str:
    """Training and evaluation peaks apart, and which of the two the GPU must hold."""
    train = f"training step {result.train_peak_bytes / GIB:.2f} GiB"
    if result.eval_peak_bytes is None:
        return f"{train}; no evaluation: training binds"
    return f"{train}, evaluation {result.eval_peak_bytes / GIB:.2f} GiB: {result.binding} binds"


def loading_line(by_loading: dict) -> str:
    """Node 0's host peak with every rank loading the model and with rank 0 alone loading it."""
    return "host memory per node by loading: " + "; ".join(
        f"{loading} {host.peak_gib:.1f} GiB" + ("" if host.fits is None else " (fits)" if host.fits else " (does NOT fit)")
        for loading, host in by_loading.items())


def host_line(result: Plan) -> str:
    """Node 0's host memory at its peak moment, and whether it fits the node's memory when that is known."""
    host = result.host
    verdict = ("" if host.fits is None else f": fits {host.node_gib:g} GiB" if host.fits
               else f": does NOT fit {host.node_gib:g} GiB ({host.peak_gib - host.node_gib:.1f} GiB over)")
    parts = ", ".join(f"{name} {value / GIB:.1f}" for name, value in host.moments[host.peak_moment].items())
    ranks = f"{host.ranks_per_node} rank{'s' * (host.ranks_per_node > 1)}"
    return f"host memory {host.peak_gib:.1f} GiB per node at the {host.peak_moment} ({ranks}, {host.loading}; {parts}){verdict}"


def lengths_line(found: dict) -> str:
    """Which row length the plan used, read from where, and the peak it replaces."""
    return (f"planned at the data's longest row, {found['planned_length']} tokens (train {found['train_longest']}, eval "
            f"{found['eval_longest']}; data.max_length {found['max_length']}), from {found['source']}; at max_length the "
            f"peak would be {found['peak_gib_at_max_length']:.2f} GiB")


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpus", type=whole(1), help="GPUs (processes) per node; default: distributed.num_processes, "
                        "else the fewest the mesh keys allow (their product: sequence_parallel 8 plans 8), else 1")
    parser.add_argument("--nodes", type=whole(1), default=1, help="nodes (default 1)")
    parser.add_argument("--gpu-memory", type=positive, metavar="GiB",
                        help=f"memory per GPU; default: memory.gpu_gib, else {DEFAULT_GPU_GIB:g}")
    parser.add_argument("--node-memory", type=positive, metavar="GiB",
                        help="host (CPU) memory per node; default: memory.node_gib (no host verdict without one)")
    parser.add_argument("--data-lengths", action="store_true",
                        help="plan at the data's longest row (preprocess cache, else a tokenised sample) instead of "
                             "data.max_length; loads the tokenizer")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    if Path(args.recipe).is_dir():
        return run_dir_plan(args)
    recipe = load_recipe(args.recipe, args.overrides)
    gpus = args.gpus or recipe.distributed.num_processes or mesh.smallest_world(recipe) // args.nodes or 1
    hybrid = mesh.hybrid_overrides(recipe, args.nodes, gpus)
    if hybrid:  # as `launcher slurm submit` runs it: shard inside each node, replicate across nodes
        recipe = load_recipe(args.recipe, [*args.overrides, *hybrid])
    found = {}
    if args.data_lengths:
        lengths = data_lengths(recipe)
        at_max = plan_with_advice(recipe, gpus * args.nodes, args.gpu_memory, args.nodes, args.node_memory).peak_gib
        recipe = at_data_lengths(recipe, lengths)
        found = {"planned_length": recipe.data.max_length, "max_length": lengths.max_length, "train_longest": lengths.train,
                 "eval_longest": lengths.eval, "source": lengths.source, "peak_gib_at_max_length": round(at_max, 3)}
    result = plan_with_advice(recipe, gpus * args.nodes, args.gpu_memory, args.nodes, args.node_memory)
    result.data_lengths = found
    loading_differs = recipe.distributed.strategy == FsdpRules.name and not result.host.partial_loading and gpus > 1
    by_loading = planner.host_by_loading(recipe, gpus * args.nodes, args.nodes, args.node_memory) if loading_differs else {}
    hsdp = (f"planned as HSDP ({' '.join(hybrid)}), as `launcher slurm submit` runs FSDP2 on {args.nodes} nodes: the "
            "gathers stay inside a node; distributed.replicate=1 plans plain FSDP2 over every GPU") if hybrid else None
    if args.json:
        print(json.dumps({**result.as_dict(), **({"mesh_overrides": hybrid} if hybrid else {}),
                          **({"host_gib_per_node_by_loading": {key: round(host.peak_gib, 3) for key, host in by_loading.items()}}
                             if by_loading else {})}, indent=1))
    else:
        lines = [plan_report(result)] + ([loading_line(by_loading)] if by_loading else []) + ([hsdp] if hsdp else [])
        print("\n".join(lines))
    return 0


def run_dir_plan(args: argparse.Namespace) -> int:
    """A finished or stopped run planned again from its recorded recipe, on the device and process count it ran
    with, beside the peaks its metrics.jsonl recorded (its last memory record)."""
    run = RunDir(args.recipe)
    recipe = load_run(run.root, args.overrides)
    record = next((r for r in reversed(read_metrics(run.metrics)) if r.get("kind") == "memory"), None)
    device = (record or {}).get("device", "cuda")
    world = args.gpus or (record or {}).get("world_size") or recipe.distributed.num_processes or mesh.smallest_world(recipe)
    result = (plan_with_advice(recipe, world, args.gpu_memory, args.nodes, args.node_memory) if device == "cuda"
              else planner.plan(recipe, world, args.gpu_memory, device=device, nodes=args.nodes, node_gib=args.node_memory))
    planned = {"training": result.train_peak_bytes, "evaluation": result.eval_peak_bytes, "peak": result.peak_bytes}
    rows = [{"pass": name, "planned_gib": None if planned[name] is None else round(planned[name] / GIB, 3),
             "recorded_plan_gib": recorded, "measured_gib": measured, "upper_bound": bool(note)}
            for name, recorded, measured, note in (memory_rows(record) if record else [])]
    measured = {"run_dir": str(run.root), "device": device, "measured_by": record.get("measured_by"), "passes": rows} if record else None
    if args.json:
        print(json.dumps({**result.as_dict(), "measured": measured}, indent=1))
    else:
        print(plan_report(result) + "\n" + measured_report(measured, run.root))
    return 0


def measured_report(measured: dict | None, root: Path) -> str:
    """The run's measured peaks under the plan, each with its ratio to the prediction."""
    if measured is None:
        return (f"measured: {root} recorded no peak memory (it ended before its last step without a stop signal, "
                "or an older launcher ran it)")
    lines = [f"measured in {root} on {measured['device']}: {measured['measured_by']}"
             + (" (on CPU: resident memory, planned with CPU dtypes)" if measured["device"] == "cpu" else "")]
    for row in measured["passes"]:
        planned, value = row["planned_gib"], row["measured_gib"]
        figure = "-" if value is None else ("<= " if row["upper_bound"] else "") + f"{value:.3f} GiB"
        ratio = f" ({value / planned:.2f}x the plan)" if value is not None and planned else ""
        lines.append(f"  {row['pass']:<11} planned {planned if planned is not None else '-'} GiB, measured {figure}{ratio}")
    return "\n".join(lines)
