"""PPO with a per-token KL penalty to the SFT reference (InstructGPT, Ouyang et al. 2022).

Our own implementation: TRL 1.16 no longer ships a PPO trainer. Each iteration is five steps,
marked below with banners:

  1. rollout        sample B responses from the policy (batched, KV-cached, left-padded prompts);
                    in fp32 the policy's log-probs and entropy come from generation's own logits
  2. score          one no-grad pass each: reference log-probs, values, the reward (RM score or a
                    programmatic reward_fn), and under bf16 the policy's log-probs (+ entropy)
  3. KL-penalise    r_t = −β·KL_t on every response token, + the score on the last one
  4. advantages     GAE(γ, λ) over the response tokens, whitened
  5. update         ppo_epochs × minibatches of clipped policy + clipped value loss (+ PPO-ptx)

The math is in stages/ppo_math.py (pure, unit-tested), the models and checkpoints in
stages/ppo_models.py. Launched as `accelerate launch -m stages.ppo --run-dir D` (or `rlhf ppo CONFIG`).
"""
from __future__ import annotations

import functools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from data_schemas.files import append_jsonl, atomic_write_jsonl
from stages.common import (
    StageError, MetricsLogger, generate, logprobs_from_logits, read_metrics, reading_checkpoint, render_prompts,
    resolve_input_model, stage_dir, stage_main, write_stage_config, write_summary,
)
from stages.config import RunConfig
from stages.runtime import generation_logprobs_exact, resolved, runtime_info, training_attention
from stages.ppo_math import (
    clipped_policy_loss, clipped_value_loss, entropy_from_logits, gae, kl_penalized_rewards, make_kl_controller,
    masked_mean, masked_whiten,
)
from stages.ppo_models import (
    config_fingerprint, export_policy, list_checkpoints, load_checkpoint, load_models, load_trainable,
    load_reward_stats, policy_logits, reference_context, reward_scores, rng_state, save_checkpoint, trainable_params,
)
from stages.rewards import call_reward_fn, load_reward_fn
from stages.trainloop import make_accelerator, micro_batch_indices

SAMPLES_PER_ITERATION = 2


# ---- inputs ----

def prepare_prompts(tokenizer, prompts, max_prompt_length: int) -> tuple[list[str], list[str]]:
    """Rendered chat prompts (ending in the assistant header) and their last user turns; prompts
    longer than max_prompt_length tokens are dropped rather than truncated (which would cut the header)."""
    from data_schemas.records import as_chat

    chats = [as_chat(p.messages) for p in prompts]
    texts = render_prompts(tokenizer, chats)
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    keep = [i for i, n in enumerate(lengths) if n <= max_prompt_length]
    if not keep:
        raise StageError(f"ppo.prompts: all {len(texts)} prompts are longer than ppo.max_prompt_length "
                         f"({max_prompt_length} tokens); raise it")
    if len(keep) < len(texts):
        print(f"ppo: dropped {len(texts) - len(keep)} of {len(texts)} prompts longer than "
              f"{max_prompt_length} tokens", file=sys.stderr)
    return [texts[i] for i in keep], [chats[i][-1]["content"] for i in keep]


