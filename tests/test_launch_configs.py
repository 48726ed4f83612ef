"""The cluster recipes cannot run here, so their configs are validated and their launch commands checked."""
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from pipeline.launcher import stage_command

REPO = Path(__file__).resolve().parents[1]
ACCEL = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))
PENDING = sorted((REPO / "bench" / "accelerate_pending").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCEL + PENDING, ids=lambda p: p.name)
def test_accelerate_configs_parse_with_accelerate(path):
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(str(path))
    raw = yaml.safe_load(path.read_text())
    assert cfg.num_processes == raw["num_processes"] >= 1
    if cfg.distributed_type.value == "DEEPSPEED":
        assert raw["deepspeed_config"]["zero_stage"] in (2, 3)
    if cfg.num_machines > 1:
        assert cfg.num_processes % cfg.num_machines == 0 and cfg.main_process_ip


def test_eight_gpu_recipe_launch_command():
    cfg = load_config(REPO / "configs" / "cluster_8gpu.yaml")
    cmd = stage_command(cfg.launch, "sft", Path("runs/x"))
    assert cmd[cmd.index("--config_file") + 1] == "configs/accelerate/ddp_8gpu.yaml"
    assert cmd[cmd.index("--num_processes") + 1] == "8"
    assert cmd[-4:] == ["-m", "stages.sft", "--run-dir", "runs/x"]
    assert (REPO / cfg.launch.accelerate_config).is_file()


def test_two_node_recipe_launch_command():
    cfg = load_config(REPO / "configs" / "cluster_2x8gpu.yaml",
                      ["launch.machine_rank=1", "launch.main_process_ip=10.1.2.3"])
    cmd = stage_command(cfg.launch, "ppo", Path("runs/y"))
    for flag, value in (("--num_machines", "2"), ("--num_processes", "16"), ("--machine_rank", "1"),
                        ("--main_process_ip", "10.1.2.3"), ("--main_process_port", "29500")):
        assert cmd[cmd.index(flag) + 1] == value
    accel = yaml.safe_load((REPO / cfg.launch.accelerate_config).read_text())
    assert accel["distributed_type"] == "MULTI_GPU"
    assert accel["num_machines"] == cfg.launch.num_machines and accel["num_processes"] == cfg.launch.num_processes


def test_cpu_ddp_uses_multi_gpu_flag_not_cpu():
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["launch.num_processes=2", "launch.cpu_ddp=true"])
    cmd = stage_command(cfg.launch, "sft", Path("r"))
    assert "--multi_gpu" in cmd and "--cpu" not in cmd
    assert cmd[cmd.index("--num_processes") + 1] == "2"


def test_no_run_config_points_at_a_backend_the_stages_reject():
    """configs/ holds only what the code runs: every accelerate file and every recipe passes pre-flight's check."""
    from pipeline.preflight import _check_accelerate_config

    for path in ACCEL:
        _check_accelerate_config(str(path))
    for recipe in sorted((REPO / "configs").glob("*.yaml")):
        acc = load_config(recipe).launch.accelerate_config
        if acc:
            _check_accelerate_config(str(REPO / acc))


@pytest.mark.parametrize("path", PENDING, ids=lambda p: p.name)
def test_deepspeed_is_refused_at_preflight_in_one_line(path, tmp_path, tiny_model_dir, monkeypatch):
    """Pending backends (DeepSpeed) stop `rlhf run` before any stage starts, with one line naming the
    file and the backend, never a crash mid-run."""
    import os
    import subprocess
    import sys

    monkeypatch.delenv("RLHF_ALLOW_PENDING_BACKENDS", raising=False)
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "configs/tiny.yaml", f"runs_root={tmp_path}",
                           f"launch.accelerate_config={path}"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    backend = yaml.safe_load(path.read_text())["distributed_type"]
    assert str(path) in err[0] and f"distributed_type {backend} is not supported" in err[0]
    assert not any((tmp_path / "tiny").glob("*/model")), "a stage ran"


FSDP2_CPU = "configs/accelerate/cpu_fsdp2.yaml"


@pytest.mark.parametrize("edit, overrides, expected", [
    ({"fsdp_version": 1}, [], "set fsdp_config.fsdp_version: 2"),
    ({"fsdp_cpu_ram_efficient_loading": True}, [], "fsdp_cpu_ram_efficient_loading: true loads weights on rank 0"),
    ({}, ["sft.lora.enabled=true"], "config error: sft.lora.enabled: LoRA is not supported under FSDP yet"),
    ({}, ["ppo.value_lora.enabled=true"], "config error: ppo.value_lora.enabled: LoRA is not supported under FSDP"),
    ({}, ["ppo.monitor.every=1", "ppo.monitor.judges=[reward]"], "config error: ppo.monitor.every: the over-optimisation"),
], ids=["fsdp1", "ram-efficient-loading", "sft-lora", "value-lora", "monitor"])
def test_what_fsdp_does_not_run_yet_is_refused_at_preflight(edit, overrides, expected, tmp_path):
    """FSDP2 runs full fine-tuning (tests/test_multiprocess.py); what the stages do not run sharded
    fails before anything is launched, in one line."""
    import os
    import subprocess
    import sys

    acc = yaml.safe_load((REPO / FSDP2_CPU).read_text())
    acc["fsdp_config"].update(edit)
    (tmp_path / "acc.yaml").write_text(yaml.safe_dump(acc))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "configs/tiny.yaml", f"runs_root={tmp_path}",
                           f"launch.accelerate_config={tmp_path / 'acc.yaml'}", *overrides], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and expected in err[0], proc.stderr
    assert not (tmp_path / "tiny" / "sft").exists(), "a stage ran"
