"""PPO with a per-token KL penalty to the SFT reference (InstructGPT, Ouyang et al. 2022).

Our own implementation: TRL 1.16 no longer ships a PPO trainer. Each iteration of `run` is five
steps, marked with banners:

  1. rollout        sample B responses from the policy (batched, KV-cached, left-padded prompts), k per
                    prompt with samples_per_prompt; in fp32 the policy's log-probs and entropy come
                    from generation's own logits
  2. score          one no-grad pass each: reference log-probs, values, the reward (RM score or a
                    programmatic reward_fn), and under bf16 the policy's log-probs (+ entropy)
  3. KL-penalise    r_t = −β·KL_t on every response token, + the score on the last one
  4. advantages     GAE(γ, λ) over the response tokens, whitened
  5. update         ppo_epochs × minibatches of clipped policy + clipped value loss (+ PPO-ptx)

With `advantage: group` there is no value model: in step 3 each score is first centred by the mean
score of the other responses to its prompt (the leave-one-out baseline of RLOO), and step 4's
advantage is the reward to go (GAE with V = 0, λ = 1). The clipped policy loss is unchanged.

Steps 1-2 are in stages/rl/rollout.py, step 5 in stages/rl/ppo_update.py, the math of 3-5 in
stages/rl/ppo_math.py (pure, unit-tested), the four models in stages/rl/ppo_models.py, the
checkpoints in stages/training/checkpoint.py. Launched as `accelerate launch -m stages.ppo --run-dir D`
(or `rlhf ppo CONFIG`).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from data_schemas.files import append_jsonl
from stages.core.config_schema import RunConfig, stage_inputs
from stages.core.entry import stage_main
from stages.core.errors import StageError
from stages.core.metrics_log import MetricsLogger, close_stage, read_metrics, restart_logs
from stages.core.run_folder import resolve_input_model, stage_dir, write_stage_config
from stages.core.runtime import generation_logprobs_exact, make_accelerator, rank_sum, resolved, runtime_info
from stages.core.sharding import backend_name, copy_full_into, gathered_for_generation, refuse_unsupported
from stages.modeling.trainable import trainable_params
from stages.rl.monitor import Monitor, load_judges
from stages.rl.ppo_math import gae, kl_penalized_rewards, leave_one_out, make_kl_controller, masked_whiten
from stages.rl.ppo_models import PPOModels, Trainees, apply_ema, load_models
from stages.rl.ppo_update import ppo_update
from stages.rl.rollout import Rollout, prepare_prompts, sample_rollouts, score_rollouts
from stages.training import checkpoint as ckpt
from stages.training.export import export_trained
from stages.training.guard import SpikeGuard
from stages.training.optimizer import adamw

SAMPLES_PER_ITERATION = 2
LOGS = {"metrics.jsonl": "step", "samples.jsonl": "iteration"}  # file -> the key numbering its rows


# ---- inputs, models, resume ----

class Inputs(NamedTuple):
    """What PPO reads before any model loads. texts: rendered prompts; user_turns: their last user
    turn (what a reward_fn and samples.jsonl see); demos: PPO-ptx demonstrations or None."""

    tokenizer: object
    texts: list[str]
    user_turns: list[str]
    demos: list | None
    reward_fn: Callable | None
    monitor_prompts: tuple[list[str], list[str]] | None  # (texts, user turns) of ppo.monitor.prompts


def load_inputs(cfg: RunConfig, run_dir: Path) -> Inputs:
    from data_schemas.loaders import load_demonstrations, load_prompts
    from stages.modeling.loading import load_tokenizer
    from stages.rl.ptx import prepare_demonstrations
    from stages.rl.reward_functions import load_reward_fn

    p, reward_fn = cfg.ppo, None
    if p.reward_fn:
        try:
            reward_fn = load_reward_fn(p.reward_fn)
        except ValueError as e:
            raise StageError(f"ppo.{e}") from None
    tokenizer = load_tokenizer(resolve_input_model(run_dir, p.policy, "ppo.policy"), cfg.trust_remote_code)
    texts, user_turns = prepare_prompts(tokenizer, load_prompts(p.prompts), p.max_prompt_length)
    ptx = stage_inputs(cfg, "ppo").settings
    demos = (prepare_demonstrations(tokenizer, load_demonstrations(ptx["sft.data"]), ptx["sft.max_length"])
             if p.ptx_coef > 0 else None)
    monitor_prompts = (prepare_prompts(tokenizer, load_prompts(p.monitor.prompts), p.max_prompt_length)
                       if p.monitor.every else None)
    return Inputs(tokenizer, texts, user_turns, demos, reward_fn, monitor_prompts)


class _IterationLog:
    """Adapter for the spike guard: its events are logged under the current PPO iteration."""

    def __init__(self, logger):
        self.logger, self.iteration = logger, 0

    def log(self, step, /, **event):  # positional-only: the guard's event dict carries its own "step"
        event["optimizer_step"] = event.pop("step", step)
        self.logger.log(self.iteration, **event)


@dataclass
class Session:
    """What the iterations share: the accelerator, inputs, models (`t`: the trained ones, prepared),
    the reward statistics, the KL controller, the spike guard, the log, and the checkpoint position."""

    cfg: RunConfig
    run_dir: Path
    accelerator: object
    inputs: Inputs
    models: PPOModels
    t: Trainees
    stats: dict | None
    kl_ctl: object
    guard: SpikeGuard
    guard_log: _IterationLog
    logger: MetricsLogger
    fingerprint: str
    start: int = 0
    opt_step: int = 0
    resumed_from: int | None = None
    monitor: Monitor | None = None

    @property
    def ckpt_root(self) -> Path:
        return stage_dir(self.run_dir, "ppo") / "checkpoints"


def _resume(cfg: RunConfig, out_dir: Path, t: Trainees, kl_ctl, accelerator) -> tuple[int, int, int | None, dict | None]:
    """(start iteration, optimizer step, resumed_from, monitor state) from the last checkpoint, or a fresh start.
    Runs after accelerate.prepare: whole tensors load into each rank's shards under FSDP."""
    from safetensors.torch import load_file

    fingerprint = ckpt.config_fingerprint(cfg, "ppo", ckpt.PPO)
    found = ckpt.resume_checkpoint(out_dir / "checkpoints", ckpt.PPO, fingerprint, "ppo")
    if found is None:
        if accelerator.is_main_process:
            restart_logs(out_dir, LOGS, None)
        return 0, 0, None, None
    last, path = found
    with ckpt.reading_checkpoint(path):
        state = ckpt.load_checkpoint(path, ckpt.PPO, weights=t.weights, states={"optimizer": t.optimizers},
                                     rank=accelerator.process_index)
        if t.ema is not None:
            if not (path / "ema.safetensors").exists():
                raise StageError(f"checkpoint {path} has no EMA weights but ppo.ema_decay is set; delete it to start over")
            for n, w in load_file(str(path / "ema.safetensors")).items():
                copy_full_into(t.ema[n], w)
    kl_ctl.load_state_dict(state["kl_ctl"])
    if accelerator.is_main_process:
        restart_logs(out_dir, LOGS, last)
        print(f"ppo: resuming from {path} (iteration {last} of {cfg.ppo.iterations})", flush=True)
    return last, state["optimizer_step"], last, state.get("monitor")


