"""Verified saves: what a run writes is read back and compared before it counts as saved.

Adapters and a checkpoint's trainable part are compared in full against the tensors that were
saved. A full model's tensors get a checksum (crc32 of their bytes) as they are handed to the
writer and again from a memory-mapped read-back. An adapter that is empty, all zero, shaped like
one rank's shard, or missing one of the model's LoRA modules fails loudly: the failure every
fine-tuning tool's users still report under ZeRO-3 and FSDP. Non-finite weights are refused
before anything is written. Saved files are made readable as the umask allows (safetensors
writes 0600). Checkpoints in a sharded format (DeepSpeed, FSDP) carry no single weights file and
are not read back here.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path

from launcher.errors import NonFiniteError, SaveVerificationError

CHECKPOINT_WEIGHTS = "model.safetensors"  # accelerate's save_state name for the first model
_saving: dict[str, dict] = {}  # checkpoint folder -> checksums of what save_state was handed, until verified



def checksum(tensor) -> int:
    import torch
    flat = tensor.detach().contiguous().cpu().reshape(-1)
    return zlib.crc32(flat.view(torch.uint8).numpy()) if flat.numel() else 0


def describe(state: dict, what: str) -> dict:
    """name -> (checksum, shape, dtype) of each tensor; NonFiniteError on a non-finite float weight."""
    import torch
    recorded = {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        if tensor.is_floating_point() and tensor.numel() and not torch.isfinite(tensor).all():
            raise NonFiniteError(f"{what}: weight {name} holds non-finite values; not saved")
        recorded[name] = (checksum(tensor), tuple(tensor.shape), str(tensor.dtype))
    return recorded


def read_back(folder: Path, files: list[Path] | None = None) -> dict:
    """name -> (checksum, shape, dtype) of every tensor in the folder's .safetensors files, memory-mapped."""
    from safetensors import safe_open
    found = {}
    for path in files or sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                found[name] = (checksum(tensor), tuple(tensor.shape), str(tensor.dtype))
    return found


def compare(expected: dict, found: dict, where: Path, may_be_missing=frozenset()) -> None:
    missing = sorted(set(expected) - set(found) - set(may_be_missing))
    extra = sorted(set(found) - set(expected))
    differing = sorted(n for n in set(expected) & set(found) if expected[n] != found[n])
    problems = [f"{label} {names[:3]}{' ...' if len(names) > 3 else ''}"
                for label, names in (("missing", missing), ("unexpected", extra), ("differing", differing)) if names]
    if problems:
        raise SaveVerificationError(f"{where}: read back, it does not hold what was saved: {'; '.join(problems)}")


def group_readable(folder: Path) -> None:
    """Files as the umask allows (0644 under the usual 022): safetensors creates its files 0600."""
    mask = os.umask(0)
    os.umask(mask)
    for path in Path(folder).rglob("*"):
        if path.is_file():
            os.chmod(path, 0o666 & ~mask)


# ---------------------------------------------------------------- checkpoints

def checksum_hook(accelerator):
    """A save_state pre-hook, registered after any that filter the weights: records what the main process saves."""
    def hook(models, weights, output_dir):
        if accelerator.is_main_process and weights:
            _saving[str(Path(output_dir))] = describe(weights[0], f"checkpoint {output_dir}")
    return hook


def checkpoint(folder: Path) -> None:
    """After save_state, before the checkpoint is renamed into place: its weights file against what was handed to it."""
    expected = _saving.pop(str(Path(folder)), None)
    path = Path(folder) / CHECKPOINT_WEIGHTS
    if expected is not None and path.is_file():
        if not expected:
            raise SaveVerificationError(f"{folder}: the checkpoint's trainable part is empty")
        compare(expected, read_back(folder, [path]), path, may_be_missing=_aliases(expected))
    group_readable(folder)


def trainable_file(path: Path, model_state: dict) -> None:
    """An adapter run's checkpoint file (launcher/layouts.py) read back against the trainable tensors handed to it."""
    import torch
    expected = describe(model_state, f"checkpoint {path.parent}")
    if not expected:
        raise SaveVerificationError(f"{path.parent}: the checkpoint's trainable part is empty")
    found = torch.load(path, map_location="cpu", weights_only=False, mmap=True)["model"]
    compare(expected, {name: (checksum(t), tuple(t.shape), str(t.dtype)) for name, t in found.items()}, path)


