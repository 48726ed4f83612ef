"""The PPO stage on the tiny 2-layer model: artifacts, what trains and what stays frozen, the LoRA
path's single base copy, resume (in-process and after SIGKILL), and a verifiable-reward learning
curve. The math itself is tested in test_ppo_math.py."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from stages import ppo
from stages.core.config_schema import RunConfig
from stages.core.errors import StageError
from stages.core.metrics_log import read_metrics

REPO = Path(__file__).resolve().parents[1]
TINY_PPO = {"prompts": {"source": "default:prompts", "limit": 16}, "iterations": 2, "batch_size": 4,
            "mini_batch_size": 2, "ppo_epochs": 1, "max_new_tokens": 6, "lr": 1e-4}
# Wall-clock and throughput fields differ between runs by nature.
TIMING_KEYS = {"time", "samples_per_s", "tokens_per_s", "generate_s", "score_s", "train_s", "iteration_s"}
# KL between two copies of the same weights. The policy's and the reference's passes batch the same
# tokens differently, and fp32 matrix products on an AVX2-only CPU round differently per shape: a
# 2-core AMD EPYC gave 2.4e-7 nats where the AMX Xeon gave exactly 0. One optimiser step gives far more.
KL_ZERO = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, tiny_model_dir):
    """sft/model (causal LM) and reward/model (1-label classifier + reward_stats.json) from the tiny model."""
    from stages.modeling.loading import load_causal_lm, load_reward_model, load_tokenizer

    root = tmp_path_factory.mktemp("upstream")
    tok = load_tokenizer(str(tiny_model_dir))
    lm = load_causal_lm(str(tiny_model_dir))
    lm.save_pretrained(root / "sft" / "model")
    tok.save_pretrained(root / "sft" / "model")
    rm = load_reward_model(str(tiny_model_dir), pad_token_id=tok.pad_token_id)
    torch.manual_seed(1)
    torch.nn.init.normal_(rm.score.weight, std=0.5)  # a head with some spread, so scores vary
    rm.save_pretrained(root / "reward" / "model")
    tok.save_pretrained(root / "reward" / "model")
    (root / "reward" / "model" / "reward_stats.json").write_text(json.dumps({"mean": 0.1, "std": 2.0}))
    return root


def make_run(tmp_path: Path, upstream: Path, name: str = "run", **ppo_overrides) -> tuple[RunConfig, Path]:
    run_dir = tmp_path / name
    run_dir.mkdir()
    for stage in ("sft", "reward"):
        (run_dir / stage).symlink_to(upstream / stage)
    cfg = RunConfig.model_validate({"name": name, "model": "tiny-random-llama", "ppo": {**TINY_PPO, **ppo_overrides}})
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return cfg, run_dir


def capture_models(monkeypatch) -> dict:
    """Record the models the stage loads (and the parameters they started with)."""
    seen = {}
    real = ppo.load_models

    def spy(*a, **k):
        models = real(*a, **k)
        seen["models"] = models
        seen["policy0"] = {n: p.detach().clone() for n, p in models.policy.named_parameters()}
        if models.value is not None:
            seen["value0"] = {n: p.detach().clone() for n, p in models.value.named_parameters()}
        seen["policy_storage"] = _unique_numel(models.policy)
        seen["adapters"] = sum(p.numel() for p in models.policy.parameters() if p.requires_grad)
        if models.ref is not None:
            seen["ref0"] = {n: p.detach().clone() for n, p in models.ref.state_dict().items()}
        return models

    monkeypatch.setattr(ppo, "load_models", spy)
    return seen


def _rows(run_dir):
    return [r for r in read_metrics(run_dir, "ppo") if "score_raw_mean" in r]


# ---- a full run ----

def test_two_iterations_artifacts_training_and_frozen_reference(tmp_path, upstream, monkeypatch):
    cfg, run_dir = make_run(tmp_path, upstream)
    seen = capture_models(monkeypatch)
    summary = ppo.run(cfg, run_dir)
    out = run_dir / "ppo"

    for f in ("config.yaml", "metrics.jsonl", "samples.jsonl", "summary.json", "model/config.json",
              "model/model.safetensors", "model/tokenizer.json", "checkpoints/iter-2/state.json",
              "checkpoints/iter-2/policy.safetensors", "checkpoints/iter-2/value.safetensors",
              "checkpoints/iter-2/optimizer.pt", "checkpoints/iter-2/rng.pt"):
        assert (out / f).exists(), f
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("score_raw_mean", "score_raw_std", "score_mean", "reward_shaped_mean", "kl", "kl_coef", "entropy",
                "clipfrac", "value_loss", "policy_loss", "approx_kl", "ratio_mean", "ratio_max", "response_length",
                "eos_rate", "samples_per_s", "tokens_per_s", "generate_s", "score_s", "train_s"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert abs(rows[0]["kl"]) < KL_ZERO  # the policy starts as the reference
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["iteration"] for s in samples] == [1, 1, 2, 2]
    assert set(samples[0]) == {"iteration", "prompt", "response", "score_raw", "score", "eos"}
    assert summary["iterations"] == 2 and summary["reward_mean"] == rows[-1]["score_raw_mean"]
    assert json.loads((out / "summary.json").read_text()) == summary

    m = seen["models"]
    changed = [n for n, p in m.policy.named_parameters() if not torch.equal(p, seen["policy0"][n])]
    assert changed, "no policy parameter changed"
    assert any(not torch.equal(p, seen["value0"][n]) for n, p in m.value.named_parameters())
    for n, t in m.ref.state_dict().items():  # the reference is bitwise untouched
        assert torch.equal(t, seen["ref0"][n]), n
    assert not any(p.requires_grad for p in m.ref.parameters())
    assert not any(p.requires_grad for p in m.reward.parameters())

    # The export is a plain causal LM holding the trained weights.
    from stages.modeling.loading import load_causal_lm

    exported = dict(load_causal_lm(str(out / "model")).named_parameters())
    name = changed[0]
    assert torch.equal(exported[name], dict(m.policy.named_parameters())[name])


def test_scoring_pass_matches_the_training_pass(tmp_path, upstream):
    """With a vanishing learning rate the policy cannot move, so every minibatch must see ratio 1:
    the no-grad scoring pass (big chunks) and the training pass (minibatches) compute the same
    log-probs and values for the same tokens (alignment, masks, positions, temperature)."""
    cfg, run_dir = make_run(tmp_path, upstream, iterations=1, lr=1e-30, temperature=0.7, batch_size=4,
                            mini_batch_size=1, ppo_epochs=2)
    ppo.run(cfg, run_dir)
    row = _rows(run_dir)[0]
    assert row["ratio_max"] == pytest.approx(1.0, abs=1e-4) and row["approx_kl"] < 1e-9
    assert row["clipfrac"] == 0.0 and row["value_clipfrac"] == 0.0


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_first_iteration_kl_is_zero_under_every_precision(tmp_path, upstream, precision):
    """Before any update the policy is the reference, so KL must be 0: exactly under bf16 (the frozen
    reference computes what the fp32-master policy computes under autocast), and within generation's
    fp32 rounding (FP32_GENERATION_TOL per token) where π_old's log-probs come from generation."""
    from test_precision import FP32_GENERATION_TOL

    cfg, run_dir = make_run(tmp_path, upstream, iterations=1)
    ppo.run(cfg.model_copy(update={"precision": precision}), run_dir)
    row = _rows(run_dir)[0]
    tol = 0.0 if precision == "bf16" else FP32_GENERATION_TOL * TINY_PPO["max_new_tokens"]
    assert abs(row["kl"]) <= tol, row["kl"]
    summary = json.loads((run_dir / "ppo" / "summary.json").read_text())
    assert summary["precision"] == precision and summary["threads"] == torch.get_num_threads()