def start_session(cfg: RunConfig, run_dir: Path) -> Session:
    """Seed, read the inputs (validated before any model loads), load the models, resume, prepare."""
    from accelerate.utils import set_seed

    p, out_dir = cfg.ppo, stage_dir(run_dir, "ppo")
    accelerator = make_accelerator(cfg)
    refuse_unsupported(accelerator, cfg, "ppo")
    set_seed(cfg.seed, device_specific=True)  # ranks sample different responses
    inputs = load_inputs(cfg, run_dir)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_stage_config(run_dir, "ppo", cfg)
    models = load_models(cfg, run_dir, inputs.tokenizer.pad_token_id)
    stats = models.reward_stats
    if inputs.reward_fn is None and p.reward_normalize and stats is None:
        print(f"ppo: warning: {models.reward_path}/reward_stats.json is missing; RM scores are not normalised",
              file=sys.stderr)
    for frozen in (models.ref, models.reward):
        if frozen is not None:
            frozen.to(accelerator.device)
    kl_ctl = make_kl_controller(p.kl_coef, p.adaptive_kl, p.kl_target, p.kl_horizon)
    # One model per prepare(): what FSDP2 and DeepSpeed accept (and DDP does not mind).
    policy, policy_opt = accelerator.prepare(models.policy, adamw(trainable_params(models.policy).values(), p.lr))
    value, value_opt = (accelerator.prepare(models.value, adamw(trainable_params(models.value).values(),
                                                                  p.value_lr or p.lr))
                        if models.value is not None else (None, None))
    policy_u = accelerator.unwrap_model(policy)
    ema = ({n: w.detach().clone().float() for n, w in trainable_params(policy_u).items()} if p.ema_decay else None)
    t = Trainees(policy=policy, value=value, policy_u=policy_u,
                 value_u=accelerator.unwrap_model(value) if value is not None else None,
                 policy_opt=policy_opt, value_opt=value_opt, ema=ema)
    start, opt_step, resumed_from, monitor_state = _resume(cfg, out_dir, t, kl_ctl, accelerator)
    logger = MetricsLogger(run_dir, "ppo", enabled=accelerator.is_main_process)
    guard_log = _IterationLog(logger)
    guard = SpikeGuard(cfg.guard, {}, guard_log, restore=lambda: rollback(s))
    s = Session(cfg, Path(run_dir), accelerator, inputs, models, t, stats, kl_ctl, guard, guard_log, logger,
                ckpt.config_fingerprint(cfg, "ppo", ckpt.PPO), start, opt_step, resumed_from)
    if inputs.monitor_prompts is not None:
        judges = load_judges(p.monitor.judges, lambda ref, what: resolve_input_model(run_dir, ref, what),
                             inputs.tokenizer, cfg.precision, cfg.trust_remote_code, accelerator.device)
        s.monitor = Monitor(p, run_dir, out_dir, models, inputs.tokenizer, accelerator, *inputs.monitor_prompts,
                            judges, cfg.seed)
        s.monitor.load_state_dict(monitor_state)
    if cfg.guard.enabled and not ckpt.list_checkpoints(s.ckpt_root, ckpt.PPO):
        checkpoint(s, 0)  # the guard's first good state (a fresh start's resume point too)
    return s