def prepare_demonstrations(tokenizer, demos, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, assistant mask) per SFT demonstration, for the PPO-ptx language-model loss."""
    from data_schemas.records import as_chat

    out = []
    for d in demos:
        enc = tokenizer.apply_chat_template(as_chat(d.messages), tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, amask = list(enc["input_ids"])[:max_length], list(enc["assistant_masks"])[:max_length]
        if any(amask):
            out.append((ids, amask))
    if not out:
        raise StageError("ppo.ptx_coef > 0 but no SFT demonstration has assistant tokens within sft.max_length")
    return out


def ptx_loss(policy, demos, n: int, seed: int, step: int, pad_id: int, device):
    """Mean next-token loss on the assistant tokens of n seeded-random demonstrations (InstructGPT's γ·E[log π(x)])."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * step)
    picked = [demos[i] for i in torch.randint(len(demos), (n,), generator=g).tolist()]
    width = max(len(ids) for ids, _ in picked)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    for row, (ids, amask) in enumerate(picked):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention[row, :len(ids)] = 1
        labels[row, :len(ids)] = torch.where(torch.tensor(amask, dtype=torch.bool), torch.tensor(ids), -100)
    out = policy(input_ids=input_ids.to(device), attention_mask=attention.to(device), labels=labels.to(device),
                 use_cache=False)
    return out.loss


def shape_scores(raw: torch.Tensor, stats: dict | None, clip: float | None, missing_eos_penalty: float | None,
                 has_eos: torch.Tensor) -> torch.Tensor:
    """(B,) raw rewards -> the sequence score PPO optimises: normalised with the RM's saved
    statistics, clipped to ±clip, then minus the penalty for a response that never ended."""
    scores = raw.float()
    if stats is not None:
        scores = (scores - stats["mean"]) / stats["std"]
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    if missing_eos_penalty:
        scores = scores - missing_eos_penalty * (~has_eos).float()
    return scores


@dataclass
class Rollout:
    """One iteration's experience (B rollouts, P prompt + R response positions).

    input_ids:    (B, P+R) left-padded prompt + response (pad after EOS)
    attention:    (B, P+R) 1 on prompt tokens and on response tokens up to and including EOS
    positions:    (B, P+R) position ids that skip the left padding
    response:     (B, R)   sampled token ids a_t
    mask:         (B, R)   1 on real response tokens
    logprobs:     (B, R)   log π_old(a_t|s_t) of the policy that sampled them
    ref_logprobs: (B, R)   log π_ref(a_t|s_t)
    values:       (B, R)   V_old(s_t)
    raw_scores:   (B,)     RM score / reward_fn output;  scores: (B,) after shape_scores
    has_eos:      (B,)     the response ended with EOS
    entropy:      ()       mean per-token entropy of π_old over real tokens
    """

    input_ids: torch.Tensor
    attention: torch.Tensor
    positions: torch.Tensor
    response: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    raw_scores: torch.Tensor
    scores: torch.Tensor
    has_eos: torch.Tensor
    entropy: torch.Tensor


class _IterationLog:
    """Adapter for the spike guard: its events are logged under the current PPO iteration."""

    def __init__(self, logger):
        self.logger, self.iteration = logger, 0

    def log(self, step, /, **event):  # positional-only: the guard's event dict carries its own "step"
        event["optimizer_step"] = event.pop("step", step)
        self.logger.log(self.iteration, **event)


def _chunked(fn, n: int, size: int):
    """Run fn(slice) over [0, n) in chunks and concatenate each output (bounds no-grad pass memory)."""
    outs = [fn(slice(i, i + size)) for i in range(0, n, size)]
    return tuple(torch.cat([o[k] for o in outs]) for k in range(len(outs[0])))


def _adamw(params, lr: float):
    """AdamW, fused where the device supports it (on CPU about 3.5x faster a step than the loop)."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def _truncate_logs(out_dir: Path, last_iteration: int) -> None:
    """On resume, drop rows a killed run wrote after its last checkpoint."""
    for name, key in (("metrics.jsonl", "step"), ("samples.jsonl", "iteration")):
        path = out_dir / name
        if path.exists():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            atomic_write_jsonl(path, [r for r in rows if r.get(key, 0) <= last_iteration])


def run(cfg: RunConfig, run_dir: Path) -> dict:
    cfg = resolved(cfg)  # precision "auto" made concrete for this machine
    from accelerate.utils import gather_object, set_seed
    from tqdm.auto import tqdm

    from data_schemas.loaders import load_demonstrations, load_prompts
    from stages.guard import SpikeGuard
    from stages.models import load_tokenizer

    p, t_start = cfg.ppo, time.time()
    out_dir, run_dir = stage_dir(run_dir, "ppo"), Path(run_dir)
    accelerator = make_accelerator(cfg)
    main, world, rank, device = (accelerator.is_main_process, accelerator.num_processes,
                                 accelerator.process_index, accelerator.device)
    set_seed(cfg.seed, device_specific=True)  # ranks sample different responses

    # ---- inputs, validated before any model loads ----
    reward_fn = None
    if p.reward_fn:
        try:
            reward_fn = load_reward_fn(p.reward_fn)
        except ValueError as e:
            raise StageError(f"ppo.{e}") from None
    tokenizer = load_tokenizer(resolve_input_model(run_dir, p.policy, "ppo.policy"), cfg.trust_remote_code)
    texts, user_turns = prepare_prompts(tokenizer, load_prompts(p.prompts), p.max_prompt_length)
    demos = prepare_demonstrations(tokenizer, load_demonstrations(cfg.sft.data), cfg.sft.max_length) \
        if p.ptx_coef > 0 else None
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_stage_config(run_dir, "ppo", cfg)

    models = load_models(cfg, run_dir, tokenizer.pad_token_id)
    stats = None
    if reward_fn is None and p.reward_normalize:
        stats = load_reward_stats(models.reward_path)
        if stats is None:
            print(f"ppo: warning: {models.reward_path}/reward_stats.json is missing; RM scores are not normalised",
                  file=sys.stderr)
    for frozen in (models.ref, models.reward):
        if frozen is not None:
            frozen.to(device)
    policy_opt = _adamw(trainable_params(models.policy).values(), p.lr)
    value_opt = _adamw(trainable_params(models.value).values(), p.value_lr or p.lr)
    kl_ctl = make_kl_controller(p.kl_coef, p.adaptive_kl, p.kl_target, p.kl_horizon)
    ema = ({n: t.detach().clone().float() for n, t in trainable_params(models.policy).items()}
           if p.ema_decay else None)

    # ---- resume from the last checkpoint, if any ----
    ckpt_root, fingerprint = out_dir / "checkpoints", config_fingerprint(cfg)
    start, opt_step, resumed_from = 0, 0, None
    ckpts = list_checkpoints(ckpt_root)
    if ckpts:
        last, path = ckpts[-1]
        with reading_checkpoint(path):
            saved_fingerprint = json.loads((path / "state.json").read_text()).get("fingerprint")
        if saved_fingerprint != fingerprint:
            raise StageError(f"the checkpoints in {ckpt_root} were made with a different ppo config; "
                             "delete that folder to start over, or restore the config to resume")
        with reading_checkpoint(path):
            state = load_checkpoint(path, policy=models.policy, value=models.value,
                                    optimizers={"policy": policy_opt, "value": value_opt}, ema=ema, rank=rank)
        kl_ctl.load_state_dict(state["kl_ctl"])
        start, opt_step, resumed_from = last, state["optimizer_step"], last
        if main:
            _truncate_logs(out_dir, last)
            print(f"ppo: resuming from {path} (iteration {last} of {p.iterations})", flush=True)
    elif main:
        for name in ("metrics.jsonl", "samples.jsonl"):
            (out_dir / name).unlink(missing_ok=True)

    policy, value, policy_opt, value_opt = accelerator.prepare(models.policy, models.value, policy_opt, value_opt)
    policy_u, value_u = accelerator.unwrap_model(policy), accelerator.unwrap_model(value)
    if ema is not None:  # made (and maybe restored) before prepare() moved the policy
        ema = {n: t.to(device) for n, t in ema.items()}
    logger = MetricsLogger(run_dir, "ppo", enabled=main)
    optimizers = {"policy": policy_opt, "value": value_opt}

    def checkpoint(it: int) -> None:
        rngs = gather_object([rng_state()])
        if main:
            save_checkpoint(ckpt_root, it, policy=policy_u, value=value_u, optimizers=optimizers, ema=ema,
                            rng_per_rank=rngs, state={"optimizer_step": opt_step, "kl_ctl": kl_ctl.state_dict(),
                                                      "fingerprint": fingerprint})
        accelerator.wait_for_everyone()

    def rollback() -> int:
        """The spike guard's good state: the last checkpoint on disk (every rank loads it)."""
        path = list_checkpoints(ckpt_root)[-1][1]
        with reading_checkpoint(path):
            return load_trainable(path, policy=policy_u, value=value_u, optimizers=optimizers)["optimizer_step"]

    if cfg.guard.enabled and not list_checkpoints(ckpt_root):
        checkpoint(0)  # the guard's first good state (a fresh start's resume point too)
    guard_log = _IterationLog(logger)
    guard = SpikeGuard(cfg.guard, {}, guard_log, restore=rollback)
    # π_old's log-probs come with generation where they equal a full forward pass (fp32); under bf16 the
    # KV-cached decode differs from it enough to skew the first ratios and KL, so scoring recomputes them.
    logprobs_from_generation = generation_logprobs_exact(cfg.precision)
    chunk = max(p.mini_batch_size, 8)  # rows per no-grad scoring pass: bounds activation memory at large B
    bar = tqdm(total=p.iterations, initial=start, desc="ppo", disable=not main, dynamic_ncols=True)

    for it in range(start + 1, p.iterations + 1):
        guard_log.iteration = it
        t0 = time.time()

        # ---- 1. rollout ----
        idx = micro_batch_indices(len(texts), cfg.seed, it - 1, p.batch_size, world, rank)
        with accelerator.autocast():
            gen = generate(policy_u, tokenizer, [texts[i] for i in idx], max_new_tokens=p.max_new_tokens,
                           temperature=p.temperature, top_p=p.top_p, max_prompt_length=p.max_prompt_length,
                           with_logprobs=logprobs_from_generation)
        prompt_ids, prompt_mask, response = gen.prompt_ids, gen.prompt_mask, gen.response
        is_eos = (response == tokenizer.eos_token_id).int()
        mask = ((torch.cumsum(is_eos, 1) - is_eos) == 0).long()  # through the first EOS
        has_eos = is_eos.bool().any(1)
        input_ids = torch.cat([prompt_ids, response], 1)
        attention = torch.cat([prompt_mask, mask], 1)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        B, R = response.shape
        t1 = time.time()

        # ---- 2. score ----
        def score_chunk(s):
            args = (input_ids[s], attention[s], positions[s])
            if logprobs_from_generation:
                logp, ent = gen.logprobs[s], gen.entropy[s]
            else:
                logits = policy_logits(policy_u, *args, R, p.temperature)
                logp, ent = logprobs_from_logits(logits, response[s]), entropy_from_logits(logits)
                del logits
            ref_model, ref_ctx = reference_context(models, policy_u)
            with ref_ctx:
                ref_logp = logprobs_from_logits(policy_logits(ref_model, *args, R, p.temperature), response[s])
            vals = value_u(*args, R)
            raw = reward_scores(models, value_u, *args) if reward_fn is None else torch.zeros(len(ent), device=device)
            return logp, ref_logp, vals, raw, ent

        # The scoring and training passes use one attention kernel, so their log-probs agree exactly.
        attention_kernel = functools.partial(training_attention, device, input_ids.shape[1])
        with torch.no_grad(), attention_kernel(), accelerator.autocast():
            logprobs, ref_logprobs, values, raw, entropy = _chunked(score_chunk, B, chunk)
        decoded = tokenizer.batch_decode(response, skip_special_tokens=True)
        if reward_fn is not None:
            try:
                raw = torch.tensor(call_reward_fn(reward_fn, [user_turns[i] for i in idx], decoded), device=device)
            except ValueError as e:
                raise StageError(f"ppo.reward_fn {p.reward_fn}: {e}") from None
        ro = Rollout(input_ids, attention, positions, response, mask, logprobs.float(), ref_logprobs.float(),
                     values.float(), raw.float(), shape_scores(raw, stats, p.reward_clip, p.missing_eos_penalty, has_eos),
                     has_eos, masked_mean(entropy, mask))
        t2 = time.time()

        # ---- 3. KL-penalise ----
        beta = kl_ctl.value
        shaped = kl_penalized_rewards(ro.scores, ro.logprobs, ro.ref_logprobs, ro.mask, beta, p.kl_estimator)
        seq_kl = shaped.kl.sum(1)

        # ---- 4. advantages ----
        advantages, returns = gae(shaped.rewards, ro.values, ro.mask, p.gamma, p.lam)
        if p.whiten_advantages:
            advantages = masked_whiten(advantages, ro.mask)

        # Rollout statistics over every rank's samples (the guard and the KL controller need the global KL).
        g_raw, g_scores, g_kl, g_shaped, g_len, g_eos = accelerator.gather(
            (ro.raw_scores, ro.scores, seq_kl, shaped.rewards.sum(1), ro.mask.sum(1).float(), ro.has_eos.float()))
        mean_kl = g_kl.mean().item()

        # ---- 5. update ----
        acc = {k: [] for k in ("policy_loss", "value_loss", "clipfrac", "value_clipfrac", "approx_kl", "ratio_mean",
                               "grad_norm_policy", "grad_norm_value", "ptx_loss")}
        ratio_max, skipped = 0.0, 0
        for epoch in range(p.ppo_epochs):
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + it * 1009 + epoch)
            for mb in torch.randperm(B, generator=g).split(p.mini_batch_size):
                if guard.should_skip():
                    skipped += 1
                    continue
                mb = mb.to(device)
                args = (ro.input_ids[mb], ro.attention[mb], ro.positions[mb])
                with attention_kernel(), accelerator.autocast():
                    new_logprobs = logprobs_from_logits(policy_logits(policy, *args, R, p.temperature), ro.response[mb])
                    pl = clipped_policy_loss(new_logprobs, ro.logprobs[mb], advantages[mb], ro.mask[mb], p.cliprange)
                    vl = clipped_value_loss(value(*args, R), ro.values[mb], returns[mb], ro.mask[mb], p.cliprange_value)
                    loss = pl.loss + p.vf_coef * vl.loss
                    if demos is not None:
                        # Through the unwrapped policy: one DDP forward per backward; gradients still sync.
                        lm = ptx_loss(policy_u, demos, len(mb), cfg.seed, opt_step, tokenizer.pad_token_id, device)
                        loss = loss + p.ptx_coef * lm
                        acc["ptx_loss"].append(lm.item())
                accelerator.backward(loss)
                gn_policy = float(accelerator.clip_grad_norm_(policy.parameters(), p.grad_clip))
                gn_value = float(accelerator.clip_grad_norm_(value.parameters(), p.grad_clip))
                # Every rank must take the same guard decision: judge reduced numbers.
                total = accelerator.reduce(loss.detach().float(), reduction="mean").item()
                rmax = accelerator.gather(pl.ratio_max.detach().float().reshape(1)).max().item()
                opt_step += 1
                # PPO losses have no stable scale for the guard's running-median rule (the policy loss is
                # centred on zero by whitening; the value loss follows the drifting returns), so only a
                # non-finite loss is passed on; PPO is judged by KL, policy ratio and grad norm.
                guard_loss = 0.0 if math.isfinite(total) else total
                if not guard.check(opt_step, loss=guard_loss, grad_norm=max(gn_policy, gn_value), kl=mean_kl,
                                   ratio=rmax):
                    policy_opt.zero_grad(set_to_none=True)
                    value_opt.zero_grad(set_to_none=True)
                    skipped += 1
                    continue
                policy_opt.step()
                value_opt.step()
                policy_opt.zero_grad(set_to_none=True)
                value_opt.zero_grad(set_to_none=True)
                if ema is not None:
                    with torch.no_grad():
                        for n, t in trainable_params(policy_u).items():
                            ema[n].lerp_(t.detach().float(), 1.0 - p.ema_decay)
                guard.after_step(opt_step)
                for k, v in (("policy_loss", pl.loss), ("value_loss", vl.loss), ("clipfrac", pl.clipfrac),
                             ("value_clipfrac", vl.clipfrac), ("approx_kl", pl.approx_kl), ("ratio_mean", pl.ratio_mean)):
                    acc[k].append(v.item())
                acc["grad_norm_policy"].append(gn_policy)
                acc["grad_norm_value"].append(gn_value)
                ratio_max = max(ratio_max, pl.ratio_max.item())
        kl_ctl.update(mean_kl, n_steps=B * world)
        t3 = time.time()

        # ---- log, sample, checkpoint ----
        dt = t3 - t0
        upd = accelerator.reduce(torch.tensor([sum(v) / len(v) if v else float("nan") for v in acc.values()],
                                              device=device), reduction="mean").tolist()
        row = {
            "score_raw_mean": g_raw.mean().item(), "score_raw_std": g_raw.std().item() if len(g_raw) > 1 else 0.0,
            "score_mean": g_scores.mean().item(), "reward_shaped_mean": g_shaped.mean().item(),
            "kl": mean_kl, "kl_coef": beta, "entropy": accelerator.reduce(ro.entropy, reduction="mean").item(),
            **{k: v for k, v in zip(acc, upd) if not (k == "ptx_loss" and demos is None)},
            "ratio_max": ratio_max, "skipped_minibatches": skipped,
            "response_length": g_len.mean().item(), "eos_rate": g_eos.mean().item(),
            "samples_per_s": len(g_raw) / dt, "tokens_per_s": g_len.sum().item() / dt,
            "generate_s": t1 - t0, "score_s": t2 - t1, "train_s": t3 - t2, "iteration_s": dt,
        }
        logger.log(it, **row)
        if main:
            for i in range(min(SAMPLES_PER_ITERATION, B)):
                append_jsonl(out_dir / "samples.jsonl", {
                    "iteration": it, "prompt": user_turns[idx[i]], "response": decoded[i],
                    "score_raw": ro.raw_scores[i].item(), "score": ro.scores[i].item(), "eos": bool(ro.has_eos[i])})
        bar.update(1)
        bar.set_postfix(score=f"{row['score_raw_mean']:.3f}", kl=f"{mean_kl:.2f}")
        if it % p.save_every == 0 or it == p.iterations:
            checkpoint(it)
    bar.close()
    guard.finish()

    # ---- export ----
    if main:
        export_policy(policy_u, tokenizer, out_dir / "model", ema)
    accelerator.wait_for_everyone()
    last = ([r for r in read_metrics(run_dir, "ppo") if "score_raw_mean" in r] or [{}])[-1]
    summary = {"reward_mean": last.get("score_raw_mean"), "score_mean": last.get("score_mean"),
               "kl": last.get("kl"), "kl_coef": kl_ctl.value, "iterations": p.iterations,
               "resumed_from": resumed_from, "spike_events": guard.events,
               "wall_s": round(time.time() - t_start, 2), **runtime_info(cfg.precision)}
    if main:
        write_summary(run_dir, "ppo", summary)
    logger.close()
    return summary


if __name__ == "__main__":
    stage_main("ppo", run)
