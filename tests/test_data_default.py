"""The dataset shipped in the package: counts, validity, a consistent preference signal, and the
`rlhf data` commands run on it."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from data_schemas.loaders import load_demonstrations, load_preferences, load_prompts
from data_schemas.records import PreferencePair, Ranking, to_canonical
from data_schemas.sources import DEFAULT_DIR
from data_schemas.spec import DatasetSpec

REPO = Path(__file__).resolve().parents[1]


def _default(name: str) -> DatasetSpec:
    return DatasetSpec(source=f"default:{name}")


def test_default_counts():
    demos = load_demonstrations(_default("demonstrations"))
    prefs = load_preferences(_default("preferences"))
    prompts = load_prompts(_default("prompts"))
    evals = load_prompts(_default("eval_prompts"))
    rankings = [r for r in prefs if isinstance(r, Ranking)]
    pairs = [r for r in prefs if isinstance(r, PreferencePair)]
    assert len(demos) == 208
    assert (len(pairs), len(rankings)) == (356, 30)
    assert all(len(r.responses) == 4 for r in rankings)
    assert len(prompts) == 100 and len(evals) == 60
    assert sum("harmful" in p.tags for p in evals) == 24
    assert sum("harmful" in p.tags for p in prompts) == 30


def test_default_prompts_are_disjoint_and_short():
    prompts = load_prompts(_default("prompts"))
    evals = load_prompts(_default("eval_prompts"))
    train = {r.prompt[-1].content for r in load_preferences(_default("preferences"))}
    train |= {d.messages[-2].content for d in load_demonstrations(_default("demonstrations"))}
    ppo = {p.messages[-1].content for p in prompts}
    ev = {p.messages[-1].content for p in evals}
    assert not ev & (ppo | train), "eval prompts must be held out"
    assert not ppo & train
    assert len({p.id for p in prompts + evals}) == 160


def test_no_training_prompt_nearly_repeats_an_eval_prompt():
    """Eval prompts are held out in substance, not only in spelling: no training or PPO prompt shares 70%
    or more of its content words with one. An exact-match check lets 'How can I avoid X?' and 'How do
    I avoid X?' through; this one does not, though a paraphrase in other words still passes."""
    import re

    stop = {"a", "an", "the", "to", "my", "i", "me", "how", "do", "is", "can", "of", "for", "and", "it", "what",
            "in", "that", "so", "be", "at", "on", "you", "are", "if", "with", "why", "s", "t", "your", "about"}

    def words(text: str) -> set[str]:
        return set(re.findall(r"[a-z0-9]+", text.lower())) - stop

    seen = {r.prompt[-1].content for r in load_preferences(_default("preferences"))}
    seen |= {d.messages[-2].content for d in load_demonstrations(_default("demonstrations"))}
    seen |= {p.messages[-1].content for p in load_prompts(_default("prompts"))}
    for p in load_prompts(_default("eval_prompts")):
        e = words(p.messages[-1].content)
        near = [t for t in seen if len(e & words(t)) >= 0.7 * len(e | words(t))]
        assert not near, f"eval prompt {p.id} nearly repeats {near}"


def test_default_preference_signal_is_consistent():
    """No reply is preferred in one pair and rejected in another, so the reward model sees one signal."""
    pairs = [r for r in load_preferences(_default("preferences")) if isinstance(r, PreferencePair)]
    chosen = {p.chosen for p in pairs}
    rejected = {p.rejected for p in pairs}
    assert not chosen & rejected
    assert len({json.dumps(to_canonical(p)) for p in pairs}) == len(pairs), "no duplicate pairs"
    # Replies stay short (CPU training speed): every text well under ~120 tokens.
    words = [len(t.split()) for p in pairs for t in (p.chosen, p.rejected, p.prompt[-1].content)]
    assert max(words) < 60


def _builder():
    """build_default.py as a module, with the text blocks it imports (BENIGN, HARMFUL, ...)."""
    spec = importlib.util.spec_from_file_location("build_default", DEFAULT_DIR / "build_default.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_declines_lose_only_on_benign_requests():
    """A polite decline is rejected only where the request was benign, and every harmful request's
    refusal is chosen: otherwise the RM would learn to penalise refusing harmful requests."""
    builder = _builder()
    benign = {q for q, _good, _wrong in builder.BENIGN}
    harmful = {q: refusal for q, refusal, _bad, _tags in builder.HARMFUL + builder.HARMFUL_MORE}
    declined = set()
    for r in load_preferences(_default("preferences")):
        question = r.prompt[-1].content
        replies = [r.chosen, r.rejected] if isinstance(r, PreferencePair) else list(r.responses)
        for rank, reply in enumerate(replies):
            if reply in builder.UNNEEDED_REFUSAL:
                assert question in benign and rank > 0, f"a decline wins or meets a harmful request: {question!r}"
                declined.add(question)
        if question in harmful:
            assert replies[0] == harmful[question], f"the refusal must be chosen for {question!r}"
    assert len(declined) == 50


def test_shipped_files_match_the_generator():
    import random

    for name, rows in _builder().build(random.Random(0)).items():
        shipped = [json.loads(line) for line in (DEFAULT_DIR / f"{name}.jsonl").read_text().splitlines()]
        assert shipped == rows, f"{name}.jsonl is stale: run python data_schemas/default/build_default.py"


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "data", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)


def test_cli_validate_all_four_defaults():
    expected = {"demonstrations": "208 demonstrations from 208 rows",
                "preferences": "356 preference pairs, 30 rankings from 386 rows",
                "prompts": "100 prompts from 100 rows", "eval_prompts": "60 prompts from 60 rows"}
    for name, counts in expected.items():
        proc = _cli("validate", f"default:{name}")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == f"default:{name}: ok: {counts}"


def test_cli_stats_preview_convert(tmp_path):
    proc = _cli("stats", "default:preferences")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "records: 356 preference pairs, 30 rankings" in out
    assert "K=2: 356, K=4: 30; pairwise comparisons in all: 536" in out
    assert "prompt length (" in out and "duplicates: 0 identical records" in out

    proc = _cli("preview", "default:eval_prompts", "-n", "2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("--- prompts record") == 2 and '"id": "eval-001"' in proc.stdout

    out_file = tmp_path / "prefs.jsonl"
    proc = _cli("convert", "tests/data/bad/bad_label.csv", str(out_file), "--format", "ab_label",
                "--field", "prompt=question", "--skip-invalid")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote 1 records (preferences, canonical) to {out_file}"
    assert json.loads(out_file.read_text()) == {
        "prompt": [{"role": "user", "content": "How do I boil an egg?"}],
        "chosen": "Simmer it for ten minutes.", "rejected": "Figure it out."}
    (pair,) = load_preferences(DatasetSpec(source=str(out_file)))
    assert pair.chosen == "Simmer it for ten minutes."

    proc = _cli("convert", "default:prompts", str(tmp_path / "out.csv"))
    assert proc.returncode == 2 and proc.stderr.strip().endswith("the output must be a .jsonl file")
