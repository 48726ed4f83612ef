"""Adapters: one raw row of a public format -> our records.

Each adapter reads the row through `RowView`, which applies the `fields:` mapping (our name ->
source column) and raises `RowError(column, reason)` for a missing, empty or mistyped value, so
the loader can prefix `file:line` and give a one-line message.

    format     demonstrations             preferences                       prompts
    canonical  messages                   prompt, chosen/rejected[, margin]  id, messages|prompt, tags
                                          or prompt, responses (ranking)
    hh         chosen transcript          chosen, rejected transcripts       chosen transcript
    trl        messages | prompt+completion  prompt, chosen, rejected[, margin]  prompt
    alpaca     instruction, input, output (or instances: [{input, output}])      instruction, input
    dolly      instruction, context, response                                    instruction, context
    ab_label   -                          prompt, response_a, response_b, label  prompt
    ranked     -                          prompt, responses (best first)     prompt
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from data_schemas.records import Demonstration, Message, PreferencePair, Prompt, Ranking

KINDS = ("demonstrations", "preferences", "prompts")


class RowError(Exception):
    """A row is invalid: `column` is the source column (or None for the row), `reason` one line."""

    def __init__(self, column: str | None, reason: str):
        super().__init__(f"{column}: {reason}" if column else reason)
        self.column, self.reason = column, reason


class RowView:
    """Typed access to a raw row through the `fields:` mapping."""

    def __init__(self, raw: dict[str, Any], fields: dict[str, str], row_id: str):
        self.raw, self.fields, self.row_id = raw, fields, row_id

    def col(self, ours: str) -> str:
        return self.fields.get(ours, ours)

    def has(self, ours: str) -> bool:
        return self.raw.get(self.col(ours)) is not None

    def value(self, ours: str) -> Any:
        col = self.col(ours)
        if col not in self.raw or self.raw[col] is None:
            raise RowError(col, "missing")
        return self.raw[col]

    def text(self, ours: str, optional: bool = False) -> str:
        """A non-empty string; with `optional`, a missing or empty value gives ''."""
        if optional and not self.has(ours):
            return ""
        value = self.value(ours)
        if not isinstance(value, str):
            raise RowError(self.col(ours), f"expected a string, got {_type_name(value)}")
        if not value.strip() and not optional:
            raise RowError(self.col(ours), "empty")
        return value.strip()

    def messages(self, ours: str) -> list[Message]:
        """A chat: a list of {role, content}; a plain string is one user turn."""
        col, value = self.col(ours), _maybe_json(self.value(ours))
        if isinstance(value, str):
            if not value.strip():
                raise RowError(col, "empty")
            return [Message(role="user", content=value.strip())]
        if not isinstance(value, list):
            raise RowError(col, f"expected a string or a list of messages, got {_type_name(value)}")
        if not value:
            raise RowError(col, "empty list of messages")
        out = []
        for i, m in enumerate(value):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise RowError(col, f"message {i}: expected {{role: str, content: str}}, got {_short(m)}")
            if m["role"] not in ("system", "user", "assistant"):
                raise RowError(col, f"message {i}: invalid role {m['role']!r} (expected system, user or assistant)")
            if not m["content"].strip():
                raise RowError(col, f"message {i}: empty content")
            out.append(Message(role=m["role"], content=m["content"].strip()))
        return out

    def reply(self, ours: str) -> str:
        """An assistant reply: a string, or a conversational list holding one assistant message."""
        col, value = self.col(ours), _maybe_json(self.value(ours))
        if isinstance(value, list):
            msgs = self.messages(ours)
            if len(msgs) != 1 or msgs[0].role != "assistant":
                raise RowError(col, "expected one assistant message")
            return msgs[0].content
        return self.text(ours)

    def margin(self) -> float | None:
        value = self.raw.get(self.col("margin"))
        if value is None or (isinstance(value, str) and not value.strip()):  # absent, null or an empty CSV cell
            return None
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise RowError(self.col("margin"), f"expected a number, got {_short(value)}") from None

    def string_list(self, ours: str) -> list[str]:
        col, value = self.col(ours), _maybe_json(self.value(ours))
        if not isinstance(value, list):
            raise RowError(col, f"expected a list of strings, got {_type_name(value)}")
        for i, v in enumerate(value):
            if not isinstance(v, str):
                raise RowError(col, f"item {i}: expected a string, got {_type_name(v)}")
            if not v.strip():
                raise RowError(col, f"item {i}: empty")
        return [v.strip() for v in value]


# ---- HH-RLHF transcripts ----

_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_transcript(text: str, col: str) -> list[tuple[str, str]]:
    """`\\n\\nHuman: ...\\n\\nAssistant: ...` -> [(role, content)], consecutive turns of one speaker
    merged (a few HH rows repeat `Assistant:`), so both transcripts of a pair split alike."""
    if text.startswith(("Human:", "Assistant:")):
        text = "\n\n" + text
    parts = _TURN.split(text)
    if len(parts) == 1:
        raise RowError(col, "malformed transcript: no '\\n\\nHuman:' / '\\n\\nAssistant:' turns")
    if parts[0].strip():
        raise RowError(col, "malformed transcript: text before the first '\\n\\nHuman:' turn")
    turns: list[tuple[str, str]] = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        content = content.strip()
        if turns and turns[-1][0] == role:
            turns[-1] = (role, (turns[-1][1] + "\n\n" + content).strip())
        else:
            turns.append((role, content))
    if turns[0][0] != "user":
        raise RowError(col, "malformed transcript: the first turn is not '\\n\\nHuman:'")
    for i, (role, content) in enumerate(turns[:-1]):
        if not content:
            raise RowError(col, f"malformed transcript: turn {i + 1} ({role}) is empty")
    return turns


def _to_messages(turns: list[tuple[str, str]]) -> list[Message]:
    return [Message(role=r, content=c) for r, c in turns]


def _hh_split(view: RowView, ours: str) -> tuple[list[tuple[str, str]], str]:
    """The shared prompt turns and the final assistant reply (possibly empty) of a transcript."""
    col = view.col(ours)
    turns = parse_transcript(view.text(ours), col)
    if turns[-1][0] != "assistant":
        raise RowError(col, "malformed transcript: does not end with an '\\n\\nAssistant:' reply")
    return turns[:-1], turns[-1][1]


def hh_preferences(view: RowView) -> list:
    prompt, chosen = _hh_split(view, "chosen")
    prompt_r, rejected = _hh_split(view, "rejected")
    if prompt != prompt_r:
        turn = next((i for i, (a, b) in enumerate(zip(prompt, prompt_r)) if a != b), min(len(prompt), len(prompt_r)))
        raise RowError(view.col("rejected"), f"the conversation before the final reply differs from "
                       f"{view.col('chosen')!r} (from turn {turn + 1}); both must share the prompt")
    if chosen == rejected:
        raise RowError(view.col("rejected"), f"final reply is the same as in {view.col('chosen')!r}")
    return [PreferencePair(prompt=_to_messages(prompt), chosen=chosen, rejected=rejected)]


def hh_demonstrations(view: RowView) -> list:
    prompt, reply = _hh_split(view, "chosen")
    if not reply:
        raise RowError(view.col("chosen"), "the final assistant reply is empty")
    return [Demonstration(messages=_to_messages(prompt + [("assistant", reply)]))]


def hh_prompts(view: RowView) -> list:
    turns = parse_transcript(view.text("chosen"), view.col("chosen"))
    if turns[-1][0] == "assistant":
        turns = turns[:-1]
    return [Prompt(id=_id(view), messages=_to_messages(turns))]


# ---- TRL: standard (strings) and conversational (message lists), explicit or implicit prompt ----

def trl_preferences(view: RowView) -> list:
    if view.has("prompt"):
        prompt, chosen, rejected = view.messages("prompt"), view.reply("chosen"), view.reply("rejected")
    elif isinstance(_maybe_json(view.value("chosen")), list):
        # Implicit prompt: full conversations that share everything but the last assistant turn.
        full_c, full_r = view.messages("chosen"), view.messages("rejected")
        for ours, full in (("chosen", full_c), ("rejected", full_r)):
            if full[-1].role != "assistant" or len(full) < 2:
                raise RowError(view.col(ours), "implicit-prompt conversation must end with an assistant reply")
        if full_c[:-1] != full_r[:-1]:
            raise RowError(view.col("rejected"),
                           f"the conversation before the final reply differs from {view.col('chosen')!r}")
        prompt, chosen, rejected = full_c[:-1], full_c[-1].content, full_r[-1].content
    else:
        raise RowError(view.col("prompt"), "missing")
    _distinct(view, chosen, rejected)
    return [PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, margin=view.margin())]


def trl_demonstrations(view: RowView) -> list:
    if view.has("messages") or not view.has("prompt"):
        return [Demonstration(messages=view.messages("messages"))]
    reply = Message(role="assistant", content=view.reply("completion"))
    return [Demonstration(messages=view.messages("prompt") + [reply])]


def prompt_column(view: RowView) -> list:
    """The prompt part of a preference-style row (trl, ab_label, ranked)."""
    return [Prompt(id=_id(view), messages=view.messages("prompt"))]


# ---- Alpaca (instruction/input/output, and the seed-task instances layout) and Dolly ----

def _instruction_turn(instruction: str, extra: str) -> Message:
    return Message(role="user", content=f"{instruction}\n\n{extra}" if extra else instruction)


def _alpaca_items(view: RowView) -> list[tuple[str, str, str | None]]:
    """(instruction, input, output) triples; the seed layout holds several instances per task."""
    instruction = view.text("instruction")
    if not view.has("instances") or view.has("output"):
        return [(instruction, view.text("input", optional=True), None)]
    col, instances = view.col("instances"), _maybe_json(view.value("instances"))
    if not isinstance(instances, list) or not instances:
        raise RowError(col, "expected a non-empty list of {input, output}")
    items = []
    for i, inst in enumerate(instances):
        if not isinstance(inst, dict):
            raise RowError(col, f"instance {i}: expected an object, got {_type_name(inst)}")
        output = inst.get("output")
        if not isinstance(output, str) or not output.strip():
            raise RowError(col, f"instance {i}: output is {'empty' if isinstance(output, str) else 'missing'}")
        extra = inst.get("input") or ""
        if not isinstance(extra, str):
            raise RowError(col, f"instance {i}: input: expected a string, got {_type_name(extra)}")
        items.append((instruction, extra.strip(), output.strip()))
    return items


def alpaca_demonstrations(view: RowView) -> list:
    return [Demonstration(messages=[_instruction_turn(ins, extra),
                                    Message(role="assistant", content=out if out is not None else view.text("output"))])
            for ins, extra, out in _alpaca_items(view)]


def alpaca_prompts(view: RowView) -> list:
    items = _alpaca_items(view)
    return [Prompt(id=_id(view) + (f"-{i}" if len(items) > 1 else ""), messages=[_instruction_turn(ins, extra)])
            for i, (ins, extra, _) in enumerate(items)]


def dolly_demonstrations(view: RowView) -> list:
    turn = _instruction_turn(view.text("instruction"), view.text("context", optional=True))
    return [Demonstration(messages=[turn, Message(role="assistant", content=view.text("response"))])]


def dolly_prompts(view: RowView) -> list:
    turn = _instruction_turn(view.text("instruction"), view.text("context", optional=True))
    tags = [view.text("category")] if view.has("category") and view.text("category", optional=True) else []
    return [Prompt(id=_id(view), messages=[turn], tags=tags)]


# ---- A/B tables with a label column, and ranked lists ----

_LABEL_A = {"a", "0", "response_a", "model_a", "response a", "model a", "first"}
_LABEL_B = {"b", "1", "response_b", "model_b", "response b", "model b", "second"}
_TIES = {"tie", "tie (bothbad)", "both", "both_bad", "equal", "none", "neither", "0.5", "draw"}


def parse_ab_label(value: Any, col: str) -> str:
    """'A' or 'B' from the usual spellings: A/B, a/b, 0/1 (0 = A), response_a/b, model_a/b."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RowError(col, f"invalid label {_short(value)} (expected A or B, 0 or 1, response_a or response_b)")
    key = str(int(value)) if isinstance(value, float) and value.is_integer() else str(value).strip().lower()
    if key in _LABEL_A:
        return "A"
    if key in _LABEL_B:
        return "B"
    if key in _TIES:
        raise RowError(col, f"label {value!r} is a tie; a preference pair needs a winner (drop ties first)")
    raise RowError(col, f"invalid label {value!r} (expected A or B, 0 or 1, response_a or response_b)")