def test_spike_guard_rolls_back_to_the_last_checkpoint(tmp_path, upstream, monkeypatch):
    """A spike (here any KL above a tiny bound) restores the last good state on disk: iteration 1 trains,
    iteration 2's rollout has KL > bound, so policy and value go back to the iteration-0 checkpoint and
    the next minibatch is skipped; iteration 3 then starts from the reference weights again (KL exactly
    0 under bf16, so restored bit for bit) and trains. bf16: iteration 1's KL is exactly 0, no spike."""
    cfg, run_dir = make_run(tmp_path, upstream, iterations=3, lr=1e-3)
    guard = cfg.guard.model_copy(update={"max_kl": 1e-6, "skip_batches": 1})
    cfg = cfg.model_copy(update={"precision": "bf16", "guard": guard})
    seen = capture_models(monkeypatch)
    ppo.run(cfg, run_dir)
    rows = read_metrics(run_dir, "ppo")
    spikes = [r for r in rows if r.get("event") == "spike"]
    assert len(spikes) == 1 and spikes[0]["step"] == 2 and spikes[0]["restored_step"] == 0
    assert "KL" in spikes[0]["reason"]
    it = {r["step"]: r for r in rows if "score_raw_mean" in r}
    assert it[1]["kl"] == 0.0 and it[2]["kl"] > 1e-6 and it[2]["skipped_minibatches"] == 2
    assert it[3]["kl"] == 0.0 and it[3]["skipped_minibatches"] == 0  # iteration 1's update undone
    m = seen["models"]
    assert any(not torch.equal(p, seen["policy0"][n]) for n, p in m.policy.named_parameters())  # 3 trained


