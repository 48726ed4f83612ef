"""Kill soak (issue 20): SIGKILL `rlhf run configs/tiny.yaml` at random moments, re-run, compare.

    .venv/bin/python bench/soak_kill.py [--trials 20] [--seed 0] [--out bench/soak_kill.json]

First one uninterrupted run gives the reference metrics and its wall time T. Then each trial starts
a fresh run folder, SIGKILLs the whole `rlhf run` process group (the orchestrator, the accelerate
launcher and the stage: what a crash or the OOM killer of a node does) after a uniformly random
0.5..T seconds, re-runs the same command to completion, and compares every stage's summary.json,
metrics.jsonl and compare/metrics.json with the reference, leaving out wall times, throughputs,
timestamps, resume bookkeeping and paths that name the run folder. Prints one line per trial and the
count of trials that finished with metrics equal to the reference.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("sft", "reward", "ppo", "baseline", "compare")
VOLATILE = {"time", "wall_s", "train_wall_s", "resumed_from", "finished", "updated", "tokens_per_s",
            "samples_per_s", "step_s", "generate_s", "score_s", "train_s", "iteration_s"}


def clean(obj, run_dir: str):
    if isinstance(obj, dict):
        return {k: clean(v, run_dir) for k, v in obj.items() if k not in VOLATILE and not k.endswith(("_s", "_seconds"))}
    if isinstance(obj, list):
        return [clean(v, run_dir) for v in obj]
    if isinstance(obj, str):
        return obj.replace(run_dir, "<run>")
    return obj


def metrics_of(run_dir: Path) -> dict:
    out = {}
    for s in STAGES:
        sdir = run_dir / s
        if (sdir / "summary.json").exists():
            out[f"{s}/summary.json"] = clean(json.loads((sdir / "summary.json").read_text()), str(run_dir))
        if (sdir / "metrics.jsonl").exists():
            out[f"{s}/metrics.jsonl"] = [clean(json.loads(line), str(run_dir))
                                         for line in (sdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if (run_dir / "compare" / "metrics.json").exists():
        out["compare/metrics.json"] = clean(json.loads((run_dir / "compare" / "metrics.json").read_text()), str(run_dir))
    return out


def start(root: Path, log) -> subprocess.Popen:
    cmd = [str(REPO / ".venv" / "bin" / "rlhf"), "run", "configs/tiny.yaml", f"runs_root={root}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def first_difference(a: dict, b: dict) -> str:
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return key
    return ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON file for the per-trial results")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="soak_kill_"))
    log = open(work / "log.txt", "w")

    t0 = time.time()
    ref_proc = start(work / "ref", log)
    if ref_proc.wait() != 0:
        sys.exit(f"the uninterrupted run failed; see {work / 'log.txt'}")
    total = time.time() - t0
    reference = metrics_of(work / "ref" / "tiny")
    assert "compare/metrics.json" in reference, "the reference run did not finish every stage"
    print(f"uninterrupted run: {total:.0f} s; {len(reference)} metric files", flush=True)

    results = []
    for trial in range(1, args.trials + 1):
        root = work / f"trial{trial:02d}"
        at = rng.uniform(0.5, total)
        proc = start(root, log)
        try:
            proc.wait(timeout=at)
            killed = False  # it finished before the moment came
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            killed = True
        manifest = root / "tiny" / "manifest.json"
        at_stage = "?"
        if manifest.exists():
            try:
                stages = json.loads(manifest.read_text())["stages"]
                at_stage = next((s for s, v in stages.items() if v.get("status") == "running"), "between stages")
            except (json.JSONDecodeError, KeyError):
                at_stage = "manifest unreadable"
        rerun = start(root, log)
        code = rerun.wait()
        got = metrics_of(root / "tiny") if code == 0 else {}
        equal = code == 0 and got == reference
        results.append({"trial": trial, "kill_at_s": round(at, 1), "killed": killed, "stage": at_stage,
                        "rerun_exit": code, "equal": equal, "first_difference": "" if equal else first_difference(got, reference)})
        print(f"trial {trial:2d}: SIGKILL at {at:5.1f} s ({at_stage}); re-run exit {code}; metrics "
              f"{'equal' if equal else 'DIFFER at ' + results[-1]['first_difference']}", flush=True)
        if equal:
            shutil.rmtree(root, ignore_errors=True)
    ok = sum(r["equal"] for r in results)
    print(f"{ok} of {len(results)} killed runs finished with metrics equal to the uninterrupted run "
          f"(work folder {work})")
    if args.out:
        Path(args.out).write_text(json.dumps({"uninterrupted_s": round(total, 1), "equal": ok, "trials": results},
                                             indent=1) + "\n")
    sys.exit(0 if ok == len(results) else 1)


if __name__ == "__main__":
    main()
