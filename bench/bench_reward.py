"""Reward model: our stage (stages.reward.run) against TRL's RewardTrainer, same model, pairs,
batch and steps.

    python -m bench.bench_reward                      # CPU, fp32, 8 pairs/step, 1 warm-up + 5 timed steps
    python -m bench.bench_reward --device cuda --dtype bf16

Both sides start from SmolLM2-135M as a 1-label sequence classifier and train the pairwise
Bradley-Terry loss on the same preference pairs (the default dataset's K-wise rankings are
flattened to pairs first, since TRL takes pairs only): 8 pairs = 16 sequences per step, max_length
256, lr 2e-5 cosine with 5% warm-up, grad clip 1.0, fp32, no gradient checkpointing, no eval, no
margin term, report_to none. Each side runs in its own subprocess.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench import benchlib as bl

WARMUP_RATIO = 0.05
SECTION = "reward"
LABELS = {"ours": "ours: stages.reward", "peer": "TRL RewardTrainer (trl 1.16)"}


# ---- workers (run in their own process) ----

def worker_ours(job: dict) -> dict:
    from stages import reward

    return bl.time_stage(reward.run, job, {"reward": dict(
        data={"source": job["data"]}, init_from=job["model_path"], use_margin=False, max_steps=job["steps"],
        batch_size=job["batch_size"], max_length=job["max_length"], lr=job["lr"], lr_scheduler="cosine",
        warmup_ratio=WARMUP_RATIO, eval_fraction=0.0, save_steps=0, logging_steps=1)}, "loss", prefix="bench-rm-ours-")


def worker_peer(job: dict) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    bl.set_threads(job)
    stamp, stamps = bl.trl_stamper()
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(job["model_path"])
    tok.padding_side = "right"
    rows = [json.loads(line) for line in Path(job["data"]).read_text().splitlines()]
    ds = datasets.Dataset.from_list([{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                      "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    model = AutoModelForSequenceClassification.from_pretrained(job["model_path"], num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    args = RewardConfig(**bl.trl_training_args(job, WARMUP_RATIO, "bench-rm-trl-"), center_rewards_coefficient=None)
    trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[stamp])
    trainer.train()
    return {"stamps": stamps, "wall_s": time.perf_counter() - t0}


# ---- parent ----

def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bl.add_common_args(ap)
    bl.add_step_args(ap, lr=2e-5, data="default:preferences", batch_help="preference pairs per step")
    args = ap.parse_args(argv)

    from bench import benchdata
    from stages.modeling.loading import load_tokenizer

    b = bl.Setup(args, LABELS, SECTION)
    labels, basis, logs, info, ceiling, model_path = b.labels, b.basis, b.logs, b.info, b.ceiling, b.model_path
    n_params = bl.count_params(model_path, head="score")
    total = args.steps + args.warmup
    data = benchdata.preference_pairs(logs, args.batch_size * total, load_tokenizer(args.model), args.max_length, args.data)
    job = {"model": args.model, "model_path": model_path, "data": data["path"], "steps": total,
           "batch_size": args.batch_size, "max_length": args.max_length, "lr": args.lr, "device": args.device,
           "dtype": args.dtype, "threads": args.threads, "ours_set": args.ours_set}
    res, note = b.run_sides("bench.bench_reward", job)
    table, _ = bl.side_by_side(res, labels, warmup=args.warmup, samples_per_step=args.batch_size,
                               tokens_per_sample=data["tokens_per_sample"], flops_per_token=6 * n_params,
                               ceiling=ceiling, basis=basis, unit="pairs")
    print(table)
    body = (f"{bl.machine_line(info)}\n\nSmolLM2-135M as a 1-label classifier ({n_params / 1e6:.1f} M matmul params: no LM head, embedding excluded), "
            f"{args.dtype}, {args.batch_size} pairs ({2 * args.batch_size} sequences) per step, max_length "
            f"{args.max_length}, {args.warmup} warm-up + {args.steps} timed steps, default preferences flattened to "
            f"pairs and cycled (mean {data['tokens_per_sample']:.0f} tokens per pair, both replies). s/step = median "
            f"time between consecutive step ends (wall and process CPU); tokens = pairs × tokens per pair; MFU = "
            f"6·N·tokens/s ÷ ceiling. {bl.basis_note(basis, ceiling)} Our stage runs with its defaults otherwise "
            f"(padding-free, prefix-shared batches: each pair's prompt computed once, its two replies after it under a "
            f"mask, packed into rows and scored at each reply's last token; the tokens column still counts a pair's "
            f"tokens as prompt + reply twice, the same work unit for both sides); TRL pads every sequence to the "
            f"longest in the batch. Peak RSS is each side's own process (VmHWM). "
            f"Logs: `{logs}`.\n\n{note}{table}\n")
    b.publish(res, "Reward model: stages.reward vs TRL RewardTrainer", body)
    return res


if __name__ == "__main__":
    import sys

    if "--worker" in sys.argv:
        bl.worker_main({"ours": worker_ours, "peer": worker_peer})
    else:
        main()