# ---- LoRA: one base copy ----

def test_lora_reference_is_the_adapter_disabled_policy(tmp_path, upstream, monkeypatch):
    import peft

    calls = []
    real_disable = peft.PeftModel.disable_adapter

    def counting_disable(self):
        calls.append(type(self).__name__)
        return real_disable(self)

    monkeypatch.setattr(peft.PeftModel, "disable_adapter", counting_disable)
    cfg, run_dir = make_run(tmp_path, upstream, lora={"enabled": True, "r": 4, "alpha": 8}, lr=1e-3)
    seen = capture_models(monkeypatch)
    ppo.run(cfg, run_dir)
    assert seen["models"].ref is None
    assert len(calls) >= 2  # one reference pass per iteration, through the adapter-disabled policy
    # Policy + reference hold one base: the policy's storage is exactly the base plus the adapters.
    from stages.modeling.loading import load_causal_lm

    base = _unique_numel(load_causal_lm(str(upstream / "sft" / "model")))
    assert seen["adapters"] > 0 and seen["policy_storage"] == base + seen["adapters"]
    rows = _rows(run_dir)
    assert abs(rows[0]["kl"]) < KL_ZERO and abs(rows[1]["kl"]) > 10 * KL_ZERO  # LoRA B starts at 0; an update moves KL
    # Only the adapters train (the checkpoint holds the trainable tensors), and they moved.
    from safetensors.torch import load_file

    trained = load_file(str(run_dir / "ppo" / "checkpoints" / "iter-2" / "policy.safetensors"))
    assert trained and all("lora_" in n for n in trained)
    assert set(trained) <= set(seen["policy0"])
    assert any(not torch.equal(t, seen["policy0"][n]) for n, t in trained.items())
    exported = load_causal_lm(str(run_dir / "ppo" / "model"))  # merged: plain weights, no adapter keys
    assert not any("lora" in n for n, _ in exported.named_parameters())


def _unique_numel(*modules) -> int:
    seen, total = set(), 0
    for mod in modules:
        for t in list(mod.parameters()) + list(mod.buffers()):
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.numel()
    return total


