"""Supervised fine-tuning on demonstrations (InstructGPT step 1).

    rlhf sft CONFIG                                   # via the pipeline
    accelerate launch -m stages.sft --run-dir D       # D/config.yaml holds the resolved config

Loss: next-token cross-entropy on assistant tokens only, found through the chat template's
{% generation %} markers. Full fine-tuning or LoRA (`sft.lora.enabled`). Output: D/sft/model, a
plain HF checkpoint (for LoRA also D/sft/adapter; D/sft/model is then the merged model).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from stages.common import MetricsLogger, StageError, stage_dir, stage_main, write_stage_config, write_summary
from stages.config import RunConfig
from stages.runtime import resolved, runtime_info
from stages.trainloop import (Batch, LossOut, apply_lora, chunks, eval_shard, export_lora, fit, make_accelerator,
                              pack_examples, save_hf_model, split_items)

IGNORE = -100


# ---- data ----

def tokenize_demonstration(tokenizer, messages, max_length: int) -> tuple[list[int], list[int]] | None:
    """(input_ids, targets): targets are the ids on assistant tokens and IGNORE elsewhere. Right-truncated
    to max_length; None if no assistant token survives the truncation."""
    enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids = list(enc["input_ids"])[:max_length]
    mask = list(enc["assistant_masks"])[:max_length]
    targets = [t if m else IGNORE for t, m in zip(ids, mask)]
    if not any(m for m in mask[1:]):  # the first token is never predicted
        return None
    return ids, targets


def collate_padding_free(examples: list[tuple[list[int], list[int]]]) -> Batch:
    """All sequences of the micro-batch concatenated into one row (1, N) with per-sequence
    position_ids and no attention mask: transformers then builds a block-diagonal causal mask, so
    sequences do not see each other and no compute goes to padding.

    tensors: input_ids (1, N); position_ids (1, N); keep (P,) positions whose next token is a
    target; labels (P,) those target ids.
    """
    ids, pos, keep, labels = [], [], [], []
    for seq, tgt in examples:
        start = len(ids)
        ids.extend(seq)
        pos.extend(range(len(seq)))
        for t in range(1, len(seq)):
            if tgt[t] != IGNORE:
                keep.append(start + t - 1)
                labels.append(tgt[t])
    return Batch({"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([pos]),
                  "keep": torch.tensor(keep), "labels": torch.tensor(labels)}, count=len(labels))


def collate_padded(examples: list[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    """Right-padded rows: input_ids, attention_mask, targets (B, T) (IGNORE on pad and non-assistant)."""
    width = max(len(s) for s, _ in examples)
    ids = torch.full((len(examples), width), pad_id)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    tgt = torch.full((len(examples), width), IGNORE)
    for r, (seq, t) in enumerate(examples):
        ids[r, :len(seq)] = torch.tensor(seq)
        mask[r, :len(seq)] = 1
        tgt[r, :len(t)] = torch.tensor(t)
    return Batch({"input_ids": ids, "attention_mask": mask, "targets": tgt}, count=int((tgt[:, 1:] != IGNORE).sum()))


def sft_loss(model, batch: Batch) -> LossOut:
    """Summed cross-entropy over target tokens. The padding-free path asks the model for logits at
    target positions only (`logits_to_keep`), so the vocabulary projection skips prompt tokens."""
    t = {k: v.to(_device(model)) for k, v in batch.tensors.items()}
    if "position_ids" in t:
        out = model(input_ids=t["input_ids"], position_ids=t["position_ids"], logits_to_keep=t["keep"], use_cache=False)
        loss = F.cross_entropy(out.logits[0].float(), t["labels"], reduction="sum")
        return LossOut(loss, t["input_ids"].numel())
    out = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], use_cache=False)
    logits = out.logits[:, :-1].float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t["targets"][:, 1:].reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return LossOut(loss, int(t["attention_mask"].sum()))


def _device(model):
    return next(model.parameters()).device


# ---- stage ----

def run(cfg: RunConfig, run_dir: Path) -> dict:
    cfg = resolved(cfg)  # precision "auto" made concrete for this machine
    from accelerate.utils import set_seed

    from data_schemas.loaders import load_demonstrations
    from data_schemas.records import as_chat
    from stages.models import load_causal_lm, load_tokenizer

    run_dir, sc, t_start = Path(run_dir), cfg.sft, time.time()
    out_dir = stage_dir(run_dir, "sft")
    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    demos = load_demonstrations(sc.data)  # bad data fails here, before any model loads
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    examples = [tokenize_demonstration(tokenizer, as_chat(d.messages), sc.max_length) for d in demos]
    dropped = sum(e is None for e in examples)
    examples = [e for e in examples if e is not None]
    if not examples:
        raise StageError(f"sft: no demonstration has an assistant token within max_length={sc.max_length}")
    train_idx, eval_idx = split_items(len(examples), sc.eval_fraction, cfg.seed)
    train = [examples[i] for i in train_idx]
    evals = [examples[i] for i in eval_idx]
    if sc.packing:  # a training item becomes a bin of examples filling up to max_length tokens
        bins = pack_examples([len(s) for s, _ in train], sc.max_length)
        items = [[train[i] for i in b] for b in bins]
    else:
        items = [[e] for e in train]
    padding_free = sc.padding_free or sc.packing

    def collate(rows) -> Batch:
        return collate_padding_free(rows) if padding_free else collate_padded(rows, tokenizer.pad_token_id)

    def make_batch(idx: list[int]) -> Batch:
        return collate([ex for i in idx for ex in items[i]])

    if accelerator.is_main_process:
        write_stage_config(run_dir, "sft", cfg)
        print(f"sft: {len(train)} train / {len(evals)} eval demonstrations"
              + (f" ({dropped} dropped: no reply within max_length)" if dropped else "")
              + (f", packed into {len(items)} rows" if sc.packing else ""), flush=True)
    logger = MetricsLogger(run_dir, "sft", enabled=accelerator.is_main_process)

    model = load_causal_lm(cfg.model, "fp32", cfg.trust_remote_code)
    model.config.pad_token_id = tokenizer.pad_token_id
    if sc.lora.enabled:
        model = apply_lora(model, sc.lora, "CAUSAL_LM")

    def evaluate(m) -> dict:
        if not evals:
            return {}
        m.eval()
        total = torch.zeros(2, device=accelerator.device)
        with torch.no_grad():
            for rows in chunks([evals[i] for i in eval_shard(list(range(len(evals))), accelerator)], sc.batch_size):
                b = collate(rows)
                total += torch.tensor([sft_loss(m, b).loss_sum.item(), b.count], device=accelerator.device)
        total = accelerator.reduce(total, reduction="sum")
        return {"loss": (total[0] / total[1].clamp(min=1)).item()}

    model, results = fit(accelerator=accelerator, model=model, cfg=cfg, stage="sft", run_dir=run_dir,
                         n_train=len(items), make_batch=make_batch, loss_fn=sft_loss, evaluate=evaluate, logger=logger)

    # ---- export ----
    if sc.lora.enabled:
        export_lora(accelerator, model, tokenizer, out_dir / "adapter", out_dir / "model" if sc.merge_lora else None)
    else:
        save_hf_model(accelerator, model, tokenizer, out_dir / "model")

    summary = {"train_loss": results["train_loss"], "eval_loss": results.get("eval_loss"), "steps": results["steps"],
               "resumed_from": results["resumed_from"], "train_examples": len(train), "eval_examples": len(evals),
               "wall_s": round(time.time() - t_start, 2), "world_size": results["world_size"],
               "items_per_rank": results["items_per_rank"], "spike_events": results["spike_events"],
               **runtime_info(cfg.precision)}
    if accelerator.is_main_process:
        write_summary(run_dir, "sft", summary)
    logger.close()
    return summary


if __name__ == "__main__":
    stage_main("sft", run)
