"""The run-folder contract.

runs/<name>/
  config.yaml          the resolved run config (stages read their settings from here)
  manifest.json        per stage: status, config hash, artifacts, key metrics, wall time, events
  <stage>/             one folder per stage: config.yaml, metrics.jsonl, summary.json, model/, ...
  <stage>/DONE         written by the pipeline only after the stage process exited 0
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from pathlib import Path

from data_schemas.files import atomic_write_json
from stages.core.errors import StageError
from stages.core.run_folder import STAGES, stage_dir

DONE = "DONE"
LOCK = ".lock"


def run_dir_for(cfg) -> Path:
    """runs_root/name, which must be a folder strictly inside runs_root (`name=..` would be its parent)."""
    root = Path(cfg.runs_root).expanduser()
    run_dir = root / cfg.name
    resolved_root, resolved = root.resolve(), run_dir.resolve()
    if resolved == resolved_root or resolved_root not in resolved.parents:
        raise StageError(f"run folder {run_dir} resolves to {resolved}, outside runs_root {resolved_root}: "
                         f"choose another name")
    return run_dir


class RunLock:
    """One `rlhf` process per run folder: an exclusive flock on runs/<name>/.lock, held until the
    process exits (the kernel drops it on any exit, SIGKILL included, so a stale lock cannot block
    the next run). The file holds the owner's PID for the message the second process prints."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            try:
                owner = self.path.read_text().split()[0]
            except (OSError, IndexError):
                owner = "?"
            raise StageError(f"run folder {self.path.parent} in use by PID {owner}: wait for that run to finish, "
                             f"or choose another name=") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    @property
    def fd(self) -> int | None:
        """The locked descriptor; handed to the stage launcher (pass_fds) so that a stage outliving a
        killed `rlhf run` keeps the folder locked until it ends too."""
        return self._fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


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
        try:
            atomic_write_json(self.path, self.data)
        except OSError as e:
            if e.errno != errno.ENOSPC or not self._overwrite_in_place():
                raise

    def _overwrite_in_place(self) -> bool:
        """On a full disk the temp file of an atomic write cannot be created, but the manifest's own
        blocks are still allocated: rewrite it in place when the new text fits in them, so a failed
        stage is still recorded as failed. Returns whether it did."""
        data = (json.dumps(self.data, indent=2, ensure_ascii=False, default=str) + "\n").encode()
        try:
            st = self.path.stat()
        except OSError:
            return False
        if len(data) > st.st_blocks * 512:
            return False
        try:
            fd = os.open(self.path, os.O_WRONLY)
            try:
                os.pwrite(fd, data, 0)
                os.ftruncate(fd, len(data))
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            return False
        return True