def test_value_lora_shares_the_reward_model_base(tmp_path, upstream):
    from stages.modeling.loading import load_reward_model
    from stages.modeling.reward_scoring import last_token_scores
    from stages.rl.ppo_models import load_models, reward_model_scores

    cfg, run_dir = make_run(tmp_path, upstream, value_lora={"enabled": True, "r": 4, "alpha": 8})
    m = load_models(cfg, run_dir, pad_token_id=0)
    assert m.reward is None and m.reward_shared
    with torch.no_grad():  # move the value adapter and head away from the RM
        for n, p in m.value.named_parameters():
            if p.requires_grad:
                p.add_(0.05)
    ids = torch.randint(3, 1000, (2, 9))
    attn = torch.ones_like(ids)
    attn[1, :3] = 0  # a left-padded row
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    rm = load_reward_model(str(upstream / "reward" / "model"))
    with torch.no_grad():
        expected = last_token_scores(rm, ids, attn, pos)
        got = reward_model_scores(m, m.value, ids, attn, pos)
        values = m.value(ids, attn, pos, 4)
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(values[:, -1], expected, atol=1e-3)  # the value path does use the adapter


@pytest.mark.parametrize("normalise", [True, False])
def test_value_from_the_rm_is_on_the_normalised_reward_scale(tmp_path, upstream, normalise):
    """The value starts from the RM; with normalised rewards ((raw - mean) / std, here mean 0.1,
    std 2.0) it must read the RM's head on that same scale, or every return starts ~mean/std off."""
    from stages.modeling.loading import load_reward_model
    from stages.modeling.reward_scoring import ValueModel
    from stages.rl.ppo_models import load_models

    cfg, run_dir = make_run(tmp_path, upstream, reward_normalize=normalise)
    m = load_models(cfg, run_dir, pad_token_id=0)
    ids = torch.randint(3, 1000, (2, 9))
    attn = torch.ones_like(ids)
    pos = attn.cumsum(-1) - 1
    raw = ValueModel(load_reward_model(str(upstream / "reward" / "model")))
    with torch.no_grad():
        expected = raw(ids, attn, pos, 4)
        got = m.value(ids, attn, pos, 4)
    assert m.reward_stats == ({"mean": 0.1, "std": 2.0} if normalise else None)
    assert torch.allclose(got, (expected - 0.1) / 2.0 if normalise else expected, atol=1e-5)
    assert expected.abs().max() > 0.05  # the check has something to see


# ---- resume ----

# ---- advantage 'group': no value model ----

GROUP = {"advantage": "group", "samples_per_prompt": 2}


def test_group_advantage_has_no_value_model_and_samples_each_prompt_as_a_group(tmp_path, upstream, monkeypatch):
    cfg, run_dir = make_run(tmp_path, upstream, **GROUP, save_every=1)
    seen = capture_models(monkeypatch)
    ppo.run(cfg, run_dir)
    m, ckpt = seen["models"], run_dir / "ppo" / "checkpoints" / "iter-2"
    assert m.value is None and m.value_path is None and m.reward is not None
    assert (ckpt / "policy.safetensors").exists() and not (ckpt / "value.safetensors").exists()
    assert set(torch.load(ckpt / "optimizer.pt", weights_only=True)) == {"policy"}
    assert any(not torch.equal(p, seen["policy0"][n]) for n, p in m.policy.named_parameters())
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["policy_loss"]) for r in rows)
    assert not any(k in r for r in rows for k in ("value_loss", "value_clipfrac", "grad_norm_value"))
    # The first two rollouts of each iteration (those samples.jsonl keeps) answer one prompt.
    samples = [json.loads(line) for line in (run_dir / "ppo" / "samples.jsonl").read_text().splitlines()]
    assert [s["iteration"] for s in samples] == [1, 1, 2, 2]
    assert samples[0]["prompt"] == samples[1]["prompt"] and samples[2]["prompt"] == samples[3]["prompt"]


