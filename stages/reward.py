"""Reward-model training on preference pairs and K-wise rankings (InstructGPT step 2).

    rlhf reward CONFIG
    accelerate launch -m stages.reward --run-dir D

The model is a sequence classifier with one output, initialised from this run's SFT model by
default (`reward.init_from: sft`). The reward of a reply is the score at its last token, the
<|im_end|> that closes the reply: sequences are `prompt (chat template, generation header) +
reply + EOS`, exactly what PPO scores after generating. By default each pair's (or ranking's)
prompt is computed once, its replies after it under a mask that hides them from each other, packed
without padding, and the score is read at each reply's last token (`collate_groups`); with
`reward.padding_free: false` rows are right-padded and HF's classifier reads the last non-pad token
(`config.pad_token_id` is set either way, so the exported model scores padded batches).

Output: D/reward/model, a plain HF checkpoint (AutoModelForSequenceClassification + tokenizer,
saved with padding_side="right") plus reward_stats.json, the eval-set reward mean/std that PPO
uses to normalise rewards.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from stages.core.config_schema import RunConfig
from stages.core.entry import stage_main
from stages.core.errors import StageError
from stages.core.metrics_log import MetricsLogger, close_stage
from stages.core.run_folder import resolve_input_model, stage_dir, write_stage_config
from stages.core.runtime import make_accelerator, resolved
from stages.core.sharding import refuse_unsupported
from stages.modeling.chat_format import render_prompts
from stages.modeling.reward_scoring import pack_reply_groups, packed_scores, padded_scores, reply_rows
from stages.modeling.tensors import pad_rows
from stages.modeling.trainable import apply_lora, freeze_lower_layers
from stages.rl.preference_loss import group_comparisons, grouped_bt_loss, pair_gaps, preference_metrics
from stages.training.data_order import chunks, eval_shard, split_items
from stages.training.export import export_trained
from stages.training.loop import Batch, LossOut, fit, run_facts

STATS_FILE = "reward_stats.json"


# ---- data ----

def preference_groups(tokenizer, records, max_length: int) -> tuple[list[tuple[list[list[int]], float | None]], list[str]]:
    """PreferencePair / Ranking records -> (groups, prompt keys). A group is (rows best first, margin)."""
    from data_schemas.records import PreferencePair, as_chat

    groups, keys = [], []
    for rec in records:
        prompt_text = render_prompts(tokenizer, [as_chat(rec.prompt)])[0]
        if isinstance(rec, PreferencePair):
            replies, margin = [rec.chosen, rec.rejected], rec.margin
        else:
            replies, margin = list(rec.responses), None
        groups.append((reply_rows(tokenizer, prompt_text, replies, max_length), margin))
        keys.append(prompt_text)
    return groups, keys


def collate_groups(groups, pad_id: int, padding_free: bool = False) -> Batch:
    """All replies of the groups as one batch.

    Padded: input_ids, attention_mask (R, T), R = total replies, each row prompt + reply, right-padded.
    Padding-free (prefix-shared): input_ids, position_ids, attention_mask (K, W), (K, W), (K, 1, W, W).
    A group is laid out once as its shared prompt followed by each reply's own tokens, and groups are
    bin-packed, whole, into K rows no longer than the longest group (W). The mask lets each reply see
    the prompt and its own earlier tokens, not the other replies or other groups; each reply's positions
    continue from the prompt's, so every reply is computed as if it sat alone after the prompt (tested
    equal to the padded layout), while the prompt is computed once per group, not once per reply. A
    row's unused tail is a segment of its own. ends (R,): the flat index (row·W + column) of each reply's
    last token, where its reward is read.
    Both: comps, the Comparisons (indices into the R rewards); count = number of groups (the loss unit);
    num_tokens, the replies' tokens as a padded batch has them, prompt included for each (the data's
    tokens, for tokens/s; the packed rows compute fewer).
    """
    rows = [r for g, _ in groups for r in g]
    comps = group_comparisons([len(g) for g, _ in groups], [m for _, m in groups])
    if not padding_free:
        ids, mask = pad_rows(rows, pad_id)
        return Batch({"input_ids": ids, "attention_mask": mask, "comps": comps, "num_tokens": int(mask.sum())},
                     count=len(groups))
    packed = pack_reply_groups([g for g, _ in groups], pad_id)
    return Batch({**packed, "comps": comps, "num_tokens": sum(len(r) for r in rows)}, count=len(groups))


def batch_tokens(batch: Batch) -> int:
    """The data tokens of a batch: each reply with its prompt, padding excluded (for tokens/s)."""
    return int(batch.tensors["num_tokens"])


def score(model, batch: Batch) -> torch.Tensor:
    """(R,) scalar rewards of the batch's rows (stages/modeling/reward_scoring.py reads them)."""
    device = next(model.parameters()).device
    t = batch.tensors
    if "position_ids" in t:
        return packed_scores(model, t["input_ids"].to(device), t["position_ids"].to(device), t["ends"].to(device),
                             t["attention_mask"].to(device))
    return padded_scores(model, t["input_ids"].to(device), t["attention_mask"].to(device))


def make_loss_fn(use_margin: bool):
    def loss_fn(model, batch: Batch) -> LossOut:
        rewards = score(model, batch)
        loss = grouped_bt_loss(rewards, batch.tensors["comps"], use_margin=use_margin, reduction="sum")
        return LossOut(loss, batch_tokens(batch))
    return loss_fn


