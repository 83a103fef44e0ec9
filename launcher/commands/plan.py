"""`launcher plan RECIPE`: the predicted per-GPU peak and the cheapest changes that make it fit, as text or JSON.

The numbers come from memory/estimate.py and the changes from memory/advice.py; the plan builds the
model on torch's meta device, so planning imports torch, but `plan --help` does not.
"""
from __future__ import annotations

import argparse
import json

from launcher.memory.advice import plan_with_advice
from launcher.memory.estimate import DEFAULT_GPU_GIB, GIB, Plan
from launcher.memory.lengths import at_data_lengths, data_lengths
from launcher.recipe.files import load_recipe


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
    parser.add_argument("--gpus", type=int, help="GPUs (processes) per node; default: distributed.num_processes or 1")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument("--gpu-memory", type=float, metavar="GiB",
                        help=f"memory per GPU; default: memory.gpu_gib, else {DEFAULT_GPU_GIB:g}")
    parser.add_argument("--node-memory", type=float, metavar="GiB",
                        help="host (CPU) memory per node; default: memory.node_gib (no host verdict without one)")
    parser.add_argument("--data-lengths", action="store_true",
                        help="plan at the data's longest row (preprocess cache, else a tokenised sample) instead of "
                             "data.max_length; loads the tokenizer")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    gpus = args.gpus or recipe.distributed.num_processes or 1
    found = {}
    if args.data_lengths:
        lengths = data_lengths(recipe)
        at_max = plan_with_advice(recipe, gpus * args.nodes, args.gpu_memory, args.nodes, args.node_memory).peak_gib
        recipe = at_data_lengths(recipe, lengths)
        found = {"planned_length": recipe.data.max_length, "max_length": lengths.max_length, "train_longest": lengths.train,
                 "eval_longest": lengths.eval, "source": lengths.source, "peak_gib_at_max_length": round(at_max, 3)}
    result = plan_with_advice(recipe, gpus * args.nodes, args.gpu_memory, args.nodes, args.node_memory)
    result.data_lengths = found
    print(json.dumps(result.as_dict(), indent=1) if args.json else plan_report(result))
    return 0
