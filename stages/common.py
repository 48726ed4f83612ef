"""Pieces several stages share: the stage-folder layout, metrics logging, log-probs, generation,
and the `python -m stages.<name> --run-dir D` entry used by `accelerate launch`."""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import yaml

from data_schemas.errors import DataError
from data_schemas.files import append_jsonl, atomic_write_json, atomic_write_text
from stages.config import RunConfig
from stages.models import ModelError

STAGES = ("sft", "reward", "ppo", "baseline", "compare")
MODEL_SUBDIR = "model"


class StageError(RuntimeError):
    """A stage cannot proceed; the message is one line for the user."""


# ---- run-folder layout (the pipeline owns manifest and done-markers; stages own their folder) ----

def stage_dir(run_dir: str | os.PathLike, stage: str) -> Path:
    return Path(run_dir) / stage


def resolve_input_model(run_dir: str | os.PathLike, ref: str, needed_by: str) -> str:
    """'sft'/'reward'/'ppo' means that stage's exported model in this run; anything else is a model name/path."""
    if ref not in STAGES:
        return ref
    path = stage_dir(run_dir, ref) / MODEL_SUBDIR
    if not (path / "config.json").exists():
        raise StageError(
            f"{needed_by} needs the {ref} stage's model at {path}, which does not exist: "
            f"run `rlhf {ref}` first, or point {needed_by} at a model path"
        )
    return str(path)


def list_checkpoints(root: Path, prefix: str, marker: str) -> list[tuple[int, Path]]:
    """(number, folder) of the complete checkpoints `<prefix><n>/` under root, oldest first. A folder
    counts once its marker file exists; staging folders start with "." and never match."""
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        if d.name.startswith(prefix) and (d / marker).exists():
            try:
                out.append((int(d.name[len(prefix):]), d))
            except ValueError:
                continue
    return sorted(out)


@contextmanager
def reading_checkpoint(path: Path):
    """Any failure to read a checkpoint (truncated safetensors, bad JSON, a missing file) becomes one
    line that names it and says what to do."""
    try:
        yield
    except StageError:
        raise
    except Exception as e:  # safetensors, torch.load and json each raise their own types
        detail = (str(e).strip().splitlines() or [""])[0][:200]
        raise StageError(f"checkpoint {path} is unreadable ({type(e).__name__}: {detail}); delete that folder "
                         f"to resume from the one before it, or delete {path.parent} to start over") from None


def os_error_line(e: OSError) -> str:
    """A filesystem error as one line for the user (the CLI and every stage entry use it)."""
    if e.errno == errno.ENOSPC:
        return f"no space left on device while writing {e.filename or 'an artifact'}"
    return f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")


def write_stage_config(run_dir: str | os.PathLike, stage: str, cfg: RunConfig) -> None:
    """Every stage folder carries the resolved config it ran with."""
    atomic_write_text(stage_dir(run_dir, stage) / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def write_summary(run_dir: str | os.PathLike, stage: str, metrics: dict) -> None:
    """Key metrics of a finished stage; the pipeline copies them into the manifest."""
    atomic_write_json(stage_dir(run_dir, stage) / "summary.json", metrics)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class MetricsLogger:
    """Appends one JSON line per step to metrics.jsonl and mirrors scalars to TensorBoard (rank 0 only)."""

    def __init__(self, run_dir: str | os.PathLike, stage: str, enabled: bool | None = None):
        self.enabled = is_main_process() if enabled is None else enabled
        self.path = stage_dir(run_dir, stage) / "metrics.jsonl"
        self._tb = None
        if self.enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(stage_dir(run_dir, stage) / "tensorboard"))
            except ImportError:  # tensorboard is a core dependency, but logging must never kill a run
                self._tb = None

    def log(self, step: int, **metrics) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **{k: _plain(v) for k, v in metrics.items()}}
        append_jsonl(self.path, row)
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "time") and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def _plain(v):
    try:
        import torch

        if isinstance(v, torch.Tensor):
            return v.item() if v.numel() == 1 else v.tolist()
    except ImportError:
        pass
    return v


def read_metrics(run_dir: str | os.PathLike, stage: str) -> list[dict]:
    path = stage_dir(run_dir, stage) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- log-probs and generation ----

def logprobs_from_logits(logits, labels):
    """(B, T, V) logits, (B, T) labels -> (B, T) log p(label). Gathers before normalising to save memory."""
    import torch

    logits = logits.float()
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def response_logprobs(model, input_ids, attention_mask, response_len: int):
    """Log-probs of the last `response_len` tokens of each row (B, R), from one forward pass."""
    import torch

    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    logits = out.logits[:, -response_len - 1 : -1, :]
    return logprobs_from_logits(logits, input_ids[:, -response_len:]), logits


def render_prompts(tokenizer, prompts: list[list[dict]]) -> list[str]:
    """Chat messages -> prompt strings ending with the assistant header."""
    return [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in prompts]


