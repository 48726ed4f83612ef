"""PPO math as pure functions: KL estimators, KL-penalised rewards, GAE, whitening, the clipped
losses, and the KL controllers. No models, no I/O; every function is tested against hand-computed
tensors in tests/test_ppo_math.py. (Log-probs and entropy from logits: stages/modeling/tensors.py.)

Shapes: B = rollouts in the batch, T = response tokens (right-padded after EOS), V = vocabulary.
`mask: (B, T)` is 1 on real response tokens (up to and including EOS) and 0 on padding.

References:
  Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (clipped objective).
  Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE".
  Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences" (KL-shaped reward,
    adaptive KL controller).
  Ouyang et al. 2022, "Training language models to follow instructions" (InstructGPT).
  Schulman 2020, "Approximating KL Divergence" (k1 / k3 estimators).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch


# ---- masked statistics ----

def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask is 1 (all of them, or along `dim`)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over masked positions; Bessel-corrected like TRL/OpenRLHF when `unbiased`."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n > 1:
            var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  total: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """(x - mean) / std over masked positions; masked-out positions come back as 0.
    With shift_mean=False the mean is added back (used for rewards in some recipes).
    `total`: sums a tensor over all ranks (data parallel); the mean and variance are then those of
    every rank's positions together, as one process holding the whole batch would compute them."""
    if total is None:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    else:
        m = mask.to(x.dtype)
        n = total(m.sum())
        mean = total((x * m).sum()) / n.clamp(min=1)
        var = total((((x - mean) ** 2) * m).sum()) / n.clamp(min=1)
        var = var * n / (n - 1) if n > 1 else var
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


# ---- KL between the policy and the frozen reference ----

def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k1 = log π(a|s) − log π_ref(a|s). Unbiased for KL(π‖π_ref) on samples from π; can be negative."""
    return logprobs - ref_logprobs


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 = (r − 1) − log r with r = π_ref/π. Unbiased and always ≥ 0, lower variance than k1."""
    log_r = ref_logprobs - logprobs
    return torch.expm1(log_r) - log_r


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    if estimator == "k1":
        return kl_k1(logprobs, ref_logprobs)
    if estimator == "k3":
        return kl_k3(logprobs, ref_logprobs)
    raise ValueError(f"unknown KL estimator {estimator!r} (k1 or k3)")


class ShapedRewards(NamedTuple):
    """rewards: (B, T) per-token reward −β·KL_t, plus the sequence score on the last real token.
    kl:      (B, T) per-token KL estimate (0 on padding)."""

    rewards: torch.Tensor
    kl: torch.Tensor


def kl_penalized_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float, estimator: str = "k1") -> ShapedRewards:
    """InstructGPT / Ziegler et al. reward shaping.

    scores:       (B,)   sequence-level reward (RM score after normalisation/clipping/penalties)
    logprobs:     (B, T) log π(a_t|s_t) of the rollout policy
    ref_logprobs: (B, T) log π_ref(a_t|s_t) of the frozen SFT reference
    mask:         (B, T) 1 on response tokens; every row must have at least one
    """
    maskf = mask.to(logprobs.dtype)
    kl = kl_per_token(logprobs, ref_logprobs, estimator) * maskf
    rewards = -kl_coef * kl
    # The last real token: index of the last 1 in each row (responses are right-padded after EOS).
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, -1).max(dim=1).values
    rewards[torch.arange(rewards.shape[0], device=mask.device), last] += scores.to(rewards.dtype)
    return ShapedRewards(rewards, kl)


# ---- advantages ----

