"""Reward stage on the tiny model: padding, K-wise batches, the entry point, artifacts, plain HF
loading of the exported RM, resume; plus the opt-in HH-RLHF benchmark."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stages.core.config_schema import RunConfig
from stages.modeling.loading import TINY_MODEL, load_reward_model, load_tokenizer

REPO = Path(__file__).resolve().parents[1]


def tiny_cfg(**reward) -> RunConfig:
    base = {"data": {"source": "default:preferences", "limit": 40}, "init_from": TINY_MODEL, "max_steps": 2,
            "batch_size": 4, "lr": 1e-3, "max_length": 128, "eval_fraction": 0.25}
    return RunConfig.model_validate({"name": "t", "model": TINY_MODEL, "reward": {**base, **reward}})


def _params(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


def test_score_is_read_at_the_last_real_token_for_either_padding(tiny_model_dir):
    tok = load_tokenizer(TINY_MODEL)
    model = load_reward_model(TINY_MODEL, pad_token_id=tok.pad_token_id).eval()
    texts = ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello there, friend.<|im_end|>",
             "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nNo.<|im_end|>"]
    with torch.no_grad():
        alone = [model(**tok(t, return_tensors="pt")).logits[0, 0].item() for t in texts]
        for side in ("right", "left"):
            tok.padding_side = side
            batch = tok(texts, return_tensors="pt", padding=True)
            assert (batch["input_ids"] == tok.pad_token_id).any()
            got = model(**batch).logits[:, 0].tolist()
            assert got == pytest.approx(alone, abs=1e-4), side


def test_kwise_group_batch_layout(tiny_model_dir):
    from data_schemas.records import PreferencePair, Ranking
    from stages.reward import collate_groups, preference_groups

    tok = load_tokenizer(TINY_MODEL)
    prompt = [{"role": "user", "content": "Rank these."}]
    recs = [PreferencePair(prompt=prompt, chosen="good", rejected="bad", margin=0.5),
            Ranking(prompt=prompt, responses=["a", "b", "c", "d"])]
    groups, keys = preference_groups(tok, recs, 64)
    assert [len(g) for g, _ in groups] == [2, 4] and keys[0] == keys[1]
    for rows, _ in groups:
        assert all(r[-1] == tok.eos_token_id for r in rows)  # the reward is read at the reply's EOS
    b = collate_groups(groups, tok.pad_token_id)
    assert b.count == 2 and b.tensors["input_ids"].shape[0] == 6
    comps = b.tensors["comps"]
    assert comps.group.tolist() == [0] + [1] * 6  # 1 pair + C(4,2) comparisons
    assert comps.margin.tolist() == [0.5] + [0.0] * 6


def test_too_long_groups_lose_the_same_prompt_head_for_every_reply():
    from stages.modeling.reward_scoring import reply_rows

    tok = load_tokenizer(TINY_MODEL)
    prompt = "word " * 40
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    r0, r1, r2 = ("A fairly long reply that goes on for a while, then stops.", "No.", "x " * 40)
    own = {r: tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in (r0, r1, r2)}
    assert len(own[r0]) < 40 < len(p_ids) and len(own[r2]) > 40

    rows = reply_rows(tok, prompt, [r0, r1], 40)
    room = 40 - len(own[r0])  # what the longer reply leaves for the prompt
    assert rows == [p_ids[-room:] + own[r0], p_ids[-room:] + own[r1]]  # one context for both replies
    # a reply that alone is too long keeps its own end; its partner then keeps no prompt either
    assert reply_rows(tok, prompt, [r0, r2], 40) == [own[r0], own[r2][-40:]]
    assert reply_rows(tok, prompt, [r1], 10_000) == [p_ids + own[r1]]  # short enough: untouched


def test_padding_free_lays_each_prompt_out_once_and_packs_whole_groups():
    from stages.reward import batch_tokens, collate_groups

    p, q = [7, 7, 7, 7], [8, 8]
    groups = [([p + [1] * 6, p + [2] * 3], None),               # prompt p shared by two replies: 4 + 6 + 3 = 13
              ([q + [3] * 2, q + [4] * 3, q + [5], q + [6]], None),  # a ranking: 2 + 2 + 3 + 1 + 1 = 9
              ([[9, 1, 1], [8, 2, 2]], None),                    # no common prefix (e.g. truncated): 6
              ([q + [3], q + [3]], None)]                        # identical replies keep their last token: 2 + 1 + 1
    b = collate_groups(groups, pad_id=0, padding_free=True)
    ids, pos, mask, ends = (b.tensors[k] for k in ("input_ids", "position_ids", "attention_mask", "ends"))
    assert ids.shape == (3, 13) and mask.shape == (3, 1, 13, 13)  # 32 tokens computed, not 44: rows as wide as the largest group
    assert batch_tokens(b) == 44  # tokens/s counts the data's tokens, as a padded batch has them
    rows = [r for g, _ in groups for r in g]
    flat_ids, flat_pos = ids.flatten(), pos.flatten()
    for i, (r, end) in enumerate(zip(rows, ends.tolist())):
        k, col = divmod(end, 13)
        seen = mask[k, 0, col].nonzero().flatten().tolist()  # what the reply's last token attends to
        assert ids[k, seen].tolist() == r            # exactly the prompt and its own reply, in order
        assert pos[k, seen].tolist() == list(range(len(r)))  # at the positions it has alone
        assert flat_ids[end] == r[-1] and flat_pos[end] == len(r) - 1
    assert (mask.squeeze(1) <= torch.ones(13, 13, dtype=torch.bool).tril()).all()  # never a later token
    assert mask.squeeze(1).diagonal(dim1=1, dim2=2).all()  # every position, tail included, sees itself


@pytest.mark.parametrize("lora", [False, True])
def test_padding_free_rewards_and_loss_equal_padded(tiny_model_dir, lora):
    from data_schemas.records import PreferencePair, Ranking
    from stages.core.config_schema import LoRAConfig
    from stages.modeling.loading import load_reward_model
    from stages.modeling.trainable import apply_lora
    from stages.reward import batch_tokens, collate_groups, make_loss_fn, preference_groups, score

    tok = load_tokenizer(TINY_MODEL)
    recs = [PreferencePair(prompt=[{"role": "user", "content": "Say hi."}], chosen="Hi there, nice to meet you!",
                           rejected="no", margin=0.5),
            Ranking(prompt=[{"role": "user", "content": "Rank these answers about the weather today."}],
                    responses=["Sunny and warm.", "It may rain later this afternoon, bring an umbrella.", "?", "idk"])]
    groups, _ = preference_groups(tok, recs, 64)
    long_prompt = [{"role": "user", "content": "Tell me, in as much detail as you can, about the history of tea."}]
    cut, _ = preference_groups(tok, [PreferencePair(prompt=long_prompt, chosen="Tea came from China long ago.",
                                                    rejected="No.")], 30)  # too long: the prompt loses its head
    groups += cut
    torch.manual_seed(0)
    model = load_reward_model(TINY_MODEL, pad_token_id=tok.pad_token_id)
    if lora:
        model = apply_lora(model, LoRAConfig(enabled=True, r=4), "SEQ_CLS")
    model.eval()
    pf, pb = collate_groups(groups, tok.pad_token_id, True), collate_groups(groups, tok.pad_token_id, False)
    assert pb.tensors["input_ids"].shape[0] == 8 and len(pf.tensors["ends"]) == 8
    assert pf.tensors["input_ids"].numel() < 0.7 * pb.tensors["num_tokens"]  # each prompt computed once, not per reply
    losses, grads = {}, {}
    for name, batch in (("packed", pf), ("padded", pb)):
        model.zero_grad()
        out = make_loss_fn(True)(model, batch)
        out.loss_sum.backward()
        losses[name] = out.loss_sum.item()
        grads[name] = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        a, b = score(model, pf), score(model, pb)
    assert a.shape == (8,) and a.tolist() == pytest.approx(b.tolist(), abs=1e-4)
    assert losses["packed"] == pytest.approx(losses["padded"], rel=1e-4) and batch_tokens(pf) == batch_tokens(pb)
    for ga, gb in zip(grads["packed"], grads["padded"]):  # the same training signal, not just the same scores
        assert torch.allclose(ga, gb, atol=1e-5, rtol=1e-3)
    # and the reward of a reply does not depend on what it was packed with
    alone = collate_groups(groups[:1], tok.pad_token_id, True)
    with torch.no_grad():
        assert score(model, alone).tolist() == pytest.approx(a[:2].tolist(), abs=1e-4)


def test_reward_run_artifacts_plain_hf_scoring_and_resume(tmp_path, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from stages.reward import run

    s1 = run(tiny_cfg(max_steps=2, save_steps=1), tmp_path)
    rdir = tmp_path / "reward"
    files = {str(p.relative_to(rdir)) for p in rdir.rglob("*") if "tensorboard" not in p.parts}
    assert files == {
        "config.yaml", "metrics.jsonl", "summary.json", "checkpoints", "checkpoints/step-1", "checkpoints/step-2",
        *(f"checkpoints/step-{n}/{f}" for n in (1, 2) for f in
          ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json")),
        "model", *(f"model/{f}" for f in ("config.json", "model.safetensors", "reward_stats.json",
                                          "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")),
    }
    summary = json.loads((rdir / "summary.json").read_text())
    assert summary == s1
    assert 0.0 <= s1["eval_accuracy"] <= 1.0 and s1["steps"] == 2
    assert set(s1) >= {"eval_accuracy", "eval_margin", "reward_mean", "reward_std", "steps", "wall_s"}
    rows = [json.loads(x) for x in (rdir / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_accuracy" in r for r in rows)
    stats = json.loads((rdir / "model/reward_stats.json").read_text())
    assert stats["mean"] == pytest.approx(s1["reward_mean"]) and stats["std"] > 0

    # a plain HF load scores like the stage did, batched with the saved tokenizer's padding
    init = load_reward_model(TINY_MODEL)
    rm = AutoModelForSequenceClassification.from_pretrained(rdir / "model").eval()
    assert rm.config.num_labels == 1 and rm.config.pad_token_id is not None
    assert any(not torch.equal(p, init.state_dict()[n]) for n, p in rm.state_dict().items())
    tok = AutoTokenizer.from_pretrained(rdir / "model")
    texts = ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>",
             "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nGo away, I am busy today.<|im_end|>"]
    with torch.no_grad():
        batched = rm(**tok(texts, return_tensors="pt", padding=True)).logits[:, 0].tolist()
        alone = [rm(**tok(t, return_tensors="pt")).logits[0, 0].item() for t in texts]
    assert batched == pytest.approx(alone, abs=1e-4)

    # A kill after the final evaluation was logged, before the export: the re-run resumes from the
    # final checkpoint and evaluates again, and the log keeps one row per event.
    def log_rows():
        return [{k: v for k, v in json.loads(x).items() if k != "time"} for x in (rdir / "metrics.jsonl").read_text().splitlines()]

    logged = log_rows()
    assert run(tiny_cfg(max_steps=2, save_steps=1), tmp_path)["resumed_from"] == 2
    assert log_rows() == logged and sum("eval_accuracy" in r for r in logged) == 1

    step2 = _params(rdir / "model")
    s2 = run(tiny_cfg(max_steps=4, save_steps=1), tmp_path)
    assert s2["resumed_from"] == 2 and s2["steps"] == 4
    steps = [r["step"] for r in map(json.loads, (rdir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == [1, 2, 3, 4]
    after = _params(rdir / "model")
    assert any(not torch.equal(after[k], step2[k]) for k in after)


def test_reward_lora_merges_into_a_plain_checkpoint(tmp_path, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    from stages.reward import run

    s = run(tiny_cfg(max_steps=1, lora={"enabled": True, "r": 4, "alpha": 8}), tmp_path)
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "reward/model")
    assert not any("lora" in n for n, _ in rm.named_parameters())
    assert s["eval_accuracy"] is not None


def test_init_from_sft_needs_the_sft_model(tmp_path):
    from stages.core.errors import StageError
    from stages.reward import run

    with pytest.raises(StageError, match="run `rlhf sft` first"):
        run(tiny_cfg(init_from="sft"), tmp_path)


@pytest.mark.slow
def test_rm_hh_benchmark(shared_data, tmp_path):
    """bench/rm_hh.py end to end on a small slice (the full 1500/300 run is the benchmark itself)."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "bench/rm_hh.py", "--train", "16", "--eval", "8", "--max-length", "256",
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert 0.0 <= result["eval_accuracy"] <= 1.0 and result["train_pairs"] == 16 and result["eval_pairs"] == 8


