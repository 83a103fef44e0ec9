"""Task evaluation: the eval loss of every task, plus the metric each task is judged by.

Classification is scored from logits (accuracy, macro-F1, confusion matrix); translation and QA
from generated text (BLEU/chrF, exact match/token F1). The arithmetic lives in metrics.py; this
module turns a model and a tokenised eval set into predictions. Every rank runs every generation
(a sharded model needs all ranks in each forward), so generation rows are kept few.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

from launcher.evaluation import metrics
from launcher.data.batching import collate, collate_pairs, eval_batches
from launcher.recipe.formats import FORMATS, IGNORE
from launcher.model.loss import task_loss_sum
from launcher.model.preference import PairTally, dpo_loss_sum
from launcher.data.mixing import rows_by_source
from launcher.recipe.schema import Recipe

UNTRACKABLE = re.compile(r"[^A-Za-z0-9_.\- ]")  # MLflow's metric names allow no others (and '/', kept as the separator)


class EvalInterrupted(Exception):
    """Every rank agreed, between two eval batches, to stop (a preemption signal): the eval is abandoned so the
    grace period goes to the checkpoint (launcher/training/stop.py)."""


def never() -> bool:
    return False


def check_stop(stop: Callable[[], bool]) -> None:
    """Called before every eval batch on every rank (`stop` is a collective when several processes run)."""
    if stop():
        raise EvalInterrupted


@dataclass
class Evaluation:
    metrics: dict                                         # eval_loss, eval_ppl, eval_chrf, ... (metrics.jsonl keys)
    predictions: list[dict] = field(default_factory=list)  # first rows: prompt, reference, output
    confusion: dict | None = None                          # classification: {"labels": [...], "matrix": rows gold, cols predicted}


def to_device(batch: dict, device) -> dict:
    """Tensors to `device`; plain numbers (a packed batch's max_length_*) as they are."""
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def loss_pass(accelerator, model, dataset, batch_size: int, pad_id: int, task: str,
              progress: Callable[[int], None] = lambda rows: None,
              stop: Callable[[], bool] = never) -> tuple[float, list[tuple[int, int]], dict[str, float]]:
    """Mean eval loss over all ranks; each source's, when the rows came from several; and for a
    classifier the (row, predicted id) of every row. Sources are summed apart, one after another."""
    import torch
    from accelerate.utils import gather_object
    sums, predicted = {}, []
    with torch.no_grad():
        for name, group in rows_by_source(dataset):
            total, count, found = _summed(accelerator, model, dataset, group, batch_size, pad_id, task, progress, stop)
            sums[name] = (accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum"))
            predicted += found
    total, count = sum(t for t, _ in sums.values()), sum(c for _, c in sums.values())
    loss = (total / count.clamp(min=1)).item()
    by_source = {name: (t / c.clamp(min=1)).item() for name, (t, c) in sums.items()} if len(sums) > 1 else {}
    if accelerator.num_processes > 1 and task == "classification":
        predicted = gather_object(predicted)
    return loss, sorted(predicted), by_source


def _summed(accelerator, model, dataset, group: list[int], batch_size: int, pad_id: int, task: str, progress, stop):
    """This rank's loss sum and count over rows `group` of `dataset`, and its classifier predictions."""
    import torch
    device = accelerator.device
    total = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    predicted: list[tuple[int, int]] = []
    for rows, real in eval_batches(len(group), batch_size, accelerator.num_processes, accelerator.process_index):
        check_stop(stop)
        rows = [group[row] for row in rows]
        batch = to_device(collate(dataset.select(rows), pad_id, task), device)
        if task == "classification":
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            part = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum")
            part_count = batch["labels"].new_tensor(len(rows))
            if real:
                predicted += list(zip(rows, logits.argmax(-1).tolist()))
        else:
            part, part_count = task_loss_sum(model, batch, task)
        if real:
            total += part.double()
            count += part_count.double()
            progress(len(rows) * accelerator.num_processes)
    return total, count, predicted


def pair_pass(accelerator, model, dataset, batch_size: int, pad_id: int, recipe: Recipe,
              progress: Callable[[int], None] = lambda rows: None, stop: Callable[[], bool] = never) -> dict:
    """Objective dpo: the mean DPO loss of the eval pairs, and their rewards and accuracies (percentages,
    as every task metric): preference_accuracy is the share of pairs whose chosen reply the model
    finds likelier, reward_accuracy the share whose chosen reply earns the higher reward."""
    import torch
    device = accelerator.device
    total = torch.zeros((), device=device, dtype=torch.float64)
    pairs, tally = torch.zeros_like(total), PairTally()
    with torch.no_grad():
        for rows, real in eval_batches(len(dataset), batch_size, accelerator.num_processes, accelerator.process_index):
            check_stop(stop)
            loss, count, sums = dpo_loss_sum(model, to_device(collate_pairs(dataset.select(rows), pad_id), device), recipe.dpo)
            if real:
                total, pairs = total + loss.double(), pairs + count.double()
                tally.add(sums)
                progress(len(rows) * accelerator.num_processes)
    pairs = accelerator.reduce(pairs, "sum").clamp(min=1)
    found = {"eval_loss": (accelerator.reduce(total, "sum") / pairs).item(), **tally.means(accelerator, pairs, "eval_")}
    return {name: 100 * value if name.endswith("accuracy") else value for name, value in found.items()}


def per_source(metric: str, name: str) -> str:
    """A per-source metric's key, e.g. eval_loss/alpaca.jsonl (characters trackers refuse become _)."""
    return f"{metric}/{UNTRACKABLE.sub('_', name)}"


def prompt_and_target(row: dict, task: str) -> tuple[list[int], list[int]]:
    if task == "seq2seq":
        return row["input_ids"], [t for t in row["labels"] if t != IGNORE]
    return row["input_ids"][: row["prompt_len"]], row["input_ids"][row["prompt_len"]:]


def generate(accelerator, generator, tokenizer, dataset, count: int, recipe: Recipe, batch_size: int,
             progress: Callable[[int], None] = lambda rows: None, synced_gpus: bool = False,
             stop: Callable[[], bool] = never) -> list[dict]:
    """Decoded outputs for the first `count` eval rows, batched; causal prompts are left-padded.
    `generator` is the bare model (outside any DDP or DeepSpeed wrapper): `.generate` lives there.
    `synced_gpus`: every rank forwards until all have finished (sharded weights are gathered in each forward)."""
    import torch
    task, settings = recipe.model.task, recipe.eval
    pad = tokenizer.pad_token_id
    out = []
    for start in range(0, min(count, len(dataset)), batch_size):
        check_stop(stop)
        rows = dataset.select(range(start, min(start + batch_size, count, len(dataset))))
        pairs = [prompt_and_target(row, task) for row in rows]
        width = max(len(prompt) for prompt, _ in pairs)
        ids = torch.full((len(pairs), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (prompt, _) in enumerate(pairs):
            span = slice(width - len(prompt), width) if task == "causal-lm" else slice(0, len(prompt))
            ids[i, span], mask[i, span] = torch.tensor(prompt), 1
        with torch.no_grad():
            generated = generator.generate(input_ids=ids.to(accelerator.device), attention_mask=mask.to(accelerator.device),
                                           max_new_tokens=settings.max_new_tokens, num_beams=settings.num_beams,
                                           no_repeat_ngram_size=settings.no_repeat_ngram_size,
                                           repetition_penalty=settings.repetition_penalty,
                                           do_sample=False, use_cache=True, pad_token_id=pad,
                                           eos_token_id=tokenizer.eos_token_id, synced_gpus=synced_gpus)
        if task == "causal-lm":
            generated = generated[:, width:]
        progress(len(rows))
        for row, (prompt, target), output in zip(rows, pairs, generated):
            out.append({"prompt": tokenizer.decode(prompt, skip_special_tokens=True),
                        "reference": row.get("reference") or tokenizer.decode(target, skip_special_tokens=True).strip(),
                        "output": tokenizer.decode(output, skip_special_tokens=True).strip()})
    return out


def _translation(outputs: Sequence[str], references: Sequence[str]) -> dict:
    return {"eval_bleu": metrics.bleu(outputs, references), "eval_chrf": metrics.chrf(outputs, references)}


def _qa(outputs: Sequence[str], references: Sequence[str]) -> dict:
    scores = metrics.qa_scores(outputs, references)
    return {"eval_exact_match": scores["exact_match"], "eval_f1": scores["f1"]}


def _classification(outputs: Sequence[str], references: Sequence[str], labels: Sequence[str] | None = None) -> dict:
    """Predicted and gold class names; `labels` fixes the classes macro-F1 averages over. Percentages, as every task metric."""
    return {"eval_accuracy": 100 * metrics.accuracy(outputs, references),
            "eval_macro_f1": 100 * metrics.macro_f1(outputs, references, labels)}


# Format name -> (outputs, references) -> metrics.jsonl entries: one eval_<name> per metric in FORMATS[name].metrics.
# Formats with a reference field are scored on generated text; classification on the classes its logits pick.
SCORERS: dict[str, Callable[..., dict]] = {"translation": _translation, "qa": _qa, "classification": _classification}


def score(data_format: str, predictions: list[dict]) -> dict:
    """Task metrics of generated predictions ({output, reference} rows) for a generation-scored format."""
    return SCORERS[data_format]([p["output"] for p in predictions], [p["reference"] for p in predictions])


def scores_by_source(data_format: str, generated: list[dict], dataset) -> dict:
    """The task metrics of each source's generated rows, when the eval rows came from several sources."""
    found = {}
    for name, rows in rows_by_source(dataset.select(range(len(generated)))):
        if name:
            found.update({per_source(key, name): value for key, value in score(data_format, [generated[r] for r in rows]).items()})
    return found


def generated_rows(recipe: Recipe) -> tuple[int, bool]:
    """(eval rows generated, whether they are scored): the scored rows of a generation-scored format, else the samples."""
    if recipe.model.task == "classification":
        return 0, False
    fmt = recipe.data.eval_format()  # None: eval rows of mixed formats, scored on loss only
    scored = bool(fmt is not None and FORMATS[fmt].reference is not None and recipe.eval.generate_rows)
    return (recipe.eval.generate_rows if scored else recipe.eval.samples), scored


def eval_rows(dataset, recipe: Recipe) -> int:
    """Rows one evaluation works through: every row's loss, then the generated ones (what its progress counts)."""
    return len(dataset) + min(generated_rows(recipe)[0], len(dataset))


def synced_generation(world: int, shards_parameters: bool) -> bool:
    """Whether generation must keep every rank forwarding until all stop: with sharded weights each forward
    gathers them from every rank, so a rank that stopped early would leave the others waiting. transformers
    detects ZeRO-3 itself but FSDP2 only when it applied FSDP2 itself."""
    return world > 1 and shards_parameters


def main_process_metrics(accelerator, metrics: dict) -> dict:
    """The main process's metrics on every rank: text each rank generated by itself could score differently,
    and what follows (a best/ export) is a collective every rank must agree to enter."""
    if accelerator.num_processes == 1:
        return metrics
    from accelerate.utils import broadcast_object_list
    return broadcast_object_list([metrics], from_process=0)[0]


def evaluate(accelerator, model, tokenizer, dataset, recipe: Recipe, labels: list[str] | None = None,
             unwrap: Callable = lambda model: model, progress: Callable[[int], None] = lambda rows: None,
             synced_gpus: bool = False, stop: Callable[[], bool] = never) -> Evaluation:
    """Loss and task metrics on the eval set, the main process's on every rank; the model is left in the mode it
    came in. `unwrap` gives the bare model of a prepared one (for generation); `progress` is told of rows done;
    `stop`, asked before every batch on every rank, ends the eval with EvalInterrupted when it says so."""
    task, fmt = recipe.model.task, recipe.data.eval_format()
    size = recipe.train.eval_batch()
    was_training = model.training
    model.eval()
    if recipe.objective == "dpo":
        result = Evaluation(pair_pass(accelerator, model, dataset, size, tokenizer.pad_token_id, recipe, progress, stop))
    else:
        loss, predicted, by_source = loss_pass(accelerator, model, dataset, size, tokenizer.pad_token_id, task, progress, stop)
        result = Evaluation({"eval_loss": loss, **{per_source("eval_loss", name): value for name, value in by_source.items()}})
    if task == "classification":
        gold = [labels[row["labels"][0]] for row in dataset]
        pred = [labels[index] for _, index in predicted]
        result.metrics.update(SCORERS[fmt](pred, gold, labels))
        result.confusion = {"labels": labels, "matrix": metrics.confusion_matrix(pred, gold, labels)}
        result.predictions = [{"prompt": tokenizer.decode(dataset[i]["input_ids"], skip_special_tokens=True)[:160],
                               "reference": gold[i], "output": pred[i]} for i in range(min(recipe.eval.samples, len(gold)))]
    else:
        if recipe.objective != "dpo":  # a DPO loss is no log-likelihood: no perplexity
            result.metrics["eval_ppl"] = metrics.perplexity(min(loss, 50.0))
        rows, scored = generated_rows(recipe)
        if rows:
            generated = generate(accelerator, unwrap(model), tokenizer, dataset, rows, recipe,
                                 recipe.eval.generate_batch_size or size, progress, synced_gpus, stop)
            if scored:
                result.metrics.update(score(fmt, generated))
                result.metrics.update(scores_by_source(fmt, generated, dataset))
            result.predictions = generated[: recipe.eval.samples]
    result.metrics = main_process_metrics(accelerator, result.metrics)
    if was_training:
        model.train()
    return result


class Best:
    """The best eval so far by the recipe's chosen metric (kept in trainer_state.json to survive resume)."""

    def __init__(self, recipe: Recipe, state: dict | None = None):
        self.key, self.greater = recipe.eval.chosen(recipe.data.eval_format())
        self.value: float | None = (state or {}).get("value")
        self.step: int | None = (state or {}).get("step")

    def update(self, values: dict, step: int) -> bool:
        """Record this eval if it beats the best; True when it does."""
        value = values.get(self.key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        if self.value is not None and not (value > self.value if self.greater else value < self.value):
            return False
        self.value, self.step = value, step
        return True

    def state(self) -> dict:
        return {"metric": self.key, "value": self.value, "step": self.step, "greater_is_better": self.greater}
