"""Precision and threads (stages/runtime.py): what `auto` picks, that bf16 and fp32 agree on the tiny
model within a stated tolerance, and that a frozen model in the autocast layout computes exactly what
the trainable fp32-master copy computes. PPO's first KL under every precision: tests/test_ppo.py."""
from pathlib import Path

import pytest
import torch

from stages.core import runtime
from stages.modeling.chat_format import render_prompts
from stages.modeling.generation import generate
from stages.modeling.tensors import logprobs_from_logits

# bf16 keeps 8 bits of mantissa: per-token log-probs of the tiny model move by up to this much.
BF16_LOGPROB_TOL = 0.05   # nats, max over tokens
FP32_GENERATION_TOL = 1e-4  # nats: KV-cached decode vs one full forward pass, fp32


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- what `auto` means ----

def test_auto_follows_torchs_capability_check(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert runtime.resolve_precision("auto") == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert runtime.resolve_precision("auto") == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert runtime.resolve_precision("auto") == "bf16"
    # a GPU decides by its own bf16 support, whatever the CPU does
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert runtime.resolve_precision("auto") == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert runtime.resolve_precision("auto") == "bf16"
    for explicit in ("fp32", "bf16", "fp16"):
        assert runtime.resolve_precision(explicit) == explicit


def test_threads_split_the_cores_unless_the_user_set_them(monkeypatch):
    monkeypatch.setattr(runtime, "available_cores", lambda: 16)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert runtime.intra_op_threads(1) == 16
    assert runtime.intra_op_threads(4) == 4
    assert runtime.intra_op_threads(32) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runtime.intra_op_threads(4) == 3


def test_launcher_passes_the_thread_count(monkeypatch):
    from pipeline.config import load_config
    from pipeline.launcher import stage_command

    monkeypatch.setattr(runtime, "available_cores", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cfg = load_config("configs/tiny.yaml", ["launch.num_processes=2", "launch.cpu_ddp=true"])

    def threads(stage):
        cmd = stage_command(cfg.launch, stage, Path("r"))
        return int(cmd[cmd.index("--num_cpu_threads_per_process") + 1])

    assert threads("sft") == 4      # two processes share the 8 cores
    assert threads("compare") == 8  # generation-only stages run one process


# ---- numerics on the tiny model ----

@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from stages.modeling.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir)).eval()
    chats = [[{"role": "user", "content": text}] for text in
             ("Name three colours.", "How do I boil an egg?", "Tell me a joke about cats, please.")]
    return tok, model, render_prompts(tok, chats)


def _sample(tok, model, texts, precision, with_logprobs=False):
    torch.manual_seed(0)
    with runtime.autocast(precision, "cpu"):
        return generate(model, tok, texts, max_new_tokens=12, temperature=1.0, top_p=1.0, with_logprobs=with_logprobs)


def _forward_logprobs(model, gen, precision):
    """(B, R) log-probs of the sampled tokens from one full forward pass, and the response mask."""
    import torch

    is_eos = (gen.response == model.generation_config.eos_token_id).int()
    mask = ((torch.cumsum(is_eos, 1) - is_eos) == 0).long()
    ids = torch.cat([gen.prompt_ids, gen.response], 1)
    att = torch.cat([gen.prompt_mask, mask], 1)
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    R = gen.response.shape[1]
    with torch.no_grad(), runtime.autocast(precision, "cpu"):
        logits = model(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=False,
                       logits_to_keep=R + 1).logits[:, :-1]
    return logprobs_from_logits(logits, gen.response), mask.bool()


def test_bf16_and_fp32_log_probs_agree_within_tolerance(tiny):
    tok, model, texts = tiny
    gen = _sample(tok, model, texts, "fp32")
    lp32, mask = _forward_logprobs(model, gen, "fp32")
    lp16, _ = _forward_logprobs(model, gen, "bf16")
    diff = (lp32 - lp16).abs()[mask]
    assert diff.numel() > 10
    assert diff.max().item() < BF16_LOGPROB_TOL, diff.max().item()
    assert diff.max().item() > 0  # autocast really ran in bf16


def test_frozen_autocast_layout_computes_exactly_what_the_trainable_copy_computes(tiny, tiny_model_dir):
    """PPO's reference and reward model live in this layout; the policy is fp32 under autocast. Before
    any update they must agree bit for bit, or KL starts away from 0."""
    from stages.modeling.loading import load_causal_lm

    tok, model, texts = tiny
    frozen = runtime.autocast_layout(load_causal_lm(str(tiny_model_dir)), "bf16").eval()
    linear = next(m for m in frozen.modules() if isinstance(m, torch.nn.Linear))
    assert linear.weight.dtype == torch.bfloat16
    assert frozen.get_input_embeddings().weight.dtype == torch.float32
    gen = _sample(tok, model, texts, "bf16")
    trained_lp, mask = _forward_logprobs(model, gen, "bf16")
    frozen_lp, _ = _forward_logprobs(frozen, gen, "bf16")
    assert torch.equal(trained_lp[mask], frozen_lp[mask])
    whole_bf16 = load_causal_lm(str(tiny_model_dir), "bf16").eval()  # what the stages did before
    naive_lp, _ = _forward_logprobs(whole_bf16, gen, "bf16")
    assert not torch.equal(trained_lp[mask], naive_lp[mask])


def test_generation_log_probs_equal_a_forward_pass_in_fp32(tiny):
    tok, model, texts = tiny
    gen = _sample(tok, model, texts, "fp32", with_logprobs=True)
    lp, mask = _forward_logprobs(model, gen, "fp32")
    assert (gen.logprobs - lp).abs()[mask].max().item() < FP32_GENERATION_TOL
    assert runtime.generation_logprobs_exact("fp32") and not runtime.generation_logprobs_exact("bf16")
    probs = lp.exp()
    assert torch.all(gen.entropy[mask] > 0) and torch.isfinite(probs).all()


def test_training_attention_uses_the_math_kernel_for_short_cpu_rows_with_the_same_gradients():
    """Short rows train on the math kernel on CPU (the fused backward is the slow part of an RM step);
    long rows and GPUs keep torch's choice. Either way the gradients are the same."""
    q, k, v = (torch.randn(2, 3, 40, 16, requires_grad=True) for _ in range(3))

    def grads(width: int):
        with runtime.training_attention("cpu", width):
            math_only = torch.backends.cuda.math_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            return torch.autograd.grad(out.square().sum(), (q, k, v)), math_only

    short, short_math = grads(runtime.MATH_ATTENTION_MAX_WIDTH)
    long, long_math = grads(runtime.MATH_ATTENTION_MAX_WIDTH + 1)
    assert short_math and not long_math
    for a, b in zip(short, long):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with runtime.training_attention("cuda", 8):  # a GPU keeps torch's own choice
        assert torch.backends.cuda.flash_sdp_enabled()
