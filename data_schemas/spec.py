"""Where a dataset comes from and how to read it: the `data:` / `prompts:` blocks of a config."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Format = Literal["canonical", "hh", "trl", "alpaca", "dolly", "ab_label", "ranked"]


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
    skip_invalid: bool = False
    limit: int | None = Field(default=None, ge=1)
