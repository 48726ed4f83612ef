"""Where a dataset comes from and how to read it: the `data:` / `prompts:` blocks of a config."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Format = Literal["canonical", "hh", "trl", "alpaca", "dolly", "ab_label", "ranked"]


class Partition(BaseModel):
    """Keep one part of a dataset, split by prompt: each record's prompt (the conversation before the
    reply) is hashed with `seed` into one of len(fractions) parts, so the same prompt lands in the same
    part in every stage and whatever the file's order. E.g. a proxy RM, a judge RM and held-out eval
    prompts from one file: fractions [0.45, 0.45, 0.1], part 0, 1 and 2."""

    model_config = ConfigDict(extra="forbid")

    fractions: list[float] = Field(min_length=2)
    part: int = Field(ge=0)
    seed: int = 0

    @model_validator(mode="after")
    def _valid(self) -> "Partition":
        if any(f <= 0 for f in self.fractions) or abs(sum(self.fractions) - 1.0) > 1e-6:
            raise ValueError(f"fractions must be positive and sum to 1, got {self.fractions}")
        if self.part >= len(self.fractions):
            raise ValueError(f"part {self.part} is out of range for {len(self.fractions)} fractions")
        return self

    def keeps(self, prompt_key: str) -> bool:
        import hashlib

        u = int(hashlib.sha256(f"{self.seed}:{prompt_key}".encode()).hexdigest()[:16], 16) / 16**16
        edge = 0.0
        for i, f in enumerate(self.fractions):
            edge += f
            if u < edge or i == len(self.fractions) - 1:
                return i == self.part
        return False


class DatasetSpec(BaseModel):
    """A dataset source plus the adapter that turns its rows into our records.

    source: `default:<name>` for the dataset shipped in the package (demonstrations, preferences,
            prompts, eval_prompts), a local file (.jsonl/.json/.csv/.parquet, optionally .gz), or a
            hub dataset name for users who are online.
    format: which adapter reads the rows (see README, "Use your own preference data").
    fields: maps our field names to the source's column names, e.g. {prompt: question}.
    """

    model_config = ConfigDict(extra="forbid")

    source: str
    format: Format = "canonical"
    fields: dict[str, str] = Field(default_factory=dict)
    split: str = "train"
    data_dir: str | None = Field(None, description="a hub dataset's subfolder, e.g. harmless-base of Anthropic/hh-rlhf")
    skip_invalid: bool = False
    limit: int | None = Field(default=None, ge=1)
    partition: Partition | None = None
    tags: list[str] = Field(default_factory=list, description="added to every prompt's tags (prompt data only), "
                            "e.g. [harmful] for red-team prompts")
