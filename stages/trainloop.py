"""The lean training loop shared by the SFT and reward stages.

Why not TRL's trainers: on this machine SFTTrainer spent most of each step in extras we do not
use (see README, "SFT and reward model", for the measurement), and both stages need the same
resume checkpoints and spike-guard hooks. The loop is plain accelerate: a deterministic data
stream, gradient accumulation, clipping, the guard, an LR schedule, periodic checkpoints.

Data stream: epoch e is a seeded permutation of the training items; the epochs are concatenated
into one stream and micro-batch m takes the next `batch_size * world_size` items of it (rank r
its own slice). The data position is therefore one integer (the micro-batch cursor), which a
checkpoint stores; resuming replays nothing and skips nothing.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from data_schemas.files import atomic_replace_dir, atomic_write_json, atomic_write_jsonl, staging_dir
from stages.common import StageError, read_metrics, reading_checkpoint, stage_dir
from stages.common import list_checkpoints as common_list_checkpoints
from stages.config import LoRAConfig, RunConfig, TrainLoop
from stages.guard import SpikeGuard
from stages.runtime import HeapTrim, training_attention

CKPT_PREFIX = "step-"
KEEP_CHECKPOINTS = 2
# Fields that may change between a run and its resume without invalidating the checkpoints.
RESUMABLE_CHANGES = ("max_steps", "epochs", "save_steps", "logging_steps", "eval_steps")
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


# ---- setup ----

def make_accelerator(cfg: RunConfig):
    from accelerate import Accelerator

    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.precision]
    # Several processes but no GPU (`accelerate launch --multi_gpu` on a CPU machine): accelerate only
    # forms the gloo process group in its CPU mode; without it every rank would train alone as world 1.
    cpu_ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != mixed:
        # A second stage in the same process (tests, notebooks) at another precision: accelerate keeps one
        # global state and refuses to change it. The process group (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
    try:
        return Accelerator(mixed_precision=mixed, cpu=cpu_ddp)
    except ValueError as e:
        raise StageError(f"precision {cfg.precision!r} is not usable here: {str(e).splitlines()[0]}") from None


def apply_lora(model, lora: LoRAConfig, task_type: str):
    """Wrap `model` with fresh LoRA adapters (task_type 'CAUSAL_LM' or 'SEQ_CLS', which also trains the score head)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                     target_modules=lora.target_modules, task_type=task_type)
    return get_peft_model(model, cfg)


def freeze_lower_layers(model, n: int) -> None:
    """Stop gradients below the top: the input embeddings and the first n transformer blocks no
    longer train, so backward (and its activation memory) ends above them."""
    if n <= 0:
        return
    total = getattr(model.config, "num_hidden_layers", None)
    blocks = next((m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == total), None)
    if blocks is None:
        raise StageError(f"freeze_layers: cannot find the transformer blocks of {type(model).__name__}")
    if n >= len(blocks):
        raise StageError(f"freeze_layers={n} but the model has {len(blocks)} layers; leave at least one to train")
    model.get_input_embeddings().requires_grad_(False)
    for block in blocks[:n]:
        block.requires_grad_(False)


def split_items(n: int, eval_fraction: float, seed: int, keys: list | None = None) -> tuple[list[int], list[int]]:
    """Seeded train/eval split of n items. With `keys`, items sharing a key (e.g. the same
    prompt) land on the same side, so the eval split never sees a training prompt."""
    import random

    keys = list(range(n)) if keys is None else keys
    uniq = list(dict.fromkeys(keys))
    random.Random(seed).shuffle(uniq)
    n_eval = min(len(uniq) - 1, round(len(uniq) * eval_fraction)) if eval_fraction > 0 else 0
    if eval_fraction > 0 and len(uniq) >= 2:
        n_eval = max(1, n_eval)
    eval_keys = set(uniq[:n_eval])
    train = [i for i in range(n) if keys[i] not in eval_keys]
    evals = [i for i in range(n) if keys[i] in eval_keys]
    return train, evals


def total_steps(tc: TrainLoop, n_train: int, world: int) -> int:
    if tc.max_steps > 0:
        return tc.max_steps
    per_step = tc.batch_size * tc.grad_accum * world
    return max(1, math.ceil(tc.epochs * n_train / per_step))


def pack_examples(lengths: list[int], max_length: int) -> list[list[int]]:
    """First-fit-decreasing bins of example indices, each bin's total length <= max_length.
    Examples are never split, so no sequence loses its context."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, r in enumerate(room):
            if lengths[i] <= r:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_length - lengths[i])
    return bins


@lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n, generator=g).tolist())


def micro_batch_indices(n: int, seed: int, cursor: int, batch_size: int, world: int, rank: int) -> list[int]:
    """Item indices of global micro-batch `cursor` for this rank (see the module docstring)."""
    start = cursor * batch_size * world + rank * batch_size
    return [epoch_order(n, seed, pos // n)[pos % n] for pos in range(start, start + batch_size)]


def config_fingerprint(cfg: RunConfig, stage: str) -> str:
    """Hash of everything that shapes a stage's training, minus the fields a resume may change."""
    section = getattr(cfg, stage).model_dump(mode="json")
    for k in RESUMABLE_CHANGES:
        section.pop(k, None)
    key = {"model": cfg.model, "seed": cfg.seed, "precision": cfg.precision, stage: section}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# ---- checkpoints (resume) ----

def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    return common_list_checkpoints(root, CKPT_PREFIX, "trainer_state.json")