class Generation(NamedTuple):
    """What `generate` returns (B rows, P prompt positions, R new tokens).

    prompt_ids:  (B, P) left-padded prompt ids
    prompt_mask: (B, P) 1 on prompt tokens
    response:    (B, R) sampled ids, pad after the first EOS (the EOS itself is kept)
    logprobs:    (B, R) log π(a_t|s_t) at the sampling temperature (top-p aside), read from the logits
                 generation computed anyway; None unless asked for
    entropy:     (B, R) entropy of that distribution, in nats; None unless asked for
    """

    prompt_ids: object
    prompt_mask: object
    response: object
    logprobs: object = None
    entropy: object = None


def generate(model, tokenizer, texts: list[str], *, max_new_tokens: int, temperature: float, top_p: float,
             max_prompt_length: int = 1024, stop_strings: list[str] | None = None,
             with_logprobs: bool = False) -> Generation:
    """Batched, left-padded, KV-cached sampling (see `Generation`). Run it inside the stage's autocast
    context: a trainable model's low-precision weight casts are then made once per call, not per token."""
    import torch

    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_prompt_length,
                    add_special_tokens=False).to(model.device)
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, use_cache=True)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(do_sample=False)
    if stop_strings:
        kwargs.update(stop_strings=stop_strings, tokenizer=tokenizer)
    if with_logprobs:  # raw logits, before temperature and top-p
        kwargs.update(output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        out = model.generate(**enc, **kwargs)
    prompt_ids = enc["input_ids"]
    sequences = out.sequences if with_logprobs else out
    response = mask_after_eos(sequences[:, prompt_ids.shape[1]:], tokenizer.eos_token_id, tokenizer.pad_token_id)
    if not with_logprobs:
        return Generation(prompt_ids, enc["attention_mask"], response)
    from stages.ppo_math import entropy_from_logits

    logprobs, entropy = [], []
    for t, step in enumerate(out.logits):  # one (B, V) step at a time: never all R x V in fp32 at once
        scaled = step.float() / (temperature or 1.0)
        logprobs.append(logprobs_from_logits(scaled, response[:, t]))
        entropy.append(entropy_from_logits(scaled))
    return Generation(prompt_ids, enc["attention_mask"], response, torch.stack(logprobs, 1), torch.stack(entropy, 1))


def mask_after_eos(response, eos_id: int, pad_id: int):
    """Replace every token after the first EOS with pad (the EOS itself is kept)."""
    import torch

    is_eos = response == eos_id
    after = (torch.cumsum(is_eos.int(), dim=1) - is_eos.int()) > 0
    return response.masked_fill(after, pad_id)


# ---- entry point for `accelerate launch -m stages.<name> --run-dir D` ----

def disk_full_error(e: BaseException) -> bool:
    """Whether an exception (or one it was raised from) is a full disk, whatever library raised it:
    safetensors' SafetensorError and torch.save's RuntimeError carry only the OS message."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        text = str(e)
        if "No space left on device" in text or "os error 28" in text or "error code: 28" in text:
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _disk_nearly_full(path, below: int = 4 * 1024**2) -> bool:
    """torch.save reports a full disk as "basic_ios::clear: iostream error" or "unexpected pos", with
    no errno: a write error on a filesystem with almost no space left is taken as the full disk."""
    import shutil

    try:
        return shutil.disk_usage(path).free < below
    except OSError:
        return False


def interrupted_line(stage: str) -> str:
    """What a stage stopped by Ctrl-C prints and reports."""
    return f"{stage}: interrupted"


def _report(line: str) -> None:
    """Print the stage's one-line error, and hand it to the orchestrator (see pipeline.orchestrator)."""
    print(line, file=sys.stderr)
    path = os.environ.get("RLHF_STAGE_ERROR_FILE")
    if path:
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError:
            pass


def stage_main(stage: str, run_fn, argv: list[str] | None = None) -> None:
    import signal

    # `rlhf run` starts the launcher with Ctrl-C ignored (so it prints no traceback); the stage itself
    # stops on Ctrl-C as usual.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    ap = argparse.ArgumentParser(prog=f"python -m stages.{stage}",
                                 description=f"Run the {stage} stage on a run folder (normally started by `rlhf`).")
    ap.add_argument("--run-dir", required=True, help="the run folder; its config.yaml holds the resolved config")
    ap.add_argument("--config", help="resolved config YAML (default: RUN_DIR/config.yaml)")
    args = ap.parse_args(argv)
    cfg_path = Path(args.config or Path(args.run_dir) / "config.yaml")
    try:
        cfg = RunConfig.from_resolved(yaml.safe_load(cfg_path.read_text()))
        run_fn(cfg, Path(args.run_dir))
    except (StageError, ModelError, DataError) as e:
        _report(f"error: {stage}: {e}")
        sys.exit(2)
    except OSError as e:  # the filesystem: a full disk, a read-only or vanished folder
        _report(f"error: {stage}: {os_error_line(e)}")
        sys.exit(2)
    except KeyboardInterrupt:
        # Also handed to the orchestrator: `accelerate launch` turns exit 130 into 1, and the
        # orchestrator may not see the Ctrl-C itself (seen once under heavy load).
        _report(interrupted_line(stage))
        sys.exit(130)
    except Exception as e:
        if not (disk_full_error(e) or _disk_nearly_full(args.run_dir)):
            raise
        _report(f"error: {stage}: no space left on device while writing under {stage_dir(args.run_dir, stage)} "
                f"({type(e).__name__})")
        sys.exit(2)