# ---- checkpoints ----

def checkpoint(s: Session, iteration: int) -> None:
    ckpt.save_checkpoint(s.accelerator, s.ckpt_root, iteration, ckpt.PPO,
                         weights={**s.t.weights, **({"ema": s.t.ema} if s.t.ema is not None else {})},
                         states={"optimizer": s.t.optimizers},
                         state={"optimizer_step": s.opt_step, "kl_ctl": s.kl_ctl.state_dict(),
                                "fingerprint": s.fingerprint, "iteration": iteration,
                                "monitor": s.monitor.state_dict() if s.monitor else None})


def rollback(s: Session) -> int:
    """The spike guard's good state: the last checkpoint on disk (every rank loads it); its optimizer step."""
    path = ckpt.list_checkpoints(s.ckpt_root, ckpt.PPO)[-1][1]
    with ckpt.reading_checkpoint(path):
        state = ckpt.load_checkpoint(path, ckpt.PPO, weights=s.t.weights, states={"optimizer": s.t.optimizers},
                                     rank=None)
    return state["optimizer_step"]


# ---- per-iteration statistics ----

class RolloutStats(NamedTuple):
    """Every rank's rollouts, gathered (N = B · world): raw and shaped scores, per-sequence KL and
    shaped return, response length and whether it ended. The guard and the KL controller need the
    global KL."""

    raw: torch.Tensor
    scores: torch.Tensor
    kl: torch.Tensor
    shaped: torch.Tensor
    length: torch.Tensor
    eos: torch.Tensor


