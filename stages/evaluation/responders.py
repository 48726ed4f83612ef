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

import copy
import gc
import os
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from stages.core.config_schema import Decoding, RunConfig
from stages.core.run_folder import is_main_process, model_label, resolve_input_model
from stages.core.runtime import autocast, autocast_layout
from stages.evaluation.baseline_outputs import BASELINE, baseline_model, baseline_prompt
from stages.evaluation.dialogue_prompt import render_transcript, stop_strings_for, truncate_at_stop
from stages.modeling.chat_format import render_prompts
from stages.modeling.generation import sample_ids
from stages.modeling.loading import load_causal_lm, load_tokenizer
from stages.modeling.tensors import common_prefix, pad_rows, response_lengths


@dataclass
class Sample:
    """One reply. Token ids are kept so the comparison can score the exact sampled tokens."""

    text: str
    num_tokens: int  # length of `text` in the model's tokenizer (what "response length" means everywhere)
    prompt_ids: list[int] = field(default_factory=list)  # (P,) the tokens the model was conditioned on
    response_ids: list[int] = field(default_factory=list)  # (R,) sampled tokens through the first EOS
    logprob_sum: float | None = None  # sum of log p(response token) under the sampling model (temperature 1,
    #                                   no top-p), from generation's raw logits; set when asked for


# ---- responders ----

MIN_SHARED_PREFIX = 32  # tokens; a shorter shared prefix is not worth caching


def middle_padded(rows: list[list[int]], prefix_len: int, pad_id: int):
    """(B, T) ids and attention mask laid out as [shared prefix | pad | own tokens]. The model reads
    positions from the mask (cumsum - 1), so each row sees exactly its unpadded sequence; with
    prefix_len 0 this is plain left padding."""
    import torch

    own_ids, own_mask = pad_rows([r[prefix_len:] for r in rows], pad_id, left=True)
    prefix = torch.tensor([r[:prefix_len] for r in rows], dtype=torch.long).reshape(len(rows), prefix_len)
    return torch.cat([prefix, own_ids], 1), torch.cat([torch.ones_like(prefix), own_mask], 1)


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
            lengths = response_lengths(response, tok.eos_token_id, tok.pad_token_id).tolist()
            for i, (prompt, r, n) in enumerate(zip(rows, response.tolist(), lengths)):
                ids = r[:n]
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
        Unlike `stages.modeling.generation.generate`, rows that share a long token prefix (the dialogue
        prompt is ~400 tokens) run that prefix through the model once: its cache is copied to every row."""
        d, tok, device = self.decoding, self.tokenizer, self.model.device
        prefix = self._shared_prefix(rows)
        ids, mask = middle_padded(rows, len(prefix[0]) if prefix else 0, tok.pad_token_id)
        cache = None
        if prefix:
            cache = copy.deepcopy(prefix[1])
            cache.batch_repeat_interleave(len(rows))
        with autocast(self.precision, device):
            out = sample_ids(self.model, tok, ids.to(device), mask.to(device), max_new_tokens=d.max_new_tokens,
                             temperature=d.temperature, top_p=d.top_p, stop_strings=stop_strings,
                             logprob_temperature=1.0 if with_logprobs else None, cache=cache)
        return out.response.cpu(), None if out.logprobs is None else out.logprobs.cpu()

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
        n = common_prefix(rows + [anchor])  # every row keeps a token of its own: generation's first input
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

    def sample(self, conversations, stop_strings=None, *, with_logprobs: bool = False):
        return super().sample(conversations, stop_strings=stop_strings or self.stops, with_logprobs=with_logprobs)


# ---- model references ('baseline', 'sft', 'ppo', or a path/name) ----

def unique_labels(refs: list[str]) -> list[str]:
    labels, seen = [], {}
    for ref in refs:
        base = model_label(ref)
        seen[base] = seen.get(base, 0) + 1
        labels.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return labels


def responder_for(ref: str, cfg: RunConfig, run_dir: str | os.PathLike | None, decoding: Decoding,
                  needed_by: str = "compare", name: str | None = None) -> Responder:
    common = dict(precision=cfg.precision, trust_remote_code=cfg.trust_remote_code)
    if ref == BASELINE:
        b = cfg.baseline
        return PromptedBaseline(name or BASELINE, baseline_model(cfg), decoding, baseline_prompt(cfg, run_dir),
                                user_prefix=b.user_prefix, assistant_prefix=b.assistant_prefix, **common)
    path = resolve_input_model(run_dir, ref, needed_by) if run_dir is not None else ref
    return ChatModel(name or model_label(ref), path, decoding, **common)
