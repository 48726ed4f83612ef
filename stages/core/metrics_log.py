"""A stage's step log: metrics.jsonl (one JSON line per step) mirrored to TensorBoard, read back
for summaries and the report, and cut back to a checkpoint when a killed run resumes."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from data_schemas.files import append_jsonl, atomic_write_jsonl
from stages.core.run_folder import is_main_process, stage_dir, write_summary


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


def close_stage(run_dir: str | os.PathLike, stage: str, summary: dict, logger: MetricsLogger, main: bool) -> dict:
    """A stage's last act: its summary.json (rank 0 writes it), then its log closed; returns the summary."""
    if main:
        write_summary(run_dir, stage, summary)
    logger.close()
    return summary


def _plain(v):
    try:
        import torch

        if isinstance(v, torch.Tensor):
            return v.item() if v.numel() == 1 else v.tolist()
    except ImportError:
        pass
    return v


def read_jsonl_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_metrics(run_dir: str | os.PathLike, stage: str) -> list[dict]:
    return read_jsonl_rows(stage_dir(run_dir, stage) / "metrics.jsonl")


def restart_logs(folder: Path, logs: dict[str, str], last: int | None, final: bool = False) -> None:
    """The logs of a stage as it (re)starts. A fresh start (last None) removes them; a resume from
    checkpoint `last` drops the rows a killed run logged after it. logs: file name -> the key that
    numbers its rows (rows without it count as 0 and are kept). `final`: checkpoint `last` is the
    run's final one, so its final evaluation's row (logged after that checkpoint, and logged again
    by the resumed run) goes too."""
    def after_checkpoint(r: dict, key: str) -> bool:
        n = r.get(key, 0)
        return n > last or (final and n == last and any(k.startswith("eval_") for k in r))

    for name, key in logs.items():
        if last is None:
            (folder / name).unlink(missing_ok=True)
            continue
        rows = read_jsonl_rows(folder / name)
        if any(after_checkpoint(r, key) for r in rows):
            atomic_write_jsonl(folder / name, [r for r in rows if not after_checkpoint(r, key)])
