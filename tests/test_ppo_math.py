"""PPO math against hand-computed numbers. Expected values are written out (worked in comments),
never produced by the function under test."""
import math

import pytest
import torch

from stages.modeling.tensors import entropy_from_logits
from stages.rl.ppo_math import (AdaptiveKLController, FixedKLController, clipped_policy_loss, clipped_value_loss, gae,
                                kl_k1, kl_k3, kl_penalized_rewards, leave_one_out, make_kl_controller, masked_mean,
                                masked_var, masked_whiten)

t = torch.tensor


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol)


# ---- masked statistics ----

def test_masked_mean_all_and_per_row():
    x = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = t([[1, 1, 0], [1, 0, 0]])
    assert close(masked_mean(x, m), 7.0 / 3.0)             # (1 + 2 + 4) / 3
    assert close(masked_mean(x, m, dim=1), [1.5, 4.0])


def test_masked_var_and_whiten_ignore_padding():
    x = t([[1.0, 2.0, 3.0, 100.0]])
    m = t([[1, 1, 1, 0]])
    # mean 2; squared deviations 1, 0, 1 -> biased var 2/3, unbiased (x3/2) = 1
    assert close(masked_var(x, m, unbiased=False), 2.0 / 3.0)
    assert close(masked_var(x, m), 1.0)
    assert close(masked_whiten(x, m), [[-1.0, 0.0, 1.0, 0.0]], tol=1e-5)        # the 100 never counts
    assert close(masked_whiten(x, m, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]], tol=1e-5)


# ---- KL estimators and shaped rewards ----

def test_k1_k3_by_hand():
    half, quarter = math.log(0.5), math.log(0.25)
    # π = 0.5, π_ref = 0.25: k1 = ln 2; r = π_ref/π = 0.5, k3 = (0.5 - 1) - ln 0.5 = ln 2 - 0.5
    assert close(kl_k1(t([half]), t([quarter])), [0.6931472])
    assert close(kl_k3(t([half]), t([quarter])), [0.1931472])
    # π = 0.25, π_ref = 0.5: k1 = -ln 2 (k1 can be negative); r = 2, k3 = 1 - ln 2 (k3 never is)
    assert close(kl_k1(t([quarter]), t([half])), [-0.6931472])
    assert close(kl_k3(t([quarter]), t([half])), [0.3068528])
    assert close(kl_k3(t([-1.3]), t([-1.3])), [0.0])


