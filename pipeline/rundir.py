"""The run-folder contract.

runs/<name>/
  config.yaml          the resolved run config (stages read their settings from here)
  manifest.json        per stage: status, config hash, artifacts, key metrics, wall time, events
  <stage>/             one folder per stage: config.yaml, metrics.jsonl, summary.json, model/, ...
  <stage>/DONE         written by the pipeline only after the stage process exited 0
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from data_schemas.files import atomic_write_json
from stages.common import STAGES, stage_dir

DONE = "DONE"


def run_dir_for(cfg) -> Path:
    return Path(cfg.runs_root) / cfg.name


def done_marker(run_dir: Path, stage: str) -> Path:
    return stage_dir(run_dir, stage) / DONE


def read_done(run_dir: Path, stage: str) -> dict | None:
    path = done_marker(run_dir, stage)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return None  # a corrupt marker counts as not done


def write_done(run_dir: Path, stage: str, record: dict) -> None:
    atomic_write_json(done_marker(run_dir, stage), record)


def clear_done(run_dir: Path, stage: str) -> None:
    done_marker(run_dir, stage).unlink(missing_ok=True)


class Manifest:
    def __init__(self, run_dir: Path, read_only: bool = False):
        self.read_only = read_only
        self.path = Path(run_dir) / "manifest.json"
        self.data = {"stages": {}}
        if self.path.exists():
            try:
                self.data = json.loads(self.path.read_text())
            except json.JSONDecodeError:
                self.data = {"stages": {}, "note": "previous manifest was unreadable and was reset"}
        self.data.setdefault("stages", {})

    def stage(self, name: str) -> dict:
        return self.data["stages"].setdefault(name, {"status": "pending"})

    def update(self, name: str, **fields) -> None:
        self.stage(name).update(fields, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
        self.save()

    def save(self) -> None:
        if self.read_only:
            return
        ordered = {s: self.data["stages"][s] for s in STAGES if s in self.data["stages"]}
        self.data["stages"] = ordered
        atomic_write_json(self.path, self.data)