def test_group_advantage_resume_reproduces_the_uninterrupted_run(tmp_path, upstream):
    cfg, full_dir = make_run(tmp_path, upstream, "full", **GROUP, iterations=3, save_every=1)
    ppo.run(cfg, full_dir)
    cfg2, split_dir = make_run(tmp_path, upstream, "split", **GROUP, iterations=1, save_every=1)
    ppo.run(cfg2, split_dir)
    cfg3 = RunConfig.model_validate({**cfg2.model_dump(), "ppo": {**cfg2.ppo.model_dump(), "iterations": 3}})
    assert ppo.run(cfg3, split_dir)["resumed_from"] == 1
    assert_same_metrics(full_dir, split_dir, {2, 3})


@pytest.mark.parametrize("bad, message", [
    ({"advantage": "group"}, "needs samples_per_prompt >= 2"),
    ({"samples_per_prompt": 3}, "samples_per_prompt \\(3\\) must divide batch_size \\(4\\)"),
    ({**GROUP, "value_lora": {"enabled": True}}, "value_lora adapts the value model"),
])
def test_group_settings_are_checked(bad, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        RunConfig.model_validate({"ppo": {**TINY_PPO, **bad}})


def _comparable(rows, steps):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows if r["step"] in steps]


def assert_same_metrics(a_dir, b_dir, steps):
    """Two runs logged the same metrics (timings aside) at `steps`, within float noise."""
    for ra, rb in zip(_comparable(_rows(a_dir), steps), _comparable(_rows(b_dir), steps), strict=True):
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-7), (ra["step"], k)


def test_resume_reproduces_the_uninterrupted_run(tmp_path, upstream):
    cfg, full_dir = make_run(tmp_path, upstream, "full", iterations=4, save_every=2)
    ppo.run(cfg, full_dir)
    cfg2, split_dir = make_run(tmp_path, upstream, "split", iterations=2, save_every=2)
    ppo.run(cfg2, split_dir)
    cfg3 = RunConfig.model_validate({**cfg2.model_dump(), "ppo": {**cfg2.ppo.model_dump(), "iterations": 4}})
    summary = ppo.run(cfg3, split_dir)
    assert summary["resumed_from"] == 2
    assert [r["step"] for r in _rows(split_dir)] == [1, 2, 3, 4]
    assert_same_metrics(full_dir, split_dir, {3, 4})
    samples = lambda d: [json.loads(x) for x in (d / "ppo" / "samples.jsonl").read_text().splitlines()]  # noqa: E731
    assert samples(full_dir) == samples(split_dir)  # the same completions were sampled


def test_resume_refuses_a_changed_config(tmp_path, upstream):
    cfg, run_dir = make_run(tmp_path, upstream, iterations=1)
    ppo.run(cfg, run_dir)
    changed = RunConfig.model_validate({**cfg.model_dump(), "ppo": {**cfg.ppo.model_dump(), "lr": 3e-4}})
    with pytest.raises(StageError, match="different ppo config"):
        ppo.run(changed, run_dir)


def test_sigkill_then_resume_continues_from_the_checkpoint(tmp_path, upstream):
    cfg, run_dir = make_run(tmp_path, upstream, iterations=8, save_every=1, max_new_tokens=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "stages.ppo", "--run-dir", str(run_dir)]
    ckpts = run_dir / "ppo" / "checkpoints"
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not list(ckpts.glob("iter-*/state.json")):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(int(p.parent.name.split("-")[1]) for p in ckpts.glob("iter-*/state.json"))
    assert done and done[-1] < 8, f"the run was not interrupted mid-way (checkpoints: {done})"
    assert not (run_dir / "ppo" / "summary.json").exists()

    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resuming from {ckpts / f'iter-{done[-1]}'}" in res.stdout
    summary = json.loads((run_dir / "ppo" / "summary.json").read_text())
    assert summary["resumed_from"] == done[-1] and summary["iterations"] == 8
    assert [r["step"] for r in _rows(run_dir)] == list(range(1, 9))  # nothing logged twice or lost
    assert sorted(p.name for p in ckpts.iterdir() if not p.name.startswith(".")) == ["iter-7", "iter-8"]


