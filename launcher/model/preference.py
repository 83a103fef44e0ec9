"""The DPO objective: summed reply log-probabilities of policy and reference, and the pair losses they give.

A batch holds n pairs as 2n sequences, chosen first (data/batching.collate_pairs). The reference is
the same model with its adapter disabled (peft's `disable_adapter`), so it costs one extra forward
and no second copy of the weights; under full fine-tuning there is no adapter to disable, and the
reference's values are computed once before training (data/reference_logps.py) and read from each batch. sigmoid is the loss of Rafailov et al. 2023 (DPO); ipo the
squared loss of Azar et al. 2023, which keeps the margin near 1 / (2 beta) instead of pushing it up.
"""
from __future__ import annotations

from launcher.data.preference import REFERENCE
from launcher.recipe.formats import IGNORE
from launcher.recipe.schema import DpoSection

# Per-pair numbers summed over a step or an eval (each becomes a mean over pairs): what the loop and evaluation report.
PAIR_SUMS = ("rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin", "preference_accuracy")


def reply_logps(model, batch: dict):
    """Each sequence's summed log-probability of its labelled (reply) tokens."""
    import torch
    import torch.nn.functional as F
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))  # half precision is summed in float32
    per_token = F.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE, reduction="none")
    return -per_token.sum(-1)


def adapter_disabled(model):
    """The bare peft model under any wrapper (DDP, DeepSpeed keep it in `.module`), and a context in
    which it runs as its base model."""
    while hasattr(model, "module"):
        model = model.module
    if not hasattr(model, "disable_adapter"):
        raise TypeError("objective dpo without an adapter reads its reference from the batch (REFERENCE), and this batch has none")
    return model, model.disable_adapter()


def reference_logps(model, batch: dict):
    """The reference's reply log-probabilities: the model with its adapter disabled, without gradients."""
    import torch
    base, disabled = adapter_disabled(model)
    with torch.no_grad(), disabled:
        return reply_logps(base, batch)


def pair_terms(policy, reference, beta: float, loss: str):
    """(loss, chosen reward, rejected reward) per pair from the 2n summed log-probabilities of policy and reference."""
    import torch.nn.functional as F
    pairs = policy.shape[0] // 2
    chosen_rewards = beta * (policy[:pairs] - reference[:pairs])
    rejected_rewards = beta * (policy[pairs:] - reference[pairs:])
    margin = (chosen_rewards - rejected_rewards) / beta  # log-ratio of chosen over rejected, policy against reference
    if loss == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        losses = -F.logsigmoid(beta * margin)
    return losses, chosen_rewards, rejected_rewards


def pair_sums(policy, reference, settings: DpoSection) -> tuple:
    """(summed loss, pair count, {name in PAIR_SUMS: summed value}) of one batch; means are taken over a whole step."""
    losses, chosen, rejected = pair_terms(policy, reference, settings.beta, settings.loss)
    pairs = chosen.shape[0]
    sums = {"rewards_chosen": chosen.detach().sum(), "rewards_rejected": rejected.detach().sum(),
            "reward_accuracy": (chosen > rejected).float().sum(), "reward_margin": (chosen - rejected).detach().sum(),
            "preference_accuracy": (policy[:pairs] > policy[pairs:]).float().sum()}
    return losses.sum(), chosen.new_tensor(pairs), sums


def dpo_loss_sum(model, batch: dict, settings: DpoSection) -> tuple:
    """One micro-batch of pairs: the reference's log-probabilities (precomputed and in the batch under full
    fine-tuning; else a forward with the adapter disabled, without gradients), then the policy's forward."""
    reference = batch.get(REFERENCE)
    if reference is None:
        reference = reference_logps(model, batch)
    policy = reply_logps(model, batch)
    return pair_sums(policy, reference.to(policy.dtype), settings)


def pair_count(labels):
    """Pairs in a batch of 2n sequences: what a DPO step's loss is averaged over."""
    return labels.new_tensor(labels.shape[0] // 2)


class PairTally:
    """PAIR_SUMS of the micro-batches of one step (or one eval), as means over all pairs of all processes."""

    def __init__(self) -> None:
        self.sums: dict = {}

    def add(self, sums: dict) -> None:
        for name, value in sums.items():
            self.sums[name] = self.sums.get(name, 0) + value.double()

    def means(self, accelerator, pairs, prefix: str = "") -> dict[str, float]:
        """Each sum over every process divided by `pairs` (already reduced); {} for an objective with no pairs."""
        return {prefix + name: (accelerator.reduce(total, "sum") / pairs).item() for name, total in sorted(self.sums.items())}
