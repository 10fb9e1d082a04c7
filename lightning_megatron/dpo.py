"""Direct Preference Optimization on Megatron: the losses, and pairs laid out for the pipeline.

A preference batch (``chosen_input_ids``, ``chosen_labels``, ``rejected_*``, as
:class:`~lightning_megatron.data.PreferenceDataModule` makes them) becomes one batch of rows
``[chosen_0, rejected_0, chosen_1, rejected_1, ...]``. Microbatches hold whole pairs (an even
``micro_batch_size``), so the loss of a pair is computed on the last pipeline stage from one
microbatch, under any TP/PP/CP/SP layout.

With ``h = (log pi(c) - log pi(r)) - (log ref(c) - log ref(r))`` (sums over response tokens):

- ``sigmoid`` (DPO): ``-log sigmoid(beta h) (1 - eps) - log sigmoid(-beta h) eps`` (eps: label smoothing)
- ``hinge`` (SLiC): ``relu(1 - beta h)``
- ``ipo``: ``(h - 1 / (2 beta))^2`` with log-probs averaged over the response tokens
- ``robust``: ``(-log sigmoid(beta h) (1 - eps) + log sigmoid(-beta h) eps) / (1 - 2 eps)``

Rewards are ``beta (log pi - log ref)`` of each side; ``rpo_alpha`` adds that times the chosen
answer's mean token NLL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from torch import Tensor

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")
SIDES = ("chosen", "rejected")


@dataclass(frozen=True)
class DPOConfig:
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    rpo_alpha: float | None = None
    reference_free: bool = False

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"DPO loss_type={self.loss_type!r} is not one of {LOSS_TYPES}")
        if self.beta <= 0:
            raise ValueError(f"DPO beta={self.beta} must be positive")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"DPO label_smoothing={self.label_smoothing} must be in [0, 0.5)")


def pairs_to_rows(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """``chosen_*``/``rejected_*`` tensors ``[pairs, s]`` -> rows ``[2 * pairs, s]``, chosen then
    rejected for each pair. Checks every pair first (see :func:`check_pairs`)."""
    missing = [f"{side}_{key}" for side in SIDES for key in ("input_ids", "labels") if f"{side}_{key}" not in batch]
    if missing:
        raise KeyError(
            f"a DPO batch needs chosen_/rejected_ input_ids and labels; missing {missing} (got {sorted(batch)}): "
            "use PreferenceDataModule"
        )
    check_pairs(batch)
    rows = {}
    for key in ("input_ids", "labels", "attention_mask", "position_ids", "loss_mask"):
        if f"chosen_{key}" in batch:
            chosen, rejected = batch[f"chosen_{key}"], batch[f"rejected_{key}"]
            rows[key] = torch.stack([chosen, rejected], dim=1).flatten(0, 1)
    return rows


def check_pairs(batch: dict[str, Tensor]) -> None:
    """Refuse pairs with an empty response or prompts that differ between chosen and rejected.
    A pair with no label tokens on either side is a filler (streaming data pads uneven shards
    with them so every rank runs the same steps): it carries no loss and passes.

    Checked for the whole batch at once (one device sync, not a few per pair)."""
    answers = {side: batch[f"{side}_labels"] != -100 for side in SIDES}
    empty = {side: ~answer.any(-1) for side, answer in answers.items()}
    filler = empty["chosen"] & empty["rejected"]
    starts = {side: answer.int().argmax(-1) for side, answer in answers.items()}  # first response token
    chosen, rejected = batch["chosen_input_ids"], batch["rejected_input_ids"]
    prompt = torch.arange(chosen.shape[1], device=chosen.device) < starts["chosen"][:, None]
    differs = (starts["chosen"] != starts["rejected"]) | ((chosen != rejected) & prompt).any(-1)
    one_empty = (empty["chosen"] | empty["rejected"]) & ~filler
    bad = (one_empty | differs) & ~filler
    if not bool(bad.any()):
        return
    index = int(bad.nonzero()[0])
    for side in SIDES:
        if bool(empty[side][index]):
            raise ValueError(f"DPO pair {index} of the batch has an empty {side} response (no label tokens)")
    first, second = int(starts["chosen"][index]), int(starts["rejected"][index])
    raise ValueError(
        f"DPO pair {index} of the batch: chosen and rejected have different prompts (the tokens before "
        f"the response differ: {first} vs {second} tokens); both must answer the same prompt"
    )


def sequence_logps(per_token_loss: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum of response-token log-probs, response token count)`` per row; summed over
    context-parallel ranks (each holds part of the sequence), keeping the gradient."""
    mask = loss_mask.float()
    logps = -(per_token_loss.float() * mask).sum(-1)
    counts = mask.sum(-1)
    if ps.get_context_parallel_world_size() > 1:
        group = ps.get_context_parallel_group()
        logps = torch.distributed.nn.functional.all_reduce(logps, group=group)
        counts = counts.clone()
        torch.distributed.all_reduce(counts, group=group)
    return logps, counts


def dpo_losses(
    policy: Tensor, reference: Tensor, counts: Tensor, config: DPOConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair losses and per-pair metrics, from per-row log-prob sums laid out chosen, rejected."""
    nll = -policy[0::2] / counts[0::2].clamp(min=1)  # the chosen answer's mean token NLL (for RPO)
    if config.loss_type == "ipo":  # IPO compares length-normalized log-probs
        policy, reference = policy / counts.clamp(min=1), reference / counts.clamp(min=1)
    chosen, rejected = policy[0::2], policy[1::2]
    ref_chosen, ref_rejected = reference[0::2], reference[1::2]
    h = (chosen - rejected) - (ref_chosen - ref_rejected)
    beta, eps = config.beta, config.label_smoothing
    if config.loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - eps) - F.logsigmoid(-beta * h) * eps
    elif config.loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif config.loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:  # robust
        losses = (-F.logsigmoid(beta * h) * (1 - eps) + F.logsigmoid(-beta * h) * eps) / (1 - 2 * eps)
    chosen_rewards = beta * (chosen - ref_chosen).detach()
    rejected_rewards = beta * (rejected - ref_rejected).detach()
    metrics = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "logps/chosen": chosen.detach(),
        "logps/rejected": rejected.detach(),
    }
    if config.rpo_alpha is not None:
        losses = losses + config.rpo_alpha * nll
        metrics["nll"] = nll.detach()
    return losses, metrics


def dpo_loss_func(config: DPOConfig, loss_mask: Tensor, reference: Tensor, per_token_loss: Tensor):
    """Megatron's loss-function contract for one microbatch of pairs: ``(loss_sum, pairs, report)``
    with ``report[name] = [sum, count]`` for every logged metric."""
    policy, counts = sequence_logps(per_token_loss, loss_mask)
    losses, metrics = dpo_losses(policy, reference.to(policy.dtype), counts, config)
    real = (counts[0::2] > 0).float()  # filler pairs (no response tokens) weigh nothing
    pairs, loss_sum = real.sum(), (losses * real).sum()
    report = {"loss": torch.stack([loss_sum.detach(), pairs])}
    report.update({name: torch.stack([(value * real).sum(), pairs]) for name, value in metrics.items()})
    return loss_sum, pairs.to(torch.int), report