def test_freeze_layers_trains_only_the_top(tmp_path, tiny_model_dir):
    from stages.reward import run

    run(tiny_cfg(max_steps=2, freeze_layers=1), tmp_path)
    init, after = load_reward_model(TINY_MODEL).state_dict(), _params(tmp_path / "reward" / "model")
    changed = {n for n, t in after.items() if not torch.equal(t, init[n])}
    assert changed and all(n.startswith(("model.layers.1.", "model.norm", "score")) for n in changed), changed
    assert any(n.startswith("model.layers.1.") for n in changed) and "score.weight" in changed
    # the checkpoint holds the trainable part only
    ckpt = _params(tmp_path / "reward" / "checkpoints" / "step-2")
    assert not any(n.startswith(("model.embed_tokens", "model.layers.0.")) for n in ckpt)


def test_freeze_layers_bounds_and_lora_conflict(tmp_path, tiny_model_dir):
    from pydantic import ValidationError

    from stages.core.errors import StageError
    from stages.reward import run

    with pytest.raises(StageError, match="freeze_layers=2 but the model has 2 layers"):
        run(tiny_cfg(freeze_layers=2), tmp_path)
    with pytest.raises(ValidationError, match="pick one"):
        tiny_cfg(freeze_layers=1, lora={"enabled": True})


