"""`rlhf chat`: the real CLI driven through piped stdin, target resolution, and the two-column layout."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from compare_fixtures import make_run

from pipeline.chat import resolve_target, side_by_side
from stages.core.errors import StageError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("chat"))


def _chat(args: list[str], stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "chat", *args], input=stdin, capture_output=True,
                          text=True, cwd=REPO, timeout=300, env={**os.environ, "COLUMNS": "120"})


def test_chat_with_run_and_baseline_side_by_side(run_folder):
    stdin = "hello\n/reset\n/oops\n\nhi again\n/quit\nnot read\n"
    proc = _chat([str(run_folder), "--baseline", "--max-new-tokens", "4"], stdin)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "chatting with ppo" in out and "dialogue-prompted" in out  # a run folder means its ppo model
    assert out.count("[ppo]") == 2 and out.count("[baseline]") == 2  # two real turns, both models each time
    assert all(" | " in line for line in out.splitlines() if line.startswith("you> [ppo]"))
    assert "(conversation cleared)" in out and "unknown command /oops" in out
    assert out.count("you> ") == 6  # hello, /reset, /oops, blank, hi again, /quit; nothing after /quit


def test_chat_with_model_folder_ends_at_eof(run_folder, monkeypatch, capsys):
    """In-process (the subprocess test above covers the real stdin pipe): a plain model folder, no baseline."""
    from pipeline.cli import main

    lines = iter(["one", "two"])

    def fake_input(prompt):
        print(prompt, end="")
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    with pytest.raises(SystemExit) as e:
        main(["chat", str(run_folder / "sft" / "model"), "--max-new-tokens", "3"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.count("[run-sft]") == 2 and "[baseline]" not in out  # RUN/sft/model is labelled RUN-sft


def test_chat_bad_target_is_a_one_line_error(tmp_path, capsys):
    from pipeline.cli import main

    (tmp_path / "config.yaml").write_text("name: x\n")
    with pytest.raises(SystemExit) as e:
        main(["chat", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "no ppo or sft model" in err and "\n" not in err


def test_resolve_target_prefers_ppo_then_sft(run_folder, tmp_path):
    assert resolve_target(str(run_folder)) == (str(run_folder / "ppo" / "model"), run_folder, "ppo")
    assert resolve_target("some/hub-model") == ("some/hub-model", None, "hub-model")
    (tmp_path / "config.yaml").write_text("name: x\n")
    with pytest.raises(StageError):
        resolve_target(str(tmp_path))


def test_side_by_side_layout():
    wide = side_by_side([("ppo", "a " * 40), ("baseline", "short\nsecond line")], 80)
    lines = wide.splitlines()
    assert lines[0].startswith("[ppo]") and "| [baseline]" in lines[0]
    assert all(len(line.split(" | ")[0]) == 38 for line in lines)
    assert "second line" in wide
    narrow = side_by_side([("ppo", "x"), ("baseline", "y")], 40)
    assert narrow == "[ppo] x\n[baseline] y"
