"""The records every stage consumes, whatever format the data came in.

    Demonstration   chat messages; the last one is the assistant reply SFT learns
    PreferencePair  prompt messages + a chosen and a rejected reply (+ optional margin)
    Ranking         prompt messages + K >= 2 replies ordered best first (InstructGPT, K = 4..9)
    Prompt          id + messages ending in a user turn + tags (e.g. "harmful"), for PPO and eval

Replies are plain strings: they are the assistant turn appended to `prompt`. A reply may be the
empty string (in HH-RLHF the preferred answer is sometimes silence), but chosen != rejected.
"""
from __future__ import annotations

from itertools import combinations
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Role = Literal["system", "user", "assistant"]


class Message(BaseModel):
    """One chat turn. Also readable as a mapping (`m["role"]`), so a list of them can go straight
    into `tokenizer.apply_chat_template`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Role
    content: str

    @field_validator("content")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("message content is empty")
        return v

    def __getitem__(self, key: str) -> Any:
        if key not in ("role", "content"):
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in ("role", "content") else default

    def keys(self):
        return ("role", "content")

    def items(self):
        return (("role", self.role), ("content", self.content))


def as_chat(messages: list[Message]) -> list[dict[str, str]]:
    """Plain dicts, for tokenizers and JSON."""
    return [{"role": m.role, "content": m.content} for m in messages]


def _check_prompt(messages: list[Message]) -> list[Message]:
    if not messages:
        raise ValueError("prompt has no messages")
    if messages[-1].role != "user":
        raise ValueError(f"prompt must end with a user turn, not {messages[-1].role!r}")
    return messages


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Demonstration(_Record):
    messages: list[Message] = Field(min_length=2)

    @model_validator(mode="after")
    def _ends_with_reply(self) -> "Demonstration":
        if self.messages[-1].role != "assistant":
            raise ValueError("the last message must be the assistant reply")
        if not any(m.role == "user" for m in self.messages[:-1]):
            raise ValueError("needs a user turn before the assistant reply")
        return self

    @property
    def prompt(self) -> list[Message]:
        return self.messages[:-1]

    @property
    def response(self) -> str:
        return self.messages[-1].content


class PreferencePair(_Record):
    prompt: list[Message]
    chosen: str
    rejected: str
    margin: float | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_ok(cls, v: list[Message]) -> list[Message]:
        return _check_prompt(v)

    @model_validator(mode="after")
    def _distinct(self) -> "PreferencePair":
        if self.chosen.strip() == self.rejected.strip():
            raise ValueError("chosen and rejected are the same text")
        return self


class Ranking(_Record):
    prompt: list[Message]
    responses: list[str] = Field(description="best first")

    @field_validator("prompt")
    @classmethod
    def _prompt_ok(cls, v: list[Message]) -> list[Message]:
        return _check_prompt(v)

    @field_validator("responses")
    @classmethod
    def _k_distinct(cls, v: list[str]) -> list[str]:
        if len(v) < 2:
            raise ValueError(f"a ranking needs at least 2 responses, got {len(v)}")
        seen = [r.strip() for r in v]
        if len(set(seen)) != len(seen):
            raise ValueError("a ranking lists the same response twice")
        return v

    def to_pairs(self) -> list[PreferencePair]:
        """All K*(K-1)/2 comparisons, as InstructGPT trains on them."""
        return [PreferencePair(prompt=self.prompt, chosen=self.responses[i], rejected=self.responses[j])
                for i, j in combinations(range(len(self.responses)), 2)]


class Prompt(_Record):
    id: str = Field(min_length=1)
    messages: list[Message]
    tags: list[str] = Field(default_factory=list)

    @field_validator("messages")
    @classmethod
    def _prompt_ok(cls, v: list[Message]) -> list[Message]:
        return _check_prompt(v)


Preference = PreferencePair | Ranking
Record = Demonstration | PreferencePair | Ranking | Prompt


def to_pairs(records: list[Preference]) -> list[PreferencePair]:
    """Flatten rankings into pairwise comparisons; pairs pass through unchanged."""
    out: list[PreferencePair] = []
    for r in records:
        out.extend(r.to_pairs() if isinstance(r, Ranking) else [r])
    return out


def to_canonical(record: Record) -> dict:
    """The JSON row of our canonical JSONL format for this record (what `rlhf data convert` writes)."""
    if isinstance(record, Demonstration):
        return {"messages": as_chat(record.messages)}
    if isinstance(record, PreferencePair):
        row = {"prompt": as_chat(record.prompt), "chosen": record.chosen, "rejected": record.rejected}
        if record.margin is not None:
            row["margin"] = record.margin
        return row
    if isinstance(record, Ranking):
        return {"prompt": as_chat(record.prompt), "responses": list(record.responses)}
    return {"id": record.id, "messages": as_chat(record.messages), "tags": list(record.tags)}
