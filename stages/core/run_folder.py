"""The run folder as the stages see it: one folder per stage, the exported model inside it, the
resolved config and the summary beside it. The pipeline owns the manifest and the done-markers
(pipeline/rundir.py); each stage owns its own folder."""
from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from data_schemas.files import atomic_write_json, atomic_write_text
from stages.core.config_schema import RunConfig
from stages.core.errors import StageError

STAGES = ("sft", "reward", "ppo", "baseline", "compare")  # in dependency order
MODEL_SUBDIR = "model"


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


def write_stage_config(run_dir: str | os.PathLike, stage: str, cfg: RunConfig) -> None:
    """Every stage folder carries the resolved config it ran with."""
    atomic_write_text(stage_dir(run_dir, stage) / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def write_summary(run_dir: str | os.PathLike, stage: str, metrics: dict) -> None:
    """Key metrics of a finished stage; the pipeline copies them into the manifest."""
    atomic_write_json(stage_dir(run_dir, stage) / "summary.json", metrics)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def model_label(ref: str) -> str:
    """A short file-safe name for a model reference. Stage names stay as they are; a run folder's
    exported model (`.../RUN/STAGE/model`, `.../RUN/ppo/best`) becomes `RUN-STAGE` (`RUN-ppo-best`), so
    two runs' reward models keep apart; any other path becomes its last part."""
    if ref in (*STAGES, "baseline"):
        return ref
    parts = Path(ref.rstrip("/")).parts
    if len(parts) >= 3 and parts[-2] in STAGES and parts[-1] in ("model", "best"):
        tail = "-".join(parts[-3:-1]) + ("-best" if parts[-1] == "best" else "")
    else:
        tail = parts[-1] if parts else ref
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", tail).strip("._") or "model"
