"""Programmatic (verifiable) rewards for PPO, used instead of a reward model with
`ppo.reward_fn: "module:function"`.

A reward function takes the prompts and the decoded responses (special tokens removed) and returns
one float per response:

    def my_reward(prompts: list[str], responses: list[str]) -> list[float]: ...

They make PPO testable without a learned RM: the reward is known exactly, so a rising curve means
the optimiser works, not that the RM was fooled.
"""
from __future__ import annotations

import importlib
import math
import re

# Words a helpful reply tends to use; the target set of `target_word_fraction`.
TARGET_WORDS = frozenset({"yes", "sure", "thanks", "thank", "you", "happy", "help", "glad", "great", "please"})
_WORD = re.compile(r"[a-z']+")


def negative_length(prompts: list[str], responses: list[str]) -> list[float]:
    """Minus the response length in units of 100 characters: shorter is better (EOS early)."""
    return [-len(r) / 100.0 for r in responses]


def target_word_fraction(prompts: list[str], responses: list[str]) -> list[float]:
    """Share of the response's words that are in TARGET_WORDS (0 for an empty response)."""
    out = []
    for r in responses:
        words = _WORD.findall(r.lower())
        out.append(sum(w in TARGET_WORDS for w in words) / len(words) if words else 0.0)
    return out


def load_reward_fn(spec: str):
    """'module:function' -> the callable. Raises ValueError with a one-line reason."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward_fn {spec!r} must look like 'module:function', e.g. 'stages.rl.reward_functions:negative_length'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward_fn {spec!r}: cannot import {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward_fn {spec!r}: {module_name} has no function {attr!r}")
    return fn


def call_reward_fn(fn, prompts: list[str], responses: list[str]) -> list[float]:
    """Call a reward function and check what it gave back: one finite number per response."""
    scores = list(fn(prompts, responses))
    if len(scores) != len(responses):
        raise ValueError(f"reward_fn returned {len(scores)} scores for {len(responses)} responses")
    out = [float(s) for s in scores]
    if not all(math.isfinite(s) for s in out):
        raise ValueError("reward_fn returned a non-finite score")
    return out
