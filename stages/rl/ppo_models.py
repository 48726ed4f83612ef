"""The four roles of PPO (policy, frozen reference, value, reward), their forward passes, and the
policy's export. The stage's story is in stages/ppo.py; its checkpoints in stages/training/checkpoint.py.

Memory: every forward pass computes vocabulary logits only for the response positions
(`policy_logits`, in stages/modeling/tensors.py) and applies the value/score head only where it is needed; with
`ppo.lora.enabled` the reference is the policy's own base weights with the adapter disabled, and
with `ppo.value_lora.enabled` (and value_init = the RM) the reward model is the value model's base
with its adapter disabled, so no base is held twice.
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from stages.core.config_schema import RunConfig
from stages.core.run_folder import resolve_input_model
from stages.core.runtime import autocast_layout
from stages.modeling.loading import load_causal_lm, load_reward_model, save_model_folder
from stages.modeling.reward_scoring import ValueModel, last_token_scores
from stages.modeling.trainable import apply_lora, is_peft, peft_base, trainable_params


@dataclass
class PPOModels:
    """policy: trainable causal LM (a PeftModel with ppo.lora).
    ref:    frozen causal LM, or None when the reference is the policy with its adapter disabled.
    value:  ValueModel (trainable), or None with ppo.advantage 'group' (no value model).
    reward: frozen sequence classifier, None with a reward_fn or when it is the value's base (shared).
    reward_shared: the RM is `value` with its adapter disabled.
    reward_stats: the RM's score mean/std that normalise the rewards, or None (not normalised)."""

    policy: torch.nn.Module
    ref: torch.nn.Module | None
    value: ValueModel | None
    reward: torch.nn.Module | None
    reward_shared: bool
    policy_path: str
    reward_path: str | None
    value_path: str | None
    reward_stats: dict | None = None


@dataclass
class Trainees:
    """The trained models as PPO's loop holds them after accelerate.prepare.

    policy, value:         prepared (DDP-wrapped with several processes): the update's forward/backward
    policy_u, value_u:     unwrapped: generation, no-grad scoring, checkpoints, export
    policy_opt, value_opt: their optimizers (prepared); the value's three are None with advantage 'group'
    ema:                   fp32 EMA of the policy's trainable weights by name, or None
    """

    policy: torch.nn.Module
    value: torch.nn.Module | None
    policy_u: torch.nn.Module
    value_u: ValueModel | None
    policy_opt: torch.optim.Optimizer
    value_opt: torch.optim.Optimizer | None
    ema: dict | None

    @property
    def weights(self) -> dict:
        """What a checkpoint holds of the models: name -> unwrapped module (no value with advantage 'group')."""
        return {"policy": self.policy_u, **({"value": self.value_u} if self.value_u is not None else {})}

    @property
    def optimizers(self) -> dict:
        return {"policy": self.policy_opt, **({"value": self.value_opt} if self.value_opt is not None else {})}


def _frozen(model):
    model.requires_grad_(False)
    return model.eval()


def load_models(cfg: RunConfig, run_dir: Path, pad_token_id: int, log=print) -> PPOModels:
    p, trc = cfg.ppo, cfg.trust_remote_code
    policy_path = resolve_input_model(run_dir, p.policy, "ppo.policy")
    reward_path = None if p.reward_fn else resolve_input_model(run_dir, p.reward_model, "ppo.reward_model")

    policy = load_causal_lm(policy_path, "fp32", trc)
    ref = None
    if p.lora.enabled:
        policy = apply_lora(policy, p.lora, "CAUSAL_LM")
    else:
        # Never trained: matmul weights in the autocast dtype, so the reference computes exactly what
        # the (fp32-master) policy computes under autocast, and KL is 0 before the first update.
        ref = _frozen(autocast_layout(load_causal_lm(policy_path, "fp32", trc), cfg.precision))
    policy.eval()  # PPO wants no dropout: ratios must be exactly 1 before the first update

    stats = load_reward_stats(reward_path) if p.reward_normalize else None
    value, value_path = (_load_value(cfg, run_dir, policy_path, reward_path, pad_token_id, stats, log)
                         if p.advantage == "gae" else (None, None))
    reward, shared = None, False
    if reward_path is not None:
        if value is not None and p.value_lora.enabled and value_path == reward_path:
            shared = True
        else:
            reward = _frozen(autocast_layout(load_reward_model(reward_path, "fp32", trc, pad_token_id=pad_token_id),
                                             cfg.precision))
    return PPOModels(policy, ref, value, reward, shared, policy_path, reward_path, value_path, stats)


def _load_value(cfg: RunConfig, run_dir: Path, policy_path: str, reward_path: str | None, pad_token_id: int,
                stats: dict | None, log) -> tuple[ValueModel, str]:
    """The value model and where it came from (ppo.value_init)."""
    p, trc = cfg.ppo, cfg.trust_remote_code
    zero_head = False
    if p.value_init == "reward" and reward_path is not None:
        value_path = reward_path
    elif p.value_init in ("reward", "policy"):
        if p.value_init == "reward":
            log("ppo: value_init 'reward' with a reward_fn (no reward model): the value starts from the policy")
        value_path, zero_head = policy_path, True
    else:
        value_path = resolve_input_model(run_dir, p.value_init, "ppo.value_init")
    value_seq = load_reward_model(value_path, "fp32", trc, pad_token_id=pad_token_id)
    if zero_head:  # a fresh head on the policy backbone: start from V = 0 rather than noise
        torch.nn.init.zeros_(peft_base(value_seq).score.weight)
    if p.value_lora.enabled:
        value_seq = apply_lora(value_seq, p.value_lora, "SEQ_CLS")
    value_seq.eval()
    # A value that starts from the RM reads its scores on the normalised rewards' scale.
    return ValueModel(value_seq, stats if value_path == reward_path else None), value_path


def reference_context(models: PPOModels, policy):
    """Where reference log-probs come from: the frozen copy, or the policy with its adapter off."""
    if models.ref is not None:
        return models.ref, nullcontext()
    return policy, policy.disable_adapter()


def reward_model_scores(models: PPOModels, value_unwrapped: ValueModel, input_ids, attention_mask, position_ids):
    """(B,) raw reward-model scores of the full (left-padded) sequences."""
    if models.reward_shared:
        with value_unwrapped.seq_cls.disable_adapter():
            return last_token_scores(value_unwrapped, input_ids, attention_mask, position_ids)
    return last_token_scores(models.reward, input_ids, attention_mask, position_ids)


def load_reward_stats(reward_path: str | None) -> dict | None:
    """The RM's saved score statistics {"mean", "std"}, or None if absent/unreadable."""
    if reward_path is None:
        return None
    path = Path(reward_path) / "reward_stats.json"
    try:
        stats = json.loads(path.read_text())
        return {"mean": float(stats["mean"]), "std": max(float(stats["std"]), 1e-6)}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def apply_ema(policy, ema: dict | None) -> None:
    """Put the EMA weights (if kept) into the policy's trainable parameters, before its export."""
    if ema is not None:
        with torch.no_grad():
            for n, p in trainable_params(policy).items():
                p.copy_(ema[n])


def export_policy(policy, tokenizer, out_dir: Path) -> None:
    """Write an unsharded policy as a plain HF causal LM + tokenizer (LoRA merged), from the calling
    process alone: the monitor's copy of the best policy. The final export is the training stages'
    `export_trained`, which every rank calls."""
    save_model_folder(policy.merge_and_unload() if is_peft(policy) else policy, tokenizer, out_dir)
