"""The comparison: metric math against hand-computed values, then one real compare run on the tiny
models (baseline + sft + perturbed ppo + random RM) whose artifacts every later test inspects."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from compare_fixtures import load_cfg, make_run, tiny_config

from stages.evaluation import metrics as cm

# ---- pure metrics ----


def test_outcome_rates_counts_ties_within_epsilon():
    d = np.array([0.5, -0.2, 1e-9, 0.0, 0.3])
    assert cm.outcome_rates(d, 1e-6) == pytest.approx((0.4, 0.4, 0.2))
    # 13 wins, 11 losses, no tie: exactly 0 ties, so the report does not print "(ties 0%)"
    assert cm.outcome_rates(np.array([1.0] * 13 + [-1.0] * 11), 1e-6)[1] == 0.0


def test_win_rate_table_is_antisymmetric_with_ties():
    scores = {"a": np.array([1.0, 2.0, 3.0, 0.0]), "b": np.array([1.0, 1.0, 4.0, 0.0]),
              "c": np.array([0.0, 5.0, 3.0, 1.0])}
    t = cm.win_rate_table(scores, 1e-6, cm.resample_indices(4, 200, 0))
    assert t["a"]["b"]["win"] == 0.25 and t["a"]["b"]["tie"] == 0.5 and t["b"]["a"]["win"] == 0.25
    assert t["a"]["b"]["rate"] == 0.5  # a tie counts half: 0.25 + 0.5 / 2
    assert t["a"]["c"]["rate"] == 0.375 and t["c"]["a"]["rate"] == 0.625  # d = [1, -3, 0, -1]
    for i in scores:
        for j in scores:
            if i != j:
                assert t[i][j]["win"] + t[j][i]["win"] + t[i][j]["tie"] == pytest.approx(1.0)
                assert t[i][j]["tie"] == t[j][i]["tie"]
                assert t[i][j]["rate"] + t[j][i]["rate"] == pytest.approx(1.0)
                assert 0 <= t[i][j]["ci_low"] <= t[i][j]["rate"] <= t[i][j]["ci_high"] <= 1


def test_bootstrap_is_seeded_and_optional():
    d = np.array([1.0, -1.0, 1.0, 1.0, -1.0, 1.0])
    a = cm.bootstrap_win_ci(d, 0.0, cm.resample_indices(6, 300, 7))
    assert a == cm.bootstrap_win_ci(d, 0.0, cm.resample_indices(6, 300, 7))
    assert a[0] < 4 / 6 < a[1]
    assert cm.bootstrap_win_ci(d, 0.0, cm.resample_indices(6, 0, 7)) == (None, None)


def test_bootstrap_interval_counts_ties_half():
    # Identical answers every time: a 50% win rate with no spread, not 0%.
    assert cm.bootstrap_win_ci(np.zeros(5), 1e-6, cm.resample_indices(5, 100, 0)) == (0.5, 0.5)
    # One win, one tie: every resample's rate is 1, 0.75 or 0.5.
    lo, hi = cm.bootstrap_win_ci(np.array([1.0, 0.0]), 1e-6, cm.resample_indices(2, 400, 0))
    assert (lo, hi) == (0.5, 1.0)


def test_cluster_bootstrap_takes_all_of_a_prompts_responses():
    idx = cm.resample_indices(3, 5, 0, per_prompt=2)
    picks = cm.resample_indices(3, 5, 0)  # the same prompts drawn, one row each
    assert idx.shape == (5, 6)
    assert (idx[:, 0::2] == 2 * picks).all() and (idx[:, 1::2] == 2 * picks + 1).all()
    # Responses to one prompt that always agree carry no more evidence than one response: the interval
    # is the one-response interval, not the narrower one that treating 3 x 6 rows as independent gives.
    d = np.array([1.0, -1.0, 1.0, 1.0, -1.0, 1.0])
    one = cm.bootstrap_win_ci(d, 0.0, cm.resample_indices(6, 300, 7))
    assert cm.bootstrap_win_ci(np.repeat(d, 3), 0.0, cm.resample_indices(6, 300, 7, per_prompt=3)) == one
    naive = cm.bootstrap_win_ci(np.repeat(d, 3), 0.0, cm.resample_indices(18, 300, 7))
    assert naive[1] - naive[0] < one[1] - one[0]


def test_length_slope_is_fitted_within_prompts():
    # Score = prompt difficulty + 0.5 * length: the slope must ignore the per-prompt offsets (10, -10).
    lengths = np.array([[2.0, 4.0], [6.0, 5.0]])
    scores = np.array([[10.0, -10.0], [10.0, -10.0]]) + 0.5 * lengths
    assert cm.length_slope(scores, lengths) == pytest.approx(0.5)
    assert cm.length_slope(scores, np.ones_like(lengths)) == 0.0


def test_length_control_removes_a_pure_length_advantage():
    # "long" wins every prompt only because it is longer: after control, the two tie.
    lengths = {"long": np.array([20.0, 30.0, 25.0]), "short": np.array([10.0, 12.0, 5.0])}
    scores = {m: 0.1 * lengths[m] + np.array([1.0, 2.0, 3.0]) for m in lengths}
    assert cm.win_rate_table(scores, 1e-6)["long"]["short"]["win"] == 1.0
    lc, slope = cm.length_controlled_scores(scores, lengths)
    assert slope == pytest.approx(0.1)
    assert cm.win_rate_table(lc, 1e-6)["long"]["short"]["tie"] == 1.0


def test_distinct_n_by_hand():
    texts = ["the cat sat", "the cat ran"]
    assert cm.distinct_n(texts, 1) == pytest.approx(4 / 6)  # the, cat, sat, ran
    assert cm.distinct_n(texts, 2) == pytest.approx(3 / 4)  # the cat x2, cat sat, cat ran
    assert cm.distinct_n(["", "hi"], 2) == 0.0


def test_offensive_scores_insults_not_polite_text():
    probs = cm.offensive_probs(["you are a stupid idiot, fuck off", "I'd be happy to help you with that."])
    assert probs[0] > 0.5 > probs[1]
    assert cm.offensive_summary(probs) == {"offensive_rate": 0.5, "offensive_prob_mean": pytest.approx(sum(probs) / 2)}
    assert cm.offensive_summary([])["offensive_rate"] is None


# ---- a real run on the tiny models ----


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    from stages import baseline, compare

    run = make_run(tmp_path_factory.mktemp("cmp"))
    cfg = load_cfg(run)
    baseline.run(cfg, run)
    summary = compare.run(cfg, run)
    return run, json.loads((run / "compare" / "metrics.json").read_text()), summary


def test_generation_logprobs_equal_a_separate_scoring_pass(tiny_model_dir):
    """The compare stage takes each tuned model's own log p(response) from generation's raw logits
    (KV-cached, one step at a time) instead of a second forward pass: the sums must be the ones that
    full forward pass gives, with temperature and top-p in the sampler not leaking into them."""
    import torch
    from compare_fixtures import PROMPTS

    from stages.core.config_schema import Decoding
    from stages.evaluation.judges import response_logprob_sums
    from stages.evaluation.responders import ChatModel

    bot = ChatModel("sft", str(tiny_model_dir), Decoding(max_new_tokens=10, temperature=0.7, top_p=0.9, batch_size=3))
    torch.manual_seed(0)
    samples = bot.sample([p["messages"] for p in PROMPTS], with_logprobs=True)  # different lengths, 2 batches
    assert all(s.logprob_sum is not None and s.response_ids for s in samples)
    scored = response_logprob_sums(bot.model, samples, bot.tokenizer.pad_token_id, batch_size=4)
    assert [s.logprob_sum for s in samples] == pytest.approx(scored, abs=1e-3)
    assert len({round(x, 3) for x in scored}) == len(scored)  # distinct rows: a mix-up would show
    torch.manual_seed(0)
    assert all(s.logprob_sum is None for s in bot.sample([PROMPTS[0]["messages"]]))


def test_token_passes_split_in_order_by_tokens_and_items():
    from stages.modeling.tensors import token_passes

    # 60+30 fit 100, +20 would not; 120 alone exceeds 100 and gets a run of its own
    assert token_passes([60, 30, 20, 120, 10, 10], 100) == [[0, 1], [2], [3], [4, 5]]
    # at most 2 items a run, however small
    assert token_passes([1, 1, 1, 1, 1], 100, max_items=2) == [[0, 1], [2, 3], [4]]
    assert token_passes([50, 50, 1], 100) == [[0, 1], [2]]  # exactly full stays one run
    assert token_passes([], 10) == []


def test_grouped_judging_gives_each_reply_the_score_it_gets_alone(compared):
    """compare scores all models' replies to a prompt as one packed group (the prompt once, several
    groups per row, identical rows once). Each score must be the one the RM gives that reply's row
    alone, padded as the reward stage's `padded_scores` reads it: prompts of different lengths, a
    prompt long enough to be cut, an empty reply, and passes small enough that groups split across
    them. Identical replies to one prompt must tie exactly."""
    import torch

    from stages.evaluation.judges import reward_model_judge
    from stages.modeling.chat_format import render_prompts
    from stages.modeling.loading import load_reward_model, load_tokenizer
    from stages.modeling.reward_scoring import padded_scores, reply_rows
    from stages.modeling.tensors import pad_rows

    run, _, _ = compared
    path = str(run / "reward" / "model")
    tok = load_tokenizer(path)
    rm = load_reward_model(path, "fp32", pad_token_id=tok.pad_token_id).eval()
    conversations = [[{"role": "user", "content": "How do I boil an egg?"}],
                     [{"role": "user", "content": "Tell me about rivers. " * 30}],
                     [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "What is 2+2?"}]]
    responses = {"a": ["Boil it for eight minutes, then cool it in cold water.", "Rivers flow.", "4"],
                 "b": ["Boil it for eight minutes, then cool it in cold water.", "", "It is four, of course."],
                 "c": ["Put it in water.", "Rivers carry water to the sea, and shape the land they cross.", "4"]}
    max_length = 64
    prompts = render_prompts(tok, conversations)
    alone = {}
    for label, texts in responses.items():
        rows = [reply_rows(tok, p, [t], max_length)[0] for p, t in zip(prompts, texts)]
        with torch.no_grad():
            alone[label] = [padded_scores(rm, *pad_rows([r], tok.pad_token_id)).item() for r in rows]
    assert len(reply_rows(tok, prompts[1], [""], max_length)[0]) == max_length  # the long prompt is cut
    for batch_size in (8, 1):  # one pass; passes of ~128 tokens, so groups are split across them
        judged = reward_model_judge(rm, tok, conversations, responses, batch_size, max_length)
        for label in responses:
            assert judged[label] == pytest.approx(alone[label], abs=1e-4)
        assert judged["a"][0] == judged["b"][0] and judged["a"][2] == judged["c"][2]  # same reply: an exact tie
    assert len({round(x, 4) for xs in alone.values() for x in xs}) == 7  # distinct replies score apart


def test_reference_logprob_sums_equal_each_row_scored_alone(tiny_model_dir):
    """The KL pass reads log p(response) the way PPO scores rollouts (left-padded prompts, packed, the
    vocabulary projection at response positions only). Each sum must be the one a full forward pass of
    that row alone gives, for prompts and responses of different lengths, an empty response (0), and
    passes split by batch size."""
    import torch

    from stages.evaluation.judges import response_logprob_sums
    from stages.evaluation.responders import Sample
    from stages.modeling.loading import load_causal_lm, load_tokenizer
    from stages.modeling.tensors import logprobs_from_logits

    tok = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir), "fp32").eval()
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    samples = [Sample("", 0, ids("System. User: boil an egg?"), ids("Eight minutes.") + [tok.eos_token_id]),
               Sample("", 0, ids("System. User: hi"), ids("Hello there, how can I help you today?")),
               Sample("", 0, ids("System. User: a much longer question about rivers and seas"), []),
               Sample("", 0, ids("System."), ids("Yes") + [tok.eos_token_id])]
    expected = []
    for s in samples:
        row = torch.tensor([s.prompt_ids + s.response_ids])
        with torch.no_grad():
            logp = logprobs_from_logits(model(input_ids=row).logits[:, :-1], row[:, 1:])
        expected.append(float(logp[0, len(s.prompt_ids) - 1:].sum()))
    assert expected[2] == 0.0
    for batch_size in (4, 3, 1):
        assert response_logprob_sums(model, samples, tok.pad_token_id, batch_size) == pytest.approx(expected, abs=1e-4)


def test_compare_reports_every_metric(compared):
    run, m, summary = compared
    assert m["models"] == ["baseline", "sft", "ppo"] and m["num_prompts"] == 4 and m["num_harmful_prompts"] == 2
    for name, pm in m["per_model"].items():
        assert math.isfinite(pm["mean_reward"])
        assert pm["mean_length_tokens"] > 0
        assert 0 < pm["distinct_1"] <= 1 and 0 <= pm["distinct_2"] <= 1
        assert 0 <= pm["offensive_rate"] <= 1 and 0 <= pm["offensive_prob_mean"] <= 1
    pm = m["per_model"]
    assert pm["baseline"]["kl_to_reference"] is None  # different context: n/a by design
    assert pm["sft"]["kl_to_reference"] == 0.0  # the reference itself
    assert math.isfinite(pm["ppo"]["kl_to_reference"]) and pm["ppo"]["kl_to_reference"] != 0.0
    # the baseline stage's samples were made with the same settings, so compare reused them
    assert pm["baseline"]["source"].startswith("baseline stage") and pm["sft"]["source"] == "generated"
    assert math.isfinite(m["length_slope_reward_per_token"])
    for key in ("win_rates", "length_controlled_win_rates"):
        for i in m["models"]:
            for j in m["models"]:
                if i != j:
                    cell = m[key][i][j]
                    assert 0 <= cell["ci_low"] <= cell["ci_high"] <= 1
                    assert cell["win"] + m[key][j][i]["win"] + cell["tie"] == pytest.approx(1.0)
                    assert cell["rate"] == pytest.approx(cell["win"] + cell["tie"] / 2)
    assert summary["win_rate_ppo_vs_baseline"] == pytest.approx(m["win_rates"]["ppo"]["baseline"]["rate"], abs=1e-4)
    assert {"mean_reward_ppo", "kl_ppo", "offensive_rate_baseline"} <= set(summary)
    assert json.loads((run / "compare" / "summary.json").read_text()) == summary


def test_compare_writes_generations_report_and_plots(compared):
    run, m, _ = compared
    out = run / "compare"
    for name in m["models"]:
        rows = [json.loads(line) for line in (out / "generations" / f"{name}.jsonl").read_text().splitlines()]
        assert [r["id"] for r in rows] == ["p1", "p2", "p3", "p4"]
        harmful = [r["offensive_prob"] is not None for r in rows]
        assert harmful == [False, True, False, True]
    baseline_rows = (run / "baseline" / "generations.jsonl").read_text().splitlines()
    assert [json.loads(line)["response"] for line in baseline_rows] == \
        [json.loads(line)["response"] for line in (out / "generations" / "baseline.jsonl").read_text().splitlines()]
    for png in ("ppo_curves.png", "win_rates.png", "lengths.png"):
        assert (out / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html_text = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    for text in (html_text, md):
        # one judge, the RM PPO optimised: the report says it is a training metric
        assert "the reward model PPO optimised" in text and "a training metric" in text
        assert "alt-profanity-check" in text
        assert "plots/win_rates.png" in text
    assert yaml.safe_load((out / "config.yaml").read_text())["compare"]["bootstrap"] == 50


def test_win_rates_by_kind_split_harmful_from_other_prompts(compared):
    """The lead judge's win rates on the harmful prompts and on the others, recomputed here from the
    scores in the generations files (wins + ties/2 on each subset), and shown in both reports."""
    run, m, _ = compared
    out = run / "compare"
    rows = {lab: [json.loads(line) for line in (out / "generations" / f"{lab}.jsonl").read_text().splitlines()]
            for lab in m["models"]}
    kinds = m["win_rates_by_kind"]
    assert {k: v["num_prompts"] for k, v in kinds.items()} == {"harmful": 2, "other": 2}
    for kind, v in kinds.items():
        picked = [i for i, r in enumerate(rows["ppo"]) if ("harmful" in r["tags"]) == (kind == "harmful")]
        for a, b in (("ppo", "sft"), ("ppo", "baseline"), ("sft", "baseline")):
            d = [rows[a][i]["reward"] - rows[b][i]["reward"] for i in picked]
            expected = sum(1.0 if x > 1e-6 else 0.5 if abs(x) <= 1e-6 else 0.0 for x in d) / len(d)
            cell = v["win_rates"][a][b]
            assert cell["rate"] == pytest.approx(expected) and cell["ci_low"] <= cell["rate"] <= cell["ci_high"]
    overall = m["win_rates"]["ppo"]["sft"]["rate"]
    assert overall == pytest.approx((kinds["harmful"]["win_rates"]["ppo"]["sft"]["rate"]
                                     + kinds["other"]["win_rates"]["ppo"]["sft"]["rate"]) / 2)  # 2 + 2 prompts
    for text in ((out / "report.md").read_text(), (out / "report.html").read_text()):
        assert "RM win rate on harmful and on other prompts" in text and "harmful prompts (2)" in text
        assert "ppo vs sft" in text


def test_report_escapes_model_output(compared, tmp_path):
    from stages.evaluation.report import write_report

    run, m, _ = compared
    gen_dir = run / "compare" / "generations"
    rows = {name: [json.loads(line) for line in (gen_dir / f"{name}.jsonl").read_text().splitlines()]
            for name in m["models"]}
    rows["ppo"][0]["response"] = "<script>alert(1)</script> & <img src=x onerror=alert(2)>"
    rows["sft"][1]["messages"][0]["content"] = "<b>prompt</b>"
    write_report(tmp_path, m, rows, [], max_samples=4)
    for name in ("report.html", "report.md"):
        text = (tmp_path / name).read_text()
        assert "<script>alert" not in text and "<img src=x" not in text
        # report.md also backslash-escapes Markdown's own syntax (the parentheses here)
        assert ("&lt;script&gt;alert(1)&lt;/script&gt;" if name == "report.html"
                else "&lt;script&gt;alert\\(1\\)&lt;/script&gt;") in text
    assert not (tmp_path / "plots" / "ppo_curves.png").exists()  # no PPO metrics given, no curve plot


def test_several_responses_per_prompt(compared, tmp_path):
    """compare.samples_per_prompt = 3: every model answers each prompt 3 times (rows <id>/<j>, a prompt's
    rows together), the baseline stage answers the same rows so compare reuses them, counts are per
    prompt, and the report shows each prompt once."""
    import shutil

    from stages import baseline, compare

    run, _, _ = compared
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("baseline", "compare"))
    config = load_cfg(copy)
    config = config.model_copy(update={"compare": config.compare.model_copy(update={"samples_per_prompt": 3})})
    baseline.run(config, copy)
    summary = compare.run(config, copy)
    m = json.loads((copy / "compare" / "metrics.json").read_text())
    assert (m["num_prompts"], m["samples_per_prompt"], m["num_responses"], m["num_harmful_prompts"]) == (4, 3, 12, 2)
    assert summary["num_prompts"] == 4
    b = json.loads((copy / "baseline" / "summary.json").read_text())
    assert (b["num_prompts"], b["num_responses"]) == (4, 12)
    assert m["per_model"]["baseline"]["source"].startswith("baseline stage")
    ids = [f"p{i}/{j}" for i in range(1, 5) for j in range(3)]
    for lab in m["models"]:
        rows = [json.loads(x) for x in (copy / "compare" / "generations" / f"{lab}.jsonl").read_text().splitlines()]
        assert [r["id"] for r in rows] == ids
        assert [r["offensive_prob"] is not None for r in rows] == [False] * 3 + [True] * 3 + [False] * 3 + [True] * 3
        assert len({r["response"] for r in rows[:3]}) > 1  # sampled afresh, not copied
    assert m["per_model"]["ppo"]["kl_to_reference"] != 0.0
    md = (copy / "compare" / "report.md").read_text()
    assert "4 eval prompts, 3 responses to each from every model" in md
    assert "### p2/0" in md and "### p2/1" not in md


def test_compare_generates_the_baseline_itself_when_the_stage_has_not_run(compared, tmp_path):
    """Without the baseline stage's generations the prompted model samples in compare itself."""
    import shutil

    from stages import compare

    run, _, _ = compared
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("baseline", "compare"))
    compare.run(load_cfg(copy), copy)
    pm = json.loads((copy / "compare" / "metrics.json").read_text())["per_model"]
    assert pm["baseline"]["source"] == "generated" and pm["baseline"]["mean_length_tokens"] > 0


