import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_prepared_default_model_loads_offline_and_answers(tmp_path):
    """`rlhf models prepare` gives a folder that plain transformers loads with HF_HUB_OFFLINE=1."""
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "models", "prepare"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    folder = Path(proc.stdout.strip().splitlines()[-1])
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.gguf"))
    script = f"""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(folder)!r})
model = AutoModelForCausalLM.from_pretrained({str(folder)!r})
assert tok.pad_token != tok.eos_token, (tok.pad_token, tok.eos_token)
ids = tok.apply_chat_template([{{"role": "user", "content": "What is the capital of France?"}}],
                              add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**ids, max_new_tokens=12, do_sample=False)
print(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout


def test_chat_template_has_generation_markers_and_renders_like_the_original(tiny_model_dir):
    from stages.modeling.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n")
    enc = tok.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
    masked = [t for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert tok.decode(masked) == "Hello!<|im_end|>"
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id != tok.eos_token_id


def test_unknown_model_is_a_one_line_error(tmp_path):
    import pytest

    from stages.modeling.loading import ModelError, load_tokenizer

    with pytest.raises(ModelError) as e:
        load_tokenizer(str(tmp_path / "nope"))
    message = str(e.value)
    assert "\n" not in message
    head = f"cannot load tokenizer from {str(tmp_path / 'nope')!r}: "
    assert message.startswith(head) and len(message) > len(head), message  # names the path, then the reason


def test_ppo_forward_passes_run_packed_with_the_padded_layouts_results(tiny_model_dir, monkeypatch):
    """PPO's policy, reference, value and reward passes compute left-padded rollouts packed: no padding,
    the rows' common start (system prompt, user header) once. Log-probs, values, scores and the policy's
    gradients equal the padded layout's."""
    from stages.modeling import tensors
    from stages.modeling.chat_format import render_prompts
    from stages.modeling.loading import TINY_MODEL, load_causal_lm, load_reward_model, load_tokenizer
    from stages.modeling.reward_scoring import ValueModel, last_token_scores
    from stages.modeling.tensors import logprobs_from_logits, pack_left_padded, pad_rows
    from stages.modeling.tensors import policy_logits

    tok = load_tokenizer(TINY_MODEL)
    texts = render_prompts(tok, [[{"role": "user", "content": q}] for q in
                                 ("Hi.", "Name three rivers in Europe, please.", "Why is the sky blue?")])
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    R = 5
    responses = [[11, 12, 13, 14, 15], [21, tok.eos_token_id, tok.pad_token_id, tok.pad_token_id, tok.pad_token_id],
                 [31, 32, 33, 34, tok.eos_token_id]]
    ids, prompt_mask = pad_rows(prompts, tok.pad_token_id, left=True)
    response = torch.tensor(responses)
    mask = tensors.through_first(response, tok.eos_token_id).long()
    ids, attn = torch.cat([ids, response], 1), torch.cat([prompt_mask, mask], 1)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    packed = pack_left_padded(ids, attn)
    common = next(i for i in range(min(map(len, prompts))) if len({p[i] for p in prompts}) > 1)
    assert common > 10 and packed.input_ids.numel() == int(attn.sum()) - 2 * common < ids.numel()

    torch.manual_seed(0)
    policy, rm = load_causal_lm(TINY_MODEL), load_reward_model(TINY_MODEL, pad_token_id=tok.pad_token_id)
    value = ValueModel(rm)

    def passes():
        policy.zero_grad()
        logp = logprobs_from_logits(policy_logits(policy, ids, attn, pos, R, 0.7), response)
        (logp * mask).sum().backward()
        with torch.no_grad():
            return (logp.detach(), value(ids, attn, pos, R), last_token_scores(rm, ids, attn, pos),
                    [p.grad.clone() for p in policy.parameters()], value.hidden(ids, attn, pos))

    logp, values, scores, grads, hidden = passes()
    monkeypatch.setattr(tensors, "PACKED_MAX_TOKENS", 0)  # the padded layout
    assert pack_left_padded(ids, attn) is None
    logp_p, values_p, scores_p, grads_p, hidden_p = passes()
    assert torch.allclose(hidden[attn.bool()], hidden_p[attn.bool()], atol=1e-5)  # every token's state
    real = mask.bool()
    assert torch.allclose(logp[real], logp_p[real], atol=1e-5)
    assert torch.allclose(values[real], values_p[real], atol=1e-5)
    assert torch.allclose(scores, scores_p, atol=1e-5)
    for a, b in zip(grads, grads_p):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-3)


# ---- packed Linear weights for fp32 CPU generation (stages.modeling.packed) ----

def _tiny_lm(tiny_model_dir):
    from stages.modeling.loading import load_causal_lm

    return load_causal_lm(str(tiny_model_dir), "fp32").eval()


