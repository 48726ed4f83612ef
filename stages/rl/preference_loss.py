"""Reward-model losses and metrics as pure tensor functions (no model, no I/O).

A batch element is one *comparison group*: the responses to one prompt plus the ordered pairs
(better, worse) among them. A preference pair is a group with one comparison; an InstructGPT
K-wise ranking is a group with all C(K,2) comparisons, each weighted 1/C(K,2), so the K
responses of one prompt count as one element and no single response is overfit (InstructGPT,
Ouyang et al. 2022, eq. 1).
"""
from __future__ import annotations

from itertools import combinations
from typing import NamedTuple

import torch
import torch.nn.functional as F


class Comparisons(NamedTuple):
    """Flattened comparisons of a batch of groups. P = number of (better, worse) pairs.

    chosen:   (P,) long  index into the flat rewards of the preferred response
    rejected: (P,) long  index into the flat rewards of the worse response
    group:    (P,) long  which batch element (prompt) the pair belongs to, in [0, G)
    margin:   (P,) float required reward gap (0 when the data gives none)
    """

    chosen: torch.Tensor
    rejected: torch.Tensor
    group: torch.Tensor
    margin: torch.Tensor


def ranking_pairs(k: int) -> list[tuple[int, int]]:
    """All (better, worse) index pairs of a best-first ranking of k responses: C(k, 2) of them."""
    return list(combinations(range(k), 2))


def group_comparisons(group_sizes: list[int], margins: list[float | None]) -> Comparisons:
    """Comparisons for groups laid out back to back in a flat rewards vector.

    group_sizes[g] = number of responses of group g, best first. A group of 2 is a preference pair
    whose margin is margins[g] (None -> 0); larger groups are rankings (margin 0).
    """
    chosen, rejected, group, margin = [], [], [], []
    offset = 0
    for g, (k, m) in enumerate(zip(group_sizes, margins)):
        if k < 2:
            raise ValueError(f"group {g} has {k} response(s); a comparison needs at least 2")
        for i, j in ranking_pairs(k):
            chosen.append(offset + i)
            rejected.append(offset + j)
            group.append(g)
            margin.append(float(m) if (k == 2 and m is not None) else 0.0)
        offset += k
    return Comparisons(torch.tensor(chosen), torch.tensor(rejected), torch.tensor(group), torch.tensor(margin))


def grouped_bt_loss(rewards: torch.Tensor, comps: Comparisons, use_margin: bool = True,
                    reduction: str = "mean") -> torch.Tensor:
    """Bradley-Terry loss -log σ(r_better - r_worse - margin), averaged inside each group first.

    rewards: (N,) flat scalar rewards of all responses. Each group's loss is the mean over its
    C(k,2) pairs (weights 1/C(k,2)); the result is the mean over groups (reduction="mean") or
    their sum ("sum", for token/group-weighted gradient accumulation).
    """
    comps = Comparisons(*(t.to(rewards.device) for t in comps))
    diff = rewards[comps.chosen] - rewards[comps.rejected]
    if use_margin:
        diff = diff - comps.margin.to(diff)
    pair_loss = -F.logsigmoid(diff)
    n_groups = int(comps.group.max().item()) + 1 if comps.group.numel() else 0
    zeros = torch.zeros(n_groups, dtype=pair_loss.dtype, device=rewards.device)
    per_group_sum = zeros.index_add(0, comps.group, pair_loss)
    per_group_n = zeros.index_add(0, comps.group, torch.ones_like(pair_loss))
    per_group = per_group_sum / per_group_n
    return per_group.sum() if reduction == "sum" else per_group.mean()


def kwise_bt_loss(rewards: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """InstructGPT loss of one prompt: rewards (K,) of its responses best first ->
    -1/C(K,2) Σ_{i<j} log σ(r_i - r_j - margin)."""
    comps = group_comparisons([rewards.shape[0]], [None])
    comps = comps._replace(margin=torch.full_like(comps.margin, float(margin)))
    return grouped_bt_loss(rewards, comps, use_margin=True)


def pair_gaps(rewards: torch.Tensor, comps: Comparisons) -> torch.Tensor:
    """(P,) r_better - r_worse for every comparison."""
    comps = Comparisons(*(t.to(rewards.device) for t in comps))
    return rewards[comps.chosen] - rewards[comps.rejected]


def preference_metrics(gaps: torch.Tensor, rewards: torch.Tensor) -> dict:
    """accuracy: fraction of pairs with r_better > r_worse (a tie counts as wrong); margin: mean gap;
    reward_mean / reward_std: over all scored responses (PPO normalises rewards with these)."""
    gaps, rewards = gaps.float(), rewards.float()
    return {
        "accuracy": (gaps > 0).float().mean().item() if gaps.numel() else float("nan"),
        "margin": gaps.mean().item() if gaps.numel() else float("nan"),
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std(unbiased=False).item() if rewards.numel() > 1 else 0.0,
    }
