"""Each adapter and each file type, on small rows written in tmp_path."""
from __future__ import annotations

import csv
import gzip
import json

import pytest

from data_schemas.errors import DataError
from data_schemas.loaders import load_demonstrations, load_preferences, load_prompts, load_records
from data_schemas.records import PreferencePair, Ranking, to_canonical, to_pairs
from data_schemas.spec import DatasetSpec

EGG = "How do I boil an egg?"
GOOD = "Simmer it for about ten minutes, then cool it in cold water."
BAD = "Figure it out yourself."


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def user(text):
    return [{"role": "user", "content": text}]


# ---- trl ----

def test_trl_standard_conversational_and_implicit(tmp_path):
    src = write_jsonl(tmp_path / "trl.jsonl", [
        {"prompt": EGG, "chosen": GOOD, "rejected": BAD, "margin": 1.5},
        {"prompt": user(EGG), "chosen": [{"role": "assistant", "content": GOOD}],
         "rejected": [{"role": "assistant", "content": BAD}]},
        {"chosen": user(EGG) + [{"role": "assistant", "content": GOOD}],
         "rejected": user(EGG) + [{"role": "assistant", "content": BAD}]},
    ])
    pairs = load_preferences(DatasetSpec(source=src, format="trl"))
    assert len(pairs) == 3
    for p in pairs:
        assert [(m.role, m.content) for m in p.prompt] == [("user", EGG)]
        assert (p.chosen, p.rejected) == (GOOD, BAD)
    assert pairs[0].margin == 1.5 and pairs[1].margin is None
    prompts = load_prompts(DatasetSpec(source=src, format="trl", limit=2))
    assert [p.id for p in prompts] == ["trl-1", "trl-2"]
    assert prompts[1].messages[0].content == EGG


def test_trl_field_mapping(tmp_path):
    src = write_jsonl(tmp_path / "mine.jsonl", [{"question": EGG, "good": GOOD, "bad": BAD}])
    spec = DatasetSpec(source=src, format="trl", fields={"prompt": "question", "chosen": "good", "rejected": "bad"})
    (pair,) = load_preferences(spec)
    assert (pair.prompt[0].content, pair.chosen, pair.rejected) == (EGG, GOOD, BAD)
    # a mapped column that is absent is reported under the source's name
    wrong_column = {"prompt": "question", "chosen": "good", "rejected": "worse"}
    with pytest.raises(DataError, match=r"mine.jsonl:1: worse: missing"):
        load_preferences(DatasetSpec(source=src, format="trl", fields=wrong_column))


# ---- hh ----

def test_hh_pair_prompt_and_demo(tmp_path):
    shared = "\n\nHuman: Hi!\n\nAssistant: Hello, how can I help?\n\nHuman: " + EGG
    src = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": shared + "\n\nAssistant: " + GOOD,
                                               "rejected": shared + "\n\nAssistant: " + BAD}])
    (pair,) = load_preferences(DatasetSpec(source=src, format="hh"))
    assert [m.role for m in pair.prompt] == ["user", "assistant", "user"]
    assert pair.prompt[1].content == "Hello, how can I help?"
    assert (pair.chosen, pair.rejected) == (GOOD, BAD)
    (demo,) = load_demonstrations(DatasetSpec(source=src, format="hh"))
    assert demo.response == GOOD and len(demo.messages) == 4
    (prompt,) = load_prompts(DatasetSpec(source=src, format="hh"))
    assert prompt.messages[-1].content == EGG


# ---- alpaca, dolly ----

def test_alpaca_flat_and_dolly(tmp_path):
    src = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
        {"instruction": "Name a primary color.", "input": "", "output": "Red."},
    ])
    demos = load_demonstrations(DatasetSpec(source=src, format="alpaca"))
    assert demos[0].messages[0].content == "Translate to French.\n\nGood morning"
    assert demos[1].messages[0].content == "Name a primary color." and demos[1].response == "Red."

    src = write_csv(tmp_path / "dolly.csv", ["instruction", "context", "response", "category"],
                    [["Summarize.", "Cats sleep a lot.", "Cats are sleepy.", "summarization"],
                     ["Name a planet.", "", "Mars.", "open_qa"]])
    demos = load_demonstrations(DatasetSpec(source=src, format="dolly"))
    assert [d.response for d in demos] == ["Cats are sleepy.", "Mars."]
    assert demos[0].messages[0].content == "Summarize.\n\nCats sleep a lot."
    prompts = load_prompts(DatasetSpec(source=src, format="dolly"))
    assert prompts[1].tags == ["open_qa"] and prompts[1].id == "dolly-2"


# ---- ab_label ----

@pytest.mark.parametrize("label,winner", [("A", "a"), ("b", "b"), (0, "a"), (1, "b"), ("1", "b"), (0.0, "a"),
                                          ("response_a", "a"), ("model_b", "b"), (" B ", "b")])
