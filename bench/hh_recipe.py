"""The real-data recipe (configs/hh_harmless.yaml and its judge, configs/hh_harmless_judge.yaml) on the
local Anthropic HH-RLHF harmless-base test file, through config overrides only: every dataset block's
source points at the file (its hub data_dir cleared), the run folders go under --out, and the judge's
path follows them. Prints and writes (--json) the stage times, both RMs' held-out accuracy, the
judges table, human-free win rates, offensive rates and the monitor's rows.

    python bench/hh_recipe.py [--data ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz] [--out DIR]
                              [--json results.json] [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
MAIN, JUDGE = REPO / "configs" / "hh_harmless.yaml", REPO / "configs" / "hh_harmless_judge.yaml"
MAIN_DATA = ("sft.data", "reward.data", "reward.eval_data", "ppo.prompts", "ppo.monitor.prompts", "compare.prompts")
JUDGE_DATA = ("reward.data", "reward.eval_data")


def local(keys, data: Path) -> list[str]:
    return [o for k in keys for o in (f"{k}.source={data}", f"{k}.data_dir=null")]


def rlhf(args: list[str], log: Path) -> tuple[int, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    with open(log, "w") as fh:
        rc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=env, stdout=fh,
                            stderr=subprocess.STDOUT).returncode
    return rc, time.time() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--out", default=str(REPO / "runs" / "hh-recipe"))
    ap.add_argument("--json", default=None)
    ap.add_argument("--set", action="append", default=[], help="extra override for the main run")
    args = ap.parse_args()
    data, out = Path(args.data).resolve(), Path(args.out).resolve()
    if not data.exists():
        print(f"error: {data}: no such file (the HH-RLHF test file lives in ../shared/data)", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    judge_model = out / "hh-harmless-judge" / "reward" / "model"
    t0 = time.time()
    rc, judge_s = rlhf(["run", str(JUDGE), "--stages", "reward", f"runs_root={out}", *local(JUDGE_DATA, data)],
                       out / "judge.log")
    if rc:
        print(f"error: the judge run failed (exit {rc}); log {out / 'judge.log'}", file=sys.stderr)
        return 1
    rc, main_s = rlhf(["run", str(MAIN), f"runs_root={out}", *local(MAIN_DATA, data),
                       f"ppo.monitor.judges=[{judge_model}]", f"compare.judges=[{judge_model},reward]", *args.set],
                      out / "main.log")
    total = time.time() - t0
    if rc:
        print(f"error: the main run failed (exit {rc}); log {out / 'main.log'}", file=sys.stderr)
        return 1
    run = out / "hh-harmless"
    manifest = json.loads((run / "manifest.json").read_text())
    judge_summary = json.loads((out / "hh-harmless-judge" / "reward" / "summary.json").read_text())
    metrics = json.loads((run / "compare" / "metrics.json").read_text())
    monitor = [r for r in (json.loads(x) for x in (run / "ppo" / "metrics.jsonl").read_text().splitlines())
               if "monitor_kl" in r]
    result = {
        "data": str(data), "total_s": round(total, 1), "judge_run_s": round(judge_s, 1), "main_run_s": round(main_s, 1),
        "stages_s": {s: m.get("wall_s") for s, m in manifest["stages"].items()},
        "judge_rm": {k: judge_summary.get(k) for k in ("eval_accuracy", "eval_margin", "eval_groups", "train_groups",
                                                        "eval_source")},
        "proxy_rm": {k: manifest["stages"]["reward"]["metrics"].get(k) for k in
                     ("eval_accuracy", "eval_margin", "eval_groups", "train_groups", "eval_source")},
        "lead_judge": metrics["lead_judge"],
        "judges": [{k: j[k] for k in ("name", "role", "mean_reward", "optimised_by_ppo")} |
                   {"win": {a: {b: j["win_rates"][a][b]["rate"] for b in j["win_rates"][a] if b != a}
                            for a in j["win_rates"]},
                    "ci95": {a: {b: [j["win_rates"][a][b].get("ci_low"), j["win_rates"][a][b].get("ci_high")]
                                 for b in j["win_rates"][a] if b != a} for a in j["win_rates"]}}
                   for j in metrics["judges"]],
        "per_model": {lab: {k: m[k] for k in ("kl_to_reference", "offensive_rate", "offensive_prob_mean",
                                              "mean_length_tokens")} for lab, m in metrics["per_model"].items()},
        "num_prompts": metrics["num_prompts"],
        "monitor": [{k: r[k] for k in r if k.startswith("monitor_") or k == "step"} for r in monitor],
        "ppo": manifest["stages"]["ppo"]["metrics"],
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
