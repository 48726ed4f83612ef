"""What a stage reads outside its own section is declared once (stages.core.config_schema.stage_inputs):
the orchestrator's skip logic hashes exactly that, file contents included, and the stage modules read
other sections through it only."""
import ast

import pytest

from pipeline.config import load_config
from pipeline.orchestrator import stage_hashes, upstream
from stages.core.config_schema import REPO_ROOT, stage_inputs
from stages.core.run_folder import STAGES

TINY = REPO_ROOT / "configs" / "tiny.yaml"


def hashes(*overrides):
    return stage_hashes(load_config(TINY, list(overrides)))


def changed(before: dict, after: dict) -> set:
    return {s for s in STAGES if before[s] != after[s]}


def test_editing_the_prompt_file_reruns_the_baseline_and_compare(tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("You are helpful.\n\nUser: Hi\nAssistant: Hello.\n")
    before = hashes(f"baseline.prompt_file={prompt}")
    prompt.write_text("You are terse.\n\nUser: Hi\nAssistant: Hello.\n")
    assert changed(before, hashes(f"baseline.prompt_file={prompt}")) == {"baseline", "compare"}


def test_the_prompt_file_is_found_as_the_stage_finds_it(tmp_path, monkeypatch):
    """A relative prompt_file is read from the repo root when the working directory lacks it, as the
    baseline stage reads it: the hash follows the content, not the path string."""
    from_repo = hashes()
    monkeypatch.chdir(tmp_path)
    assert hashes() == from_repo
    (tmp_path / "configs" / "prompts").mkdir(parents=True)
    (tmp_path / "configs" / "prompts" / "dialogue_prompted.txt").write_text("Another prompt.\n")  # cwd wins
    assert changed(from_repo, hashes()) == {"baseline", "compare"}


def test_ptx_reads_the_sft_data_settings():
    alone = ("ppo.policy=some/model", "ppo.reward_model=some/rm", "ppo.value_init=policy")  # nothing upstream
    assert upstream(load_config(TINY, list(alone)), "ppo") == []
    assert changed(hashes(*alone), hashes(*alone, "sft.max_length=64")) == {"sft", "reward", "compare"}  # no ptx
    ptx = (*alone, "ppo.ptx_coef=0.1")
    assert changed(hashes(*ptx), hashes(*ptx, "sft.max_length=64")) == {"sft", "reward", "ppo", "compare"}
    assert changed(hashes(*ptx), hashes(*ptx, "sft.data.limit=8")) == {"sft", "reward", "ppo", "compare"}


def test_compare_reads_the_reward_max_length():
    alone = ("compare.models=[baseline]", "compare.judges=[some/rm]", "compare.reference=null")
    assert upstream(load_config(TINY, list(alone)), "compare") == ["baseline"]
    assert changed(hashes(*alone), hashes(*alone, "reward.max_length=64")) == {"reward", "ppo", "compare"}


SECTIONS = ("sft", "reward", "ppo", "baseline", "compare")


@pytest.mark.parametrize("stage", SECTIONS)
def test_stage_modules_read_other_sections_only_through_the_declaration(stage):
    """No `cfg.<other section>` in a stage's module: what it reads from there comes from stage_inputs."""
    tree = ast.parse((REPO_ROOT / "stages" / f"{stage}.py").read_text())
    reads = {node.attr for node in ast.walk(tree)
             if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "cfg"}
    assert not (reads & set(SECTIONS)) - {stage}, f"stages/{stage}.py reads {sorted(reads & set(SECTIONS))}"
    stage_inputs(load_config(TINY), stage)  # every stage has a declaration