def _aliases(expected: dict) -> set:
    """Names safetensors may drop because they share storage with another (tied weights): same checksum and shape."""
    seen, aliases = set(), set()
    for name, value in expected.items():
        (aliases.add(name) if value in seen else seen.add(value))
    return aliases


# ---------------------------------------------------------------- exports (final/, best/, merged)

def before_export(model, state_dict: dict | None, converted: bool = False) -> dict:
    """What save_pretrained will write, recorded before it writes: the adapter's tensors, or every tensor's checksum.

    `converted`: save_pretrained rewrites the adapter (PiSSA/OLoRA to plain LoRA of rank 2r), so the file
    is checked for presence, content and every module, not against these tensors.
    """
    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict
        adapter = get_peft_model_state_dict(model, state_dict=state_dict)
        describe(adapter, "export")
        saved = None if converted else {k: v.detach().cpu().clone() for k, v in adapter.items()}
        return {"adapter": saved, "shapes": lora_shapes(model), "converted": converted}
    return {"full": describe(state_dict if state_dict is not None else model.state_dict(), "export")}


def lora_shapes(model) -> dict:
    """Saved adapter key -> the shape its module says it has (so an empty or one-rank shard is caught)."""
    shapes = {}
    for name, module in model.named_modules():
        for part in ("lora_A", "lora_B"):
            layers = getattr(module, part, None)
            if layers is not None and "default" in layers:
                layer = layers["default"]
                shapes[f"{name}.{part}.weight"] = (layer.out_features, layer.in_features)
    return shapes


def after_export(folder: Path, expected: dict) -> None:
    """Read the written folder back and compare; make it readable to the group."""
    folder = Path(folder)
    if "adapter" in expected:
        check_adapter(folder / "adapter_model.safetensors", expected["adapter"], expected["shapes"], expected["converted"])
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise SaveVerificationError(f"{folder}: no .safetensors file was written")
        compare(expected["full"], read_back(folder, files), folder, may_be_missing=_aliases(expected["full"]))
    group_readable(folder)


def check_adapter(path: Path, saved: dict | None, shapes: dict, converted: bool = False) -> None:
    """The adapter file in full against what was saved: present, non-empty, not all zero, every LoRA module, each whole."""
    from safetensors.torch import load_file
    if not path.is_file():
        raise SaveVerificationError(f"{path}: the adapter file is missing")
    found = load_file(str(path))
    if not found or all(t.numel() == 0 for t in found.values()):
        raise SaveVerificationError(f"{path}: the adapter is empty")
    if all(not t.any() for t in found.values()):
        raise SaveVerificationError(f"{path}: every adapter weight is zero")
    absent = sorted(set(shapes) - set(found))
    if absent:
        raise SaveVerificationError(f"{path}: missing LoRA modules {absent[:3]} ({len(absent)} of {len(shapes)})")
    if converted:
        return
    for name, tensor in found.items():
        if name in shapes and tuple(tensor.shape) != shapes[name]:
            raise SaveVerificationError(f"{path}: {name} has shape {tuple(tensor.shape)}, its module needs {shapes[name]} "
                                        f"(one process's shard saved?)")
    compare({k: (checksum(v), tuple(v.shape)) for k, v in saved.items()},
            {k: (checksum(v), tuple(v.shape)) for k, v in found.items()}, path)


# ---------------------------------------------------------------- what a checkpoint held when saved, checked on resume

CHUNK = 1 << 20


def file_crc(path: Path) -> int:
    value = 0
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            value = zlib.crc32(block, value)
    return value


def file_record(folder: Path, leave_out: str) -> dict:
    """relative path -> [bytes, crc32] of every file in a checkpoint folder but `leave_out` (the state file that holds this)."""
    folder = Path(folder)
    return {str(path.relative_to(folder)): [path.stat().st_size, file_crc(path)]
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name != leave_out}


def damage(folder: Path, recorded: dict) -> str | None:
    """Why a checkpoint's files are not those recorded at save (missing, another size, another checksum); None when whole."""
    folder = Path(folder)
    for name, (size, crc) in recorded.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        found = path.stat().st_size
        if found != size:
            return f"{name} is {found} bytes, {size} when saved{' (truncated)' if found < size else ''}"
        try:
            if file_crc(path) != crc:
                return f"{name} differs from what was saved (checksum)"
        except OSError as exc:
            return f"{name} cannot be read ({exc.strerror})"
    return None
