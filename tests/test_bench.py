"""The benchmark plumbing: step timing, FLOP accounting, the side-by-side table, RESULTS.md sections,
and per-process peak RSS. The benchmarks themselves are measurements, not tests; one slow test
drives bench_sft end to end on the tiny model so the scripts cannot rot."""
import sys

import pytest

from bench import benchlib as bl


def test_step_stats_drops_warmup_and_takes_the_median():
    # steps end at t=10, 12, 13, 16, 17 -> step times 2, 1, 3, 1 for steps 2..5
    st = bl.step_stats([10.0, 12.0, 13.0, 16.0, 17.0], warmup=1)
    assert st["timed_steps"] == 4
    assert st["step_s"] == 1.5          # median of 2, 1, 3, 1
    assert st["step_s_min"] == 1.0 and st["step_s_max"] == 3.0
    st2 = bl.step_stats([10.0, 12.0, 13.0, 16.0, 17.0], warmup=2)
    assert st2["timed_steps"] == 3 and st2["step_s"] == 1.0   # 1, 3, 1


def test_step_stats_needs_a_timed_step():
    with pytest.raises(ValueError):
        bl.step_stats([1.0], warmup=1)


def test_step_stats_with_cpu_clock():
    # [wall, cpu] stamps: wall steps 2, 4, 2 (median 2); CPU steps 1, 1, 3 (median 1)
    st = bl.step_stats([[0, 0], [2, 1], [6, 2], [8, 5]], warmup=1)
    assert st["step_s"] == 2 and st["cpu_step_s"] == 1
    assert bl.step_stats([0.0, 1.0, 2.0], warmup=1)["cpu_step_s"] is None


def test_metrics_logger_hook_stamps_first_row_per_step(tmp_path):
    from stages.core.metrics_log import MetricsLogger

    orig = MetricsLogger.log
    rows = []
    try:
        stamps = bl.hook_metrics_logger("loss", rows.append)
        log = MetricsLogger(tmp_path, "sft", enabled=False)
        log.log(1, loss=1.0)
        log.log(1, eval_loss=2.0)      # same step, no key: not a step end
        log.log(2, event="spike")      # no key
        log.log(2, loss=0.5)
        log.log(2, loss=0.4)           # second row of step 2: ignored
    finally:
        MetricsLogger.log = orig
    assert len(stamps) == 2 and all(len(s) == 2 for s in stamps)
    assert [r["loss"] for r in rows] == [1.0, 0.5]


def test_side_by_side_ratios_are_ours_over_peer():
    res = {"ours": {"stamps": [0, 1, 2, 3], "peak_rss_mb": 1000.0, "wall_s": 10.0, "load_before": 1, "load_after": 1},
           "peer": {"stamps": [0, 2, 4, 6], "peak_rss_mb": 2000.0, "wall_s": 20.0, "load_before": 1, "load_after": 1}}
    ceiling = {"gflops_best": 1000.0, "gflops_cpu": 500.0}
    table, per = bl.side_by_side(res, {"ours": "o", "peer": "p"}, warmup=1, samples_per_step=8,
                                 tokens_per_sample=10, flops_per_token=6e9, ceiling=ceiling)
    assert per["ours"]["samples_s"] == 8.0 and per["peer"]["samples_s"] == 4.0
    assert per["ours"]["tokens_s"] == 80.0
    assert per["ours"]["mfu"] == pytest.approx(80 * 6e9 / 1e12)
    ratio_row = table.splitlines()[-1]
    assert ratio_row.startswith("| **ratio ours ÷ peer** | 0.50 |")   # s/step 1 / 2
    assert "| 2.00 | 2.00 | 2.00 | 0.50 | 0.50 |" in ratio_row          # samples/s, tokens/s, MFU, RSS, wall


