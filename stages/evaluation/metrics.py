"""The comparison's metrics as pure functions on arrays and strings (no models), so each can be
tested against hand-computed values.

Conventions: `scores[m]` is a (N,) array of reward-model scores of model m's responses to the same
N prompts, in the same order; a pair of responses whose scores differ by at most `eps` is a tie.
A win rate counts a tie as half a win (as AlpacaEval and MT-Bench's pairwise judging do), so the
rates of i over j and of j over i add up to 1; the tie share is reported beside it.
"""
from __future__ import annotations

import math
import re

import numpy as np

OFFENSIVE_THRESHOLD = 0.5


# ---- win rates ----

def outcome_rates(diff: np.ndarray, eps: float) -> tuple[float, float, float]:
    """(win, tie, loss) fractions of a (N,) score difference d = score_i - score_j."""
    n = max(len(diff), 1)
    win = float(np.sum(diff > eps)) / n
    loss = float(np.sum(diff < -eps)) / n
    return win, float(np.sum(np.abs(diff) <= eps)) / n, loss  # counted, not 1 - win - loss (which leaves 5e-17)


def bootstrap_win_ci(diff: np.ndarray, eps: float, resample_idx: np.ndarray | None,
                     level: float = 0.95) -> tuple[float | None, float | None]:
    """Percentile interval of the win rate (ties half) when prompts are resampled with replacement.
    `resample_idx` is (B, N): the same resamples are used for every pair, so intervals are comparable."""
    if resample_idx is None or len(resample_idx) == 0 or len(diff) == 0:
        return None, None
    resampled = diff[resample_idx]
    wins = np.mean(resampled > eps, axis=1) + 0.5 * np.mean(np.abs(resampled) <= eps, axis=1)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(wins, [tail, 100 - tail])
    return float(lo), float(hi)


def win_rate_table(scores: dict[str, np.ndarray], eps: float, resample_idx: np.ndarray | None = None) -> dict:
    """{i: {j: {rate, win, tie, loss, ci_low, ci_high}}} for every ordered pair i != j: `rate` is the win
    rate (wins + ties/2) and [ci_low, ci_high] its interval; win/tie/loss are the plain fractions.
    By construction rate_ij + rate_ji = 1, win_ij + tie_ij + win_ji = 1 and tie_ij = tie_ji."""
    table: dict[str, dict] = {}
    for i in scores:
        table[i] = {}
        for j in scores:
            if i == j:
                continue
            d = np.asarray(scores[i], dtype=float) - np.asarray(scores[j], dtype=float)
            win, tie, loss = outcome_rates(d, eps)
            lo, hi = bootstrap_win_ci(d, eps, resample_idx)
            table[i][j] = {"rate": win + tie / 2, "win": win, "tie": tie, "loss": loss, "ci_low": lo, "ci_high": hi}
    return table


def resample_indices(n_prompts: int, n_resamples: int, seed: int, per_prompt: int = 1) -> np.ndarray | None:
    """Bootstrap row indices, (n_resamples, n_prompts * per_prompt). Rows come per_prompt to a prompt,
    consecutively; a resample draws prompts with replacement and takes all of each one's rows, because
    responses to one prompt are not independent (a cluster bootstrap)."""
    if n_resamples <= 0 or n_prompts == 0:
        return None
    picks = np.random.default_rng(seed).integers(0, n_prompts, size=(n_resamples, n_prompts))
    return (picks[:, :, None] * per_prompt + np.arange(per_prompt)).reshape(n_resamples, -1)


# ---- length control ----

def length_slope(scores: np.ndarray, lengths: np.ndarray) -> float:
    """Reward per response token, fitted by least squares *within prompts*.

    scores, lengths: (M, N) for M models on N prompts. Each prompt's mean score and mean length are
    subtracted first (a fixed effect per prompt), so the slope measures how much the RM pays for a
    longer answer to the same prompt, not how hard prompts differ. 0 when lengths never vary."""
    s = scores - scores.mean(axis=0, keepdims=True)
    l = lengths - lengths.mean(axis=0, keepdims=True)
    denom = float(np.sum(l * l))
    return float(np.sum(s * l)) / denom if denom > 0 else 0.0


def length_controlled_scores(scores: dict[str, np.ndarray], lengths: dict[str, np.ndarray]) -> tuple[dict, float]:
    """Scores with the length-explained part removed: s' = s - slope * length."""
    names = list(scores)
    slope = length_slope(np.stack([scores[m] for m in names]).astype(float),
                         np.stack([lengths[m] for m in names]).astype(float))
    return {m: np.asarray(scores[m], float) - slope * np.asarray(lengths[m], float) for m in names}, slope


# ---- diversity ----

_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def distinct_n(texts: list[str], n: int) -> float:
    """Unique n-grams / total n-grams over all of a model's responses (Li et al., 2016), on
    lower-cased words and punctuation, so it does not depend on any model's tokenizer."""
    grams = [tuple(w[i:i + n]) for w in map(words, texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


# ---- offensive language ----

def offensive_probs(texts: list[str]) -> list[float]:
    """P(offensive) from alt-profanity-check: a linear SVM over bag-of-words, trained on labelled
    offensive/profane text, fully offline. It flags insults and profanity, not subtler harms."""
    if not texts:
        return []
    from profanity_check import predict_prob

    return [float(p) for p in predict_prob(list(texts))]


def offensive_summary(probs: list[float], threshold: float = OFFENSIVE_THRESHOLD) -> dict:
    if not probs:
        return {"offensive_rate": None, "offensive_prob_mean": None}
    return {"offensive_rate": sum(p > threshold for p in probs) / len(probs),
            "offensive_prob_mean": sum(probs) / len(probs)}


# ---- small helpers ----

def mean(xs) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None
