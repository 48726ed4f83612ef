"""Step 5 of a PPO iteration: ppo_epochs passes of seeded minibatches over the rollout, each a clipped
policy loss + vf_coef · clipped value loss (+ ptx_coef · the SFT loss), judged by the spike guard
before the optimizers step."""
from __future__ import annotations

import math

import torch

from stages.core.config_schema import PPOConfig
from stages.core.runtime import rank_sum, training_attention
from stages.modeling.tensors import logprobs_from_logits, policy_logits
from stages.modeling.trainable import trainable_params
from stages.rl.ppo_math import clipped_policy_loss, clipped_value_loss
from stages.rl.ppo_models import Trainees
from stages.rl.ptx import ptx_loss
from stages.rl.rollout import Rollout

UPDATE_METRICS = ("policy_loss", "value_loss", "clipfrac", "value_clipfrac", "approx_kl", "ratio_mean",
                  "grad_norm_policy", "grad_norm_value", "ptx_loss")
VALUE_METRICS = {"value_loss", "value_clipfrac", "grad_norm_value"}  # not logged without a value model


def _token_share(accelerator, mask) -> float | torch.Tensor:
    """This rank's share of the minibatch's response tokens over all ranks, times the world size.
    The policy and value losses are means over a rank's tokens and DDP averages gradients over ranks;
    scaled by this, every token weighs the same whichever rank sampled it."""
    total = rank_sum(accelerator)
    if total is None:
        return 1.0
    local = mask.sum().float()
    return local * accelerator.num_processes / total(local).clamp(min=1)


def _minibatch_loss(accelerator, t: Trainees, ro: Rollout, advantages, returns, mb, p: PPOConfig, ptx):
    """(loss, policy loss terms, value loss terms, ptx loss or None) of one minibatch, with grad.
    ptx: (demos, seed, optimizer step, pad id) or None."""
    R = ro.response.shape[1]
    args = (ro.input_ids[mb], ro.attention[mb], ro.positions[mb])
    # The kernel of the scoring pass (stages.rl.rollout), so the first ratios are exactly 1.
    with training_attention(accelerator.device, ro.input_ids.shape[1]), accelerator.autocast():
        new_logprobs = logprobs_from_logits(policy_logits(t.policy, *args, R, p.temperature), ro.response[mb])
        pl = clipped_policy_loss(new_logprobs, ro.logprobs[mb], advantages[mb], ro.mask[mb], p.cliprange)
        vl = (clipped_value_loss(t.value(*args, R), ro.values[mb], returns[mb], ro.mask[mb], p.cliprange_value)
              if t.value is not None else None)
        loss = pl.loss + p.vf_coef * vl.loss if vl is not None else pl.loss
        loss, lm = loss * _token_share(accelerator, ro.mask[mb]), None
        if ptx is not None:
            # Through the unwrapped policy: one DDP forward per backward; gradients still sync.
            demos, seed, step, pad_id = ptx
            lm = ptx_loss(t.policy_u, demos, len(mb), seed, step, pad_id, accelerator.device)
            loss = loss + p.ptx_coef * lm
    return loss, pl, vl, lm


def ppo_update(accelerator, t: Trainees, ro: Rollout, advantages, returns, p: PPOConfig, *, guard, demos,
               pad_id: int, seed: int, iteration: int, opt_step: int, mean_kl: float) -> tuple[dict, int]:
    """Step 5. Returns ({metric: mean over the applied minibatches and the ranks, plus ratio_max and
    skipped_minibatches}, the optimizer step count after it)."""
    acc = {k: [] for k in UPDATE_METRICS}
    ratio_max, skipped = 0.0, 0
    for epoch in range(p.ppo_epochs):
        g = torch.Generator().manual_seed(seed * 1_000_003 + iteration * 1009 + epoch)
        for mb in torch.randperm(ro.response.shape[0], generator=g).split(p.mini_batch_size):
            if guard.should_skip():
                skipped += 1
                continue
            mb = mb.to(accelerator.device)
            loss, pl, vl, lm = _minibatch_loss(accelerator, t, ro, advantages, returns, mb, p,
                                               (demos, seed, opt_step, pad_id) if demos is not None else None)
            if lm is not None:
                acc["ptx_loss"].append(lm.item())
            accelerator.backward(loss)
            gn_policy = float(accelerator.clip_grad_norm_(t.policy.parameters(), p.grad_clip))
            gn_value = float(accelerator.clip_grad_norm_(t.value.parameters(), p.grad_clip)) if vl is not None else 0.0
            # Every rank must take the same guard decision: judge reduced numbers.
            total = accelerator.reduce(loss.detach().float(), reduction="mean").item()
            rmax = accelerator.gather(pl.ratio_max.detach().float().reshape(1)).max().item()
            opt_step += 1
            # PPO losses have no stable scale for the guard's running-median rule (the policy loss is
            # centred on zero by whitening; the value loss follows the drifting returns), so only a
            # non-finite loss is passed on; PPO is judged by KL, policy ratio and grad norm.
            guard_loss = 0.0 if math.isfinite(total) else total
            optimizers = t.optimizers.values()
            if not guard.check(opt_step, loss=guard_loss, grad_norm=max(gn_policy, gn_value), kl=mean_kl, ratio=rmax):
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                skipped += 1
                continue
            for opt in optimizers:
                opt.step()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            if t.ema is not None:
                with torch.no_grad():
                    for n, w in trainable_params(t.policy_u).items():
                        t.ema[n].lerp_(w.detach().float(), 1.0 - p.ema_decay)
            guard.after_step(opt_step)
            for k, v in (("policy_loss", pl.loss), ("clipfrac", pl.clipfrac), ("approx_kl", pl.approx_kl),
                         ("ratio_mean", pl.ratio_mean)):
                acc[k].append(v.item())
            acc["grad_norm_policy"].append(gn_policy)
            if vl is not None:
                acc["value_loss"].append(vl.loss.item())
                acc["value_clipfrac"].append(vl.clipfrac.item())
                acc["grad_norm_value"].append(gn_value)
            ratio_max = max(ratio_max, pl.ratio_max.item())
    means = accelerator.reduce(torch.tensor([sum(v) / len(v) if v else float("nan") for v in acc.values()],
                                            device=accelerator.device), reduction="mean").tolist()
    absent = ({"ptx_loss"} if demos is None else set()) | (VALUE_METRICS if t.value is None else set())
    metrics = {k: v for k, v in zip(acc, means) if k not in absent}
    return {**metrics, "ratio_max": ratio_max, "skipped_minibatches": skipped}, opt_step