def test_side_by_side_cpu_basis_uses_cpu_seconds():
    # ours: wall 4 s/step but 1 CPU-s/step (the machine was busy); peer: 2 wall, 2 CPU
    res = {"ours": {"stamps": [[0, 0], [4, 1], [8, 2]], "peak_rss_mb": 1.0, "wall_s": 1.0, "load_before": 5, "load_after": 5},
           "peer": {"stamps": [[0, 0], [2, 2], [4, 4]], "peak_rss_mb": 1.0, "wall_s": 1.0, "load_before": 1, "load_after": 1}}
    _, per = bl.side_by_side(res, {"ours": "o", "peer": "p"}, warmup=1, samples_per_step=8, tokens_per_sample=10,
                             flops_per_token=1e9, ceiling={"gflops_best": 100.0, "gflops_cpu": 50.0}, basis="cpu")
    assert per["ours"]["samples_s"] == 8.0 and per["peer"]["samples_s"] == 4.0
    assert per["ours"]["mfu"] == pytest.approx(80 * 1e9 / 50e9)


def test_update_results_replaces_only_its_section(tmp_path):
    path = tmp_path / "RESULTS.md"
    bl.update_results("sft", "SFT", "first", path)
    bl.update_results("ceiling", "Ceiling", "flops", path)
    bl.update_results("sft", "SFT", "second", path)
    text = path.read_text()
    assert "second" in text and "first" not in text and "flops" in text
    assert text.index("bench:ceiling") < text.index("bench:sft")   # fixed section order
    assert text.count("<!-- bench:sft -->") == 1


def test_count_params_lm_and_classifier(tiny_model_dir):
    n_lm = bl.count_params(str(tiny_model_dir), head="lm")
    n_cls = bl.count_params(str(tiny_model_dir), head="score")
    # tiny-random-llama: tied 49152 x 64 embedding; the classifier drops it and adds a 64 -> 1 head
    assert n_lm - n_cls == 49152 * 64 - 64


def test_run_worker_reports_each_process_own_peak_rss(tmp_path):
    # A worker that allocates ~200 MB must report more than one that allocates nothing, even when it
    # runs first (RUSAGE_CHILDREN would carry the first peak over), and neither may inherit this
    # test process's own RSS (torch is loaded here; a forked child's ru_maxrss would include it).
    code = ("import sys; from bench import benchlib as bl; "
            "bl.worker_main({'x': lambda job: {'buf': len(bytearray(job['mb'] * 2**20))}})")
    big = bl.run_worker(["-c", code, "--worker", "x"], {"mb": 200})
    small = bl.run_worker(["-c", code, "--worker", "x"], {"mb": 0})
    assert big["peak_rss_mb"] > small["peak_rss_mb"] + 150
    assert small["peak_rss_mb"] < 100


@pytest.mark.slow
def test_bench_sft_runs_both_sides_on_the_tiny_model(tmp_path, monkeypatch):
    from bench import bench_sft

    monkeypatch.setattr(sys, "argv", ["bench_sft"])
    res = bench_sft.main(["--model", "tiny-random-llama", "--steps", "1", "--threads", "1", "--no-write",
                          "--log-dir", str(tmp_path)])
    for side in ("ours", "peer"):
        assert len(res[side]["stamps"]) == 2 and res[side]["peak_rss_mb"] > 100


def test_variant_runs_get_their_own_results_section():
    from types import SimpleNamespace as NS

    labels = {"ours": "ours", "peer": "peer"}
    base = dict(device="cpu", dtype="fp32", sides="ours,peer", ours_set=[])
    assert bl.variant(labels, "ppo", NS(**base)) == (labels, "ppo")
    assert bl.variant(labels, "ppo", NS(**{**base, "device": "cuda", "dtype": "bf16"}))[1] == "ppo__cuda_bf16"
    assert bl.variant(labels, "ppo", NS(**{**base, "sides": "ours"}))[1] == "ppo__ours_only"
    lab, sec = bl.variant(labels, "sft", NS(**{**base, "ours_set": ["sft.padding_free=false"]}))
    assert sec == "sft__sft_padding_free_false" and lab["ours"] == "ours (sft.padding_free=false)"
