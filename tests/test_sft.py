"""SFT stage on the tiny model: completion-only targets, padding-free == padded, the real entry
points (in-process and `python -m stages.sft`), the exact artifact tree, resume, LoRA."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from stages.core.config_schema import RunConfig
from stages.modeling.loading import TINY_MODEL, load_causal_lm, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
CHAT = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]


def tiny_cfg(**sft) -> RunConfig:
    base = {"data": {"source": "default:demonstrations", "limit": 24}, "max_steps": 2, "batch_size": 4,
            "lr": 1e-3, "max_length": 128}
    return RunConfig.model_validate({"name": "t", "model": TINY_MODEL, "sft": {**base, **sft}})


def _params(path, file="model.safetensors"):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / file))


def _changed(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a if k in b)


def _tree(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*") if "tensorboard" not in p.parts}


def test_targets_are_assistant_tokens_only(tiny_model_dir):
    from stages.modeling.chat_format import IGNORE, tokenize_demonstration

    tok = load_tokenizer(TINY_MODEL)
    ids, tgt = tokenize_demonstration(tok, CHAT, 128)
    assert tok.decode([t for t in tgt if t != IGNORE]) == "Blue.<|im_end|>"
    assert tok.decode(ids).endswith("<|im_start|>assistant\nBlue.<|im_end|>\n")
    # truncated before the reply: nothing to learn, the example is dropped
    assert tokenize_demonstration(tok, CHAT, 8) is None


def test_pack_examples_never_overflows():
    from stages.modeling.tensors import pack_examples

    lengths = [70, 60, 50, 40, 30, 20, 10]
    bins = pack_examples(lengths, 100)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 100 for b in bins)
    assert len(bins) == 3  # 280 tokens, first-fit-decreasing fills 3 rows of 100


def test_padding_free_lays_the_shared_start_out_once_with_the_padded_loss_and_gradients(tiny_model_dir):
    from stages.modeling.chat_format import tokenize_demonstration
    from stages.sft import collate_padded, collate_padding_free, sft_loss

    tok = load_tokenizer(TINY_MODEL)
    chats = [CHAT, [{"role": "user", "content": "Say something longer, please, in a few words."},
                    {"role": "assistant", "content": "Here are several words for you, as asked."}],
             [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."},  # shares
              {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Green."}]]   # CHAT's start
    rows = [tokenize_demonstration(tok, c, 128) for c in chats]
    model = load_causal_lm(TINY_MODEL).eval()
    for group in (rows, rows[:1], [rows[0], rows[2]]):  # the last pair shares the user turn, up to a target
        pf, pb = collate_padding_free(group), collate_padded(group, tok.pad_token_id)
        assert pf.count == pb.count > 0
        losses, grads = [], []
        for batch in (pf, pb):
            model.zero_grad()
            out = sft_loss(model, batch)
            out.loss_sum.backward()
            losses.append(out)
            grads.append([p.grad.clone() for p in model.parameters()])
        a, b = losses
        assert a.loss_sum.item() == pytest.approx(b.loss_sum.item(), rel=1e-4)
        assert a.tokens == b.tokens == sum(len(r[0]) for r in group)  # tokens/s counts the data's tokens
        for ga, gb in zip(*grads):
            assert torch.allclose(ga, gb, atol=1e-5, rtol=1e-3)
    # the system prompt and user header, common to every row, are computed once
    common = next(i for i in range(len(rows[0][0])) if len({r[0][i] for r in rows}) > 1)
    assert common > 10 and collate_padding_free(rows).tensors["input_ids"].numel() == sum(len(r[0]) for r in rows) - 2 * common


def test_sft_run_artifacts_and_resume_via_subprocess(tmp_path, tiny_model_dir):
    from stages.sft import run

    run_dir = tmp_path / "run"
    s1 = run(tiny_cfg(max_steps=2, save_steps=1), run_dir)
    sft = run_dir / "sft"
    assert _tree(sft) == {
        "config.yaml", "metrics.jsonl", "summary.json",
        "checkpoints", "checkpoints/step-1", "checkpoints/step-2",
        *(f"checkpoints/step-{n}/{f}" for n in (1, 2) for f in
          ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json")),
        "model", *(f"model/{f}" for f in ("config.json", "generation_config.json", "model.safetensors",
                                          "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")),
    }
    assert (sft / "tensorboard").is_dir()
    assert s1["steps"] == 2 and s1["resumed_from"] is None and s1["eval_loss"] is not None
    assert json.loads((sft / "summary.json").read_text()) == s1
    assert set(s1) >= {"train_loss", "eval_loss", "steps", "wall_s"}
    step2 = _params(sft / "model")
    assert _changed(step2, _params(tiny_model_dir)), "training did not change the weights"

    # resume through the real module entry point, with a larger budget
    cfg = tiny_cfg(max_steps=4, save_steps=1)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    proc = subprocess.run([sys.executable, "-m", "stages.sft", "--run-dir", str(run_dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resuming from" in proc.stdout and "(step 2 of 4)" in proc.stdout
    s2 = json.loads((sft / "summary.json").read_text())
    assert s2["steps"] == 4 and s2["resumed_from"] == 2
    train_rows = [r for r in map(json.loads, (sft / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]  # steps 1-2 from the first run, 3-4 only once
    assert sorted(p.name for p in (sft / "checkpoints").iterdir()) == ["step-3", "step-4"]  # last two kept
    assert _changed(_params(sft / "model"), step2)


def test_resume_refuses_a_changed_config(tmp_path, tiny_model_dir):
    from stages.core.errors import StageError
    from stages.sft import run

    run(tiny_cfg(max_steps=1), tmp_path)
    with pytest.raises(StageError, match="different sft config"):
        run(tiny_cfg(max_steps=2, lr=5e-4), tmp_path)


def test_sft_lora_exports_adapter_and_merged_model(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from stages.sft import run

    summary = run(tiny_cfg(max_steps=2, lora={"enabled": True, "r": 4, "alpha": 8}, packing=True), tmp_path)
    sft = tmp_path / "sft"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (sft / "adapter").iterdir()}
    adapter = _params(sft / "adapter", "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero
    merged = AutoModelForCausalLM.from_pretrained(sft / "model")  # a plain HF model, no peft needed
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert _changed(_params(sft / "model"), _params(tiny_model_dir))
    assert summary["steps"] == 2


def test_bad_data_is_one_line_error(tmp_path, tiny_model_dir):
    cfg = tiny_cfg(data={"source": str(tmp_path / "missing.jsonl")})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    proc = subprocess.run([sys.executable, "-m", "stages.sft", "--run-dir", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: sft:") and "missing.jsonl" in proc.stderr
    assert "Traceback" not in proc.stderr
