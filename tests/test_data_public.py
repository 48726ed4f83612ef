"""Real public files, read with the documented config alone (`source` + `format`).

The files live in ../shared/data beside the repo (see its README); these tests skip without them.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from data_schemas.loaders import load_demonstrations, load_preferences, load_prompts
from data_schemas.records import PreferencePair
from data_schemas.spec import DatasetSpec

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HH = SHARED / "hh-rlhf" / "harmless-base-test.jsonl.gz"
SEED = SHARED / "alpaca-seed" / "seed_tasks.jsonl"


def _need(path: Path) -> str:
    if not path.exists():
        pytest.skip(f"{path} not present (public test data lives in ../shared/data)")
    return str(path)


def test_hh_harmless_base_all_pairs():
    prefs = load_preferences(DatasetSpec(source=_need(HH), format="hh"))
    assert len(prefs) == 1800
    assert all(isinstance(p, PreferencePair) for p in prefs)

    first = prefs[0]
    assert [m.role for m in first.prompt] == ["user", "assistant", "user", "assistant", "user"]
    assert first.prompt[0].content == "what are some pranks with a pen i can do?"
    assert first.prompt[2].content == "yep"
    assert first.prompt[-1].content == "okay some of these do not have anything to do with pens"
    assert first.chosen == ("No, sorry!  All of these involve a pen, the point is that you can get funny "
                            "results by doing pranks with pens.")
    assert first.rejected.startswith("There are lots of funny things you can do with pens, here\u2019s one example")

    last = prefs[-1]
    assert last.chosen == "Well, I\u2019m trying to consider all the different factors and effects."
    assert last.prompt[-1].content == "So you won't say that child marriage is wrong?  That's pretty messed up."

    # Line 87: the preferred answer is silence; it is kept as an empty reply, not dropped.
    assert prefs[86].chosen == "" and prefs[86].rejected == "Sure, the address is ..."
    # Line 1255 repeats `Assistant:`; consecutive turns merge so both sides share the prompt.
    assert [m.content for m in prefs[1254].prompt] == [
        "Are drag queens men?", "No. Drag queens are women who act like stereotypical men.", "Isn't that drag kings?"]
    assert prefs[1254].rejected.startswith("A drag king is the opposite of a drag queen")
    # No prompt ends with anything but the human turn, no reply leaks a turn marker.
    assert all(p.prompt[-1].role == "user" for p in prefs)
    assert not any("\n\nHuman:" in p.chosen or "\n\nAssistant:" in p.rejected for p in prefs)


def test_hh_as_prompts_and_demonstrations():
    prompts = load_prompts(DatasetSpec(source=_need(HH), format="hh"))
    assert len(prompts) == 1800
    assert prompts[0].id == "harmless-base-test-1"
    assert prompts[0].messages[-1].content == "okay some of these do not have anything to do with pens"
    # Four chosen transcripts end in an empty reply: not a demonstration; skip_invalid reports them.
    spec = DatasetSpec(source=str(HH), format="hh", skip_invalid=True)
    demos = load_demonstrations(spec)
    assert len(demos) == 1796
    assert demos[0].response.startswith("No, sorry!")


def test_alpaca_seed_tasks():
    demos = load_demonstrations(DatasetSpec(source=_need(SEED), format="alpaca"))
    assert len(demos) == 175
    assert demos[0].messages[0].content == ("Is there anything I can eat for a breakfast that doesn't include eggs, "
                                            "yet includes protein, and has roughly 700-1000 calories?")
    assert demos[0].response.startswith("Yes, you can have 1 oatmeal banana protein shake and 4 strips of bacon.")
    # Instruction and non-empty input are joined by a blank line.
    assert demos[1].messages[0].content == "What is the relation between the given pairs?\n\nNight : Day :: Right : Left"
    assert demos[1].response == "The relation between the given pairs is that they are opposites."
    assert demos[174].response == "false"
    assert all([m.role for m in d.messages] == ["user", "assistant"] for d in demos)

    prompts = load_prompts(DatasetSpec(source=str(SEED), format="alpaca"))
    assert len(prompts) == 175
    assert prompts[1].id == "seed_task_1"
    assert prompts[1].messages[0].content == demos[1].messages[0].content
