"""Reward-model benchmark on Anthropic HH-RLHF (harmless-base, test file): train the RM stage on
1500 pairs, report held-out pairwise accuracy on 300 others, with wall time. Slow and opt-in: the
1500 pairs are ~0.5 M tokens, so full fine-tuning of SmolLM2-135M takes hours on 2 CPU cores.
Measured 2026-11-29 on 2 Xeon cores: `--freeze-layers 26 --max-length 256` (the top 4 of 30 layers
and the score head train, 188 steps of 8 pairs) reached 61.8% accuracy on 301 held-out pairs in
25.4 min (training 21.9 min at ~7 s/step, then the eval pass).

    python bench/rm_hh.py [--train 1500] [--eval 300] [--epochs 1] [--model smollm2-135m-instruct]
                          [--freeze-layers 0] [--data ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz]
                          [--json out.json]

It drives the real stage (`stages.reward.run`) with init_from = the base model; the split is the
stage's own seeded prompt-level split, so eval prompts are never trained on.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--train", type=int, default=1500, help="training pairs")
    ap.add_argument("--eval", type=int, default=300, help="held-out pairs")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--freeze-layers", type=int, default=0, help="reward.freeze_layers: train only the layers above")
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args()
    if not Path(args.data).exists():
        print(f"error: {args.data} not found (it lives in ../shared beside the repo)", file=sys.stderr)
        return 2

    from stages.core.config_schema import RunConfig
    from stages.reward import run

    n = args.train + args.eval
    cfg = RunConfig.model_validate({
        "name": "rm_hh", "model": args.model, "seed": 0,
        "reward": {"data": {"source": args.data, "format": "hh", "limit": n}, "init_from": args.model,
                   "epochs": args.epochs, "batch_size": args.batch, "lr": args.lr, "max_length": args.max_length,
                   "eval_fraction": args.eval / n, "warmup_ratio": 0.05, "logging_steps": 10,
                   "freeze_layers": args.freeze_layers}})
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        summary = run(cfg, Path(d))
    result = {"eval_accuracy": summary["eval_accuracy"], "eval_margin": summary["eval_margin"],
              "train_pairs": summary["train_groups"], "eval_pairs": summary["eval_groups"], "steps": summary["steps"],
              "model": args.model, "epochs": args.epochs, "lr": args.lr, "max_length": args.max_length,
              "freeze_layers": args.freeze_layers, "wall_s": round(time.time() - t0, 1)}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