def gather_stats(accelerator, ro: Rollout, shaped) -> RolloutStats:
    return RolloutStats(*accelerator.gather((ro.raw_scores, ro.scores, shaped.kl.sum(1), shaped.rewards.sum(1),
                                             ro.mask.sum(1).float(), ro.has_eos.float())))


def log_iteration(s: Session, it: int, ro: Rollout, g: RolloutStats, beta: float, update: dict,
                  times: list[float], idx: list[int], decoded: list[str]) -> dict:
    """One metrics row (and the first SAMPLES_PER_ITERATION samples) of iteration `it`.
    times: the clock before steps 1, 2, 3 and after 5."""
    t0, t1, t2, t3 = times
    dt = t3 - t0
    row = {
        "score_raw_mean": g.raw.mean().item(), "score_raw_std": g.raw.std().item() if len(g.raw) > 1 else 0.0,
        "score_mean": g.scores.mean().item(), "reward_shaped_mean": g.shaped.mean().item(),
        "kl": g.kl.mean().item(), "kl_coef": beta,
        "entropy": s.accelerator.reduce(ro.entropy, reduction="mean").item(), **update,
        "response_length": g.length.mean().item(), "eos_rate": g.eos.mean().item(),
        "samples_per_s": len(g.raw) / dt, "tokens_per_s": g.length.sum().item() / dt,
        "generate_s": t1 - t0, "score_s": t2 - t1, "train_s": t3 - t2, "iteration_s": dt,
    }
    s.logger.log(it, **row)
    if s.accelerator.is_main_process:
        for i in range(min(SAMPLES_PER_ITERATION, len(decoded))):
            append_jsonl(stage_dir(s.run_dir, "ppo") / "samples.jsonl", {
                "iteration": it, "prompt": s.inputs.user_turns[idx[i]], "response": decoded[i],
                "score_raw": ro.raw_scores[i].item(), "score": ro.scores[i].item(), "eos": bool(ro.has_eos[i])})
    return row


def watch(s: Session, it: int) -> None:
    """The over-optimisation monitor's evaluation after iteration `it` (stages/rl/monitor.py)."""
    row = s.monitor.evaluate(s.t.policy_u, s.t.value_u, s.inputs.reward_fn)
    s.logger.log(it, **row)
    if s.monitor.keep_if_best(it, row, s.t.policy_u) and s.accelerator.is_main_process:
        print(f"ppo: iteration {it}: best judge score so far ({s.monitor.best_score:.4f}); kept in ppo/best/",
              flush=True)


# ---- the stage ----

