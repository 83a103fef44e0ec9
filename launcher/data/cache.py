"""`launcher preprocess`: tokenise (and pack) once, ahead of the GPU job, and let `train` reuse it.

The result is saved with a fingerprint of every input that shapes it, by name: the tokenizer,
its chat template, each data setting (formats, fields, templates, max length, packing), the
task, the seed (mixing and the eval split draw from it), this code, and each source's content
(launcher/fingerprint.py for files; datasets' own fingerprint for hub datasets). `train` on any
number of processes loads it without tokenising; when an input differs it refuses and names it.

Without preprocessed data, the main process tokenises while the others wait on a barrier of a
separate gloo process group whose timeout is data.tokenise_timeout_minutes, so a long
tokenisation never trips distributed.timeout_minutes (the NCCL watchdog failure other trainers
hit on large corpora).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

from launcher.data import encode as data
from launcher.data import fingerprint, mixing, packing, prompts, rows, sources
from launcher.data.batching import train_collate
from launcher.data.encode import Datasets, Tokenised, load_datasets
from launcher.data.rows import RowTally
from launcher.distributed.waiting import main_first
from launcher.errors import UserError
from launcher.model import loading as modeling
from launcher.recipe import formats
from launcher.recipe.schema import Recipe
from launcher.rundir.paths import RunDir

FINGERPRINT = "fingerprint.json"
SUMMARY = "summary.json"
RUNTIME_KEYS = {"preprocessed_dir", "tokenise_timeout_minutes"}  # how data is found or waited for, not what it is
REFERENCE_FOLDER = "reference-logps"  # full fine-tuning DPO's reference values (reference_logps.py), kept across preprocessing


def folder(recipe: Recipe) -> Path:
    return Path(recipe.data.preprocessed_dir or RunDir(recipe.output_dir).preprocessed)


def _sha(*parts: str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


def source_fingerprint(source: sources.Source) -> dict:
    if source.hub_id:
        return {"path": source.label, "fingerprint": sources.load_table(source)._fingerprint}
    return fingerprint.file_fingerprint(source.path)


def inputs(recipe: Recipe, tokenizer) -> dict:
    """Every input of the tokenised data, by name (what `stale` reports when one differs)."""
    backend = tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer") else repr(sorted(tokenizer.get_vocab().items()))
    settings = recipe.data.model_dump(mode="json", exclude=RUNTIME_KEYS)
    code = [Path(module.__file__).read_text() for module in (data, formats, mixing, packing, prompts, rows, sources)] + [Path(__file__).read_text()]
    found = {"tokenizer": _sha(type(tokenizer).__name__, backend, json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)),
             "the tokenizer's chat template": _sha(str(getattr(tokenizer, "chat_template", None))),
             **{f"data.{key}": value for key, value in settings.items()},
             "model.task": recipe.model.task, "train.seed": recipe.train.seed, "launcher's data code": _sha(*code)}
    for which in ("train", "eval"):
        for index, source in enumerate(sources.sources_of(recipe, which)):
            found[f"source data.{which}[{index}] {source.label}"] = source_fingerprint(source)
    return found


def stale(old: dict, new: dict) -> str | None:
    """The first input that differs, in words; None when the saved data is still valid."""
    for key in list(new) + [k for k in old if k not in new]:
        before, after = old.get(key), new.get(key)
        if key.startswith("source "):
            if before is None or after is None:
                return f"{key} {'added' if before is None else 'removed'}"
            reason = fingerprint.changed(before, after) if "fingerprint" not in after else (
                "content differs" if before != after else None)
            if reason:
                return f"{key}: {reason}"
        elif before != after:
            readable = key.startswith(("data.", "model.", "train.")) and len(repr(before)) + len(repr(after)) < 160
            shown = f": {before!r} -> {after!r}" if readable else ""  # digests would say nothing
            return f"{key} changed{shown}"
    return None


def preprocess(recipe: Recipe) -> Path:
    """Tokenise (and pack, with data.packing) and save beside the fingerprint; returns the folder."""
    tokenizer = modeling.load_tokenizer(modeling.resolve_weights(recipe), recipe)
    found = load_datasets(recipe, tokenizer)
    target = folder(recipe)
    staging = RunDir.staging(target)
    shutil.rmtree(staging, ignore_errors=True)
    found.train.dataset.save_to_disk(str(staging / "train"))
    if found.eval is not None:
        found.eval.dataset.save_to_disk(str(staging / "eval"))
    summary = {"rows": found.train.rows, "tally": asdict(found.train.tally), "mixture": found.train.mixture,
               "labels": found.labels, "eval_rows": found.eval.rows if found.eval else None,
               "warnings": found.train.warnings, "eval_warnings": found.eval.warnings if found.eval else []}
    (staging / SUMMARY).write_text(json.dumps(summary, indent=1))
    (staging / FINGERPRINT).write_text(json.dumps(inputs(recipe, tokenizer), indent=1))
    if (target / REFERENCE_FOLDER).is_dir():  # keyed by their own inputs: still valid where those did not change
        (target / REFERENCE_FOLDER).rename(staging / REFERENCE_FOLDER)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def load_preprocessed(recipe: Recipe, tokenizer) -> Datasets | None:
    """The saved data when `launcher preprocess` wrote it for these inputs; None when there is none."""
    import datasets
    target = folder(recipe)
    if not (target / FINGERPRINT).is_file():
        return None
    reason = stale(json.loads((target / FINGERPRINT).read_text()), inputs(recipe, tokenizer))
    if reason:
        raise UserError(f"preprocessed data in {target} no longer matches the recipe: {reason}; run `launcher preprocess` "
                        f"again, or delete {target} to tokenise in the run")
    summary = json.loads((target / SUMMARY).read_text())
    train = Tokenised(datasets.load_from_disk(str(target / "train")), summary["rows"], RowTally(**summary["tally"]), 0,
                      summary["mixture"], summary["warnings"])
    evaluation = None
    if (target / "eval").is_dir():
        evaluation = Tokenised(datasets.load_from_disk(str(target / "eval")), summary["eval_rows"], RowTally(summary["eval_rows"]),
                               warnings=summary["eval_warnings"])
    return Datasets(train, evaluation, summary["labels"], train_collate(recipe, tokenizer))


def datasets_for_run(recipe: Recipe, accelerator, phase=lambda name: nullcontext()):
    """(weights, tokenizer, datasets, how the data was found) for `train`: preprocessed data when
    it is there and valid, else tokenised by the main process first (the others reuse its cache).
    `phase(name)` wraps the weights and the tokenisation steps (the console's progress lines)."""
    started = time.perf_counter()
    with main_first(accelerator, recipe.data.tokenise_timeout_minutes):
        with phase("weights"):
            weights = modeling.resolve_weights(recipe)
            tokenizer = modeling.load_tokenizer(weights, recipe)
        with phase("tokenisation"):
            found = load_preprocessed(recipe, tokenizer)
            origin = f"preprocessed {folder(recipe)}" if found else "tokenised"
            found = found or load_datasets(recipe, tokenizer)
        record = {"data": origin, "rows_tokenised": found.train.encoded + (found.eval.encoded if found.eval else 0),
                  "data_seconds": round(time.perf_counter() - started, 2)}
    return weights, tokenizer, found, record

