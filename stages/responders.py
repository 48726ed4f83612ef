"""What counts as a "model" wherever one is compared, chatted with or labelled: anything that
answers a batch of conversations. Two kinds share the interface:

- `ChatModel`: a (tuned) causal LM prompted through its chat template; a reply ends at EOS.
- `PromptedBaseline`: an untuned LM steered only by a dialogue prompt (a preamble plus a few example
  turns, in the style of Dialogue-Prompted Gopher). It continues a plain-text transcript
  "User: ...\\nAssistant:" and is stopped at the next turn marker, which is then cut off.

`responder_for(ref, cfg, run_dir, decoding)` turns a model reference from a config ('baseline',
'sft', 'ppo', or a model path/name) into one of these.
"""
from __future__ import annotations

import gc
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from stages.common import StageError, is_main_process, mask_after_eos, render_prompts, resolve_input_model, stage_dir
from stages.config import Decoding, RunConfig
from stages.models import load_causal_lm, load_tokenizer
from stages.runtime import autocast, autocast_layout

REPO_ROOT = Path(__file__).resolve().parents[1]
BASELINE = "baseline"
PROMPT_COPY = "prompt.txt"  # the baseline stage's copy of the prompt it used, inside run_dir/baseline/


@dataclass
class Sample:
    """One reply. Token ids are kept so the comparison can score the exact sampled tokens."""

    text: str
    num_tokens: int  # length of `text` in the model's tokenizer (what "response length" means everywhere)
    prompt_ids: list[int] = field(default_factory=list)  # (P,) the tokens the model was conditioned on
    response_ids: list[int] = field(default_factory=list)  # (R,) sampled tokens through the first EOS
    logprob_sum: float | None = None  # sum of log p(response token) under the sampling model (temperature 1,
    #                                   no top-p), from generation's raw logits; set when asked for


# ---- the dialogue prompt (pure text helpers) ----

def resolve_prompt_path(prompt_file: str | os.PathLike) -> Path:
    """A relative path is tried against the current directory, then against the repo root."""
    path = Path(prompt_file)
    if path.is_absolute() or path.exists():
        return path
    return REPO_ROOT / path


def load_prompt_text(prompt_file: str | os.PathLike) -> str:
    path = resolve_prompt_path(prompt_file)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StageError(f"baseline.prompt_file: {prompt_file} not found (also looked in {REPO_ROOT})") from None
    except UnicodeDecodeError:
        raise StageError(f"baseline.prompt_file: {path} is not UTF-8 text") from None
    if not text.strip():
        raise StageError(f"baseline.prompt_file: {path} is empty")
    return text.strip() + "\n"


def prompt_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def render_transcript(preamble: str, messages: list[dict], user_prefix: str = "User:",
                      assistant_prefix: str = "Assistant:") -> str:
    """The dialogue prompt, then the conversation as plain turns, ending with an open assistant turn.
    A system message has no turn marker in the prompted format, so it joins the preamble."""
    head = preamble.rstrip("\n")
    lines = []
    for m in messages:
        if m["role"] == "system":
            head += "\n" + m["content"].strip()
        elif m["role"] == "user":
            lines.append(f"{user_prefix} {m['content'].strip()}")
        else:
            lines.append(f"{assistant_prefix} {m['content'].strip()}")
    return head + "\n\n" + "\n".join(lines) + f"\n{assistant_prefix}"


def stop_strings_for(user_prefix: str = "User:", assistant_prefix: str = "Assistant:") -> list[str]:
    """A prompted LM keeps writing the transcript; the next turn marker on a new line ends its reply."""
    return [f"\n{user_prefix}", f"\n{assistant_prefix}"]


