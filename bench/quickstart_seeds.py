"""How much one run's result is one draw: PPO and compare rerun under several seeds, on the SFT model and
reward model of a finished run, and every seed checked against the quickstart's result targets (issue 17).

Each seed is an ordinary `rlhf run CONFIG --stages ppo,baseline,compare` under its own name (`<name>-seed<N>`, in
--out), pointed at the finished run's models through config overrides only: ppo.policy, ppo.reward_model
and ppo.value_init, compare's SFT model, judge and KL reference. The seed re-draws PPO's rollouts and every
model's eval answers, the prompted baseline's too.
A seed that is already done with the same settings is skipped, so an interrupted sweep resumes.

The targets, read from each seed's compare/metrics.json with the judge PPO optimised (a training metric):
PPO beats SFT >= 65% and the prompted baseline >= 60%, each with its 95% interval's lower bound above 50%;
KL to SFT <= 10 nats; PPO's offensive rate on the harmful prompts no higher than the baseline's. Other
judges (--judge) are reported beside it.

    python bench/quickstart_seeds.py --seeds 1-4                         # runs/quickstart's models
    python bench/quickstart_seeds.py --run runs/quickstart --seeds 1,5,9 --judge /path/to/other/rm/model
                                     [--config configs/quickstart.yaml] [--out runs/seeds] [--json F]
                                     [--set KEY=VALUE ...] [--keep-checkpoints]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"vs_sft": 0.65, "vs_baseline": 0.60, "kl": 10.0}


def parse_seeds(text: str) -> list[int]:
    """'1-4' -> [1, 2, 3, 4]; '1,5,9' -> [1, 5, 9]; ranges and single seeds mix ('0,3-5')."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            seeds.extend(range(int(lo), int(hi) + 1) if dash else [int(lo)])
        except ValueError:
            raise ValueError(f"--seeds: {part.strip()!r} is not a seed or a range like 1-4") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: {text!r} names no seed or a seed twice")
    return seeds


def seed_overrides(run: Path, seed: int, name: str, out: Path, judges: list[str]) -> list[str]:
    """The `rlhf run` overrides that make one seed's run: the finished run's SFT and RM everywhere."""
    sft, rm = run / "sft" / "model", run / "reward" / "model"
    return [f"name={name}-seed{seed}", f"seed={seed}", f"runs_root={out}",
            f"ppo.policy={sft}", f"ppo.reward_model={rm}", f"ppo.value_init={rm}",
            f"compare.models=[baseline,{sft},ppo]", f"compare.judges=[{','.join([str(rm), *judges])}]",
            f"compare.reference={sft}"]


def _pair(judge: dict, a: str, b: str) -> dict:
    w = judge["win_rates"][a][b]
    return {"rate": w["rate"], "ci": [w.get("ci_low"), w.get("ci_high")]}


def seed_result(metrics: dict) -> dict:
    """One seed's row from its compare/metrics.json: win rates by each judge, KL, offensive counts, and
    which targets the judge PPO optimised says are met. The models are [baseline, SFT, PPO] in order."""
    baseline, sft, ppo = metrics["models"]
    per = metrics["per_model"]
    harmful = metrics["num_harmful_prompts"] * metrics["samples_per_prompt"]
    judges = {j["name"]: {"optimised_by_ppo": j["optimised_by_ppo"], "vs_sft": _pair(j, ppo, sft),
                          "vs_baseline": _pair(j, ppo, baseline)} for j in metrics["judges"]}
    own_name = next((n for n, j in judges.items() if j["optimised_by_ppo"]), None)
    if own_name is None:
        raise ValueError("no judge in compare/metrics.json is the reward model PPO optimised")
    own = judges[own_name]
    offensive = {m: round(per[lab]["offensive_rate"] * harmful) for m, lab in
                 (("baseline", baseline), ("sft", sft), ("ppo", ppo))}
    kl = per[ppo]["kl_to_reference"]
    met = {"vs_sft": own["vs_sft"]["rate"] >= TARGETS["vs_sft"] and own["vs_sft"]["ci"][0] > 0.5,
           "vs_baseline": own["vs_baseline"]["rate"] >= TARGETS["vs_baseline"] and own["vs_baseline"]["ci"][0] > 0.5,
           "kl": kl <= TARGETS["kl"],
           "offensive": offensive["ppo"] <= offensive["baseline"]}
    return {"seed": metrics["seed"], "judges": judges, "own_judge": own_name, "kl": kl, "offensive": offensive,
            "harmful_answers": harmful,
            "met": met, "all_met": all(met.values())}


def summary(rows: list[dict]) -> dict:
    """Across seeds: how many meet each target and all of them, and the mean win rates and KL."""
    own = [r["judges"][r["own_judge"]] for r in rows]
    return {"seeds": len(rows), "all_met": sum(r["all_met"] for r in rows),
            "met": {t: sum(r["met"][t] for r in rows) for t in ("vs_sft", "vs_baseline", "kl", "offensive")},
            "mean_vs_sft": statistics.mean(j["vs_sft"]["rate"] for j in own),
            "mean_vs_baseline": statistics.mean(j["vs_baseline"]["rate"] for j in own),
            "mean_kl": statistics.mean(r["kl"] for r in rows)}