# ---- the other knobs run ----

def test_adaptive_k3_ema_ptx_and_missing_stats(tmp_path, upstream, monkeypatch, capsys):
    cfg, run_dir = make_run(tmp_path, upstream, adaptive_kl=True, kl_target=0.01, kl_horizon=10, kl_estimator="k3",
                            ema_decay=0.5, ptx_coef=0.5, reward_model=str(tmp_path / "rm"))
    shutil.copytree(upstream / "reward" / "model", tmp_path / "rm")
    (tmp_path / "rm" / "reward_stats.json").unlink()
    cfg = RunConfig.model_validate({**cfg.model_dump(), "sft": {"data": {"source": "default:demonstrations", "limit": 8}}})
    seen = capture_models(monkeypatch)
    ppo.run(cfg, run_dir)
    assert "reward_stats.json is missing" in capsys.readouterr().err
    rows = _rows(run_dir)
    assert rows[0]["kl_coef"] == 0.05 and rows[1]["kl_coef"] != 0.05  # the controller moved β
    assert all(r["kl"] >= 0 for r in rows)  # k3 is never negative
    assert all(math.isfinite(r["ptx_loss"]) for r in rows)
    # The export holds the EMA weights (kept in the checkpoint), which differ from both the start and
    # the live policy that the same checkpoint holds.
    from safetensors.torch import load_file

    from stages.modeling.loading import load_causal_lm

    ckpt = run_dir / "ppo" / "checkpoints" / "iter-2"
    ema, live = load_file(str(ckpt / "ema.safetensors")), load_file(str(ckpt / "policy.safetensors"))
    exported = dict(load_causal_lm(str(run_dir / "ppo" / "model")).named_parameters())
    assert set(ema) == set(live) == set(seen["policy0"])
    for n in ema:
        assert torch.equal(exported[n], ema[n]), n
    assert any(not torch.equal(ema[n], live[n]) for n in ema)
    assert any(not torch.equal(ema[n], seen["policy0"][n]) for n in ema)


def test_bad_reward_fn_is_one_clear_error(tmp_path, upstream):
    cfg, run_dir = make_run(tmp_path, upstream, reward_fn="stages.rl.reward_functions:no_such_fn")
    with pytest.raises(StageError, match="no function 'no_such_fn'"):
        ppo.run(cfg, run_dir)


def test_shape_scores_normalise_clip_then_penalise():
    from stages.rl.rollout import shape_scores

    raw = torch.tensor([0.1, 20.1, -3.9])
    out = shape_scores(raw, {"mean": 0.1, "std": 2.0}, clip=5.0, missing_eos_penalty=1.0,
                           has_eos=torch.tensor([True, True, False]))
    # (0.1-0.1)/2 = 0;  (20.1-0.1)/2 = 10 -> clipped to 5;  (-3.9-0.1)/2 = -2, no EOS: -2 - 1 = -3
    assert torch.allclose(out, torch.tensor([0.0, 5.0, -3.0]))
    assert torch.allclose(shape_scores(raw, None, None, None, torch.tensor([False] * 3)), raw)


# ---- learning: a verifiable reward goes up ----

WORDS = ["yes", "sure", "great", "glad", "no", "maybe", "ok", "later"]  # the first four are target words


