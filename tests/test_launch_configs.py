"""The cluster recipes cannot run here, so their configs are validated and their launch commands checked."""
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from pipeline.launcher import stage_command

REPO = Path(__file__).resolve().parents[1]
ACCEL = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCEL, ids=lambda p: p.name)
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
    assert cmd[cmd.index("--config_file") + 1] == "configs/accelerate/zero2_8gpu.yaml"
    assert cmd[cmd.index("--num_processes") + 1] == "8"
    assert cmd[-4:] == ["-m", "stages.sft", "--run-dir", "runs/x"]
    assert (REPO / cfg.launch.accelerate_config).is_file()


def test_two_node_zero3_recipe_launch_command():
    cfg = load_config(REPO / "configs" / "cluster_2x8gpu_zero3.yaml",
                      ["launch.machine_rank=1", "launch.main_process_ip=10.1.2.3"])
    cmd = stage_command(cfg.launch, "ppo", Path("runs/y"))
    for flag, value in (("--num_machines", "2"), ("--num_processes", "16"), ("--machine_rank", "1"),
                        ("--main_process_ip", "10.1.2.3"), ("--main_process_port", "29500")):
        assert cmd[cmd.index(flag) + 1] == value
    accel = yaml.safe_load((REPO / cfg.launch.accelerate_config).read_text())
    assert accel["distributed_type"] == "DEEPSPEED" and accel["deepspeed_config"]["zero_stage"] == 3
    assert accel["num_machines"] == cfg.launch.num_machines


def test_cpu_ddp_uses_multi_gpu_flag_not_cpu():
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["launch.num_processes=2", "launch.cpu_ddp=true"])
    cmd = stage_command(cfg.launch, "sft", Path("r"))
    assert "--multi_gpu" in cmd and "--cpu" not in cmd
    assert cmd[cmd.index("--num_processes") + 1] == "2"