def test_kl_penalized_rewards_by_hand():
    logprobs = t([[-1.0, -2.0, -3.0], [-1.0, -1.0, -5.0]])
    ref = t([[-1.5, -2.0, -2.0], [-0.5, -1.0, -9.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    out = kl_penalized_rewards(t([2.0, -1.0]), logprobs, ref, mask, kl_coef=0.1, estimator="k1")
    # k1 = [[0.5, 0, -1], [-0.5, 0, (masked)]]; -0.1*k1 plus the score on each row's last real token
    assert close(out.kl, [[0.5, 0.0, -1.0], [-0.5, 0.0, 0.0]])
    assert close(out.rewards, [[-0.05, 0.0, 0.1 + 2.0], [0.05, -1.0, 0.0]])


def test_kl_penalized_rewards_k3():
    logprobs, ref = t([[math.log(0.5)]]), t([[math.log(0.25)]])
    out = kl_penalized_rewards(t([1.0]), logprobs, ref, t([[1]]), kl_coef=1.0, estimator="k3")
    assert close(out.rewards, [[1.0 - 0.1931472]])


# ---- GAE ----

def test_gae_1x4_by_hand():
    rewards = t([[0.1, -0.2, 0.0, 1.0]])
    values = t([[0.5, 0.4, 0.3, 0.2]])
    out = gae(rewards, values, t([[1, 1, 1, 1]]), gamma=1.0, lam=0.5)
    # t=3: δ = 1.0 + 0 - 0.2 = 0.8                      Â = 0.8
    # t=2: δ = 0.0 + 0.2 - 0.3 = -0.1                   Â = -0.1 + 0.5*0.8 = 0.3
    # t=1: δ = -0.2 + 0.3 - 0.4 = -0.3                  Â = -0.3 + 0.5*0.3 = -0.15
    # t=0: δ = 0.1 + 0.4 - 0.5 = 0.0                    Â = 0 + 0.5*(-0.15) = -0.075
    assert close(out.advantages, [[-0.075, -0.15, 0.3, 0.8]])
    assert close(out.returns, [[0.425, 0.25, 0.6, 1.0]])


def test_gae_padding_is_terminal_and_discounted():
    rewards = t([[0.1, -0.2, 1.0, 9.9]])      # the 9.9 / 7.0 sit on padding and must not leak in
    values = t([[0.5, 0.4, 0.3, 7.0]])
    out = gae(rewards, values, t([[1, 1, 1, 0]]), gamma=0.5, lam=1.0)
    # t=2: δ = 1.0 + 0.5*0 - 0.3 = 0.7                 Â = 0.7
    # t=1: δ = -0.2 + 0.5*0.3 - 0.4 = -0.45            Â = -0.45 + 0.5*0.7 = -0.1
    # t=0: δ = 0.1 + 0.5*0.4 - 0.5 = -0.2              Â = -0.2 + 0.5*(-0.1) = -0.25
    assert close(out.advantages, [[-0.25, -0.1, 0.7, 0.0]])
    assert close(out.returns, [[0.25, 0.3, 1.0, 0.0]])


def test_gae_matches_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    mask = t([[1] * 6, [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    gamma, lam = 0.9, 0.8
    out = gae(rewards, values, mask, gamma, lam)
    for b in range(3):
        n = int(mask[b].sum())
        adv = 0.0
        for i in reversed(range(n)):
            nv = values[b, i + 1].item() if i + 1 < n else 0.0
            adv = rewards[b, i].item() + gamma * nv - values[b, i].item() + gamma * lam * adv
            assert abs(out.advantages[b, i].item() - adv) < 1e-5
        assert torch.all(out.advantages[b, n:] == 0)


# ---- the group (leave-one-out) baseline ----

def test_leave_one_out_by_hand():
    # one group of 4: baselines (2+3+6)/3, (1+3+6)/3, (1+2+6)/3, (1+2+3)/3
    assert close(leave_one_out(t([1.0, 2.0, 3.0, 6.0]), 4), [1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0])
    # two groups of 2, in order: each score minus its partner's
    assert close(leave_one_out(t([1.0, 3.0, 5.0, 4.0]), 2), [-2.0, 2.0, 1.0, -1.0])
    # a group whose responses all score alike carries no signal, however high the score
    assert close(leave_one_out(t([7.0, 7.0, 7.0]), 3), [0.0, 0.0, 0.0])
    for scores, k in ((t([1.0, 2.0, 3.0]), 2), (t([1.0, 2.0]), 1)):
        with pytest.raises(ValueError, match="groups"):
            leave_one_out(scores, k)


def test_group_advantage_is_the_centred_reward_to_go():
    """What stages/ppo.py computes for advantage 'group': centred scores, KL-shaped, then GAE with
    V = 0 and λ = 1, i.e. each token's reward to go."""
    scores = leave_one_out(t([2.0, 0.0]), 2)                         # [2, -2]
    logprobs = t([[-1.0, -2.0], [-1.0, -3.0]])
    ref = t([[-1.5, -1.0], [-1.0, -7.0]])
    mask = t([[1, 1], [1, 0]])
    shaped = kl_penalized_rewards(scores, logprobs, ref, mask, kl_coef=0.1)
    # k1 = [[0.5, -1.0], [0, (masked)]] -> rewards [[-0.05, 0.1 + 2], [0 - 2, 0]]
    out = gae(shaped.rewards, torch.zeros(2, 2), mask, gamma=1.0, lam=1.0)
    assert close(out.advantages, [[2.05, 2.1], [-2.0, 0.0]])
    assert close(out.returns, out.advantages)


# ---- clipped losses at the clip boundaries (ε = 0.2) ----

@pytest.mark.parametrize("ratio, adv, loss, clipped", [
    (1.19, +1.0, -1.19, False),   # inside 1+ε: plain surrogate -Â·ρ
    (1.21, +1.0, -1.20, True),    # outside with Â>0: capped at -(1+ε)Â, no gradient
    (1.21, -1.0, 1.21, False),    # outside but Â<0: the pessimistic unclipped term wins
    (0.81, -1.0, 0.81, False),    # inside 1-ε
    (0.79, -1.0, 0.80, True),     # below 1-ε with Â<0: capped at (1-ε)·|Â|
    (0.79, +1.0, -0.79, False),   # below 1-ε with Â>0: unclipped wins
])
def test_clipped_policy_loss_boundaries(ratio, adv, loss, clipped):
    logp = t([[math.log(ratio)]], requires_grad=True)
    out = clipped_policy_loss(logp, t([[0.0]]), t([[adv]]), t([[1]]), cliprange=0.2)
    assert close(out.loss, loss, tol=1e-5)
    assert close(out.clipfrac, 1.0 if clipped else 0.0)
    assert close(out.ratio_mean, ratio, tol=1e-5) and close(out.ratio_max, ratio, tol=1e-5)
    assert close(out.approx_kl, 0.5 * math.log(ratio) ** 2)
    out.loss.backward()
    # d/dlogp of -Â·ρ is -Â·ρ; the clipped branch is flat
    assert close(logp.grad, [[0.0 if clipped else -adv * ratio]], tol=1e-5)


def test_clipped_policy_loss_mean_over_real_tokens():
    logp = t([[math.log(1.1), math.log(1.5), 5.0]])
    out = clipped_policy_loss(logp, t([[0.0, 0.0, 0.0]]), t([[2.0, 1.0, 100.0]]), t([[1, 1, 0]]), 0.2)
    # token 1: -2*1.1 = -2.2; token 2: max(-1.5, -1.2) = -1.2; token 3 is padding
    assert close(out.loss, (-2.2 - 1.2) / 2, tol=1e-5)
    assert close(out.clipfrac, 0.5) and close(out.ratio_max, 1.5, tol=1e-5)


@pytest.mark.parametrize("value, ret, loss, clipped", [
    (0.19, 1.0, 0.5 * 0.81 ** 2, False),   # inside ±0.2 of old value 0
    (0.21, 1.0, 0.5 * 0.80 ** 2, True),    # just outside: clipped term (0.2 - 1)² is larger
    (0.50, 1.0, 0.5 * 0.80 ** 2, True),    # moved toward the return too far: clipped term wins
    (-0.5, 1.0, 0.5 * 1.50 ** 2, False),   # moved away: unclipped (−0.5 − 1)² is larger
    (1.50, 1.0, 0.5 * 0.80 ** 2, True),    # overshoot past the return
])
def test_clipped_value_loss_boundaries(value, ret, loss, clipped):
    v = t([[value]], requires_grad=True)
    out = clipped_value_loss(v, t([[0.0]]), t([[ret]]), t([[1]]), cliprange_value=0.2)
    assert close(out.loss, loss, tol=1e-5)
    assert close(out.clipfrac, 1.0 if clipped else 0.0)
    out.loss.backward()
    assert close(v.grad, [[0.0 if clipped else value - ret]], tol=1e-5)


# ---- entropy ----

def test_entropy_from_logits():
    # uniform over 2: ln 2; p = (1/4, 3/4): -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.5623351
    logits = t([[0.0, 0.0], [0.0, math.log(3.0)]])
    assert close(entropy_from_logits(logits), [0.6931472, 0.5623351])


# ---- KL controllers ----

def test_adaptive_kl_controller_update():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=9.0, n_steps=8)
    # error 9/6 - 1 = 0.5, clipped to 0.2: β = 0.1 * (1 + 0.2 * 8 / 10000) = 0.100016
    assert ctl.value == pytest.approx(0.100016, rel=1e-12)
    ctl.update(current_kl=5.4, n_steps=100)
    # error 5.4/6 - 1 = -0.1 (inside the clip): β *= 1 - 0.1 * 100 / 10000 = 0.999
    assert ctl.value == pytest.approx(0.100016 * 0.999, rel=1e-12)
    ctl.update(current_kl=0.0, n_steps=10000)   # error -1 clipped to -0.2: β *= 0.8
    assert ctl.value == pytest.approx(0.100016 * 0.999 * 0.8, rel=1e-12)
    other = AdaptiveKLController(0.5, 6.0, 10000)
    other.load_state_dict(ctl.state_dict())
    assert other.value == ctl.value


def test_fixed_kl_controller_and_factory():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 64)
    assert ctl.value == 0.05
    adaptive = make_kl_controller(0.05, True, 6.0, 100)
    assert (adaptive.value, adaptive.target, adaptive.horizon) == (0.05, 6.0, 100)
    adaptive.update(12.0, 10)  # error 12/6 - 1 = 1, clipped to 0.2: β = 0.05 * (1 + 0.2 * 10 / 100) = 0.051
    assert adaptive.value == pytest.approx(0.051, rel=1e-12)
    fixed = make_kl_controller(0.05, False, 6.0, 100)
    fixed.update(12.0, 10)
    assert fixed.value == 0.05
    # a resumed controller carries the saved target and horizon, not the ones it was built with
    resumed = AdaptiveKLController(0.5, target=1.0, horizon=1)
    resumed.load_state_dict(adaptive.state_dict())
    assert (resumed.value, resumed.target, resumed.horizon) == (adaptive.value, 6.0, 100)
