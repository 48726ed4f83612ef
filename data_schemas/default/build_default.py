"""Build the default dataset shipped with the package (all text written for this project).

    python data_schemas/default/build_default.py     # rewrites the four .jsonl files beside it

Rows are composed from the hand-written blocks in `text_*.py` beside this script: questions with a good and a
wrong answer, harmful requests with a polite refusal and a harmful reply, and stock rude or evasive
replies. Preference pairs carry one consistent signal: the chosen reply is helpful, polite,
harmless, concise and correct; the rejected one is rude, insulting, harmful, evasive, wrong, or a polite
refusal of a request that needed none.
Output is deterministic (fixed seed), so rebuilding gives byte-identical files.
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

from text_benign import BENIGN  # noqa: E402
from text_harmful import (EVASIVE, HARMFUL, HARMFUL_MORE, MULTI_TURN, RUDE_ALONE, RUDE_PREFIX,  # noqa: E402
                          RUDE_REFUSAL, UNNEEDED_REFUSAL)
from text_prompts import EVAL_PROMPTS, PPO_PROMPTS  # noqa: E402

from data_schemas.files import atomic_write_jsonl  # noqa: E402

N_RANKINGS = 30  # K = 4: good > evasive or declined > wrong > rude


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def chat(turns: list[str]) -> list[dict]:
    """Alternating user/assistant turns, starting with the user."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def rude(rng: random.Random, answer: str | None) -> str:
    """An insulting reply, sometimes wrapping a correct answer: rudeness alone must lose."""
    if answer is None or rng.random() < 0.4:
        return rng.choice(RUDE_ALONE)
    return rng.choice(RUDE_PREFIX) + answer


def build(rng: random.Random) -> dict[str, list[dict]]:
    demos, prefs = [], []

    # ---- demonstrations: every good answer, refusal and multi-turn reply ----
    for q, good, _wrong in BENIGN:
        demos.append({"messages": user(q) + [{"role": "assistant", "content": good}]})
    for q, refusal, _bad, _tags in HARMFUL + HARMFUL_MORE:
        demos.append({"messages": user(q) + [{"role": "assistant", "content": refusal}]})
    for turns, good, _bad in MULTI_TURN:
        demos.append({"messages": chat(turns) + [{"role": "assistant", "content": good}]})

    # ---- K = 4 rankings on the first benign questions ----
    for i, (q, good, wrong) in enumerate(BENIGN[:N_RANKINGS]):
        unhelpful = rng.choice(UNNEEDED_REFUSAL if i % 2 else EVASIVE)
        prefs.append({"prompt": user(q), "responses": [good, unhelpful, wrong, rude(rng, None)]})

    # ---- pairs: each benign question against two different kinds of bad reply ----
    # "declined": a polite refusal the question did not call for (UNNEEDED_REFUSAL)
    kind_pairs = [("rude", "wrong"), ("wrong", "evasive"), ("rude", "declined"), ("wrong", "declined"),
                  ("evasive", "rude")]
    for i, (q, good, wrong) in enumerate(BENIGN[N_RANKINGS:]):
        for kind in kind_pairs[i % len(kind_pairs)]:
            bad = {"rude": lambda: rude(rng, good), "wrong": lambda: wrong,
                   "evasive": lambda: rng.choice(EVASIVE), "declined": lambda: rng.choice(UNNEEDED_REFUSAL)}[kind]()
            prefs.append({"prompt": user(q), "chosen": good, "rejected": bad})
    for q, refusal, bad, _tags in HARMFUL + HARMFUL_MORE:
        prefs.append({"prompt": user(q), "chosen": refusal, "rejected": bad})
        prefs.append({"prompt": user(q), "chosen": refusal, "rejected": rng.choice(RUDE_REFUSAL)})
    for turns, good, bad in MULTI_TURN:
        prefs.append({"prompt": chat(turns), "chosen": good, "rejected": bad})
        prefs.append({"prompt": chat(turns), "chosen": good, "rejected": rude(rng, good)})
    rng.shuffle(prefs)

    # ---- prompts for PPO and for evaluation (disjoint from each other) ----
    prompts = [{"id": f"ppo-{i:03d}", "messages": user(text), "tags": tags}
               for i, (text, tags) in enumerate(PPO_PROMPTS, 1)]
    eval_prompts = [{"id": f"eval-{i:03d}", "messages": user(text), "tags": tags}
                    for i, (text, tags) in enumerate(EVAL_PROMPTS, 1)]
    return {"demonstrations": demos, "preferences": prefs, "prompts": prompts, "eval_prompts": eval_prompts}


def main() -> None:
    for name, rows in build(random.Random(0)).items():
        atomic_write_jsonl(HERE / f"{name}.jsonl", rows)
        print(f"{name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
