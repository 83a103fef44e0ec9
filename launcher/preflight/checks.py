"""Every check on the user's input and environment that can run before torch loads.

`launcher validate` is this module alone; `train`, `eval`, `inspect` and `slurm submit` run it
once, first, so a mistake costs seconds, not a queue wait and a model load. Nothing here imports
torch: the device is found from the driver's files, package support from their versions.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from launcher.data.sources import check_sources
from launcher.errors import UserError
from launcher.preflight import locations, modelfolder
from launcher.recipe.files import load_recipe, load_run
from launcher.recipe.schema import BNB_OPTIMIZERS, Recipe
from launcher.distributed import mesh
from launcher.distributed.launch import launch_hint, launched, launched_world_size, mixed_precision
from launcher.distributed.rules import rules_for

BNB_FIRST_CPU_VERSION = (0, 46)  # bitsandbytes gained its CPU backend (4-bit, 8-bit, 8-bit optimisers) in 0.46


@dataclass
class Target:
    """Where the run will execute: the device type and how many processes were launched. `ahead`: a check made
    before the launch (`validate` in a plain shell), so the recipe's own num_processes is the count to check."""
    device: str
    world: int
    ahead: bool = False


def detect_device() -> str:
    """'cuda' when an NVIDIA GPU is visible to this process, else 'cpu'; found without importing torch."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return "cpu"
    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir() and any(gpus.iterdir()):
        return "cuda"
    smi = shutil.which("nvidia-smi")  # containers may hide /proc/driver but ship the driver's tool
    listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout if smi else ""
    return "cuda" if listed.startswith("GPU ") else "cpu"


def recipe_or_run(path: str, overrides: list[str]) -> Recipe:
    """A recipe file, or a run directory (its resolved recipe.yaml)."""
    return load_run(path, overrides) if Path(path).is_dir() else load_recipe(path, overrides)


def checked_recipe(args, target: Target | None = None) -> Recipe:
    """The command's recipe (or run directory's), validated and preflighted (every check that needs no torch),
    before anything loads."""
    recipe = recipe_or_run(args.recipe, args.overrides)
    check(recipe, target)
    return recipe


def check(recipe: Recipe, target: Target | None = None) -> Target:
    """Refuse, with one message, anything the run would refuse later; returns the target it checked for."""
    target = target or Target(detect_device(), launched_world_size())
    check_extras(recipe)
    check_launch(recipe, target)
    check_device_support(recipe, target.device)
    locations.check_output_dir(recipe)
    locations.check_model(recipe)
    check_sources(recipe)  # every row of every file: the slow one
    modelfolder.check_model_folder(recipe)  # headers only, before any loader sees a damaged file
    return target


def check_launch(recipe: Recipe, target: Target) -> None:
    """The process count the recipe demands, and the strategy's own rules (its JSON, what it cannot train, its device,
    accelerate's config)."""
    wanted = recipe.distributed.num_processes
    if target.world > 1 and launched() and not os.environ.get("MASTER_ADDR"):
        # a WORLD_SIZE left in the shell (or set by hand) without the rendezvous a launcher sets beside it
        raise UserError(f"WORLD_SIZE={target.world} is set but MASTER_ADDR is not, so the processes cannot meet; start them "
                        f"with {launch_hint(target.world)} (which sets both), or unset WORLD_SIZE for one process")
    if wanted is not None and target.world != wanted and not target.ahead:
        raise UserError(f"distributed.num_processes is {wanted} but {target.world} process{'es' * (target.world != 1)} "
                        f"started; launch with {launch_hint(wanted)}")
    known = wanted or (target.world if target.world > 1 or launched() else None)  # plain validate: count unknown
    mesh.check(recipe, known, target.device == "cuda")
    rules = rules_for(recipe)
    rules.refuse()
    rules.refuse_launch(target.device == "cuda")


def check_device_support(recipe: Recipe, device: str) -> None:
    """Optimiser, quantisation, compiler and precision support on the device that will run, from package versions alone."""
    optimizer = recipe.train.optimizer
    if optimizer in BNB_OPTIMIZERS:
        _need_bitsandbytes(f"train.optimizer {optimizer}", device, "use train.optimizer: adamw")
        if optimizer.startswith("paged") and device != "cuda":
            # bitsandbytes would warn and quietly fall back to plain state: the user would believe memory is saved.
            raise UserError(f"train.optimizer {optimizer}: paging moves optimiser state between GPU and CPU memory through "
                            f"CUDA unified memory, which a {device} device lacks; use adamw-8bit (or adamw) there")
    if recipe.method == "qlora":
        _need_bitsandbytes("method: qlora", device, "use method: lora")
    if recipe.lora.init == "loftq" and device != "cuda":
        # peft.utils.loftq_utils quantises on compute_device = "cuda" (or "xpu"), whatever the model's device.
        raise UserError(f"lora.init loftq: peft computes LoftQ's quantisation residuals on a CUDA device, which a {device} "
                        "run lacks; use lora.init default (or pissa / olora with method: lora)")
    if recipe.train.compile:
        check_compiler(device)
    if recipe.train.precision != "auto":  # auto asks torch what the GPU supports; an explicit choice is checked now
        mixed_precision(recipe, device == "cuda")


def needed_extras(recipe: Recipe) -> list[tuple[str, str, str]]:
    """(recipe setting, importable module, launcher extra) for each optional dependency the recipe needs."""
    needs = [(f"distributed.strategy {recipe.distributed.strategy}", "deepspeed", "deepspeed")] \
        if recipe.distributed.strategy == "deepspeed" else []
    if recipe.method == "qlora" or recipe.train.optimizer in BNB_OPTIMIZERS:
        needs.append(("method: qlora" if recipe.method == "qlora" else f"train.optimizer {recipe.train.optimizer}",
                      "bitsandbytes", "qlora"))
    if recipe.model.gguf_file:
        needs.append(("model.gguf_file", "gguf", "gguf"))
    modules = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
    needs += [(f"report.trackers {name}", modules[name], name) for name in recipe.report.trackers]
    return needs


def check_extras(recipe: Recipe) -> None:
    """An optional dependency the recipe needs and this install lacks: one line naming the extra that brings it."""
    for setting, module, extra in needed_extras(recipe):
        if importlib.util.find_spec(module) is None:
            raise UserError(f"{setting} needs {module}, which is not installed: pip install 'launcher[{extra}]'")


def _need_bitsandbytes(what: str, device: str, instead: str) -> None:
    try:
        version = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"{what} needs bitsandbytes: pip install 'launcher[qlora]'") from None
    numbers = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    if device == "cpu" and numbers < BNB_FIRST_CPU_VERSION:
        raise UserError(f"{what}: bitsandbytes {version} has no cpu backend (it came in "
                        f"{'.'.join(map(str, BNB_FIRST_CPU_VERSION))}); upgrade bitsandbytes or {instead}")


def check_compiler(device: str) -> None:
    """train.compile: inductor writes C++ on CPU and triton kernels on GPU; without them the first step would fail."""
    if device == "cpu":
        compilers = {os.environ.get("CXX") or "g++", "g++", "clang++"}
        if not any(shutil.which(name) for name in compilers):
            raise UserError("train.compile on CPU needs a C++ compiler (g++ or clang++, or set CXX); "
                            "install one or set train.compile: false")
    elif importlib.util.find_spec("triton") is None:
        raise UserError(f"train.compile on {device} needs triton: pip install triton, or set train.compile: false")
