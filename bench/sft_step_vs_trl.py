"""Quick SFT step-time comparison: TRL's SFTTrainer vs our lean loop (stages/training/loop.py), same
model, same rows, same batch, measured in the same process.

    python bench/sft_step_vs_trl.py [--model smollm2-135m-instruct] [--steps 6] [--batch 8]

Rows are synthetic chats of about 61 tokens (system + user + assistant). Both sides train with
assistant-only loss, fp32, AdamW. Prints the median and mean s/step (the first step is a warm-up
and is excluded) and the ratios. TRL runs with its default gradient checkpointing ("trl") and
without ("trl_no_gc"); the lean loop padded and padding-free, spike guard on unless --no-guard.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = ("the quick brown fox jumps over a lazy dog while seven small birds sing about rivers "
         "mountains bread coffee tables windows gardens").split()


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    import random

    rnd = random.Random(seed)
    rows = []
    for _ in range(n):
        q = " ".join(rnd.choices(WORDS, k=rnd.randint(8, 14))) + "?"
        a = " ".join(rnd.choices(WORDS, k=rnd.randint(14, 24))) + "."
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return rows


def time_trl(model_name: str, rows: list[dict], steps: int, batch: int, grad_ckpt: bool = True) -> list[float]:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from stages.modeling.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer(model_name)
    model = load_causal_lm(model_name)
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=2e-5,
                         assistant_only_loss=True, logging_steps=1, report_to=[], save_strategy="no",
                         use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False,
                         gradient_checkpointing=grad_ckpt,  # TRL's default is True; our loop does not checkpoint
                         dataloader_num_workers=0, max_length=256, seed=0)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                             callbacks=[Clock()])
        trainer.train()
    return times


def time_lean(model_name: str, rows: list[dict], steps: int, batch: int, padding_free: bool,
              guard: bool = True) -> list[float]:
    from stages.core.config_schema import RunConfig
    from stages.sft import run

    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "demos.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        cfg = RunConfig.model_validate({
            "model": model_name, "guard": {"enabled": guard},
            "sft": {"data": {"source": str(data)}, "max_steps": steps, "batch_size": batch, "lr": 2e-5,
                    "max_length": 256, "eval_fraction": 0, "padding_free": padding_free}})
        run(cfg, Path(d) / "run")
        metrics = [json.loads(x) for x in (Path(d) / "run/sft/metrics.jsonl").read_text().splitlines()]
    return [m["step_s"] for m in metrics if "step_s" in m]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--no-guard", action="store_true", help="lean loop without the spike guard's snapshots")
    ap.add_argument("--only", choices=("trl", "trl_no_gc", "lean_padded", "lean_padding_free"), action="append",
                    help="run only these variants (repeatable)")
    args = ap.parse_args()
    import torch

    print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}, "
          f"torch threads {torch.get_num_threads()}")

    from stages.modeling.loading import load_tokenizer

    rows = synthetic_rows(args.batch * args.steps)
    tok = load_tokenizer(args.model)
    lens = [len(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"]) for r in rows]
    print(f"rows: {len(rows)}, mean tokens {statistics.mean(lens):.1f}, batch {args.batch}, steps {args.steps}")

    results = {}
    for name, fn in (("trl", lambda: time_trl(args.model, rows, args.steps, args.batch)),
                     ("trl_no_gc", lambda: time_trl(args.model, rows, args.steps, args.batch, grad_ckpt=False)),
                     ("lean_padded", lambda: time_lean(args.model, rows, args.steps, args.batch, False, not args.no_guard)),
                     ("lean_padding_free", lambda: time_lean(args.model, rows, args.steps, args.batch, True, not args.no_guard))):
        if args.only and name not in args.only:
            continue
        t = fn()
        results[name] = statistics.median(t[1:]) if len(t) > 1 else t[0]
        mean = statistics.mean(t[1:]) if len(t) > 1 else t[0]
        print(f"{name:>18}: median {results[name]:.3f} s/step, mean {mean:.3f} (all: {', '.join(f'{x:.2f}' for x in t)})", flush=True)
    for peer in ("trl", "trl_no_gc"):
        for name in ("lean_padded", "lean_padding_free"):
            if peer in results and name in results:
                print(f"speed-up {name} vs {peer}: {results[peer] / results[name]:.2f}x")


if __name__ == "__main__":
    main()