def evaluate_groups(model, groups, accelerator, batch_size: int, pad_id: int, use_margin: bool,
                    padding_free: bool = False) -> dict:
    """Loss, accuracy, mean margin and reward mean/std over `groups` (sharded across ranks)."""
    from accelerate.utils import gather_object

    model.eval()
    rewards, gaps, loss_sum = [], [], 0.0
    with torch.no_grad():
        for part in chunks([groups[i] for i in eval_shard(list(range(len(groups))), accelerator)], batch_size):
            b = collate_groups(part, pad_id, padding_free)
            r = score(model, b)
            loss_sum += grouped_bt_loss(r, b.tensors["comps"], use_margin=use_margin, reduction="sum").item()
            rewards.extend(r.tolist())
            gaps.extend(pair_gaps(r, b.tensors["comps"]).tolist())
    if accelerator.num_processes > 1:
        rewards, gaps = gather_object(rewards), gather_object(gaps)
        loss_sum = sum(gather_object([loss_sum]))
    metrics = preference_metrics(torch.tensor(gaps), torch.tensor(rewards))
    return {"loss": loss_sum / max(1, len(groups)), **metrics}


# ---- stage ----

def run(cfg: RunConfig, run_dir: Path) -> dict:
    cfg = resolved(cfg)  # precision "auto" made concrete for this machine
    from accelerate.utils import set_seed

    from data_schemas.loaders import load_preferences
    from stages.modeling.loading import load_reward_model, load_tokenizer

    run_dir, rc, t_start = Path(run_dir), cfg.reward, time.time()
    out_dir = stage_dir(run_dir, "reward")
    init = resolve_input_model(run_dir, rc.init_from, needed_by="reward") if rc.init_from else cfg.model
    accelerator = make_accelerator(cfg)
    refuse_unsupported(accelerator, cfg, "reward")
    set_seed(cfg.seed)
    records = load_preferences(rc.data)  # bad data fails here, before any model loads
    eval_records = load_preferences(rc.eval_data) if rc.eval_data is not None else None
    tokenizer = load_tokenizer(init, cfg.trust_remote_code)
    tokenizer.padding_side = "right"  # saved with the model: plain HF scoring then reads the right token
    groups, keys = preference_groups(tokenizer, records, rc.max_length)
    if not groups:
        raise StageError(f"reward: {rc.data.source} has no preference records")
    if eval_records is None:
        train_idx, eval_idx = split_items(len(groups), rc.eval_fraction, cfg.seed, keys=keys)
        train = [groups[i] for i in train_idx]
        evals = [groups[i] for i in eval_idx]
        eval_source = f"{rc.eval_fraction:g} of {rc.data.source} (split by prompt)" if evals else None
    else:
        train, eval_source = groups, rc.eval_data.source
        evals, eval_keys = preference_groups(tokenizer, eval_records, rc.max_length)
        if not evals:
            raise StageError(f"reward.eval_data: {rc.eval_data.source} has no preference records")
        shared = len(set(eval_keys) & set(keys))
        if shared and accelerator.is_main_process:
            print(f"reward: warning: {shared} of {len(set(eval_keys))} eval_data prompts also occur in reward.data; "
                  "accuracy on them is not held out", file=sys.stderr)
    if accelerator.is_main_process:
        write_stage_config(run_dir, "reward", cfg)
        n_pairs = sum(len(g) * (len(g) - 1) // 2 for g, _ in train)
        print(f"reward: {len(train)} train groups ({n_pairs} comparisons) / {len(evals)} eval groups "
              f"({eval_source}); init {init}", flush=True)
    logger = MetricsLogger(run_dir, "reward", enabled=accelerator.is_main_process)

    model = load_reward_model(init, "fp32", cfg.trust_remote_code, pad_token_id=tokenizer.pad_token_id)
    if rc.lora.enabled:
        model = apply_lora(model, rc.lora, "SEQ_CLS")
    freeze_lower_layers(model, rc.freeze_layers)

    def evaluate(m) -> dict:
        if not evals:
            return {}
        return evaluate_groups(m, evals, accelerator, rc.batch_size, tokenizer.pad_token_id, rc.use_margin,
                               rc.padding_free)

    model, results = fit(accelerator=accelerator, model=model, cfg=cfg, stage="reward", run_dir=run_dir,
                         n_train=len(train), make_batch=lambda idx: collate_groups([train[i] for i in idx], tokenizer.pad_token_id,
                                                               rc.padding_free),
                         loss_fn=make_loss_fn(rc.use_margin), evaluate=evaluate, logger=logger)

    # ---- normalisation stats, export ----
    if evals:
        stats = {"mean": results["eval_reward_mean"], "std": results["eval_reward_std"], "split": "eval", "n": sum(len(g) for g, _ in evals)}
    else:  # no held-out split: the training set is the only sample of the reward distribution
        m = evaluate_groups(model, train, accelerator, rc.batch_size, tokenizer.pad_token_id, rc.use_margin,
                            rc.padding_free)
        stats = {"mean": m["reward_mean"], "std": m["reward_std"], "split": "train", "n": sum(len(g) for g, _ in train)}
    export_trained(accelerator, model, tokenizer, out_dir, lora=rc.lora.enabled, extra_files={STATS_FILE: stats})

    summary = {"eval_accuracy": results.get("eval_accuracy"), "eval_margin": results.get("eval_margin"),
               "eval_loss": results.get("eval_loss"), "reward_mean": stats["mean"], "reward_std": stats["std"],
               "train_loss": results["train_loss"], "steps": results["steps"], "resumed_from": results["resumed_from"],
               "train_groups": len(train), "eval_groups": len(evals), "eval_source": eval_source, "init_from": init,
               **run_facts(results, t_start, cfg.precision)}
    return close_stage(run_dir, "reward", summary, logger, accelerator.is_main_process)


if __name__ == "__main__":
    stage_main("reward", run)
