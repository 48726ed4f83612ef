"""The `python -m stages.<name> --run-dir D` entry every stage module ends with (what `accelerate
launch` runs): read the resolved config, run the stage, and turn a failure into one line and an exit
code the orchestrator understands."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from data_schemas.errors import DataError
from stages.core.config_schema import RunConfig
from stages.core.errors import ModelError, StageError, disk_full_error, os_error_line
from stages.core.run_folder import stage_dir


def _disk_nearly_full(path, below: int = 4 * 1024**2) -> bool:
    """torch.save reports a full disk as "basic_ios::clear: iostream error" or "unexpected pos", with
    no errno: a write error on a filesystem with almost no space left is taken as the full disk."""
    import shutil

    try:
        return shutil.disk_usage(path).free < below
    except OSError:
        return False


def interrupted_line(stage: str) -> str:
    """What a stage stopped by Ctrl-C prints and reports."""
    return f"{stage}: interrupted"


def _report(line: str) -> None:
    """Print the stage's one-line error, and hand it to the orchestrator (see pipeline.orchestrator)."""
    print(line, file=sys.stderr)
    path = os.environ.get("RLHF_STAGE_ERROR_FILE")
    if path:
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError:
            pass


def stage_main(stage: str, run_fn, argv: list[str] | None = None) -> None:
    import signal

    # `rlhf run` starts the launcher with Ctrl-C ignored (so it prints no traceback); the stage itself
    # stops on Ctrl-C as usual.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    ap = argparse.ArgumentParser(prog=f"python -m stages.{stage}",
                                 description=f"Run the {stage} stage on a run folder (normally started by `rlhf`).")
    ap.add_argument("--run-dir", required=True, help="the run folder; its config.yaml holds the resolved config")
    ap.add_argument("--config", help="resolved config YAML (default: RUN_DIR/config.yaml)")
    args = ap.parse_args(argv)
    cfg_path = Path(args.config or Path(args.run_dir) / "config.yaml")
    try:
        cfg = RunConfig.from_resolved(yaml.safe_load(cfg_path.read_text()))
        run_fn(cfg, Path(args.run_dir))
    except (StageError, ModelError, DataError) as e:
        _report(f"error: {stage}: {e}")
        sys.exit(2)
    except OSError as e:  # the filesystem: a full disk, a read-only or vanished folder
        _report(f"error: {stage}: {os_error_line(e)}")
        sys.exit(2)
    except KeyboardInterrupt:
        # Also handed to the orchestrator: `accelerate launch` turns exit 130 into 1, and the
        # orchestrator may not see the Ctrl-C itself (seen once under heavy load).
        _report(interrupted_line(stage))
        sys.exit(130)
    except Exception as e:
        if not (disk_full_error(e) or _disk_nearly_full(args.run_dir)):
            raise
        _report(f"error: {stage}: no space left on device while writing under {stage_dir(args.run_dir, stage)} "
                f"({type(e).__name__})")
        sys.exit(2)