def test_packed_linears_compute_what_plain_linears_do_and_leave_nothing_behind(tiny_model_dir, monkeypatch):
    import copy

    from stages.modeling import packed

    monkeypatch.delenv(packed.ENV, raising=False)
    lm = _tiny_lm(tiny_model_dir).requires_grad_(False)
    if not packed.applies(lm):
        pytest.skip("torch here lacks oneDNN's packed linear ops")
    linears = [m for m in lm.modules() if type(m) is torch.nn.Linear]
    ids = torch.randint(0, lm.config.vocab_size, (3, 11))
    with torch.no_grad():
        plain = lm(ids).logits
        calls = []
        monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise",
                            lambda *a, _f=torch.ops.mkldnn._linear_pointwise: calls.append(1) or _f(*a))
        with packed.packed_linears(lm, rows_hint=3):
            inside = lm(ids).logits
            copy.deepcopy(lm)  # a packed (opaque) copy must not be reachable from the model
    assert len(calls) == len(linears)  # every Linear took the packed path, once
    assert torch.allclose(inside, plain, atol=1e-4) and not torch.equal(inside, torch.zeros_like(inside))
    assert all("forward" not in m.__dict__ for m in linears)  # restored to nn.Linear.forward
    with torch.no_grad():
        assert torch.equal(lm(ids).logits, plain)


def test_packed_linears_repack_a_trainable_weight_changed_in_place(tiny_model_dir):
    from stages.modeling import packed

    lm = _tiny_lm(tiny_model_dir)
    if not packed.applies(lm):
        pytest.skip("torch here lacks oneDNN's packed linear ops")
    ids = torch.randint(0, lm.config.vocab_size, (2, 7))
    head = lm.get_output_embeddings()
    with torch.no_grad(), packed.packed_linears(lm):
        before = lm(ids).logits
    with torch.no_grad():
        head.weight.data.mul_(2.0)  # like the fused AdamW kernel: in place, version counter untouched
        expected = lm(ids).logits
    with torch.no_grad(), packed.packed_linears(lm):
        after = lm(ids).logits
    assert not torch.allclose(after, before, atol=1e-3)
    assert torch.allclose(after, expected, atol=1e-4)


def test_packed_linears_leave_a_linear_with_its_own_forward_alone(tiny_model_dir, monkeypatch):
    from stages.modeling import packed

    monkeypatch.delenv(packed.ENV, raising=False)
    lm = _tiny_lm(tiny_model_dir).requires_grad_(False)
    if not packed.applies(lm):
        pytest.skip("torch here lacks oneDNN's packed linear ops")
    head = lm.get_output_embeddings()
    hooked = head.forward  # what a device-map hook does: an instance-level forward wrapping the class's
    head.forward = lambda x: hooked(x) + 1.0
    ids = torch.randint(0, lm.config.vocab_size, (2, 5))
    with torch.no_grad():
        plain = lm(ids).logits
        with packed.packed_linears(lm):
            inside = lm(ids).logits
    assert torch.allclose(inside, plain, atol=1e-4)  # the +1 of the instance forward still applied
    assert torch.allclose(lm(ids).logits, plain) and "forward" in vars(head)  # and it survives the block


def test_packed_linears_stay_off_when_disabled_or_under_autocast(tiny_model_dir, monkeypatch):
    from stages.modeling import packed

    lm = _tiny_lm(tiny_model_dir)
    monkeypatch.setenv(packed.ENV, "0")
    assert not packed.applies(lm)
    monkeypatch.delenv(packed.ENV)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not packed.applies(lm)
    bf16 = _tiny_lm(tiny_model_dir).to(torch.bfloat16)
    assert not packed.applies(bf16)


def test_nucleus_filter_keeps_what_transformers_top_p_keeps():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    from stages.modeling.generation import NucleusFilter

    g = torch.Generator().manual_seed(0)
    peaked = torch.randn(6, 5000, generator=g) * 10  # the nucleus lies within the 256 candidates
    flat = torch.randn(3, 5000, generator=g) * 0.1  # it does not: these rows take the full sort
    scores = torch.cat([peaked, flat])
    for temperature, top_p in [(0.7, 0.9), (1.0, 0.5), (1.3, 0.95)]:
        ours = NucleusFilter(top_p, temperature, candidates=256)(None, scores.clone())
        theirs = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, scores.clone()))
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), (temperature, top_p)
        kept = ~torch.isinf(ours)
        assert torch.equal(ours[kept], scores[kept])  # unscaled: generate's temperature warper follows
        assert kept[:6].sum(1).max() < 256 and kept[6:].sum(1).min() > 256  # both paths were taken
