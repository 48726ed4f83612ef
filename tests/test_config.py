import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
ALL_CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: p.name)
def test_every_run_config_validates(path):
    cfg = load_config(path)
    raw = yaml.safe_load(path.read_text())
    assert cfg.name == raw.get("name", path.stem)

    def same(written: dict, held: dict, where: str) -> None:  # no setting is rewritten after parsing
        for key, value in written.items():
            if isinstance(value, dict):
                same(value, held[key], f"{where}{key}.")
            else:
                assert held[key] == value, f"{path.name}: {where}{key}: {value!r} became {held[key]!r}"

    same(raw, cfg.model_dump(mode="json"), "")


def test_overrides_apply_and_are_typed():
    cfg = load_config(REPO / "configs" / "quickstart.yaml", ["ppo.kl_coef=0.07", "sft.lora.enabled=true", "name=x"])
    assert cfg.ppo.kl_coef == pytest.approx(0.07)
    assert cfg.sft.lora.enabled is True and cfg.name == "x"
    # an override into a section the YAML leaves out keeps that section's other defaults
    cfg = load_config(REPO / "configs" / "quickstart.yaml", ["reward.data.format=hh"])
    assert cfg.reward.data.source == "default:preferences" and cfg.reward.data.format == "hh"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("ppo.kl_cof=0.1", "unknown key 'ppo.kl_cof' (did you mean 'ppo.kl_coef'?)"),
        ("sft.lora.rank=4", "unknown key 'sft.lora.rank'"),
        ("ppo.kl_coef=lots", "'ppo.kl_coef': Input should be a valid number"),
        ("ppo.kl_estimator=k2", "'ppo.kl_estimator': Input should be 'k1' or 'k3'"),
        ("ppo.batch_size=6", "mini_batch_size (4) must divide batch_size (6)"),
        ("precision=fp8", "'precision': Input should be 'auto', 'fp32', 'bf16' or 'fp16'"),
        ("nmae=x", "unknown key 'nmae' (did you mean 'name'?)"),
        ("ppo.kl_coef", "must look like key.path=value"),
    ],
)
def test_bad_values_give_one_line_errors(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs" / "quickstart.yaml", [override])
    msg = str(e.value)
    assert expected in msg
    assert "\n" not in msg


def test_bad_yaml_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nppo: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: invalid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(lst)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")


def test_cli_misspelt_key_exits_nonzero_with_one_line():
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "configs/quickstart.yaml", "ppo.kl_cof=0.05"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["config error: configs/quickstart.yaml + overrides: unknown key 'ppo.kl_cof' "
                     "(did you mean 'ppo.kl_coef'?)"]
    assert "Traceback" not in proc.stdout + proc.stderr


def test_cli_help_lists_stage_commands():
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    for cmd in ("run", "sft", "reward", "ppo", "baseline", "compare", "chat", "data", "models", "label"):
        assert f"    {cmd}" in proc.stdout, cmd


def test_cli_overrides_may_follow_options():
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "configs/tiny.yaml", "--dry-run", "--stages", "sft",
                           "ppo.kl_cof=0.05"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("unknown key 'ppo.kl_cof' (did you mean 'ppo.kl_coef'?)")
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "configs/tiny.yaml", "--dry-run", "--bogus"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unrecognized arguments: --bogus" in proc.stderr