def test_eval_data_replaces_the_random_split(tmp_path, tiny_model_dir):
    """reward.eval_data: a named preference set is the eval set, all of reward.data trains, and the
    summary reports accuracy and margin on it."""
    from stages.reward import run

    held_out = tmp_path / "held_out.jsonl"
    pairs = [{"prompt": [{"role": "user", "content": f"Question {i}: is the sky blue on a clear day?"}],
              "chosen": "Yes, on a clear day the sky looks blue.", "rejected": "No."} for i in range(5)]
    held_out.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    summary = run(tiny_cfg(eval_data={"source": str(held_out)}), tmp_path / "run")
    assert summary["eval_groups"] == 5 and summary["train_groups"] == 40
    assert summary["eval_source"] == str(held_out)
    assert 0.0 <= summary["eval_accuracy"] <= 1.0 and summary["eval_margin"] is not None
    rows = [json.loads(x) for x in (tmp_path / "run" / "reward" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_accuracy" in r for r in rows)

    default_split = run(tiny_cfg(), tmp_path / "split")
    # Without eval_data a quarter of the 40 records' distinct prompts is held out, and records sharing a
    # prompt stay together, so the counts follow the shipped data (10 / 30 before its unneeded refusals).
    assert default_split["eval_groups"] == 9 and default_split["train_groups"] == 31
    assert default_split["eval_source"].startswith("0.25 of default:preferences")


def test_bad_eval_data_is_one_line_naming_the_file_line_and_field(tmp_path, tiny_model_dir):
    from data_schemas.errors import DataError
    from stages.reward import run

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello!"}) + "\n")
    with pytest.raises(DataError) as e:
        run(tiny_cfg(eval_data={"source": str(bad)}), tmp_path / "run")
    msg = str(e.value)
    assert "\n" not in msg and str(bad) in msg and ":1" in msg and "rejected" in msg
    assert not (tmp_path / "run" / "reward" / "model").exists()
