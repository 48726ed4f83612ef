"""`rlhf label` without a browser: comparisons, records, the Wilson interval, and the HTTP API's
rejection of malformed requests (4xx, nothing written). The browser test is test_label_browser.py."""
from __future__ import annotations

import http.client
import json
import threading
from pathlib import Path

import pytest

from data_schemas.errors import DataError
from pipeline import label, label_server
from pipeline.label_records import (Generation, label_record, load_generations, load_run_generations, plan_comparisons,
                                    read_labels, save_label, ties_path, wilson_interval, win_rates)
from pipeline.label_server import LabelSession, make_server


def _gens(models=("baseline", "ppo"), n=4):
    return [Generation(f"p{i}", [{"role": "user", "content": f"q{i}"}], m, f"[{m}] answer {i}")
            for m in models for i in range(n)]


def write_run(run: Path, models=("baseline", "ppo"), n=4) -> Path:
    """Generations as the compare stage saves them: one file per model, rows keyed id/messages."""
    folder = run / "compare" / "generations"
    folder.mkdir(parents=True)
    for m in models:
        rows = [{"id": f"p{i}", "tags": [], "messages": [{"role": "user", "content": f"q{i} <img src=x>"}],
                 "response": f"[{m}] answer {i}", "num_tokens": 3, "reward": 0.5, "kl": None} for i in range(n)]
        (folder / f"{m}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


# ---- comparisons ----

def test_every_model_pair_on_every_prompt_in_a_seeded_order():
    comps = plan_comparisons(_gens(("a", "b", "c"), n=3), seed=1)
    assert len(comps) == 3 * 3
    assert {frozenset((c.model_a, c.model_b)) for c in comps} == {frozenset("ab"), frozenset("ac"), frozenset("bc")}
    again = plan_comparisons(list(reversed(_gens(("a", "b", "c"), n=3))), seed=1)
    assert [(c.id, c.model_a) for c in again] == [(c.id, c.model_a) for c in comps]  # input order is irrelevant
    other = plan_comparisons(_gens(("a", "b", "c"), n=3), seed=2)
    assert [c.id for c in other] != [c.id for c in comps]
    assert sorted(c.id for c in other) == sorted(c.id for c in comps)
    # the coin flips both ways: model "a" is not always on the left
    assert {c.model_a for c in comps} != {"a"}


def test_identical_responses_are_dropped_and_models_filter():
    gens = _gens(n=2) + [Generation("p0", [{"role": "user", "content": "q0"}], "sft", "[baseline] answer 0 ")]
    comps = plan_comparisons(gens, seed=0)
    assert len(comps) == 2 + 1  # (baseline, ppo) x 2 prompts + (ppo, sft) on p0; (baseline, sft) is the same text
    only = plan_comparisons(gens, seed=0, models=["ppo", "sft"])
    assert [{c.model_a, c.model_b} for c in only] == [{"ppo", "sft"}]
    with pytest.raises(DataError, match="no generations for nope"):
        plan_comparisons(gens, models=["ppo", "nope"])
    with pytest.raises(DataError, match="at least 2 models"):
        plan_comparisons(_gens(("solo",)))


def test_comparison_id_changes_with_the_text():
    a = plan_comparisons(_gens(n=1))[0]
    changed = [g if g.model != "ppo" else Generation(g.prompt_id, g.prompt, g.model, "other") for g in _gens(n=1)]
    assert plan_comparisons(changed)[0].id != a.id


def test_load_generations_names_the_bad_line(tmp_path):
    f = tmp_path / "gens.jsonl"
    f.write_text(json.dumps({"prompt_id": 1, "prompt": "hi", "model": "m", "response": "r"}) + "\n"
                 + json.dumps({"prompt_id": 2, "prompt": [{"role": "bot", "content": "x"}], "response": "r"}) + "\n")
    with pytest.raises(DataError, match=r"gens.jsonl:2: prompt\[0\]"):
        load_generations(f)
    f.write_text(json.dumps({"prompt_id": 1, "prompt": "hi", "response": "r"}) + "\n")
    (g,) = load_generations(f)
    assert (g.prompt_id, g.model, g.prompt) == ("1", "gens", [{"role": "user", "content": "hi"}])
    f.write_text('{"prompt_id": 1, "prompt": "hi", "response": "r"}\n{"prompt_id": 2,\n')
    with pytest.raises(DataError, match=r"gens.jsonl:2: invalid JSON"):
        load_generations(f)
    with pytest.raises(DataError, match="no saved generations"):
        load_run_generations(tmp_path)
    gens = load_run_generations(write_run(tmp_path / "run", n=2))
    assert [(g.prompt_id, g.model, g.prompt[0]["content"]) for g in gens][:2] == [
        ("p0", "baseline", "q0 <img src=x>"), ("p1", "baseline", "q1 <img src=x>")]


# ---- records and summary ----

def test_records_put_the_winner_in_chosen():
    c = plan_comparisons(_gens(n=1))[0]
    a, b, tie = label_record(c, "A", "n"), label_record(c, "B"), label_record(c, "tie")
    assert (a["chosen"], a["rejected"], a["meta"]["chosen_model"]) == (c.response_a, c.response_b, c.model_a)
    assert (b["chosen"], b["rejected"], b["meta"]["rejected_model"]) == (c.response_b, c.response_a, c.model_a)
    assert a["margin"] is None and a["prompt"] == c.prompt and a["meta"]["note"] == "n"
    assert "chosen" not in tie and tie["meta"]["label"] == "tie" and tie["meta"]["chosen_model"] is None
    assert (tie["response_a"], tie["response_b"]) == (c.response_a, c.response_b)


def test_ties_go_to_the_sibling_file_and_both_files_are_read(tmp_path):
    comps = plan_comparisons(_gens(n=3))
    out = tmp_path / "labels.jsonl"
    for c, lab in zip(comps, ["A", "tie", "both_bad"]):
        save_label(out, label_record(c, lab))
    assert ties_path(out) == tmp_path / "labels.ties.jsonl"
    assert [r["meta"]["label"] for r in map(json.loads, out.read_text().splitlines())] == ["A"]
    assert [r["meta"]["label"] for r in map(json.loads, ties_path(out).read_text().splitlines())] == ["tie", "both_bad"]
    assert sorted(r["meta"]["comparison_id"] for r in read_labels(out)) == sorted(c.id for c in comps)
    assert LabelSession(comps, out).state()["comparison"] is None  # all three count as done


def test_the_labels_file_loads_as_canonical_preferences(tmp_path):
    from data_schemas.loaders import load_preferences
    from data_schemas.records import PreferencePair
    from data_schemas.spec import DatasetSpec

    comps = plan_comparisons(_gens(n=4))
    out = tmp_path / "labels.jsonl"
    for c, lab in zip(comps, ["A", "B", "tie", "A"]):
        save_label(out, label_record(c, lab, note="why"))
    pairs = load_preferences(DatasetSpec(source=str(out), format="canonical"))
    assert all(isinstance(p, PreferencePair) for p in pairs)
    expected = [(c.response_a, c.response_b) if lab == "A" else (c.response_b, c.response_a)
                for c, lab in zip(comps, ["A", "B", "tie", "A"]) if lab != "tie"]
    assert [(p.chosen, p.rejected) for p in pairs] == expected


def test_wilson_interval_matches_hand_computed_values():
    lo, hi = wilson_interval(8, 10)  # textbook: 8/10 -> [0.4902, 0.9433]
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    assert wilson_interval(0, 10)[0] == 0.0 and round(wilson_interval(0, 10)[1], 4) == 0.2775
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_win_rates_count_wins_losses_ties_and_both_bad():
    comps = plan_comparisons(_gens(n=4))
    labels = ["A", "B", "tie", "both_bad"]
    rows = [label_record(c, lab) for c, lab in zip(comps, labels)]
    winners = [c.model_a if lab == "A" else c.model_b for c, lab in zip(comps[:2], labels[:2])]
    stats = win_rates(rows)
    for m in ("baseline", "ppo"):
        s = stats[m]
        assert s["wins"] == winners.count(m) and s["losses"] == 2 - winners.count(m)
        assert (s["ties"], s["both_bad"], s["comparisons"]) == (1, 1, 4)
        assert s["win_rate"] == winners.count(m) / 2


def test_summary_cli(tmp_path, capsys):
    comps = plan_comparisons(_gens(n=4))
    f = tmp_path / "labels.jsonl"
    f.write_text("".join(json.dumps(label_record(c, "A" if c.model_a == "ppo" else "B")) + "\n" for c in comps))
    args = label.argparse.Namespace(file=str(f), json=True)
    assert label.summary_main(args) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["ppo"]["wins"] == 4 and stats["ppo"]["win_rate"] == 1.0
    assert stats["ppo"]["ci95"] == pytest.approx(list(wilson_interval(4, 4)))
    assert label.summary_main(label.argparse.Namespace(file=str(f), json=False)) == 0
    assert "ppo" in capsys.readouterr().out.splitlines()[2]  # best model first
    f.write_text('{"prompt": [], "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(DataError, match="labels.jsonl:1: meta"):
        read_labels(f)


# ---- the HTTP API ----

@pytest.fixture
def server(tmp_path):
    comps = plan_comparisons(load_run_generations(write_run(tmp_path / "run")), seed=0)
    out = tmp_path / "labels.jsonl"
    srv = make_server(LabelSession(comps, out), "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv, comps, out
    srv.shutdown()
    srv.server_close()


def _request(srv, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=10)
    hdrs = {"Content-Type": "application/json"} if body is not None else {}
    hdrs.update(headers or {})
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    conn.request(method, path, body=body, headers=hdrs)
    resp = conn.getresponse()
    status, data = resp.status, resp.read()
    conn.close()
    try:
        return status, json.loads(data)
    except ValueError:
        return status, data


def test_malformed_posts_get_4xx_and_write_nothing(server):
    srv, comps, out = server
    good = {"id": comps[0].id, "label": "A"}
    bad = [
        ("not json", {}, 400),
        ({"id": "0000000000000000", "label": "A"}, {}, 404),
        ({"id": comps[0].id, "label": "C"}, {}, 400),
        ({"id": comps[0].id, "label": "A", "note": 5}, {}, 400),
        ({"id": comps[0].id, "label": "A", "note": "x" * 3000}, {}, 400),
        ({**good, "model": "ppo"}, {}, 400),
        (["A"], {}, 400),
        (good, {"Content-Type": "text/plain"}, 415),
        ("{" + " " * (label_server.MAX_BODY + 10) + "}", {}, 413),
        (good, {"Host": "evil.example:80"}, 403),
    ]
    for body, headers, status in bad:
        got, data = _request(srv, "POST", "/api/label", body, headers)
        assert got == status, (body if len(str(body)) < 100 else "big", data)
        assert "error" in data
    assert not out.exists()
    assert _request(srv, "POST", "/api/nope", good)[0] == 404
    assert _request(srv, "GET", "/etc/passwd")[0] == 404


def test_a_choice_is_saved_then_a_duplicate_is_refused(server):
    srv, comps, out = server
    status, first = _request(srv, "GET", "/api/next")
    assert status == 200 and first["comparison"]["id"] == comps[0].id and first["position"] == 1
    assert set(first["comparison"]) == {"id", "prompt", "A", "B"}  # no model names reach the page
    status, nxt = _request(srv, "POST", "/api/label", {"id": comps[0].id, "label": "B", "note": " meh "})
    assert status == 200 and nxt["comparison"]["id"] == comps[1].id and nxt["labelled"] == 1
    (row,) = read_labels(out)
    assert row["chosen"] == comps[0].response_b and row["meta"]["note"] == "meh"
    assert _request(srv, "POST", "/api/label", {"id": comps[0].id, "label": "A"})[0] == 409
    assert len(read_labels(out)) == 1
    # a new session on the same file resumes after the labelled comparison
    assert LabelSession(comps, out).state()["comparison"]["id"] == comps[1].id


def test_a_failed_write_is_a_500_and_the_comparison_stays_open(tmp_path):
    comps = plan_comparisons(_gens(n=2))
    out = tmp_path / "labels.jsonl"
    session = LabelSession(comps, out)
    out.mkdir()  # appending to a folder fails like a full or read-only disk would
    status, body = session.submit({"id": comps[0].id, "label": "A"})
    assert status == 500 and "could not write" in body["error"]
    assert session.state()["comparison"]["id"] == comps[0].id


def test_page_is_served_with_a_csp_and_never_uses_inner_html(server):
    srv = server[0]
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=10)
    conn.request("GET", "/")
    resp = conn.getresponse()
    assert resp.status == 200 and "script-src 'self'" in resp.getheader("Content-Security-Policy")
    assert b"label.js" in resp.read()
    conn.close()
    js = (label_server.STATIC_DIR / "label.js").read_text()
    assert "innerHTML" not in js.replace("never innerHTML", "") and "textContent" in js


def test_generate_with_models_then_reuse_the_saved_answers(tmp_path, monkeypatch):
    """`serve --config C --models ...`: the tiny model answers once; a restart reuses the saved
    answers instead of sampling new ones (new text would mean new ids and no resume)."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"name: t\nmodel: tiny-random-llama\nruns_root: {tmp_path / 'runs'}\n"
                   "compare:\n  prompts: {source: 'default:eval_prompts', limit: 3}\n"
                   "  decoding: {max_new_tokens: 6, temperature: 1.0}\n")
    folder = tmp_path / "labels.generations"
    gens = label.generate_for_labels(str(cfg), ["baseline", "tiny-random-llama"], folder)
    assert sorted(p.name for p in folder.iterdir()) == ["baseline.jsonl", "tiny-random-llama.jsonl"]
    assert len(gens) == 6 and {g.model for g in gens} == {"baseline", "tiny-random-llama"}

    import stages.evaluation.responders

    def no_model(*a, **k):
        raise AssertionError("must reuse the saved generations")

    monkeypatch.setattr(stages.evaluation.responders, "responder_for", no_model)
    again = label.generate_for_labels(str(cfg), ["baseline", "tiny-random-llama"], folder)
    assert again == gens