def word_policy(tiny_model_dir, out: Path) -> None:
    """The tiny random model, edited so it mostly says one of eight words (plus sometimes EOS).

    Embedding dimension 0 is set to a constant for every token, so every hidden state carries that
    direction after RMSNorm; the eight words (and EOS) get a large value there, so their logits
    stand above the other 49k tokens in every context. Half of the words are in the target set of
    `target_word_fraction`, so the initial reward is about 0.5 and PPO has room to raise it."""
    from stages.modeling.loading import load_causal_lm, load_tokenizer
    from stages.rl.reward_functions import TARGET_WORDS

    assert set(WORDS[:4]) <= TARGET_WORDS and not set(WORDS[4:]) & TARGET_WORDS
    tok = load_tokenizer(str(tiny_model_dir))
    lm = load_causal_lm(str(tiny_model_dir))
    ids = [tok(" " + w, add_special_tokens=False).input_ids for w in WORDS]
    assert all(len(i) == 1 for i in ids)
    with torch.no_grad():
        emb = lm.model.embed_tokens.weight
        emb[:, 0] = 0.2
        emb[[i[0] for i in ids], 0] = 2.5
        emb[tok.eos_token_id, 0] = 2.0
    lm.save_pretrained(out)
    tok.save_pretrained(out)


LEARN = dict(iterations=20, batch_size=16, mini_batch_size=8, ppo_epochs=2, max_new_tokens=4, lr=3e-4,
             reward_fn="stages.rl.reward_functions:target_word_fraction", value_init="policy", missing_eos_penalty=None,
             save_every=100)


@pytest.mark.parametrize("advantage", [{}, {"advantage": "group", "samples_per_prompt": 4}], ids=["gae", "group"])
def test_ppo_raises_a_verifiable_reward(tmp_path, tiny_model_dir, advantage):
    run_dir = tmp_path / "learn"
    word_policy(tiny_model_dir, run_dir / "sft" / "model")
    cfg = RunConfig.model_validate({"name": "learn", "model": "tiny-random-llama",
                                    "ppo": {**TINY_PPO, **LEARN, **advantage}})
    ppo.run(cfg, run_dir)
    rows = _rows(run_dir)
    curve = [round(r["score_raw_mean"], 3) for r in rows]
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    print("reward per iteration:", curve, "kl:", [round(r["kl"], 2) for r in rows])
    assert last > first + 0.1, curve
    assert all(math.isfinite(r["kl"]) and r["kl"] < 10 for r in rows)


@pytest.mark.slow
def test_ppo_raises_a_verifiable_reward_smollm2(tmp_path):
    """SmolLM2-135M-Instruct (LoRA policy and value) with the negative-length reward: answers get
    shorter (EOS earlier) within KL bounds. About 6 minutes on 2 busy CPU cores."""
    from stages.modeling.loading import resolve_model

    run_dir = tmp_path / "learn"
    (run_dir / "sft").mkdir(parents=True)
    (run_dir / "sft" / "model").symlink_to(resolve_model("smollm2-135m-instruct"))
    cfg = RunConfig.model_validate({"name": "learn", "model": "smollm2-135m-instruct", "ppo": {
        **TINY_PPO, "prompts": {"source": "default:prompts"}, "iterations": 10, "batch_size": 8,
        "mini_batch_size": 4, "ppo_epochs": 1, "max_new_tokens": 32, "lr": 2e-4, "lora": {"enabled": True},
        "value_lora": {"enabled": True}, "value_init": "policy", "reward_fn": "stages.rl.reward_functions:negative_length",
        "missing_eos_penalty": None, "save_every": 100}})
    ppo.run(cfg, run_dir)
    rows = _rows(run_dir)
    curve = [round(r["score_raw_mean"], 3) for r in rows]
    print("reward per iteration:", curve, "kl:", [round(r["kl"], 2) for r in rows],
          "length:", [round(r["response_length"], 1) for r in rows], "s/iteration:", [round(r["iteration_s"], 1) for r in rows])
    assert sum(curve[-3:]) / 3 > sum(curve[:3]) / 3, curve
    assert all(math.isfinite(r["kl"]) and r["kl"] < 10 for r in rows)


