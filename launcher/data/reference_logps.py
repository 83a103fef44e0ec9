"""Full fine-tuning DPO's reference: each pair's reply log-probabilities under the initial model, computed once.

Without an adapter to disable, the reference would be a second copy of the model. Instead, before the
first step, one pass of the model as loaded (eval mode, no gradients) scores the chosen and the rejected
reply of every train and eval pair; the values become a column of the tokenised sets (REFERENCE), and
each batch carries its own. ZeRO-3 and FSDP2 runs thus hold one model, and a step runs one forward; the rank
log shows it: process_parameter_bytes, every parameter alive in the process once the values are there, equals
the trained model's own parameter_bytes (a shard per rank under ZeRO-3 and FSDP2).

The values are saved beside the preprocessed data (cache.folder(recipe)/reference-logps/KEY.pt), KEY
being a digest of what they depend on: the tokenised data's inputs (cache.inputs, file times left out),
the reference model's identity (each file's name and content: small files hashed whole, large weight files by
their size, safetensors header and samples of every tensor, since hashing a 140 GB checkpoint would cost minutes;
a copied checkpoint is the same model), its settings and precision, and this code. A resumed run, or a
new run on the same data and model, reads them instead of scoring again.

The pass is sharded: the rows go in parts of PART_PAIRS pairs; within a part each rank scores its
eval-style share of batches (every rank runs the same number of forwards, as sharded weights need),
the shares are gathered, and the main process writes the part file (written under a temporary name and
renamed, so a file that exists is complete). A pass killed midway restarts from the parts written;
once all are there, the main process writes KEY.pt the same way and drops the parts.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from launcher.data import cache
from launcher.data.batching import collate_pairs, eval_batches
from launcher.data.encode import Datasets
from launcher.data.fingerprint import sampled_digest
from launcher.data.preference import REFERENCE
from launcher.memory.counts import process_parameter_bytes
from launcher.model import preference
from launcher.recipe.schema import Recipe

PART_PAIRS = 2048  # pairs per part file: what a killed pass can lose


def store(recipe: Recipe) -> Path:
    """Where the reference values of this recipe's data live: beside its preprocessed data."""
    return cache.folder(recipe) / cache.REFERENCE_FOLDER


def model_identity(weights: str) -> dict:
    """The reference model by content, not place or time: each file's name and sampled digest (configs and tokenizer
    files whole; large weight files by size, safetensors header and samples of every tensor: fingerprint.py), so a
    copied checkpoint reuses the values and a changed one scores again. A hub id stands for itself."""
    folder = Path(weights)
    if not folder.is_dir():
        return {"path": weights}
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {"files": {str(p.relative_to(folder)): sampled_digest(p) for p in files}}


def _without_times(value):
    """cache.inputs with file modification times dropped: a copied or touched data file holds the same rows."""
    if isinstance(value, dict):
        return {key: _without_times(item) for key, item in value.items() if key != "mtime_ns"}
    return value


def reference_inputs(recipe: Recipe, tokenizer, weights: str, precision: str) -> dict:
    """Everything the reference values depend on, by name."""
    code = [Path(module.__file__).read_text() for module in (preference,)] + [Path(__file__).read_text()]
    return {"data": _without_times(cache.inputs(recipe, tokenizer)),
            "reference model": model_identity(weights),
            "model settings": recipe.model.model_dump(mode="json"),
            "precision": precision,
            "reference code": hashlib.sha256("\0".join(code).encode()).hexdigest()[:16]}


