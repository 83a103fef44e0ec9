"""The NaN/inf guard: a run stops at its first non-finite loss or gradient norm, naming the step.

What diverged is never saved: the stop comes before the step's checkpoint or export, so the last
good checkpoint stays the newest, and the save paths (launcher/verify.py) refuse non-finite
weights in any case. `train.skip_nonfinite: N` instead skips up to N such steps in a process's
run: their update is not applied. Under fp16 an inf gradient norm is a loss-scale overflow, a normal
skipped step the scaler handles (`skip_update`), not divergence. metrics.jsonl stays strict JSON: a non-finite number is
written as a string.
"""
from __future__ import annotations

import math
from typing import Callable

from launcher.errors import NonFiniteError



def finite(value) -> bool:
    return value is None or math.isfinite(float(value))


def json_safe(record: dict) -> dict:
    """Non-finite floats as "nan", "inf" or "-inf": json.dumps would write bare NaN, which strict readers reject."""
    return {key: (str(value) if isinstance(value, float) and not math.isfinite(value) else value)
            for key, value in record.items()}


def may_skip(totals: dict, limit: int) -> bool:
    """At a non-finite gradient norm, before the update: True skips the update (counted in totals["skipped"])."""
    if totals.get("skipped", 0) < limit:
        totals["skipped"] = totals.get("skipped", 0) + 1
        return True
    return False


def loss_scaled(accelerator) -> bool:
    """fp16 trains under a loss scaler (torch's GradScaler, FSDP2's sharded one, or DeepSpeed's own)."""
    return getattr(accelerator, "scaler", None) is not None or accelerator.mixed_precision == "fp16"


def skip_update(grad_norm, scaled: bool, totals: dict, limit: int) -> bool:
    """Before the update: True leaves the optimiser step out. Under a loss scaler the step always runs: an
    inf/NaN gradient there is an overflow, which the scaler's own step skips while lowering its scale; leaving
    its step (and `update()`) out would keep the scale too high and make the next `unscale_` raise."""
    if scaled or finite(grad_norm):
        return False
    return may_skip(totals, limit)


def skip_reason(skipped: bool, overflow: bool) -> str:
    if overflow and not skipped:
        return "fp16 loss-scale overflow (scale lowered)"
    return "non-finite loss" if overflow else "non-finite gradient norm"


def check_step(step: int, loss: float, grad_norm: float | None, skipped: bool, last_good: Callable[[], object]) -> None:
    """After a step: raise NonFiniteError unless the loss and gradient norm are finite or the step was skipped.

    `last_good` finds the newest checkpoint for the message; it runs only when the step failed, so a
    healthy step does no file-system work here (issue #29).
    """
    if skipped:
        return
    for what, value in (("loss", loss), ("gradient norm", grad_norm)):
        if not finite(value):
            kept_path = last_good()
            kept = f"the last good checkpoint {kept_path} is kept" if kept_path else "no checkpoint was written before it"
            raise NonFiniteError(f"step {step}: the {what} is {value}; stopped without saving this step or exporting "
                                 f"({kept}). Lower train.lr or set train.max_grad_norm (with --overwrite), "
                                 f"or rerun with train.skip_nonfinite=N to skip up to N such steps")
