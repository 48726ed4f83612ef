"""Spike guard: the decision rule, and rollback + skip on a real (small) training loop."""
import math

import pytest
import torch

from stages.core.config_schema import GuardConfig
from stages.core.errors import StageError
from stages.training.guard import SpikeGuard, spike_reason

CFG = GuardConfig(spike_factor=4.0, min_history=3, window=10, snapshot_every=5, skip_batches=3, max_events=3)


def test_spike_rule():
    hist = [1.0, 1.1, 0.9, 1.0]
    assert spike_reason(CFG, hist, 1.2) is None
    assert spike_reason(CFG, hist, 3.9) is None          # excess 2.9 < (4-1) x median 1.0
    assert "running median" in spike_reason(CFG, hist, 4.1)
    assert spike_reason(CFG, hist[:2], 100.0) is None     # too little history to judge
    assert "non-finite loss" in spike_reason(CFG, hist, float("nan"))
    assert "non-finite grad norm" in spike_reason(CFG, hist, 1.0, grad_norm=float("inf"))
    assert "KL" in spike_reason(CFG, hist, 1.0, kl=CFG.max_kl + 1)
    assert "ratio" in spike_reason(CFG, hist, 1.0, ratio=CFG.max_ratio + 0.5)
    assert spike_reason(CFG, hist, 1.0, kl=1.0, ratio=1.5) is None
    # near-zero / negative medians (PPO losses) are judged on an absolute floor, not a sign flip
    assert spike_reason(CFG, [-0.01, 0.0, 0.01], 0.001) is None


def _train(steps=60, inject=None, guard_cfg=CFG, seed=0):
    """Linear regression with SGD; `inject(step, loss, model)` may corrupt a step."""
    torch.manual_seed(seed)
    x = torch.randn(steps * 8, 4)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.01 * torch.randn(steps * 8)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = SpikeGuard(guard_cfg, {"model": model, "optimizer": opt})
    losses, applied = [], 0
    for step in range(1, steps + 1):
        if guard.should_skip():
            continue
        xb, yb = x[(step - 1) * 8: step * 8], y[(step - 1) * 8: step * 8]
        loss = torch.nn.functional.mse_loss(model(xb).squeeze(-1), yb)
        if inject:
            loss = inject(step, loss, model)
        opt.zero_grad()
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
        if not guard.check(step, loss=loss.item(), grad_norm=gn.item()):
            opt.zero_grad()
            continue
        opt.step()
        applied += 1
        guard.after_step(step)
        losses.append(loss.item())
    with torch.no_grad():
        final = torch.nn.functional.mse_loss(model(x).squeeze(-1), y).item()
    return final, guard, losses


def test_injected_loss_spike_rolls_back_and_skips():
    clean, _, _ = _train()
    # At step 30 the loss is scaled by 1e4: without the guard, SGD would be thrown far off.
    spiky, guard, _ = _train(inject=lambda s, loss, m: loss * 1e4 if s == 30 else loss)
    assert len(guard.events) == 1
    ev = guard.events[0]
    assert ev["step"] == 30 and ev["restored_step"] == 25 and ev["skip_batches"] == 3
    assert spiky == pytest.approx(clean, rel=0.10) or abs(spiky - clean) < 1e-3
    unguarded, _, _ = _train(inject=lambda s, loss, m: loss * 1e4 if s == 30 else loss,
                             guard_cfg=GuardConfig(enabled=False))
    assert not math.isfinite(unguarded) or unguarded > 10 * clean  # the spike does real damage unguarded


def test_nan_gradients_roll_back():
    clean, _, _ = _train()

    def nan_grads(step, loss, model):
        return loss * float("nan") if step == 41 else loss

    final, guard, _ = _train(inject=nan_grads)
    assert [e["step"] for e in guard.events] == [41]
    assert "non-finite" in guard.events[0]["reason"]
    assert math.isfinite(final) and (final == pytest.approx(clean, rel=0.10) or abs(final - clean) < 1e-3)


def test_gives_up_after_max_events():
    with pytest.raises(StageError, match="spike guard gave up after 4 spikes"):
        _train(inject=lambda s, loss, m: loss * float("nan") if s > 20 else loss)


def _adam_setup():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    return model, opt


def _adam_step(model, opt):
    loss = model(torch.randn(8, 4)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_snapshots_reuse_their_buffers_and_hold_the_state_of_their_step():
    model, opt = _adam_setup()
    guard = SpikeGuard(GuardConfig(snapshot_every=1), {"model": model, "optimizer": opt})
    _adam_step(model, opt)
    guard.after_step(1)
    first = guard._snapshot["model"]["weight"]
    ptr = first.data_ptr()
    _adam_step(model, opt)
    guard.after_step(2)
    snap = guard._snapshot
    assert snap["model"]["weight"].data_ptr() == ptr            # overwritten in place, not reallocated
    assert torch.equal(snap["model"]["weight"], model.weight.detach())
    assert snap["model"]["weight"].data_ptr() != model.weight.data_ptr()  # a copy, not the live tensor
    exp_avg = opt.state[model.weight]["exp_avg"]
    assert torch.equal(snap["optimizer"]["state"][0]["exp_avg"], exp_avg)
    assert snap["optimizer"]["state"][0]["exp_avg"].data_ptr() != exp_avg.data_ptr()


def test_rollback_twice_to_one_snapshot_restores_the_same_state():
    # Adam's load_state_dict keeps same-device tensors as given; the guard must hand it a copy, or
    # the steps after a rollback would update the snapshot itself and a second rollback restore them.
    model, opt = _adam_setup()
    guard = SpikeGuard(GuardConfig(snapshot_every=1, min_history=100), {"model": model, "optimizer": opt})
    _adam_step(model, opt)
    guard.after_step(1)
    want_w = model.weight.detach().clone()
    want_m = opt.state[model.weight]["exp_avg"].clone()
    for step in (2, 3):
        _adam_step(model, opt)                                   # a step that changes weights and moments
        assert not guard.check(step, loss=float("nan"))          # judged a spike: roll back to step 1
        assert torch.equal(model.weight.detach(), want_w)
        assert torch.equal(opt.state[model.weight]["exp_avg"], want_m)


def test_a_spike_in_the_sft_stage_is_logged_and_training_goes_on(tmp_path, tiny_model_dir):
    """Through the real entry point: a guard this strict (any loss above the running median is a
    spike) rolls back several times, each event lands in metrics.jsonl and the summary, and the stage
    still finishes. Until 2026-12-01 the first spike crashed SFT and RM with a TypeError: the event's
    own "step" key collided with the logger's step argument."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "configs/tiny.yaml", "--stages", "sft",
                           f"runs_root={tmp_path}", "sft.batch_size=2", "sft.max_steps=16", "sft.lr=3e-2",
                           "guard.min_history=2", "guard.spike_factor=1.0001", "guard.max_events=30",
                           "guard.snapshot_every=2"], cwd=repo, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    sft = tmp_path / "tiny" / "sft"
    events = json.loads((sft / "summary.json").read_text())["spike_events"]
    logged = [json.loads(x) for x in (sft / "metrics.jsonl").read_text().splitlines() if '"spike"' in x]
    assert events and len(logged) == len(events)
    assert [r["step"] for r in logged] == [e["step"] for e in events]
    assert all(e["restored_step"] < e["step"] for e in events)
