"""The bad-input corpus (tests/data/bad/): each broken file gives its own one-line error naming
the file, the line and the field, and the CLI prints exactly that line with exit code 2."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_schemas.errors import DataError
from data_schemas.loaders import load_records
from data_schemas.spec import DatasetSpec

BAD = Path(__file__).resolve().parent / "data" / "bad"
REPO = Path(__file__).resolve().parents[1]

# (file, format, kind, fields, expected message after "<path>")
CASES = [
    ("missing_field.jsonl", "canonical", "preferences", {}, ":2: rejected: missing"),
    ("empty_field.jsonl", "trl", "preferences", {}, ":3: chosen: empty"),
    ("wrong_type.jsonl", "trl", "preferences", {}, ":1: chosen: expected a string, got a number"),
    ("invalid_json.jsonl", "trl", "preferences", {}, ":2: invalid JSON: Expecting value (column 49)"),
    ("invalid_json.jsonl.gz", "trl", "preferences", {}, ":3: invalid JSON: Expecting property name"),
    ("not_object.jsonl", "canonical", "preferences", {}, ":2: expected a JSON object, got an array"),
    ("non_utf8.jsonl", "trl", "preferences", {}, ":2: not valid UTF-8 (byte 0xe9 at column 16)"),
    ("bad_label.csv", "ab_label", "preferences", {"prompt": "question"},
     ":3: label: invalid label 'C' (expected A or B, 0 or 1, response_a or response_b)"),
    ("tie_label.csv", "ab_label", "preferences", {}, ":2: label: label 'tie' is a tie"),
    ("hh_malformed.jsonl", "hh", "preferences", {},
     ":1: chosen: malformed transcript: no '\\n\\nHuman:' / '\\n\\nAssistant:' turns"),
    ("hh_prefix_mismatch.jsonl", "hh", "preferences", {},
     ":1: rejected: the conversation before the final reply differs from 'chosen' (from turn 1)"),
    ("hh_no_reply.jsonl", "hh", "preferences", {},
     ":1: chosen: malformed transcript: does not end with an '\\n\\nAssistant:' reply"),
    ("ranking_too_short.jsonl", "ranked", "preferences", {},
     ":2: responses: a ranking needs at least 2 responses, got 1"),
    ("same_reply.jsonl", "trl", "preferences", {}, ":1: rejected: same text as 'chosen'"),
    ("bad_role.jsonl", "canonical", "demonstrations", {},
     ":1: messages: message 0: invalid role 'human' (expected system, user or assistant)"),
    ("demo_no_reply.jsonl", "canonical", "demonstrations", {},
     ":1: messages: the last message must be the assistant reply"),
    ("bad_margin.jsonl", "trl", "preferences", {}, ":1: margin: expected a number, got 'high'"),
    ("alpaca_no_output.jsonl", "alpaca", "demonstrations", {}, ":2: output: missing"),
    ("columns.csv", "trl", "preferences", {}, ":3: expected 3 columns as in the header, got 2"),
    ("unclosed.json", "trl", "preferences", {}, ":4: invalid JSON: Expecting ',' delimiter"),
    ("duplicate_id.jsonl", "canonical", "prompts", {}, ": id: duplicate prompt id 'p1'"),
    ("empty.jsonl", "trl", "preferences", {}, ": empty file (no rows)"),
    ("unsupported.txt", "trl", "preferences", {}, ": unsupported file extension '.txt'"),
    ("does_not_exist.jsonl", "trl", "preferences", {}, ": file not found"),
]


@pytest.mark.parametrize("name,fmt,kind,fields,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_error(name, fmt, kind, fields, expected):
    path = str(BAD / name)
    with pytest.raises(DataError) as err:
        load_records(DatasetSpec(source=path, format=fmt, fields=fields), kind)
    message = str(err.value)
    assert message.startswith(path + expected), message
    assert "\n" not in message


def test_corpus_covers_every_bad_file_with_its_own_message():
    files = {p.name for p in BAD.iterdir()}
    named = {name for name, *_ in CASES}
    assert not files - named, f"bad files no case tests: {sorted(files - named)}"
    assert named - files == {"does_not_exist.jsonl"}  # the one case about a missing file
    messages = [expected for *_, expected in CASES]
    assert len(set(messages)) == len(messages) >= 12  # at least twelve kinds, each case its own error


def test_unknown_field_mapping_suggests_the_right_name():
    spec = DatasetSpec(source=str(BAD / "same_reply.jsonl"), format="trl", fields={"promt": "question"})
    with pytest.raises(DataError, match=r"fields: unknown field 'promt' for format 'trl' preferences "
                                        r"\(known: prompt, chosen, rejected, margin\); did you mean 'prompt'\?"):
        load_records(spec, "preferences")


def test_format_that_cannot_provide_the_kind():
    with pytest.raises(DataError, match="format 'alpaca' cannot provide preferences"):
        load_records(DatasetSpec(source=str(BAD / "same_reply.jsonl"), format="alpaca"), "preferences")


def test_skip_invalid_drops_bad_rows_and_counts_them(capsys):
    from data_schemas.loaders import load_preferences

    path = str(BAD / "empty_field.jsonl")
    records = load_preferences(DatasetSpec(source=path, format="trl", skip_invalid=True))
    assert len(records) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"skipped 1 invalid rows in {path} (first: {path}:3: chosen: empty)"]

    # Unreadable lines (bad bytes, bad JSON) are skippable rows too.
    result = load_records(DatasetSpec(source=str(BAD / "non_utf8.jsonl"), format="trl", skip_invalid=True), "preferences")
    assert (len(result.records), result.skipped) == (1, 1)


def test_skip_invalid_with_nothing_valid_is_an_error():
    spec = DatasetSpec(source=str(BAD / "same_reply.jsonl"), format="trl", skip_invalid=True)
    with pytest.raises(DataError, match="no valid rows: all 1 were invalid"):
        load_records(spec, "preferences")


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "data", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name,fmt,extra,expected", [
    ("missing_field.jsonl", "canonical", [], ":2: rejected: missing"),
    ("non_utf8.jsonl", "trl", [], ":2: not valid UTF-8"),
    ("bad_label.csv", "ab_label", ["--field", "prompt=question"], ":3: label: invalid label 'C'"),
    ("hh_prefix_mismatch.jsonl", "hh", [], ":1: rejected: the conversation before the final reply differs"),
    ("ranking_too_short.jsonl", "ranked", [], ":2: responses: a ranking needs at least 2 responses"),
])
def test_cli_validate_prints_one_line_and_exits_2(name, fmt, extra, expected):
    path = f"tests/data/bad/{name}"
    proc = _cli("validate", path, "--format", fmt, *extra)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {path}{expected}")
    assert proc.stdout == ""


def test_cli_unknown_field_and_skip_invalid():
    proc = _cli("validate", "tests/data/bad/same_reply.jsonl", "--format", "trl", "--field", "chozen=good")
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and "did you mean 'chosen'" in proc.stderr

    proc = _cli("validate", "tests/data/bad/empty_field.jsonl", "--format", "trl", "--skip-invalid")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "tests/data/bad/empty_field.jsonl: ok: 2 preference pairs from 3 rows (1 invalid rows skipped)"
    assert proc.stderr.startswith("skipped 1 invalid rows in tests/data/bad/empty_field.jsonl")