def run(cfg: RunConfig, run_dir: Path) -> dict:
    cfg = resolved(cfg)  # precision "auto" made concrete for this machine
    from tqdm.auto import tqdm

    p, t_start, run_dir = cfg.ppo, time.time(), Path(run_dir)
    s = start_session(cfg, run_dir)
    acc, tok = s.accelerator, s.inputs.tokenizer
    # π_old's log-probs come with generation where they equal a full forward pass (fp32); under bf16 the
    # KV-cached decode differs from it enough to skew the first ratios and KL, so scoring recomputes them.
    logprobs_from_generation = generation_logprobs_exact(cfg.precision)
    bar = tqdm(total=p.iterations, initial=s.start, desc="ppo", disable=not acc.is_main_process, dynamic_ncols=True)

    if s.monitor is not None and s.start == 0 and not any(
            r.get("step") == 0 and "monitor_kl" in r for r in read_metrics(run_dir, "ppo")):
        watch(s, 0)  # where the policy starts: KL 0, the SFT model's scores (once, also across a resume)
    for it in range(s.start + 1, p.iterations + 1):
        s.guard_log.iteration = it
        t0 = time.time()

        # ---- 1. rollout ----
        with gathered_for_generation(s.t.policy_u):  # FSDP2: one all-gather per rollout, not per token
            batch = sample_rollouts(acc, s.t.policy_u, tok, s.inputs.texts, p, seed=cfg.seed, iteration=it,
                                    with_logprobs=logprobs_from_generation)
        t1 = time.time()

        # ---- 2. score ----
        ro, decoded = score_rollouts(acc, s.models, s.t.policy_u, s.t.value_u, batch, p, tokenizer=tok,
                                     reward_fn=s.inputs.reward_fn, prompts=[s.inputs.user_turns[i] for i in batch.idx],
                                     stats=s.stats)
        t2 = time.time()

        # ---- 3. KL-penalise ----
        beta = s.kl_ctl.value
        group = p.advantage == "group"
        scores = leave_one_out(ro.scores, p.samples_per_prompt) if group else ro.scores
        shaped = kl_penalized_rewards(scores, ro.logprobs, ro.ref_logprobs, ro.mask, beta, p.kl_estimator)

        # ---- 4. advantages ----
        # 'group': the reward to go (λ = 1; the values are 0), its score centred by the group's other responses.
        advantages, returns = gae(shaped.rewards, ro.values, ro.mask, p.gamma, 1.0 if group else p.lam)
        if p.whiten_advantages:
            advantages = masked_whiten(advantages, ro.mask, total=rank_sum(acc))
        g = gather_stats(acc, ro, shaped)
        mean_kl = g.kl.mean().item()

        # ---- 5. update ----
        update, s.opt_step = ppo_update(acc, s.t, ro, advantages, returns, p, guard=s.guard, demos=s.inputs.demos,
                                        pad_id=tok.pad_token_id, seed=cfg.seed, iteration=it, opt_step=s.opt_step,
                                        mean_kl=mean_kl)
        s.kl_ctl.update(mean_kl, n_steps=ro.response.shape[0] * acc.num_processes)
        t3 = time.time()

        # ---- log, sample, checkpoint ----
        row = log_iteration(s, it, ro, g, beta, update, [t0, t1, t2, t3], batch.idx, decoded)
        bar.update(1)
        bar.set_postfix(score=f"{row['score_raw_mean']:.3f}", kl=f"{mean_kl:.2f}")
        if s.monitor is not None and s.monitor.due(it):
            watch(s, it)
        if it % p.save_every == 0 or it == p.iterations:
            checkpoint(s, it)
    bar.close()
    s.guard.finish()

    # ---- export ----
    apply_ema(s.t.policy_u, s.t.ema)
    export_trained(acc, s.t.policy_u, tok, stage_dir(run_dir, "ppo"), lora=p.lora.enabled)
    last = ([r for r in read_metrics(run_dir, "ppo") if "score_raw_mean" in r] or [{}])[-1]
    summary = {"reward_mean": last.get("score_raw_mean"), "score_mean": last.get("score_mean"),
               "kl": last.get("kl"), "kl_coef": s.kl_ctl.value, "iterations": p.iterations,
               "resumed_from": s.resumed_from, "spike_events": s.guard.events, "world_size": acc.num_processes,
               **({"best_iteration": s.monitor.best_iteration, "best_judge_score": s.monitor.best_score}
                  if s.monitor is not None and s.monitor.judges else {}),
               "wall_s": round(time.time() - t_start, 2), **runtime_info(cfg.precision),
               "backend": backend_name(acc)}
    return close_stage(run_dir, "ppo", summary, s.logger, acc.is_main_process)


if __name__ == "__main__":
    stage_main("ppo", run)
