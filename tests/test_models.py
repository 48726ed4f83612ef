import os
import subprocess
import sys
from pathlib import Path

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
    from stages.rl.ppo_models import policy_logits

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
