"""The lean training loop shared by the SFT and reward stages.

Why not TRL's trainers: on this machine SFTTrainer spent most of each step in extras we do not
use (see README, "SFT and reward model", for the measurement), and both stages need the same
resume checkpoints and spike-guard hooks. The loop is plain accelerate: a deterministic data
stream (stages/training/data_order.py), gradient accumulation, clipping, the guard, an LR
schedule, periodic checkpoints (stages/training/checkpoint.py).
"""
from __future__ import annotations

import math
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from stages.core.config_schema import RunConfig, TrainLoop
from stages.core.metrics_log import restart_logs
from stages.core.run_folder import stage_dir
from stages.core.runtime import HeapTrim, rank_sum, runtime_info, training_attention
from stages.core.sharding import backend_name
from stages.training import checkpoint as ckpt
from stages.training.data_order import micro_batch_indices, total_steps
from stages.training.guard import SpikeGuard
from stages.training.optimizer import adamw, decay_groups

MAX_FP16_SKIPS = 20  # consecutive fp16 overflow skips tolerated before the spike guard judges them


class LossOut(NamedTuple):
    """What a stage's loss function returns for one micro-batch.

    loss_sum: () tensor, the loss summed over the micro-batch's units (target tokens for SFT,
              comparison groups for the RM); the loop divides by the step's unit count.
    tokens:   int, input tokens processed (for tokens/s).
    """

    loss_sum: torch.Tensor
    tokens: int


@dataclass
class Batch:
    """A collated micro-batch: tensors for the model plus `count`, its number of loss units."""

    tensors: dict
    count: int


def _resume(accelerator, raw, optimizer, scheduler, *, stage: str, run_dir: Path, fingerprint: str,
            steps: int) -> tuple[int, int, list[float], int | None]:
    """(step, cursor, recent losses, resumed_from) from the stage's last checkpoint, or a fresh start."""
    root = stage_dir(run_dir, stage) / "checkpoints"
    found = ckpt.resume_checkpoint(root, ckpt.TRAIN_LOOP, fingerprint, stage)
    if found is None:
        if accelerator.is_main_process:
            restart_logs(stage_dir(run_dir, stage), {"metrics.jsonl": "step"}, None)  # a fresh start, a fresh log
        return 0, 0, [], None
    path = found[1]
    with ckpt.reading_checkpoint(path):
        state = ckpt.load_checkpoint(path, ckpt.TRAIN_LOOP, weights={"model": raw},
                                     states={"optimizer": optimizer, "scheduler": scheduler},
                                     rank=accelerator.process_index)
    if accelerator.is_main_process:
        restart_logs(stage_dir(run_dir, stage), {"metrics.jsonl": "step"}, state["step"], final=state["step"] >= steps)
        print(f"{stage}: resuming from {path} (step {state['step']} of {steps})", flush=True)
    return state["step"], state["cursor"], state.get("recent_losses", []), state["step"]


def _units_per_rank(accelerator, local: int, world: int) -> float:
    """The divisor of a rank's summed loss: the optimizer step's loss units (tokens, pairs) over all
    ranks, divided by the world size. DDP averages gradients over ranks, so every unit weighs the same
    whichever rank holds it, and 2 ranks step as 1 rank would on the same global batch."""
    total = rank_sum(accelerator)
    if total is None:
        return max(1, local)
    import torch

    return max(1.0, total(torch.tensor(float(local), device=accelerator.device)).item()) / world


