import os
import subprocess
import sys
from pathlib import Path

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
