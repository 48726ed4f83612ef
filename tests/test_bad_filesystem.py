"""Bad disk states through the real CLI: an unwritable run folder, a full disk in the middle of a
stage, corrupt checkpoints, an output path that is not a folder. Each is one line naming the path,
no traceback, and nothing left half-written. The CLI exits 2 on its own errors; a failed stage
process makes `rlhf run` exit non-zero with the stage's line and the orchestrator's. (Data and config errors are in
test_data_bad.py and test_config.py.)"""
import json

import pytest

from test_distributed_and_kill import KILL_AT, STEPS, _kill_at, rlhf


def one_error_line(out: str, prefix: str) -> str:
    assert "Traceback" not in out, out[-3000:]
    lines = [line for line in out.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, out[-3000:]
    return lines[0]


def test_run_folder_under_a_file(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    res = rlhf(["run", "configs/tiny.yaml", f"runs_root={blocker}"])
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"error: cannot write the run folder {blocker}/tiny: Not a directory"]


def test_run_folder_on_a_filesystem_that_refuses_writes():
    res = rlhf(["run", "configs/tiny.yaml", "runs_root=/sys/rlhf-runs"])
    assert res.returncode == 2
    line = one_error_line(res.stderr, "error:")
    assert line.startswith("error: cannot write the run folder /sys/rlhf-runs/tiny: ")


def test_full_disk_during_the_model_export(tmp_path, tiny_model_dir):
    root = tmp_path / "runs"
    res = rlhf(["run", "configs/tiny.yaml", "--stages", "sft", f"runs_root={root}", "sft.max_steps=2"],
               {"RLHF_TEST_ENOSPC_ON": r"/sft/\.model\.partial/"})
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-2000:]
    line = one_error_line(res.stderr, "error: sft:")
    assert line.startswith(f"error: sft: no space left on device while writing {root}/tiny/sft/.model.partial/")
    assert "error: stage sft failed with exit code" in res.stderr
    assert not (root / "tiny" / "sft" / "model").exists() and not (root / "tiny" / "sft" / "DONE").exists()


@pytest.mark.parametrize("damage", ["truncated weights", "bad trainer state"])
def test_corrupt_checkpoint_is_one_clear_line(tmp_path, tiny_model_dir, damage):
    run_dir, code, _ = _kill_at(tmp_path, "final save")
    assert code != 0
    ckpt = run_dir / "sft" / "checkpoints" / f"step-{KILL_AT['final save'][2]}"
    if damage == "truncated weights":
        weights = ckpt / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        (ckpt / "trainer_state.json").write_text('{"step": 6, "cur')
    res = rlhf(["run", "configs/tiny.yaml", "--stages", "sft", f"runs_root={run_dir.parent}", f"sft.max_steps={STEPS}",
                "sft.save_steps=2", "sft.batch_size=2"])
    assert res.returncode != 0
    line = one_error_line(res.stderr, "error: sft:")
    kind = "SafetensorError" if damage == "truncated weights" else "JSONDecodeError"
    assert line.startswith(f"error: sft: checkpoint {ckpt} is unreadable ({kind}: ")
    assert line.endswith(f"delete that folder to resume from the one before it, or delete {ckpt.parent} to start over")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["sft"]["status"] == "failed"


def test_convert_into_a_path_under_a_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = rlhf(["data", "convert", "default:prompts", str(blocker / "out.jsonl")])
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"error: Not a directory: {blocker}"]
    assert blocker.read_text() == "x"