def fit(*, accelerator, model, cfg: RunConfig, stage: str, run_dir: Path, n_train: int,
        make_batch: Callable[[list[int]], Batch], loss_fn: Callable[[object, Batch], LossOut],
        evaluate: Callable[[object], dict], logger) -> tuple[object, dict]:
    """Train `model` on items [0, n_train) of the stage's data; return (prepared model, results).

    results: train_loss (mean of the last 10 steps), steps, resumed_from, plus `evaluate`'s
    metrics (prefixed eval_) on the final model.
    """
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    tc: TrainLoop = getattr(cfg, stage)
    world, rank = accelerator.num_processes, accelerator.process_index
    steps = total_steps(tc, n_train, world)
    ckpt_root = stage_dir(run_dir, stage) / "checkpoints"
    fingerprint = ckpt.config_fingerprint(cfg, stage, ckpt.TRAIN_LOOP)

    optimizer = adamw(decay_groups(model, tc.weight_decay), tc.lr)
    sched_name = "constant_with_warmup" if tc.lr_scheduler == "constant" else tc.lr_scheduler
    scheduler = get_scheduler(sched_name, optimizer, num_warmup_steps=round(tc.warmup_ratio * steps),
                              num_training_steps=steps)
    # The scheduler stays unwrapped: it steps exactly once per optimizer step on every rank.
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)
    step, cursor, recent, resumed_from = _resume(accelerator, raw, optimizer, scheduler, stage=stage,
                                                 run_dir=run_dir, fingerprint=fingerprint, steps=steps)
    recent = deque(recent, maxlen=10)
    guard = SpikeGuard(cfg.guard, {"model": raw, "optimizer": optimizer, "scheduler": scheduler}, logger)

    def checkpoint():
        ckpt.save_checkpoint(accelerator, ckpt_root, step, ckpt.TRAIN_LOOP, weights={"model": raw},
                             states={"optimizer": optimizer, "scheduler": scheduler},
                             state={"step": step, "cursor": cursor, "total_steps": steps,
                                    "recent_losses": list(recent), "fingerprint": fingerprint})

    heap = HeapTrim()  # packed rows of changing length fragment the heap; keep RSS flat
    fp16_skips = 0
    rank_items = 0  # training items this rank ran forward/backward on in this launch (for the summary)
    pbar = tqdm(total=steps, initial=step, desc=stage, disable=not accelerator.is_main_process, dynamic_ncols=True)
    t_start = time.perf_counter()
    while step < steps:
        if guard.should_skip():
            cursor += tc.grad_accum
            continue
        t0 = time.perf_counter()
        batches_idx = [micro_batch_indices(n_train, cfg.seed, cursor + i, tc.batch_size, world, rank)
                       for i in range(tc.grad_accum)]
        batches = [make_batch(idx) for idx in batches_idx]
        cursor += tc.grad_accum
        rank_items += sum(len(b) for b in batches_idx)
        units = _units_per_rank(accelerator, sum(b.count for b in batches), world)
        model.train()
        loss_total, tokens = torch.zeros((), device=accelerator.device), 0
        for i, b in enumerate(batches):
            # Gradients are all-reduced once per optimizer step, on the last micro-batch.
            with accelerator.no_sync(model) if i < len(batches) - 1 else nullcontext(), \
                    training_attention(accelerator.device, b.tensors["input_ids"].shape[-1]):
                out = loss_fn(model, b)
                loss = out.loss_sum / units
                accelerator.backward(loss)
            loss_total += loss.detach().float()
            tokens += out.tokens
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip))
        loss_val = accelerator.reduce(loss_total, reduction="mean").item()
        if accelerator.scaler is not None and not math.isfinite(grad_norm) and fp16_skips < MAX_FP16_SKIPS:
            # fp16 loss scaling overflows now and then by design: the scaler skips the update and
            # lowers its scale. That is not a spike unless it keeps happening.
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            fp16_skips += 1
            continue
        fp16_skips = 0
        if not guard.check(step + 1, loss=loss_val, grad_norm=grad_norm):
            optimizer.zero_grad(set_to_none=True)
            if accelerator.scaler is not None:  # close the scaler's unscale_ of this dropped step
                accelerator.scaler.update()
            continue
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        guard.after_step(step)
        heap.step()
        recent.append(loss_val)
        dt = time.perf_counter() - t0
        pbar.update(1)
        pbar.set_postfix(loss=f"{loss_val:.4f}")
        if step % tc.logging_steps == 0 or step == steps:
            epoch = cursor * tc.batch_size * world / n_train
            logger.log(step, loss=loss_val, lr=lr, grad_norm=grad_norm, tokens_per_s=tokens * world / dt,
                       step_s=dt, epoch=round(epoch, 4))
        if step == steps or (tc.save_steps and step % tc.save_steps == 0):
            checkpoint()
        if tc.eval_steps and step % tc.eval_steps == 0 and step < steps:
            logger.log(step, **{f"eval_{k}": v for k, v in evaluate(model).items()})
    pbar.close()
    guard.finish()
    wall = time.perf_counter() - t_start

    eval_metrics = {f"eval_{k}": v for k, v in evaluate(model).items()}
    if eval_metrics:
        logger.log(step, **eval_metrics)
    # How the work was split: every rank reports the items it trained on, so a DDP run shows all ranks at work.
    per_rank = accelerator.gather(torch.tensor([rank_items], device=accelerator.device)).tolist()
    results = {"train_loss": sum(recent) / len(recent) if recent else None, "steps": step,
               "resumed_from": resumed_from, "train_wall_s": round(wall, 2), **eval_metrics,
               "world_size": world, "items_per_rank": per_rank, "spike_events": guard.events,
               "backend": backend_name(accelerator)}
    return model, results


def run_facts(results: dict, t_start: float, precision: str) -> dict:
    """The tail of a training stage's summary: wall time, how the work was split, the spike events,
    and what the stage ran with."""
    return {"wall_s": round(time.time() - t_start, 2), "world_size": results["world_size"],
            "items_per_rank": results["items_per_rank"], "spike_events": results["spike_events"],
            **runtime_info(precision), "backend": results["backend"]}
