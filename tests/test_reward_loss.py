"""The reward-model losses against hand-computed numbers."""
import math

import pytest
import torch

from stages.rl.preference_loss import (group_comparisons, grouped_bt_loss, kwise_bt_loss, pair_gaps, preference_metrics,
                                       ranking_pairs)


def _nls(x):  # -log sigmoid(x), by hand
    return math.log1p(math.exp(-x))


def test_kwise_k4_hand_computed():
    r = torch.tensor([2.0, 1.0, 0.5, -1.0])  # best first
    # the 6 pairs (i<j) and their gaps r_i - r_j
    gaps = [1.0, 1.5, 3.0, 0.5, 2.0, 1.5]
    expected = sum(_nls(g) for g in gaps) / 6
    assert ranking_pairs(4) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert kwise_bt_loss(r).item() == pytest.approx(expected, rel=1e-6)
    # each pair weighs 1/6: the gradient on r_0 is -(1/6) Σ_j σ(-(r_0 - r_j))
    r = r.clone().requires_grad_(True)
    kwise_bt_loss(r).backward()
    g0 = -sum(1 / (1 + math.exp(g)) for g in (1.0, 1.5, 3.0)) / 6
    assert r.grad[0].item() == pytest.approx(g0, rel=1e-6)
    assert r.grad.sum().item() == pytest.approx(0.0, abs=1e-7)


def test_kwise_margin_subtracted():
    r = torch.tensor([1.0, 0.0, -1.0])
    expected = (_nls(1 - 0.5) + _nls(2 - 0.5) + _nls(1 - 0.5)) / 3
    assert kwise_bt_loss(r, margin=0.5).item() == pytest.approx(expected, rel=1e-6)


def test_groups_weighted_equally_and_pair_margin():
    # group 0: a pair with margin 1.0; group 1: a K=3 ranking. Flat rewards: [c, r, a, b, c]
    rewards = torch.tensor([3.0, 1.0, 0.0, -1.0, 2.0])
    comps = group_comparisons([2, 3], [1.0, None])
    assert comps.chosen.tolist() == [0, 2, 2, 3] and comps.rejected.tolist() == [1, 3, 4, 4]
    g0 = _nls(3 - 1 - 1.0)
    g1 = (_nls(0 - -1) + _nls(0 - 2) + _nls(-1 - 2)) / 3
    assert grouped_bt_loss(rewards, comps).item() == pytest.approx((g0 + g1) / 2, rel=1e-6)
    assert grouped_bt_loss(rewards, comps, reduction="sum").item() == pytest.approx(g0 + g1, rel=1e-6)
    no_margin = (_nls(2.0) + g1) / 2
    assert grouped_bt_loss(rewards, comps, use_margin=False).item() == pytest.approx(no_margin, rel=1e-6)


def test_preference_metrics():
    rewards = torch.tensor([1.0, 0.0, -1.0, 1.0])
    comps = group_comparisons([2, 2], [None, None])
    gaps = pair_gaps(rewards, comps)
    assert gaps.tolist() == [1.0, -2.0]
    m = preference_metrics(gaps, rewards)
    assert m["accuracy"] == 0.5
    assert m["margin"] == pytest.approx((1.0 - 2.0) / 2)
    assert m["reward_mean"] == pytest.approx(0.25)
    assert m["reward_std"] == pytest.approx(torch.tensor([1.0, 0.0, -1.0, 1.0]).std(unbiased=False).item())


def test_single_response_group_rejected():
    with pytest.raises(ValueError, match="at least 2"):
        group_comparisons([1], [None])