def test_ab_label_values(tmp_path, label, winner):
    src = write_jsonl(tmp_path / "ab.jsonl", [{"prompt": EGG, "response_a": "AAA", "response_b": "BBB", "label": label}])
    (pair,) = load_preferences(DatasetSpec(source=src, format="ab_label"))
    assert pair.chosen == ("AAA" if winner == "a" else "BBB")
    assert pair.rejected == ("BBB" if winner == "a" else "AAA")


@pytest.mark.parametrize("label,reason", [("tie", "label 'tie' is a tie"), ("tie (bothbad)", "label 'tie (bothbad)' is a tie"),
                                          (2, "invalid label 2"), ("C", "invalid label 'C'"),
                                          (True, "invalid label True"), (None, "missing")])
def test_ab_label_rejects_ties_and_unknown_values(tmp_path, label, reason):
    src = write_jsonl(tmp_path / "ab.jsonl", [{"prompt": EGG, "response_a": "AAA", "response_b": "BBB", "label": label}])
    with pytest.raises(DataError) as err:
        load_preferences(DatasetSpec(source=src, format="ab_label"))
    assert str(err.value).startswith(f"{src}:1: label: {reason}")


# ---- ranked, canonical, rankings as pairs ----

def test_ranked_csv_with_json_list_and_pairs(tmp_path):
    src = write_csv(tmp_path / "ranked.csv", ["prompt", "responses"], [[EGG, json.dumps([GOOD, "Boil it.", BAD])]])
    (ranking,) = load_preferences(DatasetSpec(source=src, format="ranked"))
    assert isinstance(ranking, Ranking) and ranking.responses == [GOOD, "Boil it.", BAD]
    pairs = ranking.to_pairs()
    assert [(p.chosen, p.rejected) for p in pairs] == [(GOOD, "Boil it."), (GOOD, BAD), ("Boil it.", BAD)]
    assert len(to_pairs([ranking, pairs[0]])) == 4


def test_canonical_roundtrip_of_every_kind(tmp_path):
    rows = [{"prompt": user(EGG), "chosen": GOOD, "rejected": BAD, "margin": 0.5},
            {"prompt": user(EGG), "responses": [GOOD, "Boil it.", BAD, "No."]}]
    src = write_jsonl(tmp_path / "prefs.jsonl", rows)
    records = load_preferences(DatasetSpec(source=src))
    assert isinstance(records[0], PreferencePair) and isinstance(records[1], Ranking)
    assert [to_canonical(r) for r in records] == rows

    src = write_jsonl(tmp_path / "prompts.jsonl", [{"id": "a", "messages": user(EGG), "tags": ["harmful"]},
                                                   {"prompt": "Name a color."}])
    prompts = load_prompts(DatasetSpec(source=src))
    assert (prompts[0].id, prompts[0].tags) == ("a", ["harmful"])
    assert (prompts[1].id, prompts[1].messages[0].content) == ("prompts-2", "Name a color.")


# ---- sources: json, csv, parquet, gz, limit, hub fallback ----

def test_json_csv_parquet_and_gz_sources(tmp_path):
    rows = [{"prompt": f"Question {i}?", "chosen": GOOD, "rejected": BAD} for i in range(5)]
    (tmp_path / "p.json").write_text(json.dumps(rows, indent=2))
    with gzip.open(tmp_path / "p.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    write_csv(tmp_path / "p.csv", ["prompt", "chosen", "rejected"], [list(r.values()) for r in rows])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    with gzip.open(tmp_path / "p.csv.gz", "wb") as g:
        g.write((tmp_path / "p.csv").read_bytes())
    for name in ("p.json", "p.jsonl.gz", "p.csv", "p.csv.gz", "p.parquet"):
        pairs = load_preferences(DatasetSpec(source=str(tmp_path / name), format="trl"))
        assert [p.prompt[0].content for p in pairs] == [f"Question {i}?" for i in range(5)], name
    assert len(load_preferences(DatasetSpec(source=str(tmp_path / "p.csv"), format="trl", limit=2))) == 2


def test_json_rows_are_located_by_line(tmp_path):
    rows = [{"prompt": "Q?", "chosen": GOOD, "rejected": BAD}, {"prompt": "Q2?", "chosen": GOOD, "rejected": ""}]
    (tmp_path / "p.json").write_text(json.dumps(rows, indent=2))
    # the second object starts on line 7 of the indented file
    with pytest.raises(DataError, match=r"p.json:7: rejected: empty"):
        load_preferences(DatasetSpec(source=str(tmp_path / "p.json"), format="trl"))


def test_parquet_rows_are_located_by_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"prompt": "Q", "chosen": GOOD, "rejected": BAD},
                                         {"prompt": "Q", "chosen": GOOD, "rejected": GOOD}]), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p.parquet:row 2: rejected: same text as 'chosen'"):
        load_preferences(DatasetSpec(source=str(tmp_path / "p.parquet"), format="trl"))


def test_hub_name_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as err:
        load_records(DatasetSpec(source="nobody/no-such-dataset-xyz", format="trl"), "preferences")
    msg = str(err.value)
    assert msg.startswith("nobody/no-such-dataset-xyz: not a local file, and loading it from the Hugging Face hub failed")
    assert "\n" not in msg and "point `source:` at the file" in msg