def test_compare_needs_the_models_it_names(compared, tmp_path):
    from stages import compare
    from stages.core.errors import StageError

    run, _, _ = compared
    empty_run = tmp_path / "empty"  # same config, but no stage has produced a model here
    with pytest.raises(StageError, match="needs the sft stage's model"):
        compare.run(load_cfg(run), empty_run)


def test_compare_entry_point_gives_one_line_error(tmp_path, capsys):
    from stages.compare import run as compare_run
    from stages.core.entry import stage_main

    cfg = tiny_config(tmp_path / "run", tmp_path / "missing.jsonl")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as e:
        stage_main("compare", compare_run, ["--run-dir", str(tmp_path / "run")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: compare:") and "missing.jsonl" in err and "\n" not in err


def test_judges_lead_with_a_held_out_rm_and_human_labels_give_win_rates_and_agreement(compared, tmp_path):
    """compare.judges = [this run's RM (PPO's), a second RM]: the report leads with the second. Human
    labels on this run's generations give pairwise win rates (Wilson) and each judge's agreement,
    checked here by hand against the judges' own scores."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from pipeline.label_records import Comparison, label_record, save_label, wilson_interval
    from stages import compare
    from stages.modeling.loading import load_tokenizer

    run, _, _ = compared
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("compare"))
    judge = tmp_path / "judge-rm"
    cfg = LlamaConfig.from_pretrained(copy / "reward" / "model")
    torch.manual_seed(7)
    LlamaForSequenceClassification(cfg).save_pretrained(judge)
    load_tokenizer(str(copy / "reward" / "model")).save_pretrained(judge)

    # a person's labels on the generations compare will make (same seed, same settings)
    gens = {lab: [json.loads(x) for x in (run / "compare" / "generations" / f"{lab}.jsonl").read_text().splitlines()]
            for lab in ("sft", "ppo")}
    labels = tmp_path / "labels.jsonl"
    choices = ["A", "A", "B", "tie"]  # ppo is side A: ppo wins 2, loses 1, one tie
    for k, choice in enumerate(choices):
        a, b = gens["ppo"][k], gens["sft"][k]
        comp = Comparison(f"c{k}", a["id"], a["messages"], "ppo", a["response"], "sft", b["response"])
        save_label(labels, label_record(comp, choice))

    config = load_cfg(copy)
    config = config.model_copy(update={"compare": config.compare.model_copy(
        update={"judges": ["reward", str(judge)], "human_labels": str(labels)})})
    summary = compare.run(config, copy)
    m = json.loads((copy / "compare" / "metrics.json").read_text())
    assert [j["name"] for j in m["judges"]] == ["reward", "judge-rm"]
    assert [j["optimised_by_ppo"] for j in m["judges"]] == [True, False]
    assert m["lead_judge"] == "judge-rm" and m["reward_model_optimised_by_ppo"] is False
    assert summary["lead_judge"] == "judge-rm" and "judge_reward_win_rate_ppo_vs_sft" in summary
    # a judge that differs from the proxy gives different scores and win rates, and the headline follows the lead
    assert m["judges"][0]["mean_reward"] != m["judges"][1]["mean_reward"]
    assert m["judges"][0]["win_rates"] != m["judges"][1]["win_rates"]
    assert m["win_rates"] == m["judges"][1]["win_rates"]

    human = m["human"]["win_rates"]["ppo"]["sft"]
    assert (human["wins"], human["losses"], human["ties"]) == (2, 1, 1)
    assert human["win"] == pytest.approx(2 / 3) and human["ci95"] == pytest.approx(list(wilson_interval(2, 3)))
    assert summary["human_win_rate_ppo_vs_sft"] == pytest.approx(2 / 3, abs=1e-4)

    for j in m["judges"]:  # agreement by hand from the judge's per-response scores
        rows = {lab: [json.loads(x) for x in (copy / "compare" / "generations" / f"{lab}.jsonl").read_text().splitlines()]
                for lab in ("sft", "ppo")}
        assert [r["response"] for r in rows["ppo"]] == [r["response"] for r in gens["ppo"]]  # labels match
        score = {lab: [r["reward"] for r in rows[lab]] for lab in rows} if j["name"] == "judge-rm" else None
        if score is not None:  # generations carry the lead judge's scores
            winners = ["ppo", "ppo", "sft"]
            expected = sum(1.0 if score[w][k] > score[o][k] else 0.0
                           for k, (w, o) in enumerate((w, "sft" if w == "ppo" else "ppo") for w in winners))
            assert j["human_agreement"]["agreement"] == pytest.approx(expected / 3)
        assert j["human_agreement"]["n"] == 3 and j["human_agreement"]["unmatched"] == 0
    md = (copy / "compare" / "report.md").read_text()
    assert "## Judges" in md and "judge-rm (leads this report)" in md and "## Human labels (3 decisive of 4)" in md
    assert "a held-out judge" in md


def test_a_bad_human_labels_file_stops_preflight_in_one_line(tmp_path):
    import os
    import subprocess
    import sys

    bad = tmp_path / "labels.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b"}) + "\n")
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "configs/tiny.yaml", f"runs_root={tmp_path}",
                           f"compare.human_labels={bad}", "--dry-run"], cwd=repo, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {bad}:1: meta: not a row written by `rlhf label` "
                                                "(needs meta.label, meta.comparison_id, meta.model_a, meta.model_b)"]


def test_report_plots_the_monitor_against_sqrt_kl(compared, tmp_path):
    from stages.evaluation.report import write_report

    run, m, _ = compared
    gen_rows = {lab: [json.loads(x) for x in (run / "compare" / "generations" / f"{lab}.jsonl").read_text().splitlines()]
                for lab in m["models"]}
    ppo_rows = [{"step": i, "monitor_kl": 0.5 * i, "monitor_sqrt_kl": math.sqrt(0.5 * i), "monitor_proxy": 0.3 * i,
                 "monitor_judge_held_out": 0.2 - 0.1 * i} for i in range(4)]
    plots = write_report(tmp_path, m, gen_rows, ppo_rows)
    assert plots["Over-optimisation monitor (ppo.monitor): proxy and judges against sqrt(KL)"] == \
        "plots/overoptimisation.png"
    assert (tmp_path / "plots" / "overoptimisation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "overoptimisation.png" in (tmp_path / "report.html").read_text()
    assert "overoptimisation.png" not in (run / "compare" / "report.md").read_text()  # no monitor rows there


def test_best_of_n_picks_the_sft_sample_the_proxy_rm_scores_highest(compared, tmp_path):
    """best_of_3: 3 SFT samples per prompt, PPO's RM picks one. The first candidate is the SFT row's own
    sample (same seed and decoding), so per prompt the pick scores at least as high as SFT under that RM."""
    import shutil

    from stages import compare

    run, _, _ = compared
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("compare"))
    config = load_cfg(copy)
    config = config.model_copy(update={"compare": config.compare.model_copy(update={"best_of_n": 3})})
    summary = compare.run(config, copy)
    m = json.loads((copy / "compare" / "metrics.json").read_text())
    assert m["models"] == ["baseline", "sft", "ppo", "best_of_3"] and "win_rate_best_of_3_vs_sft" in summary
    assert m["per_model"]["best_of_3"]["kl_to_reference"] is None and "log N" in m["notes"]["best_of_n"]
    rows = {lab: [json.loads(x) for x in (copy / "compare" / "generations" / f"{lab}.jsonl").read_text().splitlines()]
            for lab in ("sft", "best_of_3")}
    assert m["lead_judge"] == "reward"  # the only judge is PPO's RM, which also picked
    assert all(b["reward"] >= s["reward"] - 1e-6 for b, s in zip(rows["best_of_3"], rows["sft"]))
    assert any(b["response"] != s["response"] for b, s in zip(rows["best_of_3"], rows["sft"]))
    assert "**Best of N**" in (copy / "compare" / "report.md").read_text()


def test_model_labels_keep_two_runs_reward_models_apart():
    from stages.core.run_folder import model_label

    assert [model_label(r) for r in ("sft", "baseline", "runs/hh/reward/model", "/x/runs/judge/reward/model/",
                                     "runs/q/ppo/best", "HuggingFaceTB/SmolLM2-135M", "/tmp/my rm")] == \
        ["sft", "baseline", "hh-reward", "judge-reward", "q-ppo-best", "SmolLM2-135M", "my_rm"]