def ab_label_preferences(view: RowView) -> list:
    prompt = view.messages("prompt")
    a, b = view.text("response_a"), view.text("response_b")
    winner = parse_ab_label(view.value("label"), view.col("label"))
    chosen, rejected = (a, b) if winner == "A" else (b, a)
    if a == b:
        raise RowError(view.col("response_b"), f"same text as {view.col('response_a')!r}")
    return [PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, margin=view.margin())]


def ranked_preferences(view: RowView) -> list:
    prompt, responses = view.messages("prompt"), view.string_list("responses")
    if len(responses) < 2:
        raise RowError(view.col("responses"), f"a ranking needs at least 2 responses, got {len(responses)}")
    if len(set(responses)) != len(responses):
        raise RowError(view.col("responses"), "the same response is listed twice")
    return [Ranking(prompt=prompt, responses=responses)]


# ---- canonical: our own JSONL ----

def canonical_demonstrations(view: RowView) -> list:
    msgs = view.messages("messages")
    if msgs[-1].role != "assistant":
        raise RowError(view.col("messages"), "the last message must be the assistant reply")
    return [Demonstration(messages=msgs)]


def canonical_preferences(view: RowView) -> list:
    if view.has("responses"):
        return ranked_preferences(view)
    prompt, chosen, rejected = view.messages("prompt"), view.text("chosen"), view.text("rejected")
    _distinct(view, chosen, rejected)
    return [PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, margin=view.margin())]


