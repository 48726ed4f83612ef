"""RSS of a reward-model run, step by step (issue 20, defect 8: memory grew during RM training).

    .venv/bin/python bench/rm_rss.py [--steps 200] [--freeze-layers 0] [--env MALLOC_ARENA_MAX=2 ...]

Runs `rlhf reward` on the shared Anthropic HH-RLHF harmless-base file with SmolLM2-135M-Instruct
(reward.max_length=512, padding-free, the default), samples the stage process's RSS once a second
and prints (step, RSS) every --every steps, then the growth after warm-up: the largest RSS seen from
the warm-up step on, against the RSS at the warm-up step. Writes the samples as JSON (--out).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
HH = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


def stage_process(root: psutil.Process) -> psutil.Process | None:
    for p in root.children(recursive=True):
        try:
            if "stages.reward" in " ".join(p.cmdline()) and "accelerate" not in " ".join(p.cmdline()):
                return p
        except psutil.Error:
            continue
    return None


def steps_done(metrics: Path) -> int:
    if not metrics.exists():
        return 0
    return sum(1 for line in metrics.read_text().splitlines() if '"loss"' in line and '"eval_' not in line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--freeze-layers", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--warmup", type=int, default=20, help="step from which RSS must stay flat")
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for the stage process")
    ap.add_argument("--override", action="append", default=[], help="extra dotted config overrides")
    ap.add_argument("--out", default=None, help="JSON file for the samples")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="rm_rss_"))
    overrides = ["name=rss", f"runs_root={work}", "model=smollm2-135m-instruct", "reward.init_from=smollm2-135m-instruct",
                 f"reward.data.source={HH}", "reward.data.format=hh", "reward.data.limit=null", f"reward.lr={args.lr}", f"reward.max_length={args.max_length}",
                 "reward.padding_free=true", f"reward.max_steps={args.steps}", f"reward.batch_size={args.batch_size}",
                 "reward.eval_fraction=0", f"reward.freeze_layers={args.freeze_layers}", "reward.save_steps=0",
                 *args.override]
    env = dict(os.environ, HF_HUB_OFFLINE="1", **dict(kv.split("=", 1) for kv in args.env))
    cmd = [str(REPO / ".venv" / "bin" / "rlhf"), "reward", str(REPO / "configs" / "tiny.yaml"), *overrides]
    print(" ".join(cmd), "| env:", " ".join(args.env) or "-", flush=True)
    metrics = work / "rss" / "reward" / "metrics.jsonl"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    samples: list[tuple[float, int, float]] = []  # (time, step, RSS GiB)
    t0 = time.time()
    last_print = -1
    while proc.poll() is None:
        stage = stage_process(root)
        if stage is not None:
            try:
                rss = stage.memory_info().rss / 1024**3
            except psutil.Error:
                rss = None
            step = steps_done(metrics)
            if rss is not None:
                samples.append((round(time.time() - t0, 1), step, round(rss, 3)))
                if step // args.every != last_print and step % args.every == 0:
                    last_print = step // args.every
                    print(f"step {step:4d}  t {time.time() - t0:7.0f} s  RSS {rss:.2f} GiB", flush=True)
        time.sleep(1.0)
    err = proc.stderr.read()
    if proc.returncode != 0:
        print(err[-3000:], file=sys.stderr)
        sys.exit(f"rlhf reward failed with exit code {proc.returncode}")
    per_step: dict[int, float] = {}
    for _, step, rss in samples:
        per_step[step] = max(per_step.get(step, 0.0), rss)
    warm = [s for s in sorted(per_step) if s >= args.warmup]
    base = per_step[warm[0]]
    peak_step = max(warm, key=lambda s: per_step[s])
    growth = per_step[peak_step] / base - 1
    print(f"after warm-up (step {warm[0]}): RSS {base:.2f} GiB -> peak {per_step[peak_step]:.2f} GiB at step {peak_step} "
          f"(+{100 * growth:.1f}%); last step {warm[-1]}: {per_step[warm[-1]]:.2f} GiB; wall {time.time() - t0:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "per_step_max_rss_gib": per_step,
                                              "growth_after_warmup": growth, "samples": samples}, indent=1) + "\n")


if __name__ == "__main__":
    main()
