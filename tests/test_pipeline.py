"""`rlhf run` end to end on the tiny config: all stages, then a no-op re-run, then a ppo-only change."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ["sft", "reward", "ppo", "baseline", "compare"]


def rlhf(*args, timeout=1200):
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    return proc


def done_records(run_dir: Path) -> dict:
    return {s: json.loads((run_dir / s / "DONE").read_text()) for s in STAGES if (run_dir / s / "DONE").exists()}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    proc = rlhf("run", "configs/tiny.yaml", f"runs_root={root}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "tiny", proc


def test_full_run_writes_the_contract(tiny_run):
    run_dir, proc = tiny_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert list(manifest["stages"]) == STAGES
    for s in STAGES:
        entry = manifest["stages"][s]
        assert entry["status"] == "done", (s, entry)
        assert entry["wall_s"] > 0 and len(entry["config_hash"]) == 16
        assert (run_dir / s / "config.yaml").exists() and (run_dir / s / "DONE").exists()
    for s in ("sft", "reward", "ppo"):
        assert (run_dir / s / "model" / "model.safetensors").exists()
        assert (run_dir / s / "metrics.jsonl").stat().st_size > 0
    assert (run_dir / "compare" / "report.html").exists() and (run_dir / "compare" / "report.md").exists()
    assert not list(run_dir.rglob("*.tmp")) and not list(run_dir.rglob(".*.partial"))
    # every stage records the precision and intra-op threads it really ran with (one process each here)
    from stages.core.runtime import intra_op_threads, resolve_precision

    for s in STAGES:
        metrics = manifest["stages"][s]["metrics"]
        assert metrics["precision"] == resolve_precision("auto"), s
        assert metrics["threads"] == intra_op_threads(1), s
    # the final summary table names every stage
    for s in STAGES:
        assert f"\n{s} " in proc.stdout


def test_second_run_skips_everything_and_ppo_change_reruns_only_downstream(tiny_run):
    run_dir, _ = tiny_run
    before = done_records(run_dir)
    proc = rlhf("run", "configs/tiny.yaml", f"runs_root={run_dir.parent}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert done_records(run_dir) == before  # no DONE marker rewritten
    assert proc.stdout.count("skip (done, unchanged)") == 5
    assert "==== " not in proc.stdout  # no stage process was launched

    proc = rlhf("run", "configs/tiny.yaml", f"runs_root={run_dir.parent}", "ppo.kl_coef=0.2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = done_records(run_dir)
    for s in ("sft", "reward", "baseline"):
        assert after[s] == before[s], s
    for s in ("ppo", "compare"):
        assert after[s]["config_hash"] != before[s]["config_hash"], s
        assert after[s]["finished"] >= before[s]["finished"]
    assert "==== ppo ====" in proc.stdout and "==== compare ====" in proc.stdout
    assert "==== sft ====" not in proc.stdout and "==== reward ====" not in proc.stdout
    cfg = (run_dir / "ppo" / "config.yaml").read_text()
    assert "kl_coef: 0.2" in cfg
