"""Routing math as pure functions: top-k selection, weights, load statistics, balance losses, bias updates.

Shape suffixes: T tokens, E routed experts, K experts per token, B batch, S sequence.
The selection bias (aux-loss-free balancing, DeepSeek-V3) changes which experts are chosen, never the
weights they get: weights come from the unbiased scores.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Routing(NamedTuple):
    weights_TK: torch.Tensor  # fp32 combine weights
    experts_TK: torch.Tensor  # int64 expert ids
    scores_TE: torch.Tensor  # fp32 scores (sigmoid or softmax of the logits)


def route(
    logits_TE: torch.Tensor,
    bias_E: torch.Tensor | None,
    top_k: int,
    score: str = "sigmoid",
    norm_topk_prob: bool = True,
    scaling: float = 1.0,
) -> Routing:
    """Choose top-k experts per token on `score + bias`; weight them by the unbiased scores."""
    logits_TE = logits_TE.float()
    scores_TE = logits_TE.sigmoid() if score == "sigmoid" else logits_TE.softmax(dim=-1)
    choice_TE = scores_TE if bias_E is None else scores_TE + bias_E.float()
    experts_TK = torch.topk(choice_TE.detach(), k=top_k, dim=-1).indices
    weights_TK = scores_TE.gather(1, experts_TK)
    if norm_topk_prob:
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
    return Routing(weights_TK * scaling, experts_TK, scores_TE)


def expert_counts(experts_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens routed to each expert (int64 [E])."""
    return torch.bincount(experts_TK.reshape(-1), minlength=num_experts)


def bias_update(bias_E: torch.Tensor, counts_E: torch.Tensor, rate: float) -> torch.Tensor:
    """Aux-loss-free update: raise the bias of under-loaded experts, lower it for over-loaded ones."""
    counts = counts_E.float()
    return bias_E + rate * torch.sign(counts.mean() - counts)


def load_stats(counts_E: torch.Tensor) -> dict[str, float]:
    """Balance statistics of one layer's expert load: min/max share, coefficient of variation, dead share."""
    counts = counts_E.double()
    total = counts.sum().clamp_min(1.0)
    mean = counts.mean()
    cv = (counts.std(unbiased=False) / mean).item() if mean > 0 else 0.0
    return {
        "min_share": (counts.min() / total).item(),
        "max_share": (counts.max() / total).item(),
        "cv": cv,
        "dead_frac": (counts == 0).double().mean().item(),
    }


def sequence_balance_loss(scores_BSE: torch.Tensor, experts_BSK: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss sum_i f_i * P_i, averaged over sequences (alpha applied by caller).

    f_i = E / (K*S) * (tokens of the sequence routed to i); P_i = mean over the sequence of normalised scores.
    """
    b, s, e = scores_BSE.shape
    k = experts_BSK.shape[-1]
    onehot_BSE = torch.zeros_like(scores_BSE).scatter_(-1, experts_BSK, 1.0)
    f_BE = onehot_BSE.sum(dim=1) * (e / (k * s))
    p_BE = (scores_BSE / scores_BSE.sum(dim=-1, keepdim=True).clamp_min(1e-20)).mean(dim=1)
    return (f_BE.detach() * p_BE).sum(dim=-1).mean()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss: mean squared log-sum-exp of the logits (keeps them small)."""
    return torch.logsumexp(logits_TE.float(), dim=-1).pow(2).mean()
