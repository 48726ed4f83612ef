"""The records of labelling: each model's responses, the A/B comparisons built from them, the labels
file a person's choices are appended to, and the human win rates they give. The `rlhf label`
command is pipeline/label.py; the page and its HTTP API are pipeline/label_server.py.

The comparison order and the left/right sides are fixed by a seed, and each choice is appended
with one write + fsync, so killing the server loses nothing and a restart resumes at the first
comparison without a label in the file.
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from data_schemas.errors import DataError
from data_schemas.files import append_jsonl
from stages.evaluation.human_labels import (LABELS, pairwise_win_rates, read_labels, ties_path,  # noqa: F401
                                            wilson_interval)  # (LABELS, read_labels, ties_path: re-exported)



# ---- comparisons ----

@dataclass(frozen=True)
class Generation:
    """One model's response to one prompt. prompt: chat messages [{"role", "content"}], ending in a user turn."""

    prompt_id: str
    prompt: list[dict]
    model: str
    response: str


@dataclass(frozen=True)
class Comparison:
    """Two models' responses to the same prompt, already placed on sides A (left) and B (right)."""

    id: str
    prompt_id: str
    prompt: list[dict]
    model_a: str
    response_a: str
    model_b: str
    response_b: str


def _check_messages(value, where: str, key: str = "prompt") -> list[dict]:
    if isinstance(value, str):  # a bare prompt string is one user turn
        value = [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {key}: expected a non-empty list of messages or a string")
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: {key}[{i}]: expected {{\"role\": system|user|assistant, \"content\": str}}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def load_generations(path: str | Path, model: str | None = None) -> list[Generation]:
    """Rows {"prompt_id"|"id", "prompt"|"messages", "response", "model"?}: the compare stage's
    generations/<model>.jsonl (id, messages) or a generic file (prompt_id, prompt). `model`, else
    the row's, else the file stem names who wrote them."""
    from data_schemas.sources import read_rows

    path = Path(path)
    out = []
    for where, row in read_rows(str(path)):
        if not isinstance(row, dict):  # the reader hands back a bad line's reason in its place
            raise DataError(f"{where}: {row}")
        pid_key = "prompt_id" if "prompt_id" in row else "id"
        prompt_key = "prompt" if "prompt" in row else "messages"
        for key in (pid_key, prompt_key, "response"):
            if key not in row:
                raise DataError(f"{where}: {key}: missing")
        if not isinstance(row["response"], str):
            raise DataError(f"{where}: response: expected a string")
        if not isinstance(row[pid_key], (str, int)) or isinstance(row[pid_key], bool) or not str(row[pid_key]).strip():
            raise DataError(f"{where}: {pid_key}: expected a non-empty string or integer")
        name = model or row.get("model") or path.name.split(".")[0]
        if not isinstance(name, str) or not name:
            raise DataError(f"{where}: model: expected a non-empty string")
        out.append(Generation(str(row[pid_key]), _check_messages(row[prompt_key], where, prompt_key), name, row["response"]))
    return out


def load_run_generations(run_dir: str | Path) -> list[Generation]:
    """The compare stage's saved generations: RUN/compare/generations/<model>.jsonl."""
    folder = Path(run_dir) / "compare" / "generations"
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise DataError(f"{folder}: no saved generations (*.jsonl); run `rlhf compare` first, or pass --generations")
    return [g for f in files for g in load_generations(f, model=f.stem)]


def comparison_id(prompt_id: str, a: Generation, b: Generation) -> str:
    """Stable across restarts and independent of side order; it changes if either response changes,
    so a label never attaches to text the person did not see."""
    first, second = sorted([a, b], key=lambda g: g.model)
    key = json.dumps([prompt_id, first.model, first.response, second.model, second.response])
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def plan_comparisons(generations: list[Generation], seed: int = 0, models: list[str] | None = None,
                      limit: int | None = None) -> list[Comparison]:
    """Every pair of models on every prompt, in a seeded order with seeded sides.

    A pair whose two responses are the same text is dropped: it carries no preference.
    """
    by_prompt: dict[str, dict[str, Generation]] = defaultdict(dict)
    for g in generations:
        if models is None or g.model in models:
            by_prompt[g.prompt_id].setdefault(g.model, g)  # first response per (prompt, model) wins
    found = sorted({m for gens in by_prompt.values() for m in gens})
    if models is not None and (missing := sorted(set(models) - set(found))):
        raise DataError(f"--models: no generations for {', '.join(missing)} (found: {', '.join(found) or 'none'})")
    if len(found) < 2:
        raise DataError(f"need responses from at least 2 models to compare, found {len(found)}: {', '.join(found)}")
    comps = []
    for pid in sorted(by_prompt):
        gens = by_prompt[pid]
        for m1, m2 in combinations(sorted(gens), 2):
            a, b = gens[m1], gens[m2]
            if a.response.strip() == b.response.strip():
                continue
            cid = comparison_id(pid, a, b)
            if random.Random(f"{seed}:{cid}").random() < 0.5:  # per-comparison coin: same sides after a restart
                a, b = b, a
            comps.append(Comparison(cid, pid, a.prompt, a.model, a.response, b.model, b.response))
    comps.sort(key=lambda c: c.id)
    random.Random(seed).shuffle(comps)
    return comps[:limit] if limit else comps


# ---- storage: FILE holds pairs with a winner; ties and both-bad go to FILE's `.ties` sibling ----

def label_record(comp: Comparison, label: str, note: str = "", now: float | None = None) -> dict:
    """One labelled comparison. A or B: a canonical preference pair (chosen = the winner) plus
    `meta`, which the preference loader ignores. tie / both_bad: both texts, no chosen/rejected."""
    meta = {"comparison_id": comp.id, "prompt_id": comp.prompt_id, "label": label,
            "model_a": comp.model_a, "model_b": comp.model_b, "chosen_model": None, "rejected_model": None,
            "note": note, "time": round(time.time() if now is None else now, 3)}
    row: dict = {"prompt": comp.prompt}
    if label in ("A", "B"):
        win, lose = ("a", "b") if label == "A" else ("b", "a")
        row.update(chosen=getattr(comp, f"response_{win}"), rejected=getattr(comp, f"response_{lose}"), margin=None)
        meta.update(chosen_model=getattr(comp, f"model_{win}"), rejected_model=getattr(comp, f"model_{lose}"))
    else:
        row.update(response_a=comp.response_a, response_b=comp.response_b)
    row["meta"] = meta
    return row


def save_label(out: str | Path, row: dict) -> None:
    """One append of one whole line + fsync: a killed server leaves every earlier choice intact."""
    append_jsonl(out if row["meta"]["label"] in ("A", "B") else ties_path(out), row)


# ---- summary ----

def win_rates(rows: list[dict]) -> dict[str, dict]:
    """Per model: wins, losses, ties, both_bad over every comparison it was in, and the win rate
    wins / (wins + losses) with a Wilson 95% CI. Ties and both-bad are counted, not rated."""
    # a model's counts are the sums of its cells against each opponent
    stats = {model: {k: sum(cell[k] for cell in against.values()) for k in ("wins", "losses", "ties", "both_bad")}
             for model, against in pairwise_win_rates(rows).items()}
    for s in stats.values():
        n = s["wins"] + s["losses"]
        s["comparisons"] = n + s["ties"] + s["both_bad"]
        s["win_rate"] = s["wins"] / n if n else None
        s["ci95"] = list(wilson_interval(s["wins"], n)) if n else None
    return dict(sorted(stats.items(), key=lambda kv: -(kv[1]["win_rate"] or 0)))


def format_summary(path: str | Path, stats: dict[str, dict]) -> str:
    total = sum(s["comparisons"] for s in stats.values()) // 2
    lines = [f"{path}: {total} labelled comparisons",
             f"{'model':<24} {'win rate':>8}  {'95% CI (Wilson)':<16} {'wins':>5} {'losses':>6} {'ties':>5} {'both bad':>8}"]
    for name, s in stats.items():
        rate = f"{s['win_rate']:.1%}" if s["win_rate"] is not None else "-"
        ci = f"[{s['ci95'][0]:.1%}, {s['ci95'][1]:.1%}]" if s["ci95"] else "-"
        lines.append(f"{name:<24} {rate:>8}  {ci:<16} {s['wins']:>5} {s['losses']:>6} {s['ties']:>5} {s['both_bad']:>8}")
    lines.append("win rate = wins / (wins + losses); ties and both-bad are not in the rate")
    return "\n".join(lines)