# ---- the over-optimisation monitor ----

def _random_rm(upstream: Path, out: Path, seed: int) -> Path:
    from stages.modeling.loading import load_reward_model, load_tokenizer

    rm = load_reward_model(str(upstream / "reward" / "model"))
    torch.manual_seed(seed)
    torch.nn.init.normal_(rm.score.weight, std=0.5)
    rm.save_pretrained(out)
    load_tokenizer(str(upstream / "reward" / "model")).save_pretrained(out)
    return out


def test_monitor_logs_proxy_judges_and_kl_keeps_the_best_and_leaves_training_alone(tmp_path, upstream):
    from transformers import AutoModelForCausalLM

    judge = _random_rm(upstream, tmp_path / "judge_a", seed=5)
    monitor = {"every": 1, "prompts": {"source": "default:eval_prompts", "limit": 6}, "batch_size": 4,
               # the second judge is the proxy RM itself: its column must equal the proxy's
               "judges": [str(judge), str(upstream / "reward" / "model")]}
    cfg, run_dir = make_run(tmp_path, upstream, "mon", iterations=3, lr=3e-4, monitor=monitor)
    summary = ppo.run(cfg, run_dir)
    rows = [r for r in read_metrics(run_dir, "ppo") if "monitor_kl" in r]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["monitor_kl"] == pytest.approx(0.0, abs=1e-5)  # the policy is still the reference
    assert any(abs(r["monitor_kl"]) > 1e-4 for r in rows[1:])
    for r in rows:
        assert r["monitor_sqrt_kl"] == pytest.approx(math.sqrt(max(r["monitor_kl"], 0.0)))
        assert r[f"monitor_judge_{upstream.name}-reward"] == pytest.approx(r["monitor_proxy"], rel=1e-5, abs=1e-6)
    scores = [r["monitor_judge_judge_a"] for r in rows]
    best_it = rows[max(range(len(scores)), key=lambda k: (scores[k], -k))]["step"]  # first of equal maxima
    best = json.loads((run_dir / "ppo" / "best" / "best.json").read_text())
    assert best["iteration"] == best_it == summary["best_iteration"] and best["judge"] == "judge_a"
    assert summary["best_judge_score"] == pytest.approx(max(scores))
    AutoModelForCausalLM.from_pretrained(run_dir / "ppo" / "best")  # a plain HF folder

    # the monitor samples on a forked RNG: training is what it is without the monitor
    cfg_off, off_dir = make_run(tmp_path, upstream, "off", iterations=3, lr=3e-4)
    ppo.run(cfg_off, off_dir)
    assert _comparable(_rows(off_dir), {1, 2, 3}) == _comparable(_rows(run_dir), {1, 2, 3})

    # resume: a run stopped after 2 iterations continues to the same monitor rows and the same best
    cfg2, split_dir = make_run(tmp_path, upstream, "split", iterations=2, lr=3e-4, save_every=1, monitor=monitor)
    ppo.run(cfg2, split_dir)
    cfg3 = RunConfig.model_validate({**cfg2.model_dump(), "ppo": {**cfg2.ppo.model_dump(), "iterations": 3}})
    summary3 = ppo.run(cfg3, split_dir)
    split_rows = [r for r in read_metrics(split_dir, "ppo") if "monitor_kl" in r]
    assert [r["step"] for r in split_rows] == [0, 1, 2, 3]
    for a, b in zip(split_rows, rows):
        assert {k: v for k, v in a.items() if k != "time"} == \
            pytest.approx({k: v for k, v in b.items() if k != "time"}, rel=1e-5, abs=1e-6)
    assert summary3["best_iteration"] == summary["best_iteration"]


def test_monitor_judges_need_the_monitor_on():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="set every > 0"):
        RunConfig.model_validate({"ppo": {"monitor": {"judges": ["some/rm"]}}})
