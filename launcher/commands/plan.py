"""`launcher plan RECIPE`: the predicted per-GPU peak and the cheapest changes that make it fit, as text or JSON.

The numbers come from memory/estimate.py and the changes from memory/advice.py; the plan builds the
model on torch's meta device, so planning imports torch, but `plan --help` does not.
"""
from __future__ import annotations

import argparse
import json

from launcher.memory.advice import plan_with_advice
from launcher.memory.estimate import DEFAULT_GPU_GIB, GIB, HEADROOM, Plan
from launcher.recipe.files import load_recipe


def plan_report(result: Plan) -> str:
    """The plan as `launcher plan` prints it."""
    usable = HEADROOM * result.gpu_gib
    lines = [f"plan: {result.label}",
             f"GPU memory: {result.gpu_gib:g} GiB per process, {usable:.1f} GiB usable "
             f"({100 - 100 * HEADROOM:.0f}% kept for the CUDA context, communication buffers and fragmentation)",
             f"peak {result.peak_gib:.2f} GiB per process at the {result.peak_moment}: "
             + ("fits" if result.fits else f"does NOT fit ({result.peak_gib - usable:.2f} GiB over)")]
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


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpus", type=int, help="GPUs (processes) per node; default: distributed.num_processes or 1")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument("--gpu-memory", type=float, metavar="GiB",
                        help=f"memory per GPU; default: memory.gpu_gib, else {DEFAULT_GPU_GIB:g}")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    gpus = args.gpus or recipe.distributed.num_processes or 1
    result = plan_with_advice(recipe, gpus * args.nodes, args.gpu_memory)
    print(json.dumps(result.as_dict(), indent=1) if args.json else plan_report(result))
    return 0
