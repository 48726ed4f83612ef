"""The bad-input corpus through the CLI: every kind of bad config, data, command line and filesystem
state gives exactly one line on stderr, no traceback, and exit code 2. Table-driven and in-process
(`pipeline.cli.main`), so ~100 kinds cost seconds; the real `rlhf run` subprocess path for stage
errors is in test_reliability.py (exit code 2 through `accelerate launch`) and test_bad_filesystem.py.

Each row: (kind, argv, a substring of the one line). In argv, {tiny} is configs/tiny.yaml, {bad} is
tests/data/bad, {tmp} a fresh temp folder (see `prepare`), {runs} a runs_root inside it.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.cli import main

REPO = Path(__file__).resolve().parents[1]
BAD = REPO / "tests" / "data" / "bad"

# ---- configs: values, keys, YAML files ----
CONFIG = [
    ("unknown key", ["config", "validate", "{tiny}", "ppo.kl_cof=0.1"], "unknown key 'ppo.kl_cof' (did you mean 'ppo.kl_coef'?)"),
    ("unknown nested key", ["config", "validate", "{tiny}", "sft.lora.rank=4"], "unknown key 'sft.lora.rank'"),
    ("unknown top key", ["config", "validate", "{tiny}", "nmae=x"], "unknown key 'nmae' (did you mean 'name'?)"),
    ("not a number", ["config", "validate", "{tiny}", "ppo.kl_coef=lots"], "'ppo.kl_coef': Input should be a valid number"),
    ("bad choice", ["config", "validate", "{tiny}", "ppo.kl_estimator=k2"], "'ppo.kl_estimator': Input should be 'k1' or 'k3'"),
    ("minibatch does not divide", ["config", "validate", "{tiny}", "ppo.batch_size=6", "ppo.mini_batch_size=4"], "must divide batch_size"),
    ("bad precision", ["config", "validate", "{tiny}", "precision=fp8"], "'precision': Input should be"),
    ("override without =", ["config", "validate", "{tiny}", "ppo.kl_coef"], "must look like key.path=value"),
    ("lr inf", ["config", "validate", "{tiny}", "ppo.lr=inf"], "'ppo.lr': Input should be a finite number"),
    ("sft lr inf", ["config", "validate", "{tiny}", "sft.lr=inf"], "'sft.lr': Input should be a finite number"),
    ("lr nan", ["config", "validate", "{tiny}", "reward.lr=.nan"], "'reward.lr': Input should be a finite number"),
    ("kl -inf", ["config", "validate", "{tiny}", "ppo.kl_coef=-.inf"], "'ppo.kl_coef': Input should be a finite number"),
    ("max_steps 0", ["config", "validate", "{tiny}", "sft.max_steps=0"], "'sft.max_steps': 0 would train nothing"),
    ("max_steps -2", ["config", "validate", "{tiny}", "reward.max_steps=-2"], "'reward.max_steps': Input should be greater than or equal to -1"),
    ("batch 0", ["config", "validate", "{tiny}", "sft.batch_size=0"], "'sft.batch_size': Input should be greater than or equal to 1"),
    ("epochs 0", ["config", "validate", "{tiny}", "sft.epochs=0"], "'sft.epochs': Input should be greater than 0"),
    ("warmup 1", ["config", "validate", "{tiny}", "sft.warmup_ratio=1"], "'sft.warmup_ratio': Input should be less than 1"),
    ("negative lr", ["config", "validate", "{tiny}", "sft.lr=-1"], "'sft.lr': Input should be greater than 0"),
    ("bad scheduler", ["config", "validate", "{tiny}", "sft.lr_scheduler=step"], "'sft.lr_scheduler': Input should be"),
    ("max_length 8", ["config", "validate", "{tiny}", "sft.max_length=8"], "'sft.max_length': Input should be greater than or equal to 16"),
    ("top_p 1.5", ["config", "validate", "{tiny}", "ppo.top_p=1.5"], "'ppo.top_p': Input should be less than or equal to 1"),
    ("gamma 2", ["config", "validate", "{tiny}", "ppo.gamma=2"], "'ppo.gamma': Input should be less than or equal to 1"),
    ("temperature 0", ["config", "validate", "{tiny}", "ppo.temperature=0"], "'ppo.temperature': Input should be greater than 0"),
    ("mini batch 0", ["config", "validate", "{tiny}", "ppo.mini_batch_size=0"], "'ppo.mini_batch_size': Input should be greater than or equal to 1"),
    ("freeze -1", ["config", "validate", "{tiny}", "reward.freeze_layers=-1"], "'reward.freeze_layers': Input should be greater than or equal to 0"),
    ("freeze and lora", ["config", "validate", "{tiny}", "reward.freeze_layers=1", "reward.lora.enabled=true"], "pick one"),
    ("processes 0", ["config", "validate", "{tiny}", "launch.num_processes=0"], "'launch.num_processes': Input should be greater than or equal to 1"),
    ("port 70000", ["config", "validate", "{tiny}", "launch.main_process_port=70000"], "'launch.main_process_port': Input should be less than or equal to 65535"),
    ("mixed precision fp8", ["config", "validate", "{tiny}", "launch.mixed_precision=fp8"], "'launch.mixed_precision': Input should be"),
    ("spike factor 1", ["config", "validate", "{tiny}", "guard.spike_factor=1"], "'guard.spike_factor': Input should be greater than 1"),
    ("max events 0", ["config", "validate", "{tiny}", "guard.max_events=0"], "'guard.max_events': Input should be greater than or equal to 1"),
    ("name ..", ["config", "validate", "{tiny}", "name=.."], "'name': String should match pattern"),
    ("name .", ["config", "validate", "{tiny}", "name=."], "'name': String should match pattern"),
    ("name with /", ["config", "validate", "{tiny}", "name=a/b"], "'name': String should match pattern"),
    ("empty name", ["config", "validate", "{tiny}", "name="], "'name': String should match pattern"),
    ("no models to compare", ["config", "validate", "{tiny}", "compare.models=[]"], "'compare.models': List should have at least 1 item"),
    ("lora dropout 1", ["config", "validate", "{tiny}", "sft.lora.dropout=1"], "'sft.lora.dropout': Input should be less than 1"),
    ("not a bool", ["config", "validate", "{tiny}", "trust_remote_code=maybe"], "'trust_remote_code': Input should be a valid boolean"),
    ("not an int", ["config", "validate", "{tiny}", "seed=abc"], "'seed': Input should be a valid integer"),
    ("unknown data format", ["config", "validate", "{tiny}", "sft.data.format=nope"], "'sft.data.format': Input should be"),
    ("section not a mapping", ["config", "validate", "{tiny}", "sft=5"], "'sft': Input should be a valid dictionary"),
    ("negative bootstrap", ["config", "validate", "{tiny}", "compare.bootstrap=-1"], "'compare.bootstrap': Input should be greater than or equal to 0"),
    ("reward clip 0", ["config", "validate", "{tiny}", "ppo.reward_clip=0"], "'ppo.reward_clip': Input should be greater than 0"),
    ("decoding top_p 0", ["config", "validate", "{tiny}", "baseline.decoding.top_p=0"], "'baseline.decoding.top_p': Input should be greater than 0"),
    ("data limit 0", ["config", "validate", "{tiny}", "sft.data.limit=0"], "'sft.data.limit': Input should be greater than or equal to 1"),
]
YAML_FILES = {  # file name -> (bytes, expected)
    "empty.yaml": (b"", "the file has no settings"),
    "comment.yaml": (b"# nothing here\n", "the file has no settings"),
    "braces.yaml": (b"{}\n", "the file has no settings"),
    "duplicate.yaml": (b"name: a\nsft:\n  lr: 1.0e-3\n  lr: 2.0e-3\n", "line 4: invalid YAML (duplicate key 'lr' (first at line 3))"),
    "duplicate_top.yaml": (b"name: a\nname: b\n", "line 2: invalid YAML (duplicate key 'name'"),
    "invalid.yaml": (b"name: x\nppo: [unclosed\n", "invalid YAML"),
    "list.yaml": (b"- a\n- b\n", "top level must be a mapping of keys, got list"),
    "scalar.yaml": (b"hello\n", "top level must be a mapping of keys, got str"),
    "latin1.yaml": (b"name: caf\xe9\n", "not UTF-8 text"),
    "unknown_in_file.yaml": (b"name: a\nsft:\n  lrr: 1\n", "unknown key 'sft.lrr' (did you mean 'sft.lr'?)"),
    "tab_indent.yaml": (b"name: a\nsft:\n\tlr: 1\n", "invalid YAML"),
}
CONFIG += [(f"yaml file: {name}", ["config", "validate", f"{{tmp}}/{name}"], exp) for name, (_, exp) in YAML_FILES.items()]
CONFIG += [
    ("config file missing", ["config", "validate", "{tmp}/missing.yaml"], "no such file"),
    ("config path is a folder", ["config", "validate", "{tmp}"], "is a folder, not a config file"),
]

# ---- data files (tests/data/bad) through `rlhf data validate` and `rlhf run` ----
DATA = [
    ("missing field", ["data", "validate", "{bad}/missing_field.jsonl", "--format", "canonical"], ":2: rejected: missing"),
    ("empty field", ["data", "validate", "{bad}/empty_field.jsonl", "--format", "trl"], ":3: chosen: empty"),
    ("wrong type", ["data", "validate", "{bad}/wrong_type.jsonl", "--format", "trl"], ":1: chosen: expected a string, got a number"),
    ("invalid json", ["data", "validate", "{bad}/invalid_json.jsonl", "--format", "trl"], ":2: invalid JSON"),
    ("invalid json gz", ["data", "validate", "{bad}/invalid_json.jsonl.gz", "--format", "trl"], ":3: invalid JSON"),
    ("not an object", ["data", "validate", "{bad}/not_object.jsonl", "--format", "canonical"], ":2: expected a JSON object"),
    ("non utf-8", ["data", "validate", "{bad}/non_utf8.jsonl", "--format", "trl"], ":2: not valid UTF-8"),
    ("bad label", ["data", "validate", "{bad}/bad_label.csv", "--format", "ab_label", "--field", "prompt=question"], ":3: label: invalid label 'C'"),
    ("tie label", ["data", "validate", "{bad}/tie_label.csv", "--format", "ab_label"], ":2: label: label 'tie' is a tie"),
    ("hh malformed", ["data", "validate", "{bad}/hh_malformed.jsonl", "--format", "hh"], ":1: chosen: malformed transcript"),
    ("hh prefix mismatch", ["data", "validate", "{bad}/hh_prefix_mismatch.jsonl", "--format", "hh"], ":1: rejected: the conversation before"),
    ("hh no reply", ["data", "validate", "{bad}/hh_no_reply.jsonl", "--format", "hh"], ":1: chosen: malformed transcript: does not end"),
    ("ranking too short", ["data", "validate", "{bad}/ranking_too_short.jsonl", "--format", "ranked"], ":2: responses: a ranking needs at least 2"),
    ("same reply", ["data", "validate", "{bad}/same_reply.jsonl", "--format", "trl"], ":1: rejected: same text as 'chosen'"),
    ("bad role", ["data", "validate", "{bad}/bad_role.jsonl", "--format", "canonical", "--kind", "demonstrations"], "invalid role 'human'"),
    ("demo without reply", ["data", "validate", "{bad}/demo_no_reply.jsonl", "--format", "canonical", "--kind", "demonstrations"], "the last message must be the assistant reply"),
    ("bad margin", ["data", "validate", "{bad}/bad_margin.jsonl", "--format", "trl"], ":1: margin: expected a number"),
    ("alpaca without output", ["data", "validate", "{bad}/alpaca_no_output.jsonl", "--format", "alpaca"], ":2: output: missing"),
    ("csv columns", ["data", "validate", "{bad}/columns.csv", "--format", "trl"], ":3: expected 3 columns"),
    ("unclosed json", ["data", "validate", "{bad}/unclosed.json", "--format", "trl"], ":4: invalid JSON"),
    ("duplicate prompt id", ["data", "validate", "{bad}/duplicate_id.jsonl", "--format", "canonical", "--kind", "prompts"], "duplicate prompt id 'p1'"),
    ("empty data file", ["data", "validate", "{bad}/empty.jsonl", "--format", "trl"], "empty file (no rows)"),
    ("unsupported extension", ["data", "validate", "{bad}/unsupported.txt", "--format", "trl"], "unsupported file extension '.txt'"),
    ("data file missing", ["data", "validate", "{bad}/does_not_exist.jsonl", "--format", "trl"], "file not found"),
    ("unknown field mapping", ["data", "validate", "{bad}/same_reply.jsonl", "--format", "trl", "--field", "chozen=good"], "did you mean 'chosen'"),
    ("format cannot provide kind", ["data", "validate", "{bad}/same_reply.jsonl", "--format", "alpaca", "--kind", "preferences"], "cannot provide preferences"),
    ("nothing valid to skip to", ["data", "validate", "{bad}/same_reply.jsonl", "--format", "trl", "--skip-invalid"], "no valid rows"),
    ("preview -n 0", ["data", "preview", "default:prompts", "-n", "0"], "-n 0: must be at least 1"),
    ("convert to non-jsonl", ["data", "convert", "default:prompts", "{tmp}/out.csv"], "the output must be a .jsonl file"),
    ("convert over its input", ["data", "convert", "{tmp}/prompts.jsonl", "{tmp}/prompts.jsonl"], "refusing to overwrite the input file"),
    ("run: bad reward data", ["run", "{tiny}", "--dry-run", "runs_root={runs}", "reward.data.source={bad}/missing_field.jsonl",
                              "reward.data.format=canonical", "reward.data.limit=null"], ":2: rejected: missing"),
    ("run: bad sft data", ["run", "{tiny}", "--dry-run", "runs_root={runs}", "sft.data.source={bad}/bad_role.jsonl",
                           "sft.data.format=canonical", "sft.data.limit=null"], "invalid role 'human'"),
    ("run: bad prompts", ["run", "{tiny}", "--dry-run", "runs_root={runs}", "ppo.prompts.source={bad}/duplicate_id.jsonl",
                          "ppo.prompts.limit=null"], "duplicate prompt id 'p1'"),
]

# ---- the command line ----
CLI = [
    ("no command", [], "rlhf: error: the following arguments are required: COMMAND"),
    ("run without config", ["run"], "rlhf run: error: the following arguments are required: config ("),
    ("unknown command", ["frob"], "invalid choice: 'frob'"),
    ("unknown option", ["run", "{tiny}", "--bogus"], "unrecognized arguments: --bogus"),
    ("stray word", ["run", "{tiny}", "--dry-run", "oops"], "unrecognized arguments: oops"),
    ("unknown stage", ["run", "{tiny}", "--stages", "sft,nope", "runs_root={runs}"], "unknown stage 'nope'"),
    ("unknown --from", ["run", "{tiny}", "--from", "nope", "runs_root={runs}"], "unknown stage 'nope'"),
    ("upstream not done", ["run", "{tiny}", "--stages", "ppo", "runs_root={runs}"], "ppo reads the sft stage's output, which is missing"),
    ("models without action", ["models"], "rlhf models: error: the following arguments are required"),
    ("config without action", ["config"], "rlhf config: error: the following arguments are required"),
    ("data without action", ["data"], "rlhf data: error: the following arguments are required"),
    ("bad int option", ["chat", "x", "--max-new-tokens", "many"], "argument --max-new-tokens: invalid int value: 'many'"),
    ("data bad format choice", ["data", "validate", "{bad}/empty.jsonl", "--format", "nope"], "argument --format"),
    ("label summary missing file", ["label", "summary", "{tmp}/no_labels.jsonl"], "no_labels.jsonl"),
]

# ---- references and the filesystem ----
FILESYSTEM = [
    ("runs_root under a file", ["run", "{tiny}", "--dry-run", "runs_root={tmp}/a_file"], "cannot write the run folder {tmp}/a_file/tiny: Not a directory"),
    ("runs_root in /proc", ["run", "{tiny}", "--dry-run", "runs_root=/proc/rlhf-runs"], "cannot write the run folder /proc/rlhf-runs/tiny"),
    ("runs_root in /sys", ["run", "{tiny}", "runs_root=/sys/rlhf-runs"], "cannot write the run folder /sys/rlhf-runs/tiny"),
    ("run folder locked", ["run", "{tiny}", "--stages", "sft", "runs_root={tmp}/locked"], "in use by PID"),
    ("prompt file is a folder", ["run", "{tiny}", "--dry-run", "runs_root={runs}", "baseline.prompt_file={tmp}"], "baseline.prompt_file: {tmp}: is a folder"),
    ("prompt file missing", ["run", "{tiny}", "--dry-run", "runs_root={runs}", "baseline.prompt_file=/nope.txt"], "baseline.prompt_file: /nope.txt: no such file"),
    ("prompt file not utf-8", ["run", "{tiny}", "--dry-run", "runs_root={runs}", "baseline.prompt_file={tmp}/latin1.yaml"], "not UTF-8 text"),
    ("accelerate config missing", ["run", "{tiny}", "--dry-run", "runs_root={runs}", "launch.accelerate_config=/nope.yaml"], "launch.accelerate_config: /nope.yaml: no such file"),
    ("accelerate config wrong", ["run", "{tiny}", "--dry-run", "runs_root={runs}", "launch.accelerate_config={tiny}"], "not an accelerate config"),
    ("model folder missing", ["run", "{tiny}", "--dry-run", "runs_root={runs}", "model=/nonexistent/model"], "model: model folder /nonexistent/model does not exist"),
    ("model folder empty", ["run", "{tiny}", "--dry-run", "runs_root={runs}", "model={tmp}/empty_model"], "has no config.json"),
    ("model path is a file", ["run", "{tiny}", "--dry-run", "runs_root={runs}", "model={tmp}/a_file"], "is a file, not a model folder"),
    ("model without safetensors", ["run", "{tiny}", "--dry-run", "runs_root={runs}", "model={tmp}/config_only"], "has no *.safetensors weights"),
    ("hub name offline", ["run", "{tiny}", "--dry-run", "runs_root={runs}", "model=nobody/no-such-model-xyz"], "HF_HUB_OFFLINE is set"),
    ("invalid hub name", ["run", "{tiny}", "--dry-run", "runs_root={runs}", "model=bad name!"], "neither a local model folder nor a valid hub name"),
    ("reward init missing", ["run", "{tiny}", "--dry-run", "runs_root={runs}", "reward.init_from=/nonexistent"], "reward.init_from: model folder /nonexistent does not exist"),
    ("policy missing", ["run", "{tiny}", "--dry-run", "runs_root={runs}", "ppo.policy=./no/such/policy"], "ppo.policy: model folder ./no/such/policy"),
    ("reward model missing", ["run", "{tiny}", "--dry-run", "runs_root={runs}", "ppo.reward_model=/no/rm"], "ppo.reward_model: model folder /no/rm"),
    ("value init missing", ["run", "{tiny}", "--dry-run", "runs_root={runs}", "ppo.value_init=/no/value"], "ppo.value_init: model folder /no/value"),
    ("compare model missing", ["run", "{tiny}", "--dry-run", "runs_root={runs}", "compare.models=[sft,nope]"], "compare.models[1]: nope is not a local folder"),
    ("compare reference missing", ["run", "{tiny}", "--dry-run", "runs_root={runs}", "compare.reference=/no/ref"], "compare.reference: model folder /no/ref"),
    ("reward_fn bad form", ["run", "{tiny}", "--dry-run", "runs_root={runs}", "ppo.reward_fn=foo"], "must look like 'module:function'"),
    ("reward_fn no module", ["run", "{tiny}", "--dry-run", "runs_root={runs}", "ppo.reward_fn=no_such_mod_xyz:f"], "cannot import 'no_such_mod_xyz'"),
    ("reward_fn no function", ["run", "{tiny}", "--dry-run", "runs_root={runs}", "ppo.reward_fn=stages.rl.reward_functions:nope"], "has no function 'nope'"),
    ("run data missing", ["run", "{tiny}", "--dry-run", "runs_root={runs}", "sft.data.source={tmp}/nope.jsonl"], "file not found"),
    ("chat: model folder missing", ["chat", "/nonexistent/model"], "chat: model folder /nonexistent/model does not exist"),
    ("chat: hub name offline", ["chat", "nobody/no-such-model-xyz"], "HF_HUB_OFFLINE is set"),
    ("convert into a file's child", ["data", "convert", "default:prompts", "{tmp}/a_file/out.jsonl"], "Not a directory"),
]

CORPUS = [("config", *c) for c in CONFIG] + [("data", *c) for c in DATA] + [("cli", *c) for c in CLI] + \
         [("filesystem", *c) for c in FILESYSTEM]


@pytest.fixture
def prepare(tmp_path):
    """The files and folders the table's {tmp} paths name."""
    for name, (data, _) in YAML_FILES.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty_model").mkdir()
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.json").write_text("{}")
    (tmp_path / "prompts.jsonl").write_text('{"id": "p1", "prompt": "hi"}\n')
    return tmp_path


