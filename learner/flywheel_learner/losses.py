"""Pure loss functions for SFT and the reward model. They import only torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_token_nll(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Mean negative log-likelihood of `labels` over the positions where `mask` is set.

    logits: (B, T, V) where logits[:, t] predicts labels[:, t] (the caller shifts);
    labels: (B, T); mask: (B, T) -> scalar. Averaged per token, not per sequence, so long and
    short responses weigh by their length, as in plain language-model training.
    """
    nll = F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), reduction="none"
    )  # (B*T,)
    weights = mask.flatten().to(nll.dtype)  # (B*T,)
    return (nll * weights).sum() / weights.sum().clamp(min=1.0)


def _ordered_pairs(tiers: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """pairs[i, j] is True where completion i is ranked strictly above j in the same group.

    tiers, group: (N,) -> (N, N). Lower tier = better; equal tiers are ties, not pairs.
    """
    same_group = group[:, None] == group[None, :]  # (N, N)
    better = tiers[:, None] < tiers[None, :]  # (N, N)
    return same_group & better


def ranking_loss(rewards: torch.Tensor, tiers: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """InstructGPT's K-way ranking loss (Ouyang et al. 2022, eq. 1), vectorised.

    rewards, tiers, group: (N,), one row per completion, each completion scored once.
    For each group (one prompt's ranking), the mean of -log sigmoid(r_i - r_j) over its C pairs
    with tier_i < tier_j (1/C(K,2) in the paper, which has no ties); then the mean over groups,
    so a prompt with many completions counts once, as the paper's batching intends. Groups with
    no pair (all tied) are left out. -> scalar
    """
    pairs = _ordered_pairs(tiers, group)  # (N, N)
    margins = rewards[:, None] - rewards[None, :]  # (N, N)
    pair_loss = -F.logsigmoid(margins) * pairs  # (N, N)
    _, group_index = torch.unique(group, return_inverse=True)  # (N,)
    n_groups = int(group_index.max()) + 1 if group.numel() else 0
    loss_sum = rewards.new_zeros(n_groups).index_add(0, group_index, pair_loss.sum(dim=1))  # (G,)
    pair_count = rewards.new_zeros(n_groups).index_add(
        0, group_index, pairs.sum(dim=1).to(rewards.dtype)
    )  # (G,)
    ranked = pair_count > 0  # (G,)
    if not bool(ranked.any()):
        return rewards.sum() * 0.0  # no preference to learn from; keeps the graph connected
    return (loss_sum[ranked] / pair_count[ranked]).mean()


def pairwise_accuracy(rewards: torch.Tensor, tiers: torch.Tensor, group: torch.Tensor) -> float:
    """Share of ordered pairs (over all groups) the rewards put in the right order.

    A tie in reward counts as wrong. rewards, tiers, group: (N,). NaN when there is no pair.
    """
    pairs = _ordered_pairs(tiers, group)  # (N, N)
    if not bool(pairs.any()):
        return float("nan")
    correct = rewards[:, None] > rewards[None, :]  # (N, N)
    return float((correct & pairs).sum() / pairs.sum())