def leave_one_out(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) sequence scores, in consecutive groups of `group_size` responses to one prompt -> each
    score minus the mean score of the other responses in its group: the REINFORCE leave-one-out
    baseline (RLOO; Kool et al. 2019, Ahmadian et al. 2024). Unbiased, since a response's baseline does
    not depend on it, and it removes how hard the prompt is from the signal without a value model."""
    if group_size < 2 or scores.shape[0] % group_size:
        raise ValueError(f"leave_one_out: {scores.shape[0]} scores do not form groups of {group_size} >= 2")
    g = scores.view(-1, group_size)
    return (g - (g.sum(1, keepdim=True) - g) / (group_size - 1)).view(-1)


class Advantages(NamedTuple):
    """advantages: (B, T) GAE advantage Â_t (0 on padding).
    returns:    (B, T) value targets Â_t + V(s_t)."""

    advantages: torch.Tensor
    returns: torch.Tensor


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> Advantages:
    """Generalised advantage estimation over the response tokens.

    δ_t = r_t + γ·V(s_{t+1}) − V(s_t);  Â_t = δ_t + γλ·Â_{t+1}.  The state after the last real
    token is terminal (V = 0): padded positions carry zero reward and zero value, so the
    recursion passes through them without effect.

    rewards: (B, T) shaped per-token rewards;  values: (B, T) V(s_t) from the rollout's value model.
    """
    maskf = mask.to(values.dtype)
    rewards, values = rewards * maskf, values * maskf
    T = rewards.shape[1]
    last_adv = torch.zeros_like(rewards[:, 0])
    out = [None] * T
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last_adv)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_adv = delta + gamma * lam * last_adv
        out[t] = last_adv
    advantages = torch.stack(out, dim=1) * maskf
    return Advantages(advantages, (advantages + values) * maskf)


# ---- losses ----

class PolicyLoss(NamedTuple):
    """loss: scalar clipped surrogate (to minimise). clipfrac: share of tokens where the clip was active.
    approx_kl: ½·E[(log π − log π_old)²], how far this update moved from the rollout policy.
    ratio_mean / ratio_max: of π/π_old over real tokens."""

    loss: torch.Tensor
    clipfrac: torch.Tensor
    approx_kl: torch.Tensor
    ratio_mean: torch.Tensor
    ratio_max: torch.Tensor


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, cliprange: float) -> PolicyLoss:
    """PPO-clip: mean over real tokens of max(−Â·ρ, −Â·clip(ρ, 1−ε, 1+ε)), ρ = π/π_old.

    logprobs: (B, T) with grad; old_logprobs, advantages: (B, T) from the rollout (no grad).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
        approx_kl = 0.5 * masked_mean(log_ratio ** 2, mask)
        ratio_mean = masked_mean(ratio, mask)
        ratio_max = torch.where(mask.bool(), ratio, torch.zeros_like(ratio)).max()
    return PolicyLoss(loss, clipfrac, approx_kl, ratio_mean, ratio_max)


class ValueLoss(NamedTuple):
    """loss: scalar ½·E[max((V−R)², (V_clip−R)²)]. clipfrac: share of tokens where the clipped term won."""

    loss: torch.Tensor
    clipfrac: torch.Tensor


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, cliprange_value: float) -> ValueLoss:
    """The value update may move V at most ε_v away from the rollout's values before the clipped
    term takes over (PPO2 / TRL / InstructGPT).

    values: (B, T) with grad; old_values, returns: (B, T) from the rollout (no grad).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_sq = (values - returns) ** 2
    clipped_sq = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_sq, clipped_sq), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped_sq > unclipped_sq).to(values.dtype), mask)
    return ValueLoss(loss, clipfrac)


# ---- KL coefficient controllers ----

class FixedKLController:
    """β stays at its initial value."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. 2019, §2.2: β ← β·(1 + clip((KL − target)/target, −0.2, 0.2)·n_steps/horizon).

    current_kl is the mean per-sequence KL of the latest batch; n_steps is how many rollouts it held.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = int(state["horizon"])


def make_kl_controller(kl_coef: float, adaptive: bool, target: float, horizon: int):
    return AdaptiveKLController(kl_coef, target, horizon) if adaptive else FixedKLController(kl_coef)
