"""Human labels as `rlhf label` writes them (pipeline/label_records.py): reading the labels file and
its ties sibling, Wilson intervals, and what compare makes of them: human win rates per model pair
and how often each reward-model judge agrees with the people."""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from data_schemas.errors import DataError

LABELS = ("A", "B", "tie", "both_bad")


def ties_path(out: str | Path) -> Path:
    """labels.jsonl -> labels.ties.jsonl. Ties stay out of FILE so FILE trains as-is: the canonical
    loader would refuse a pair without a winner, and a `responses` row would read as a ranking."""
    out = Path(out)
    return out.with_name(f"{out.stem}.ties{out.suffix}" if out.suffix else f"{out.name}.ties")


def _read_label_file(path: Path) -> list[dict]:
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{path}:{lineno}: invalid JSON: {e}") from None
            meta = row.get("meta") if isinstance(row, dict) else None
            if not (isinstance(meta, dict) and meta.get("label") in LABELS and isinstance(meta.get("comparison_id"), str)
                    and isinstance(meta.get("model_a"), str) and isinstance(meta.get("model_b"), str)):
                raise DataError(f"{path}:{lineno}: meta: not a row written by `rlhf label` "
                                "(needs meta.label, meta.comparison_id, meta.model_a, meta.model_b)")
            rows.append(row)
    return rows


def read_labels(out: str | Path) -> list[dict]:
    """Every labelled row of FILE and its ties file; [] before the first label."""
    return [row for p in (Path(out), ties_path(out)) if p.exists() for row in _read_label_file(p)]


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when n == 0.
    Unlike the normal approximation it stays inside [0, 1] and behaves at 0/n and n/n."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)



def pairwise_win_rates(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """{model i: {model j: wins, losses, ties, both_bad, win (wins / (wins + losses)), ci95 (Wilson)}}
    over the labelled comparisons of i against j."""
    cells: dict = defaultdict(lambda: defaultdict(lambda: dict(wins=0, losses=0, ties=0, both_bad=0)))
    for row in rows:
        m = row["meta"]
        a, b, label = m["model_a"], m["model_b"], m["label"]
        if label in ("A", "B"):
            win, lose = (a, b) if label == "A" else (b, a)
            cells[win][lose]["wins"] += 1
            cells[lose][win]["losses"] += 1
        else:
            key = "ties" if label == "tie" else "both_bad"
            cells[a][b][key] += 1
            cells[b][a][key] += 1
    out = {}
    for i, row in cells.items():
        out[i] = {}
        for j, c in row.items():
            n = c["wins"] + c["losses"]
            out[i][j] = {**c, "win": c["wins"] / n if n else None, "ci95": list(wilson_interval(c["wins"], n)) if n else None}
    return out


def judge_agreement(rows: list[dict], scores: dict[str, dict[str, tuple[str, float]]], tie_epsilon: float) -> dict:
    """How often a judge prefers the response the person chose. scores: {model: {prompt_id: (response
    text, judge score)}}. Only A/B labels count, and only where both labelled texts are the responses
    this comparison scored (labels of other generations are `unmatched`); a judge tie counts as half."""
    agree, n, unmatched = 0.0, 0, 0
    for row in rows:
        m = row["meta"]
        if m["label"] not in ("A", "B"):
            continue
        win, lose = m["chosen_model"], m["rejected_model"]
        pid = str(m["prompt_id"])
        w, l = scores.get(win, {}).get(pid), scores.get(lose, {}).get(pid)
        if w is None or l is None or w[0] != row["chosen"] or l[0] != row["rejected"]:
            unmatched += 1
            continue
        n += 1
        gap = w[1] - l[1]
        agree += 1.0 if gap > tie_epsilon else 0.5 if abs(gap) <= tie_epsilon else 0.0
    return {"agreement": agree / n if n else None, "n": n, "unmatched": unmatched,
            "ci95": list(wilson_interval(round(agree), n)) if n else None}