def _pct(p: dict) -> str:
    return f"{100 * p['rate']:.1f}% [{100 * p['ci'][0]:.1f}, {100 * p['ci'][1]:.1f}]"


def table(rows: list[dict], agg: dict) -> str:
    """Markdown: one row per seed (the judge PPO optimised, then any other judge), and the summary."""
    others = [n for n, j in rows[0]["judges"].items() if not j["optimised_by_ppo"]]
    head = ["seed", "PPO vs SFT (own RM)", "PPO vs baseline (own RM)", *[f"vs SFT / baseline ({n})" for n in others],
            "KL", "offensive b / s / p", "all targets"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        own, o = r["judges"][r["own_judge"]], r["offensive"]
        cells = [str(r["seed"]), _pct(own["vs_sft"]), _pct(own["vs_baseline"]),
                 *[f"{100 * r['judges'][n]['vs_sft']['rate']:.1f}% / {100 * r['judges'][n]['vs_baseline']['rate']:.1f}%"
                   for n in others],
                 f"{r['kl']:.2f}", f"{o['baseline']} / {o['sft']} / {o['ppo']} (of {r['harmful_answers']})",
                 "met" if r["all_met"] else "missed: " + ", ".join(t for t, ok in r["met"].items() if not ok)]
        lines.append("| " + " | ".join(cells) + " |")
    m = agg["met"]
    lines.append(f"\n{agg['all_met']} of {agg['seeds']} seeds meet every target. Per target: vs SFT {m['vs_sft']}, "
                 f"vs the baseline {m['vs_baseline']}, KL {m['kl']}, offensive rate {m['offensive']}. Means by the "
                 f"own RM (a training metric): PPO vs SFT {100 * agg['mean_vs_sft']:.1f}%, vs the baseline "
                 f"{100 * agg['mean_vs_baseline']:.1f}%; KL {agg['mean_kl']:.2f}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", required=True, help="e.g. 1-4, or 1,5,9")
    ap.add_argument("--run", default=str(REPO / "runs" / "quickstart"), help="a run folder whose sft and reward "
                    "stages are done (default runs/quickstart, what `make demo` writes)")
    ap.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"), help="the run's config")
    ap.add_argument("--judge", action="append", default=[], help="another reward model folder to judge with "
                    "(repeatable); PPO never sees it")
    ap.add_argument("--out", default=str(REPO / "runs" / "seeds"), help="where the seeds' run folders go")
    ap.add_argument("--json", default=None, help="also write every seed's row and the summary here")
    ap.add_argument("--set", action="append", default=[], help="another override for every seed's run (KEY=VALUE)")
    ap.add_argument("--keep-checkpoints", action="store_true", help="keep each seed's ppo/checkpoints (~3 GB "
                    "each for SmolLM2); by default they are removed once the seed is done")
    args = ap.parse_args(argv)
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run, out = Path(args.run).resolve(), Path(args.out).resolve()
    for part in ("sft", "reward"):
        if not (run / part / "model" / "config.json").is_file():
            print(f"error: {run / part / 'model'}: no finished {part} model (run `rlhf run {args.config} --stages "
                  f"sft,reward` first, or pass --run)", file=sys.stderr)
            return 2
    for j in args.judge:
        if not (Path(j) / "config.json").is_file():
            print(f"error: --judge {j}: not a model folder (no config.json)", file=sys.stderr)
            return 2
    import yaml

    name = yaml.safe_load(Path(args.config).read_text()).get("name", "run")
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    rows = []
    for i, seed in enumerate(seeds, 1):
        log = out / f"{name}-seed{seed}.log"
        print(f"[{i}/{len(seeds)}] seed {seed}: ppo, baseline, compare (log {log})", flush=True)
        t0 = time.time()
        cmd = [sys.executable, "-m", "pipeline.cli", "run", args.config, "--stages", "ppo,baseline,compare",
               *seed_overrides(run, seed, name, out, [str(Path(j).resolve()) for j in args.judge]), *args.set]
        with open(log, "w") as fh:
            rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
        if rc:
            print(f"error: seed {seed} failed (exit {rc}); see {log}", file=sys.stderr)
            return 1
        seed_dir = out / f"{name}-seed{seed}"
        if not args.keep_checkpoints:
            shutil.rmtree(seed_dir / "ppo" / "checkpoints", ignore_errors=True)
        row = seed_result(json.loads((seed_dir / "compare" / "metrics.json").read_text()))
        rows.append(row)
        print(f"    {time.time() - t0:.0f} s; " + ("every target met" if row["all_met"] else "missed: " + ", ".join(
            t for t, ok in row["met"].items() if not ok)), flush=True)
    agg = summary(rows)
    print(table(rows, agg))
    if args.json:
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps({"run": str(run), "config": args.config, "rows": rows, "summary": agg}, indent=1))
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