def key_of(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- files: written whole or not at all

def _write_whole(path: Path, values) -> None:
    """torch.save under a temporary name, then a rename: a reader finds the whole file or none."""
    import torch
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    torch.save(values, temporary)
    os.replace(temporary, path)


def _read(path: Path):
    """A saved file's values; None when it is missing or unreadable (then it is computed again)."""
    import torch
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged file is recomputed, never trusted
        return None


def _from_main(accelerator, value):
    """The main process's `value` on every process."""
    from accelerate.utils import broadcast_object_list
    if accelerator.num_processes == 1:
        return value
    return broadcast_object_list([value])[0]


# ---------------------------------------------------------------- the pass

def score_rows(accelerator, model, dataset, rows: list[int], batch_size: int, pad_id: int):
    """(len(rows), 2) float32 [chosen, rejected] reply log-probabilities of `rows`, on every process: each rank
    scores its share of batches, then the shares are gathered."""
    import torch
    from accelerate.utils import gather_object
    found = []
    with torch.no_grad():
        for local, real in eval_batches(len(rows), batch_size, accelerator.num_processes, accelerator.process_index):
            batch = collate_pairs(dataset.select([rows[i] for i in local]), pad_id)
            batch = {name: tensor.to(accelerator.device) for name, tensor in batch.items()}
            logps = preference.reply_logps(model, batch).float().cpu()
            if real:
                found.append((local, logps.view(2, -1).T.tolist()))
    values = torch.zeros((len(rows), 2), dtype=torch.float32)
    for local, pairs in gather_object(found):
        values[local] = torch.tensor(pairs, dtype=torch.float32)
    return values


def scored(accelerator, model, dataset, split: str, parts: Path, batch_size: int, pad_id: int,
           part_pairs: int = PART_PAIRS, progress=lambda rows: None):
    """Every row of `dataset` scored, part by part; parts already written (by a killed pass) are read instead."""
    import torch
    values = []
    for index, start in enumerate(range(0, len(dataset), part_pairs)):
        rows = list(range(start, min(start + part_pairs, len(dataset))))
        path = parts / f"{split}-{index:05d}.pt"
        part = _from_main(accelerator, _read(path) if accelerator.is_main_process else None)
        if not isinstance(part, torch.Tensor) or tuple(part.shape) != (len(rows), 2):  # missing, unreadable or foreign
            part = score_rows(accelerator, model, dataset, rows, batch_size, pad_id)
            if accelerator.is_main_process:
                _write_whole(path, part)
        values.append(part)
        progress(len(rows))
    return torch.cat(values) if values else torch.zeros((0, 2), dtype=torch.float32)


def saved_values(accelerator, target: Path, splits: dict) -> dict | None:
    """The values in `target` on every process, when it holds every split whole; else None."""
    saved = _from_main(accelerator, _read(target) if accelerator.is_main_process else None)
    if isinstance(saved, dict) and all(len(saved.get(split, ())) == len(dataset) for split, dataset in splits.items()):
        return saved
    return None


def computed_values(accelerator, model, splits: dict, target: Path, batch_size: int, pad_id: int,
                    part_pairs: int = PART_PAIRS, progress=lambda rows: None) -> dict:
    """{split: (rows, 2) values} scored now (from the parts a killed pass left, if any), then saved to `target`.

    The model scores in eval mode without gradients and is put back in the mode it was in."""
    parts = target.with_name(target.stem + ".parts")
    was_training = model.training
    model.eval()
    try:
        values = {split: scored(accelerator, model, dataset, split, parts, batch_size, pad_id, part_pairs, progress)
                  for split, dataset in splits.items()}
    finally:
        model.train(was_training)
    if accelerator.is_main_process:
        _write_whole(target, values)
        shutil.rmtree(parts, ignore_errors=True)
    accelerator.wait_for_everyone()
    return values


def attach_reference(accelerator, model, data: Datasets, recipe: Recipe, tokenizer, weights: str, console) -> dict:
    """Give every train and eval pair its REFERENCE column, computed now or read back; prints one line saying
    which (on the console of the main process) and returns it as a record for the rank log."""
    started = time.perf_counter()
    inputs = reference_inputs(recipe, tokenizer, weights, str(accelerator.mixed_precision))
    target = store(recipe) / f"{key_of(inputs)}.pt"
    splits = {"train": data.train.dataset, **({"eval": data.eval.dataset} if data.eval is not None else {})}
    pairs = sum(len(rows) for rows in splits.values())
    values = saved_values(accelerator, target, splits)
    reused = values is not None
    if not reused:
        with console.phase("reference log-probabilities", pairs, "pairs") as shown:
            values = computed_values(accelerator, model, splits, target, recipe.train.eval_batch(),
                                     tokenizer.pad_token_id, progress=shown.advance)
    if accelerator.is_main_process and not reused:
        target.with_suffix(".json").write_text(json.dumps(inputs, indent=1, default=str))  # what the key stands for
    data.train.dataset = data.train.dataset.add_column(REFERENCE, values["train"].tolist())
    if data.eval is not None:
        data.eval.dataset = data.eval.dataset.add_column(REFERENCE, values["eval"].tolist())
    seconds = round(time.perf_counter() - started, 2)
    console.print(f"reference log-probabilities of {pairs} pairs: "
                  f"{'reused (not recomputed)' if reused else f'computed in {seconds} s'}, {target}")
    return {"reference_logps": "reused" if reused else "computed", "reference_file": str(target),
            "reference_pairs": pairs, "reference_seconds": seconds,
            "process_parameter_bytes": process_parameter_bytes()}  # one model here: its parameter_bytes, no more


def with_base_reference(accelerator, base_model, dataset, batch_size: int, pad_id: int):
    """`launcher eval` under DPO: every checkpoint is compared with the base model, whose eval pairs' values become
    the REFERENCE column (scored now: eval sets are small, and a trained adapter or full model has no other)."""
    base_model.eval()
    values = score_rows(accelerator, base_model, dataset, list(range(len(dataset))), batch_size, pad_id)
    return dataset.add_column(REFERENCE, values.tolist())