def save_checkpoint(root: Path, step: int, state: dict, model, optimizer, scheduler) -> Path:
    """model (trainable params, safetensors), optimizer, scheduler, RNG and loop state, written to
    a staging folder and moved into place; older checkpoints beyond the last two are removed."""
    from safetensors.torch import save_file

    final = root / f"{CKPT_PREFIX}{step}"
    tmp = staging_dir(final)
    params = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(params, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng.pt")
    atomic_write_json(tmp / "trainer_state.json", state)
    atomic_replace_dir(tmp, final)
    for _, old in list_checkpoints(root)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    from safetensors.torch import load_file

    params = load_file(str(path / "model.safetensors"))
    own = dict(model.named_parameters())
    unknown = sorted(set(params) - set(own))
    if unknown:
        raise StageError(f"checkpoint {path} does not match the model (unknown parameter {unknown[0]}); "
                         "delete the checkpoints folder to start over")
    with torch.no_grad():
        for n, t in params.items():
            own[n].copy_(t)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((path / "trainer_state.json").read_text())


def _truncate_metrics(run_dir: Path, stage: str, last_step: int, final: bool) -> None:
    """On resume, drop the log rows written after the checkpoint (a killed run may have logged them):
    rows of later steps and, when the checkpoint is the final one, the final evaluation's row, which
    `fit` logs after that checkpoint and the resumed run logs again."""
    rows = read_metrics(run_dir, stage)

    def after_checkpoint(r: dict) -> bool:
        step = r.get("step", 0)
        return step > last_step or (final and step == last_step and any(k.startswith("eval_") for k in r))

    if any(map(after_checkpoint, rows)):
        atomic_write_jsonl(stage_dir(run_dir, stage) / "metrics.jsonl", [r for r in rows if not after_checkpoint(r)])


# ---- the loop ----

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
    fingerprint = config_fingerprint(cfg, stage)

    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:  # the fused kernel is several times faster than the default foreach one, on CPU too
        optimizer = torch.optim.AdamW(groups, lr=tc.lr, fused=True)
    except (RuntimeError, ValueError):  # a device without a fused AdamW
        optimizer = torch.optim.AdamW(groups, lr=tc.lr)
    sched_name = "constant_with_warmup" if tc.lr_scheduler == "constant" else tc.lr_scheduler
    scheduler = get_scheduler(sched_name, optimizer, num_warmup_steps=round(tc.warmup_ratio * steps),
                              num_training_steps=steps)
    # The scheduler stays unwrapped: it steps exactly once per optimizer step on every rank.
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)

    step, cursor, recent, resumed_from = 0, 0, deque(maxlen=10), None
    ckpts = list_checkpoints(ckpt_root)
    if ckpts:
        path = ckpts[-1][1]
        with reading_checkpoint(path):
            state = json.loads((path / "trainer_state.json").read_text())
        if state.get("fingerprint") != fingerprint:
            raise StageError(f"the checkpoints in {ckpt_root} were made with a different {stage} config; "
                             f"delete that folder to start over, or restore the config to resume")
        with reading_checkpoint(path):
            state = load_checkpoint(path, raw, optimizer, scheduler)
        step, cursor, resumed_from = state["step"], state["cursor"], state["step"]
        recent.extend(state.get("recent_losses", []))
        if accelerator.is_main_process:
            _truncate_metrics(run_dir, stage, step, final=step >= steps)
            print(f"{stage}: resuming from {path} (step {step} of {steps})", flush=True)
    elif accelerator.is_main_process:
        (stage_dir(run_dir, stage) / "metrics.jsonl").unlink(missing_ok=True)  # a fresh start, a fresh log

    guard = SpikeGuard(cfg.guard, {"model": raw, "optimizer": optimizer, "scheduler": scheduler}, logger)

    def checkpoint():
        state = {"step": step, "cursor": cursor, "total_steps": steps, "recent_losses": list(recent),
                 "fingerprint": fingerprint}
        if accelerator.is_main_process:
            save_checkpoint(ckpt_root, step, state, raw, optimizer, scheduler)
        accelerator.wait_for_everyone()

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
        units = max(1, sum(b.count for b in batches))
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
               "world_size": world, "items_per_rank": per_rank, "spike_events": guard.events}
    return model, results


def eval_shard(items: list[int], accelerator) -> list[int]:
    """This rank's share of the eval items (every world_size-th one)."""
    return items[accelerator.process_index::accelerator.num_processes]


def chunks(seq: list, size: int):
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


# ---- export ----

def save_hf_model(accelerator, model, tokenizer, out_dir: Path, extra_files: dict | None = None) -> None:
    """Write a plain HF safetensors folder (model + tokenizer [+ json files]) atomically, rank 0 only."""
    raw = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)  # gathers FSDP/ZeRO-3 shards
    if accelerator.is_main_process:
        tmp = staging_dir(out_dir)
        raw.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, obj in (extra_files or {}).items():
            atomic_write_json(tmp / name, obj)
        atomic_replace_dir(tmp, out_dir)
    accelerator.wait_for_everyone()


def export_lora(accelerator, model, tokenizer, adapter_dir: Path | None, merged_dir: Path | None,
                extra_files: dict | None = None) -> None:
    """Save the LoRA adapter (if adapter_dir) and/or the merged full model (if merged_dir)."""
    raw = accelerator.unwrap_model(model)
    if accelerator.is_main_process and adapter_dir is not None:
        tmp = staging_dir(adapter_dir)
        raw.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_replace_dir(tmp, adapter_dir)
    if merged_dir is not None and accelerator.is_main_process:
        merged = raw.merge_and_unload()
        tmp = staging_dir(merged_dir)
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, obj in (extra_files or {}).items():
            atomic_write_json(tmp / name, obj)
        atomic_replace_dir(tmp, merged_dir)
    accelerator.wait_for_everyone()
