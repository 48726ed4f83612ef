"""The dialogue-prompted baseline: transcript rendering, stopping at the next user turn (as text,
and in real generation on the tiny model), the prompt file, and the baseline stage's artifacts."""
import json

import pytest
from compare_fixtures import PROMPTS, load_cfg, make_run

from stages.core.config_schema import Decoding
from stages.core.errors import StageError
from stages.evaluation.dialogue_prompt import (REPO_ROOT, load_prompt_text, render_transcript, stop_strings_for,
                                               truncate_at_stop)
from stages.evaluation.responders import PromptedBaseline

STOPS = stop_strings_for("User:", "Assistant:")


def test_truncate_at_stop_cuts_at_the_next_user_turn():
    assert truncate_at_stop(" Boil it for 8 minutes.\nUser: thanks\nAssistant: ok", STOPS) == "Boil it for 8 minutes."
    # the earliest stop wins, whichever string it is
    assert truncate_at_stop(" A\nAssistant: B\nUser: C", STOPS) == "A"
    assert truncate_at_stop("  no stop here \n", STOPS) == "no stop here"
    assert truncate_at_stop("\nUser: immediately", STOPS) == ""
    # "User:" inside a line is not a turn
    assert truncate_at_stop("Ask the User: politely.", STOPS) == "Ask the User: politely."


def test_render_transcript_ends_with_an_open_assistant_turn():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    text = render_transcript("PREAMBLE\n", msgs)
    assert text == "PREAMBLE\nBe brief.\n\nUser: Hi\nAssistant: Hello!\nUser: 2+2?\nAssistant:"
    assert render_transcript("P", msgs[1:2], "Q:", "A:").endswith("\n\nQ: Hi\nA:")


def test_shipped_prompt_is_ours_short_and_has_the_example_turns(tiny_model_dir):
    from stages.modeling.loading import load_tokenizer

    text = load_prompt_text("configs/prompts/dialogue_prompted.txt")
    assert text.count("\nUser:") >= 4 and text.count("\nAssistant:") >= 4
    assert "Gopher" not in text
    n = len(load_tokenizer(str(tiny_model_dir))(text)["input_ids"])
    assert 250 <= n <= 450, n  # prepended to every prompt: its length is paid on every generation


def test_prompt_file_resolves_against_repo_root_and_errors_clearly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_prompt_text("configs/prompts/dialogue_prompted.txt") == \
        (REPO_ROOT / "configs/prompts/dialogue_prompted.txt").read_text().strip() + "\n"
    (tmp_path / "mine.txt").write_text("Custom preamble.\n")
    assert load_prompt_text("mine.txt") == "Custom preamble.\n"  # CWD first
    with pytest.raises(StageError, match="baseline.prompt_file: nope.txt not found"):
        load_prompt_text("nope.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(StageError, match="is empty"):
        load_prompt_text("empty.txt")


def test_generation_really_stops_at_a_stop_string(tiny_model_dir):
    """Seeded sampling on the tiny model: first unstopped, then with a stop string taken from the
    unstopped output (same seed, so the same tokens up to it). The stopped run must end early (fewer
    tokens) and return the text before the stop string."""
    import torch

    decoding = Decoding(max_new_tokens=12, temperature=1.0, top_p=1.0, batch_size=2)
    bot = PromptedBaseline("baseline", str(tiny_model_dir), decoding, "You are helpful.", stops=[])
    convs = [[{"role": "user", "content": "Hello there"}]]
    torch.manual_seed(0)
    full = bot.sample(convs, stop_strings=None)[0]
    assert len(full.response_ids) == 12
    pieces = [bot.tokenizer.decode(full.response_ids[:k]) for k in range(13)]
    k = next(k for k in range(3, 12) if pieces[k][len(pieces[k - 1]):].strip().isalpha()
             and pieces[k][len(pieces[k - 1]):] not in pieces[k - 1])
    stop = pieces[k][len(pieces[k - 1]):]
    bot.stops = [stop]
    torch.manual_seed(0)
    stopped = bot.sample(convs)[0]
    assert len(stopped.response_ids) == k  # generation ended at the stop token, not at max_new_tokens
    assert stopped.text == pieces[k - 1].strip() == full.text[:full.text.index(stop)].strip()


def test_baseline_stage_writes_prompt_and_generations(tmp_path):
    from stages import baseline

    run = make_run(tmp_path, with_ppo=False)
    summary = baseline.run(load_cfg(run), run)
    out = run / "baseline"
    assert (out / "prompt.txt").read_text() == load_prompt_text("configs/prompts/dialogue_prompted.txt")
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [p["id"] for p in PROMPTS]
    assert rows[1]["tags"] == ["harmful"] and rows[2]["messages"] == PROMPTS[2]["messages"]
    assert all("\nUser:" not in r["response"] for r in rows)
    assert summary["num_prompts"] == 4 and summary["prompt_tokens"] > 250
    settings = json.loads((out / "generation_settings.json").read_text())
    assert settings["decoding"]["max_new_tokens"] == 8 and settings["model"] == "tiny-random-llama"
    assert json.loads((out / "summary.json").read_text()) == summary


def test_shared_prefix_helpers():
    from stages.evaluation.responders import middle_padded
    from stages.modeling.tensors import common_prefix

    assert common_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix([[1, 2, 3], [1, 2, 3]]) == 2  # each row keeps one token of its own
    assert common_prefix([[7], [7, 8]]) == 0
    ids, mask = middle_padded([[1, 2, 3, 4], [1, 2, 5]], 2, 0)
    assert ids.tolist() == [[1, 2, 3, 4], [1, 2, 0, 5]] and mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 1]]
    ids, mask = middle_padded([[1, 2, 3], [4]], 0, 0)  # no prefix: plain left padding
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_cached_dialogue_prompt_gives_the_same_samples(tiny_model_dir, monkeypatch):
    """The dialogue prompt's KV cache is computed once and shared by every row and batch; the samples
    must be token-for-token those of running every full prompt through the model."""
    import torch

    from stages.evaluation import responders

    decoding = Decoding(max_new_tokens=6, temperature=1.0, top_p=1.0, batch_size=2)
    bot = PromptedBaseline("baseline", str(tiny_model_dir), decoding,
                           load_prompt_text("configs/prompts/dialogue_prompted.txt"))
    convs = [p["messages"] for p in PROMPTS]  # different lengths, 2 batches
    torch.manual_seed(0)
    cached = bot.sample(convs)
    prefix_ids = bot._prefix[0]
    assert len(prefix_ids) >= 300 and bot.tokenizer.decode(prefix_ids).rstrip().endswith("User:")
    monkeypatch.setattr(responders, "MIN_SHARED_PREFIX", 10**9)
    bot._prefix = None
    torch.manual_seed(0)
    full = bot.sample(convs)
    assert bot._prefix is None
    assert [s.response_ids for s in cached] == [s.response_ids for s in full]
    assert [s.prompt_ids for s in cached] == [s.prompt_ids for s in full]