def _fill(arg: str, tmp: Path) -> str:
    return arg.format(tiny=REPO / "configs" / "tiny.yaml", bad=BAD, tmp=tmp, runs=tmp / "runs")


@pytest.mark.parametrize("group,kind,argv,expected", CORPUS, ids=[f"{g}: {k}" for g, k, *_ in CORPUS])
def test_bad_input_is_one_line_and_exit_2(prepare, capsys, monkeypatch, group, kind, argv, expected):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(REPO)
    lock = None
    if kind == "run folder locked":
        from pipeline.rundir import RunLock

        (prepare / "locked" / "tiny").mkdir(parents=True)
        lock = RunLock(prepare / "locked" / "tiny").acquire()
    try:
        with pytest.raises(SystemExit) as e:
            main([_fill(a, prepare) for a in argv])
    finally:
        if lock is not None:
            lock.release()
    out, err = capsys.readouterr()
    assert e.value.code == 2, (out[-2000:], err[-2000:])
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[-3000:]
    assert _fill(expected, prepare) in lines[0]
    assert not (prepare / "runs" / "tiny").exists()  # bad input leaves no run folder behind


def test_corpus_covers_at_least_90_kinds():
    kinds = {(g, k) for g, k, *_ in CORPUS}
    assert len(kinds) == len(CORPUS) >= 90
    assert {g for g, *_ in kinds} == {"config", "data", "cli", "filesystem"}
