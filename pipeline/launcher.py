"""Builds the `accelerate launch` command for one stage from the config's `launch:` section."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from stages.core.runtime import intra_op_threads


def accelerate_args(launch) -> list[str]:
    # --quiet: a stage that fails with its one-line error exits non-zero without the launcher's
    # CalledProcessError traceback (single-process and DeepSpeed launches; torchrun prints its own summary).
    args: list[str] = ["--quiet"]
    if launch.accelerate_config:
        args += ["--config_file", launch.accelerate_config]
    if launch.cpu_ddp:
        # `--cpu --num_processes 2` silently runs ONE process; --multi_gpu on a CPU machine gives gloo DDP.
        args += ["--multi_gpu"]
    args += ["--num_processes", str(launch.num_processes), "--num_machines", str(launch.num_machines)]
    if launch.num_machines > 1:
        args += ["--machine_rank", str(launch.machine_rank), "--main_process_ip", str(launch.main_process_ip),
                 "--main_process_port", str(launch.main_process_port)]
    elif launch.num_processes > 1:
        args += ["--main_process_port", str(launch.main_process_port)]
    if launch.mixed_precision:
        args += ["--mixed_precision", launch.mixed_precision]
    elif not launch.accelerate_config:
        args += ["--mixed_precision", "no"]
    if not launch.accelerate_config:
        args += ["--dynamo_backend", "no"]
    # accelerate gives a process one intra-op thread unless told (it splits the cores only with --cpu).
    per_node = max(1, launch.num_processes // max(1, launch.num_machines))
    args += ["--num_cpu_threads_per_process", str(intra_op_threads(per_node))]
    return args


def stage_command(launch, stage: str, run_dir: Path) -> list[str]:
    if stage in ("baseline", "compare") and launch.num_processes > 1 and not launch.accelerate_config:
        # Generation-only stages gain nothing from several CPU processes; keep them on one.
        from copy import copy

        launch = copy(launch)
        launch.num_processes, launch.cpu_ddp = 1, False
    return [sys.executable, "-m", "accelerate.commands.launch", *accelerate_args(launch),
            "-m", f"stages.{stage}", "--run-dir", str(run_dir)]


def stage_env() -> dict:
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
