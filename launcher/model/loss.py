"""The training objective of each task, as a sum and a count.

The loop and evaluation both need it. The loss is never averaged inside a micro-batch: the loop
divides the summed loss by the number of targets in the whole optimiser step, so accumulation and
data parallelism weight every target token (or example) equally. transformers' own `loss` averages
per forward pass, which is why no forward here is given `labels`: seq2seq decoder inputs are built
by the model's own `prepare_decoder_input_ids_from_labels` instead.
"""
from __future__ import annotations

from launcher.data.packing import VARLEN_KEYS
from launcher.model import preference
from launcher.recipe.formats import IGNORE
from launcher.recipe.schema import Recipe


def objective_count(batch: dict, recipe: Recipe):
    """What a step's loss is averaged over: pairs under DPO, the task's targets otherwise."""
    if recipe.objective == "dpo":
        return preference.pair_count(batch["labels"])
    if "shift_labels" in batch:  # a slice of a split sequence (launcher/distributed/sequence.py)
        return (batch["shift_labels"] != IGNORE).sum()
    return target_count(batch["labels"], recipe.model.task)


def objective_loss_sum(model, batch: dict, recipe: Recipe) -> tuple:
    """(summed loss, count, summed pair metrics) of one training batch under the recipe's objective."""
    if recipe.objective == "dpo":
        return preference.dpo_loss_sum(model, batch, recipe.dpo)
    return (*task_loss_sum(model, batch, recipe.model.task, recipe.train.loss_chunk_tokens), {})


def target_count(labels, task: str):
    """How many targets a batch's labels hold: next tokens (causal), decoder tokens, or examples."""
    if task == "classification":
        return labels.new_tensor(labels.numel())
    if task == "seq2seq":
        return (labels != IGNORE).sum()
    return (labels[:, 1:] != IGNORE).sum()


def task_loss_sum(model, batch: dict, task: str, chunk_tokens: int = 0):
    """(summed cross-entropy, target count) for one batch.

    causal-lm: logits at t predict the token at t+1. seq2seq: labels are the decoder targets and
    the model's decoder inputs are them shifted right, so no shift here. classification:
    one label per example. chunk_tokens (causal-lm): see `chunked_causal_ce`. A packed batch (with
    position_ids) is sent without attention_mask, so transformers confines attention to each example.
    """
    import torch.nn.functional as F
    if "shift_labels" in batch:  # a slice of a split sequence: targets already shifted, so no shift here
        return _shifted_loss_sum(model, batch, chunk_tokens)
    labels = batch["labels"]
    inputs = {"input_ids": batch["input_ids"]}
    if task != "classification":
        inputs["use_cache"] = False  # training and eval loss need no KV cache; packing is detected only without one
    if "position_ids" in batch:  # packing is detected only with no attention mask
        inputs["position_ids"] = batch["position_ids"]
        inputs.update({key: batch[key] for key in VARLEN_KEYS if key in batch})  # flash-attention's bounds
    else:
        inputs["attention_mask"] = batch["attention_mask"]
    if task == "causal-lm" and chunk_tokens:
        # logits_to_keep=1: the model projects only the last position; hidden_states[-1] is the final-norm output
        hidden = model(**inputs, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
        inner = _unwrapped(model)
        total = chunked_causal_ce(hidden[:, :-1], labels[:, 1:], inner.get_output_embeddings(), chunk_tokens,
                                  softcap=getattr(inner.config, "final_logit_softcapping", None))
        return total, target_count(labels, task)
    if task == "seq2seq":
        decoder_ids = _unwrapped(model).prepare_decoder_input_ids_from_labels(labels=labels)
        logits = model(**inputs, decoder_input_ids=decoder_ids).logits
    else:
        logits = model(**inputs).logits
        if task == "causal-lm":
            logits, labels = logits[:, :-1], labels[:, 1:]
    logits = logits.float()
    total = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return total, target_count(batch["labels"], task)


def _shifted_loss_sum(model, batch: dict, chunk_tokens: int):
    """Causal-lm loss of a sequence slice whose `shift_labels` hold each position's next token; position_ids are the
    row's global ones, which the split attention needs."""
    import torch.nn.functional as F
    targets = batch["shift_labels"]
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    if chunk_tokens:
        hidden = model(**inputs, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
        inner = _unwrapped(model)
        total = chunked_causal_ce(hidden, targets, inner.get_output_embeddings(), chunk_tokens,
                                  softcap=getattr(inner.config, "final_logit_softcapping", None))
    else:
        logits = model(**inputs).logits.float()
        total = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return total, (targets != IGNORE).sum()


def chunked_causal_ce(hidden, targets, head, chunk_tokens: int, softcap: float | None = None):
    """Summed CE of `head(hidden)` against `targets`, never holding more than one chunk of logits.

    softcap: the model's final_logit_softcapping (Gemma 2/3), applied to each chunk as its forward does.

    Only positions with a target are projected. Each chunk's lm_head + CE runs under non-reentrant
    checkpointing, so backward recomputes that chunk's logits instead of keeping them: peak memory
    for logits is chunk_tokens x vocab in fp32, not batch x length x vocab. Hand-written because
    neither transformers nor PEFT exposes a chunked loss for an arbitrary (LoRA-wrapped) head.
    """
    import torch
    from torch.utils.checkpoint import checkpoint
    keep = targets != IGNORE
    states, wanted = hidden[keep], targets[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, wanted.numel(), chunk_tokens):
        piece = slice(start, start + chunk_tokens)
        total = total + checkpoint(_chunk_ce, head, states[piece], wanted[piece], softcap, use_reentrant=False)
    return total


def _chunk_ce(head, states, targets, softcap):
    import torch
    import torch.nn.functional as F
    logits = head(states).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets, reduction="sum")


def _unwrapped(model):
    """The model under DDP and DeepSpeed (both keep it in `.module`); PEFT forwards config and lm_head."""
    while hasattr(model, "module"):
        model = model.module
    return model