def canonical_prompts(view: RowView) -> list:
    msgs = view.messages("messages" if view.has("messages") or not view.has("prompt") else "prompt")
    tags: list[str] = []
    if view.has("tags"):
        raw = view.value("tags")
        tags = [t.strip() for t in raw.split(",") if t.strip()] if isinstance(raw, str) else view.string_list("tags")
    return [Prompt(id=_id(view), messages=msgs, tags=tags)]


# ---- the registry: (format, kind) -> (adapter, our field names it reads) ----

Adapter = Callable[[RowView], list]
_PREF_PROMPT = (prompt_column, ("prompt", "id"))
ADAPTERS: dict[str, dict[str, tuple[Adapter, tuple[str, ...]]]] = {
    "canonical": {"demonstrations": (canonical_demonstrations, ("messages",)),
                  "preferences": (canonical_preferences, ("prompt", "chosen", "rejected", "margin", "responses")),
                  "prompts": (canonical_prompts, ("id", "messages", "prompt", "tags"))},
    "hh": {"demonstrations": (hh_demonstrations, ("chosen",)),
           "preferences": (hh_preferences, ("chosen", "rejected")),
           "prompts": (hh_prompts, ("chosen", "id"))},
    "trl": {"demonstrations": (trl_demonstrations, ("messages", "prompt", "completion")),
            "preferences": (trl_preferences, ("prompt", "chosen", "rejected", "margin")),
            "prompts": _PREF_PROMPT},
    "alpaca": {"demonstrations": (alpaca_demonstrations, ("instruction", "input", "output", "instances")),
               "prompts": (alpaca_prompts, ("instruction", "input", "instances", "id"))},
    "dolly": {"demonstrations": (dolly_demonstrations, ("instruction", "context", "response")),
              "prompts": (dolly_prompts, ("instruction", "context", "category", "id"))},
    "ab_label": {"preferences": (ab_label_preferences, ("prompt", "response_a", "response_b", "label", "margin")),
                 "prompts": _PREF_PROMPT},
    "ranked": {"preferences": (ranked_preferences, ("prompt", "responses")), "prompts": _PREF_PROMPT},
}


def adapt(adapter: Adapter, view: RowView) -> list:
    """Run an adapter; a record that fails its own validation becomes a RowError too."""
    try:
        return adapter(view)
    except ValidationError as e:
        err = e.errors()[0]
        loc = next((str(p) for p in err["loc"] if isinstance(p, str)), None)
        raise RowError(view.col(loc) if loc else None, err["msg"].removeprefix("Value error, ")) from None


# ---- helpers ----

def _id(view: RowView) -> str:
    if view.has("id"):
        value = view.value("id")
        if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
            return str(value).strip()
        raise RowError(view.col("id"), f"expected a non-empty string or integer, got {_short(value)}")
    return view.row_id


def _distinct(view: RowView, chosen: str, rejected: str) -> None:
    if chosen.strip() == rejected.strip():
        raise RowError(view.col("rejected"), f"same text as {view.col('chosen')!r}")


def _maybe_json(value: Any) -> Any:
    """CSV cells hold lists as JSON text; decode those, leave everything else alone."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return list(value) if isinstance(value, tuple) else value


def _type_name(value: Any) -> str:
    return {str: "a string", int: "a number", float: "a number", bool: "a boolean", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
