"""PPO's over-optimisation monitor: how to tell when to stop.

Every `ppo.monitor.every` iterations, and once before the first, the policy answers a fixed set of
held-out prompts with PPO's own sampling settings and a fixed seed. Three numbers come out:
  proxy     the mean raw score of the reward PPO optimises (its RM, or its reward_fn)
  judges    the mean score of each reward model in `ppo.monitor.judges`, which PPO never sees
  kl        the mean over prompts of the summed per-token log-ratio to the reference
The metrics log gets them as monitor_* columns, and the compare report plots proxy and judges against
sqrt(KL). Proxy reward that keeps rising while a judge falls is the over-optimisation of Gao et al.
(2022). The policy that the first judge scores best is written to ppo/best/ (a plain HF folder with
best.json), so it can be compared as a model.

The monitor's sampling runs on a forked RNG, so training draws exactly what it would draw without it.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import torch

from data_schemas.files import atomic_write_json
from stages.core.config_schema import PPOConfig
from stages.core.errors import StageError
from stages.core.run_folder import model_label
from stages.core.runtime import autocast_layout, rank_sum
from stages.modeling.reward_scoring import last_token_scores
from stages.modeling.tensors import logprobs_from_logits, policy_logits
from stages.rl.ppo_models import PPOModels, export_policy, reference_context, reward_model_scores
from stages.rl.reward_functions import call_reward_fn
from stages.rl.rollout import answer
from stages.training.data_order import chunks, eval_shard

BEST = "best"
SEED_OFFSET = 7_777


class Monitor:
    def __init__(self, p: PPOConfig, run_dir: Path, out_dir: Path, models: PPOModels, tokenizer, accelerator,
                 texts: list[str], user_turns: list[str], judges: dict[str, torch.nn.Module], seed: int):
        self.p, self.out_dir, self.models, self.tokenizer, self.acc = p, out_dir, models, tokenizer, accelerator
        self.texts, self.user_turns, self.judges, self.seed = texts, user_turns, judges, seed
        self.best_score: float | None = None
        self.best_iteration: int | None = None

    def due(self, iteration: int) -> bool:
        every = self.p.monitor.every
        return every > 0 and (iteration % every == 0 or iteration == self.p.iterations)

    def state_dict(self) -> dict:
        return {"best_score": self.best_score, "best_iteration": self.best_iteration}

    def load_state_dict(self, state: dict | None) -> None:
        state = state or {}
        self.best_score, self.best_iteration = state.get("best_score"), state.get("best_iteration")

    @torch.no_grad()
    def evaluate(self, policy, value, reward_fn) -> dict:
        """{'monitor_proxy', 'monitor_kl', 'monitor_sqrt_kl', 'monitor_judge_<name>' ...}: means over the
        held-out prompts (every rank answers a shard; the means are over all of them)."""
        acc, p = self.acc, self.p
        devices = [acc.device] if acc.device.type == "cuda" else []
        mine = eval_shard(list(range(len(self.texts))), acc)
        sums = torch.zeros(2 + len(self.judges), dtype=torch.float64, device=acc.device)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed + SEED_OFFSET + acc.process_index)
            for idx in chunks(mine, p.monitor.batch_size):
                s = answer(acc, policy, self.tokenizer, self.texts, idx, p)
                args = (s.input_ids, s.attention, s.positions)
                R = s.response.shape[1]
                with acc.autocast():
                    if reward_fn is None:
                        proxy = reward_model_scores(self.models, value, *args)
                    else:
                        decoded = self.tokenizer.batch_decode(s.response, skip_special_tokens=True)
                        proxy = torch.tensor(call_reward_fn(reward_fn, [self.user_turns[i] for i in idx], decoded))
                    logp = logprobs_from_logits(policy_logits(policy, *args, R, p.temperature), s.response)
                    ref_model, ref_ctx = reference_context(self.models, policy)
                    with ref_ctx:
                        ref_logp = logprobs_from_logits(policy_logits(ref_model, *args, R, p.temperature), s.response)
                    judged = [last_token_scores(j, *args) for j in self.judges.values()]
                kl = ((logp - ref_logp) * s.mask).sum(1)
                parts = [proxy.float().sum(), kl.sum()] + [j.sum() for j in judged]
                sums += torch.stack([x.to(acc.device, torch.float64) for x in parts])
        total = rank_sum(acc)
        sums = total(sums) if total is not None else sums
        n = len(self.texts)
        kl = float(sums[1] / n)
        row = {"monitor_proxy": float(sums[0] / n), "monitor_kl": kl, "monitor_sqrt_kl": math.sqrt(max(kl, 0.0))}
        row.update({f"monitor_judge_{name}": float(sums[2 + k] / n) for k, name in enumerate(self.judges)})
        return row

    def keep_if_best(self, iteration: int, row: dict, policy) -> bool:
        """Write the policy to ppo/best/ when the first judge scores it above every earlier evaluation."""
        if not self.judges:
            return False
        name = next(iter(self.judges))
        score = row[f"monitor_judge_{name}"]
        if self.best_score is not None and score <= self.best_score:
            return False
        self.best_score, self.best_iteration = score, iteration
        if self.acc.is_main_process:
            # A copy: exporting merges LoRA adapters into the weights, which must not touch the live policy.
            export_policy(copy.deepcopy(policy), self.tokenizer, self.out_dir / BEST)
            atomic_write_json(self.out_dir / BEST / "best.json",
                              {"iteration": iteration, "judge": name, "judge_score": score, **row})
        self.acc.wait_for_everyone()
        return True


def load_judges(refs: list[str], resolve, tokenizer, precision: str, trust_remote_code: bool, device) -> dict:
    """{short name: frozen reward model} for ppo.monitor.judges; each must share the policy's vocabulary,
    since it scores the policy's token ids as they are."""
    from stages.modeling.loading import load_reward_model, load_tokenizer

    out = {}
    for i, ref in enumerate(refs):
        path = resolve(ref, f"ppo.monitor.judges[{i}]")
        if load_tokenizer(path, trust_remote_code).get_vocab() != tokenizer.get_vocab():
            raise StageError(f"ppo.monitor.judges[{i}]: {path} has a different tokenizer from the policy; a judge "
                             "scores the policy's tokens as they are, so it must share the vocabulary")
        name = model_label(str(path))  # runs/judge/reward/model -> judge-reward
        if name in out:
            name = f"{name}_{i}"
        rm = load_reward_model(path, "fp32", trust_remote_code, pad_token_id=tokenizer.pad_token_id)
        rm.requires_grad_(False)
        out[name] = autocast_layout(rm, precision).eval().to(device)
    return out
