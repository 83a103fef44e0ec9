"""Optimiser, learning-rate schedule and the explicit L2 penalty.

The four schedules are one multiplier function for LambdaLR: transformers has no exponential
schedule, and keeping all four together keeps warmup identical across them. Optimisers come from
torch and bitsandbytes; this module only picks one by name (what its state costs is counted in
launcher/memory/counts.py).
"""
from __future__ import annotations

import math

import torch

from launcher.model.adapters import loraplus_groups
from launcher.recipe.schema import TrainSection



def lr_multiplier(step: int, train: TrainSection, total_steps: int) -> float:
    """Factor applied to train.lr at optimiser step `step` (0-based)."""
    if step < train.warmup_steps:
        return (step + 1) / (train.warmup_steps + 1)
    after = step - train.warmup_steps
    span = max(1, total_steps - train.warmup_steps)
    if train.schedule == "constant":
        return 1.0
    if train.schedule == "linear":
        return max(0.0, 1 - after / span)
    if train.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(after, span) / span))
    return train.decay_rate ** (after / train.decay_steps)  # exponential: eta0 * rate^(t / decay_steps)


def param_groups(model, weight_decay: float) -> list[dict]:
    """Decay matrices only; biases and norm scales stay undecayed, as is usual."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decayed = [p for n, p in trainable if p.ndim >= 2]
    plain = [p for n, p in trainable if p.ndim < 2]
    return [g for g in ({"params": decayed, "weight_decay": weight_decay},
                        {"params": plain, "weight_decay": 0.0}) if g["params"]]


def build_optimizer(model, train: TrainSection, b_lr_ratio: float | None = None) -> torch.optim.Optimizer:
    """`b_lr_ratio`: LoRA+ (lora.plus_lr_ratio), a higher learning rate for the adapters' B matrices."""
    groups, name = loraplus_groups(model, param_groups(model, train.weight_decay), train.lr, b_lr_ratio), train.optimizer
    if name == "adamw":
        # Fused kernels on GPU; on CPU the plain loop keeps results identical to earlier runs.
        return torch.optim.AdamW(groups, lr=train.lr, fused=torch.cuda.is_available() or None)
    if name == "adafactor":
        return torch.optim.Adafactor(groups, lr=train.lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=0.9)
    import bitsandbytes as bnb
    cls = {"adamw-8bit": bnb.optim.AdamW8bit, "paged-adamw": bnb.optim.PagedAdamW32bit,
           "paged-adamw-8bit": bnb.optim.PagedAdamW8bit}[name]
    return cls(groups, lr=train.lr)


def build_scheduler(optimizer, train: TrainSection, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, train, total_steps))


def resume_schedule(scheduler) -> None:
    """After a checkpoint loads: the optimiser's rate for the current step under this run's total.

    The checkpoint holds the rate its run set for the next step, from that run's total; a run
    extended with a higher train.max_steps must instead continue on the schedule planned for the new total.
    """
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate wraps the LambdaLR
    rates = [base * factor(inner.last_epoch) for base, factor in zip(inner.base_lrs, inner.lr_lambdas)]
    for group, rate in zip(inner.optimizer.param_groups, rates):
        group["lr"] = rate
    inner._last_lr = rates


def l2_penalty(model, l2_lambda: float) -> torch.Tensor | float:
    """lambda * sum ||theta||^2 over trainable parameters (the seed's explicit regulariser)."""
    if not l2_lambda:
        return 0.0
    return l2_lambda * sum(p.float().pow(2).sum() for p in model.parameters() if p.requires_grad)