def truncate_at_stop(text: str, stops: list[str]) -> str:
    """Cut `text` at the earliest stop string (the stop text itself is dropped), then trim whitespace."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut].strip()


# ---- responders ----

MIN_SHARED_PREFIX = 32  # tokens; a shorter shared prefix is not worth caching


def shared_prefix_len(rows: list[list[int]]) -> int:
    """Length of the token prefix all rows share, leaving every row at least one token of its own
    (generation needs one uncached input token per row)."""
    limit = min(len(r) for r in rows) - 1
    n = 0
    while n < limit and all(r[n] == rows[0][n] for r in rows):
        n += 1
    return max(n, 0)


def middle_padded(rows: list[list[int]], prefix_len: int, pad_id: int):
    """(B, T) ids and attention mask laid out as [shared prefix | pad | own tokens]. The model reads
    positions from the mask (cumsum - 1), so each row sees exactly its unpadded sequence; with
    prefix_len 0 this is plain left padding."""
    import torch

    width = prefix_len + max(len(r) - prefix_len for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        own = len(r) - prefix_len
        ids[i, :prefix_len], mask[i, :prefix_len] = torch.tensor(r[:prefix_len], dtype=torch.long), 1
        ids[i, width - own:], mask[i, width - own:] = torch.tensor(r[prefix_len:], dtype=torch.long), 1
    return ids, mask


def _trim_response(row: list[int], eos_id: int, pad_id: int) -> list[int]:
    """Sampled tokens up to the first pad (finished rows are padded) and through the first EOS."""
    out = []
    for t in row:
        if t == pad_id:
            break
        out.append(t)
        if t == eos_id:
            break
    return out


class Responder:
    """Answers conversations. `name` labels it in reports; `model`/`tokenizer` are the loaded LM."""

    name: str
    kind: str  # "chat" or "prompted"

    def __init__(self, name: str, model_path: str, decoding: Decoding, *, precision: str = "fp32",
                 trust_remote_code: bool = False):
        self.name, self.model_path, self.decoding = name, model_path, decoding
        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        self.precision = precision
        self.model = autocast_layout(load_causal_lm(model_path, "fp32", trust_remote_code), precision).eval()
        self._prefix = None  # (token ids, KV cache) of the prompt prefix all rows share; see _shared_prefix

    def render(self, conversation: list[dict]) -> str:
        raise NotImplementedError

    def finish_text(self, text: str) -> str:
        return text.strip()

    def sample(self, conversations: list[list[dict]], stop_strings: list[str] | None = None, *,
               with_logprobs: bool = False) -> list[Sample]:
        """Batched generation with this responder's decoding settings; seed torch beforehand.
        with_logprobs: also fill each Sample.logprob_sum from the logits generation computed anyway
        (what a separate scoring pass over prompt + response would give, without that pass)."""
        d, tok = self.decoding, self.tokenizer
        max_prompt = max(16, getattr(self.model.config, "max_position_embeddings", 2048) - d.max_new_tokens)
        out: list[Sample] = []
        bar = tqdm(total=len(conversations), desc=f"generate {self.name}", unit="prompt", dynamic_ncols=True,
                   disable=not is_main_process() or len(conversations) <= 1)  # no bar for a chat turn
        for start in range(0, len(conversations), d.batch_size):
            # a too-long prompt keeps its latest turns
            rows = [self.tokenize(self.render(c))[-max_prompt:] for c in conversations[start:start + d.batch_size]]
            response, token_logp = self._generate(rows, stop_strings, with_logprobs)
            for i, (prompt, r) in enumerate(zip(rows, response.tolist())):
                ids = _trim_response(r, tok.eos_token_id, tok.pad_token_id)
                text = self.finish_text(tok.decode(ids, skip_special_tokens=True))
                lp = float(token_logp[i, :len(ids)].sum()) if token_logp is not None else None
                out.append(Sample(text=text, num_tokens=self.count_tokens(text), prompt_ids=prompt, response_ids=ids,
                                  logprob_sum=lp))
            bar.update(len(rows))
        bar.close()
        return out

    def _generate(self, rows: list[list[int]], stop_strings: list[str] | None, with_logprobs: bool = False):
        """KV-cached sampling for token rows -> (response ids (B, R) with tokens after EOS set to pad,
        log p of each sampled token (B, R) from the raw logits, or None unless with_logprobs).
        Unlike `stages.common.generate`, rows that share a long token prefix (the dialogue prompt is
        ~400 tokens) run that prefix through the model once: its cache is copied to every row."""
        import copy

        import torch

        d, tok = self.decoding, self.tokenizer
        prefix = self._shared_prefix(rows)
        ids, mask = middle_padded(rows, len(prefix[0]) if prefix else 0, tok.pad_token_id)
        kwargs = dict(max_new_tokens=d.max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      use_cache=True)
        if d.temperature > 0:
            kwargs.update(do_sample=True, temperature=d.temperature, top_p=d.top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if stop_strings:
            kwargs.update(stop_strings=stop_strings, tokenizer=tok)
        if with_logprobs:  # raw logits, before temperature and top-p
            kwargs.update(output_logits=True, return_dict_in_generate=True)
        if prefix:
            cache = copy.deepcopy(prefix[1])
            cache.batch_repeat_interleave(len(rows))
            kwargs["cache"] = cache  # transformers 5: `past_key_values` is deprecated in generate()
        with torch.no_grad(), autocast(self.precision, self.model.device):
            out = self.model.generate(input_ids=ids.to(self.model.device), attention_mask=mask.to(self.model.device),
                                      **kwargs)
        if not with_logprobs:
            return mask_after_eos(out[:, ids.shape[1]:].cpu(), tok.eos_token_id, tok.pad_token_id), None
        response = out.sequences[:, ids.shape[1]:]
        token_logp = torch.stack([  # one (B, V) log-softmax at a time: never all R x V at once
            torch.log_softmax(step.float(), dim=-1).gather(1, response[:, t:t + 1]).squeeze(1)
            for t, step in enumerate(out.logits)], dim=1)
        return mask_after_eos(response.cpu(), tok.eos_token_id, tok.pad_token_id), token_logp.cpu()

    def _shared_prefix(self, rows: list[list[int]]):
        """(prefix ids, its KV cache) for the tokens every row starts with, computed once and kept
        across batches and chat turns; None when the shared part is too short to be worth it.
        A rendered dummy conversation joins the rows, so the prefix never reaches into a user turn
        even when a single conversation is sampled (a chat turn)."""
        import torch

        if self._prefix is not None:
            ids = self._prefix[0]
            if all(len(r) > len(ids) and r[:len(ids)] == ids for r in rows):
                return self._prefix
        anchor = self.tokenize(self.render([{"role": "user", "content": "x"}]))
        n = shared_prefix_len(rows + [anchor])
        if n < MIN_SHARED_PREFIX:
            return None
        ids = rows[0][:n]
        with torch.no_grad(), autocast(self.precision, self.model.device):
            cache = self.model(torch.tensor([ids], device=self.model.device), use_cache=True).cache
        self._prefix = (ids, cache)
        return self._prefix

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def respond(self, conversations: list[list[dict]]) -> list[str]:
        return [s.text for s in self.sample(conversations)]

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def close(self) -> None:
        """Free the weights; comparisons load one model at a time."""
        self.model, self._prefix = None, None
        gc.collect()


class ChatModel(Responder):
    kind = "chat"

    def render(self, conversation: list[dict]) -> str:
        return render_prompts(self.tokenizer, [conversation])[0]


class PromptedBaseline(Responder):
    kind = "prompted"

    def __init__(self, name: str, model_path: str, decoding: Decoding, prompt_text: str, *,
                 user_prefix: str = "User:", assistant_prefix: str = "Assistant:", stops: list[str] | None = None,
                 precision: str = "fp32", trust_remote_code: bool = False):
        super().__init__(name, model_path, decoding, precision=precision, trust_remote_code=trust_remote_code)
        self.prompt_text, self.user_prefix, self.assistant_prefix = prompt_text, user_prefix, assistant_prefix
        self.stops = stops if stops is not None else stop_strings_for(user_prefix, assistant_prefix)

    def render(self, conversation: list[dict]) -> str:
        return render_transcript(self.prompt_text, conversation, self.user_prefix, self.assistant_prefix)

    def finish_text(self, text: str) -> str:
        return truncate_at_stop(text, self.stops)

    def sample(self, conversations, stop_strings=None):
        return super().sample(conversations, stop_strings=stop_strings or self.stops)


# ---- model references ('baseline', 'sft', 'ppo', or a path/name) ----

def model_label(ref: str) -> str:
    """A short file-safe name for a model reference: stage names stay, paths become their last part."""
    if ref in (BASELINE, "sft", "ppo", "reward"):
        return ref
    tail = Path(ref.rstrip("/")).name or ref
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", tail).strip("._") or "model"


def unique_labels(refs: list[str]) -> list[str]:
    labels, seen = [], {}
    for ref in refs:
        base = model_label(ref)
        seen[base] = seen.get(base, 0) + 1
        labels.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return labels


def baseline_model(cfg: RunConfig) -> str:
    return cfg.baseline.model or cfg.model


def baseline_prompt(cfg: RunConfig, run_dir: str | os.PathLike | None) -> str:
    """The run's baseline prompt: the baseline stage's saved copy if there is one, else the config's file."""
    if run_dir is not None:
        saved = stage_dir(run_dir, BASELINE) / PROMPT_COPY
        if saved.exists():
            return saved.read_text(encoding="utf-8")
    return load_prompt_text(cfg.baseline.prompt_file)


def responder_for(ref: str, cfg: RunConfig, run_dir: str | os.PathLike | None, decoding: Decoding,
                  needed_by: str = "compare", name: str | None = None) -> Responder:
    common = dict(precision=cfg.precision, trust_remote_code=cfg.trust_remote_code)
    if ref == BASELINE:
        b = cfg.baseline
        return PromptedBaseline(name or BASELINE, baseline_model(cfg), decoding, baseline_prompt(cfg, run_dir),
                                user_prefix=b.user_prefix, assistant_prefix=b.assistant_prefix, **common)
    path = resolve_input_model(run_dir, ref, needed_by) if run_dir is not None else ref
    return ChatModel(name or model_label(ref), path, decoding, **common)
