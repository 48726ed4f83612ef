"""Supervised fine-tuning on demonstrations (InstructGPT step 1).

    rlhf sft CONFIG                                   # via the pipeline
    accelerate launch -m stages.sft --run-dir D       # D/config.yaml holds the resolved config

Loss: next-token cross-entropy on assistant tokens only, found through the chat template's
{% generation %} markers (stages/modeling/chat_format.py). Full fine-tuning or LoRA (`sft.lora.enabled`). Output: D/sft/model, a
plain HF checkpoint (for LoRA also D/sft/adapter; D/sft/model is then the merged model).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from stages.core.config_schema import RunConfig
from stages.core.entry import stage_main
from stages.core.errors import StageError
from stages.core.metrics_log import MetricsLogger, close_stage
from stages.core.run_folder import stage_dir, write_stage_config
from stages.core.runtime import make_accelerator, resolved
from stages.core.sharding import refuse_unsupported
from stages.modeling.chat_format import IGNORE, tokenize_demonstration
from stages.modeling.tensors import (attention_bias, common_prefix, pack_examples, pad_rows, shared_prefix_mask,
                                     shared_start_layout)
from stages.modeling.trainable import apply_lora
from stages.training.data_order import chunks, eval_shard, split_items
from stages.training.export import export_trained
from stages.training.loop import Batch, LossOut, fit, run_facts

# ---- data ----

def collate_padding_free(examples: list[tuple[list[int], list[int]]]) -> Batch:
    """All sequences of the micro-batch in one row (1, N), their common start laid out once.

    With a chat template, sequences share their start: the system prompt and the user header are 24
    of the default demonstrations' 65 tokens. That start (never a position that predicts a target)
    comes once, then each sequence's own tokens at the positions they have alone, under a mask that
    lets each see the start and its own earlier tokens only. So every target gets the logits it gets
    alone (tested equal to padded rows), no compute goes to padding, and the common start is computed
    once per micro-batch instead of once per sequence.

    tensors: input_ids, position_ids (1, N); attention_mask (1, 1, N, N) bool; keep (P,) positions
    whose next token is a target; labels (P,) those target ids; num_tokens, the sequences' tokens as
    a padded batch has them (for tokens/s).
    """
    seqs = [seq for seq, _ in examples]
    predicts = [min(t for t in range(1, len(seq)) if tgt[t] != IGNORE) - 1 for seq, tgt in examples]
    p = min(common_prefix(seqs), *predicts) if len(seqs) > 1 else 0
    ids, pos, seg, starts = shared_start_layout(seqs, p)
    keep, labels = [], []
    for (seq, tgt), start in zip(examples, starts):
        for t in range(p + 1, len(seq)):
            if tgt[t] != IGNORE:
                keep.append(start + t - 1 - p)  # the position that predicts token t
                labels.append(tgt[t])
    return Batch({"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([pos]),
                  "attention_mask": shared_prefix_mask(torch.tensor([seg])), "keep": torch.tensor(keep),
                  "labels": torch.tensor(labels), "num_tokens": sum(map(len, seqs))}, count=len(labels))


def collate_padded(examples: list[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    """Right-padded rows: input_ids, attention_mask, targets (B, T) (IGNORE on pad and non-assistant)."""
    ids, mask = pad_rows([seq for seq, _ in examples], pad_id)
    tgt, _ = pad_rows([t for _, t in examples], IGNORE)
    return Batch({"input_ids": ids, "attention_mask": mask, "targets": tgt}, count=int((tgt[:, 1:] != IGNORE).sum()))


def sft_loss(model, batch: Batch) -> LossOut:
    """Summed cross-entropy over target tokens. The padding-free path asks the model for logits at
    target positions only (`logits_to_keep`), so the vocabulary projection skips prompt tokens."""
    t = {k: v.to(_device(model)) if torch.is_tensor(v) else v for k, v in batch.tensors.items()}
    if "position_ids" in t:
        out = model(input_ids=t["input_ids"], position_ids=t["position_ids"], use_cache=False,
                    attention_mask=attention_bias(model, t["attention_mask"]), logits_to_keep=t["keep"])
        loss = F.cross_entropy(out.logits[0].float(), t["labels"], reduction="sum")
        return LossOut(loss, int(t["num_tokens"]))
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
    from stages.modeling.loading import load_causal_lm, load_tokenizer

    run_dir, sc, t_start = Path(run_dir), cfg.sft, time.time()
    out_dir = stage_dir(run_dir, "sft")
    accelerator = make_accelerator(cfg)
    refuse_unsupported(accelerator, cfg, "sft")
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
    export_trained(accelerator, model, tokenizer, out_dir, lora=sc.lora.enabled, adapter=True, merged=sc.merge_lora)

    summary = {"train_loss": results["train_loss"], "eval_loss": results.get("eval_loss"), "steps": results["steps"],
               "resumed_from": results["resumed_from"], "train_examples": len(train), "eval_examples": len(evals),
               **run_facts(results, t_start, cfg.precision)}
    return close_stage(run_dir, "sft", summary, logger, accelerator.is_main_process)


if __name__ == "__main__":
    stage_main("sft", run)
