"""Does bf16 cost quality? The quickstart's SFT and reward stages under fp32 and under bf16, same
seed and data: SFT eval loss and the RM's held-out pairwise accuracy side by side, with wall times.

    .venv/bin/python bench/precision_parity.py [--runs-root runs] [--json out.json]

Acceptance (issue "Use the whole machine"): bf16 RM accuracy within 2 points and SFT eval loss
within 2% of fp32. Runs through `rlhf run`, so each stage uses the launcher's thread count; a run
folder that already holds a finished stage is reused (the orchestrator skips it).

The quickstart's held-out split has 38 pairs, so one pair is 2.6 points. Where ../shared/data is
beside the repo, both RMs are also scored on the first --hh-pairs Anthropic HH-RLHF harmless-base
pairs (--hh), which neither saw, alike (bf16 scoring, 256 tokens): a larger sample to tell noise from
a loss. (Scoring precision itself moves nothing here: each RM's split accuracy is the same scored in
fp32 or in bf16.)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_side(precision: str, runs_root: str) -> dict:
    name = f"parity_{precision}"
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "configs/quickstart.yaml", "--stages", "sft,reward",
           f"name={name}", f"runs_root={runs_root}", f"precision={precision}"]
    subprocess.run(cmd, cwd=REPO, check=True)
    run_dir = Path(runs_root) if Path(runs_root).is_absolute() else REPO / runs_root
    sft = json.loads((run_dir / name / "sft" / "summary.json").read_text())
    rm = json.loads((run_dir / name / "reward" / "summary.json").read_text())
    return {"precision": precision, "threads": sft["threads"], "sft_eval_loss": sft["eval_loss"],
            "sft_wall_s": sft["wall_s"], "rm_eval_accuracy": rm["eval_accuracy"], "rm_wall_s": rm["wall_s"]}


def pairwise_accuracy(model_dir: Path, source: str, pairs: int, batch_size: int = 16) -> dict:
    """The RM's accuracy on the first `pairs` pairs of an HH-format preference file, scored as the
    reward stage scores (padding-free rows), under bf16 autocast."""
    import torch

    from data_schemas.loaders import load_preferences
    from data_schemas.spec import DatasetSpec
    from stages.core.runtime import autocast
    from stages.modeling.loading import load_reward_model, load_tokenizer
    from stages.reward import collate_groups, preference_groups, score
    from stages.rl.preference_loss import pair_gaps

    tok = load_tokenizer(str(model_dir))
    tok.padding_side = "right"
    groups, _ = preference_groups(tok, load_preferences(DatasetSpec(source=source, format="hh", limit=pairs)), 256)
    model = load_reward_model(str(model_dir), "fp32", pad_token_id=tok.pad_token_id).eval()
    gaps = []
    with torch.no_grad(), autocast("bf16", "cpu"):
        for i in range(0, len(groups), batch_size):
            b = collate_groups(groups[i:i + batch_size], tok.pad_token_id, padding_free=True)
            gaps.extend(pair_gaps(score(model, b), b.tensors["comps"]).tolist())
    wins = sum(g > 0 for g in gaps)
    return {"pairs": len(gaps), "accuracy": wins / len(gaps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs-root", default="runs")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--hh", default=str(REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"),
                    help="an HH-format preference file both RMs are also scored on (skipped if absent)")
    ap.add_argument("--hh-pairs", type=int, default=500, help="how many of its pairs (from the top)")
    args = ap.parse_args()
    rows = [run_side(p, args.runs_root) for p in ("fp32", "bf16")]
    fp32, bf16 = rows
    if Path(args.hh).exists():
        runs = Path(args.runs_root) if Path(args.runs_root).is_absolute() else REPO / args.runs_root
        for r in rows:
            hh = pairwise_accuracy(runs / f"parity_{r['precision']}" / "reward" / "model", args.hh, args.hh_pairs)
            r["hh_pairs"], r["rm_hh_accuracy"] = hh["pairs"], hh["accuracy"]
    verdict = {
        "rm_accuracy_gap_points": round(100 * (bf16["rm_eval_accuracy"] - fp32["rm_eval_accuracy"]), 2),
        "sft_eval_loss_gap_pct": round(100 * (bf16["sft_eval_loss"] / fp32["sft_eval_loss"] - 1), 2),
        "rm_hh_accuracy_gap_points": (round(100 * (bf16["rm_hh_accuracy"] - fp32["rm_hh_accuracy"]), 2)
                                      if "rm_hh_accuracy" in bf16 else None),
        "sft_speedup": round(fp32["sft_wall_s"] / bf16["sft_wall_s"], 2),
        "rm_speedup": round(fp32["rm_wall_s"] / bf16["rm_wall_s"], 2),
    }
    print(f"{'precision':9s} {'threads':>7s} {'SFT eval loss':>13s} {'SFT s':>7s} {'RM acc':>7s} {'RM s':>7s} "
          f"{'RM acc on HH':>12s}")
    for r in rows:
        hh = f"{100 * r['rm_hh_accuracy']:11.1f}%" if "rm_hh_accuracy" in r else f"{'n/a':>12s}"
        print(f"{r['precision']:9s} {r['threads']:7d} {r['sft_eval_loss']:13.4f} {r['sft_wall_s']:7.1f} "
              f"{100 * r['rm_eval_accuracy']:6.1f}% {r['rm_wall_s']:7.1f} {hh}")
    print(json.dumps(verdict))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, **verdict}, indent=2))


if __name__ == "__main__":
    main()
