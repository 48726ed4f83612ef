"""End to end in a real headless Chromium: label 5 comparisons with clicks and keys, check the file,
SIGKILL the server, restart it and resume at the 6th, check that model text with <script> shows as
text and never runs, then train the reward stage on the labels with the tiny model.

Skips (with the reason) when chromium, chromedriver or selenium is missing: `make browser` installs them.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipeline.label_records import load_run_generations, plan_comparisons, read_labels, ties_path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
XSS = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2">'
SEED = 3
N_PROMPTS = 8

pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs chromium and chromedriver (run `make browser`, or "
                                       "apt-get install chromium chromium-driver)")


def write_generations(run: Path) -> None:
    folder = run / "compare" / "generations"
    folder.mkdir(parents=True)
    for model in ("baseline", "ppo"):
        rows = [{"id": f"p{i}", "tags": [],  # the compare stage's row shape
                 "messages": [{"role": "system", "content": "Be helpful."},
                              {"role": "user", "content": f"Question {i}: what does <b>bold</b> do? {XSS}"}],
                 "response": f"[{model}] answer {i}: {XSS}\nsecond line", "num_tokens": 9, "reward": 0.1}
                for i in range(N_PROMPTS)]
        (folder / f"{model}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


class Server:
    """`python -m pipeline.label serve` in a subprocess; the port comes from its first stdout line."""

    def __init__(self, run: Path):
        cmd = [sys.executable, "-m", "pipeline.label", "serve", "--run", str(run), "--port", "0", "--seed", str(SEED)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(60)
        match = re.search(r"http://localhost:(\d+)/", line[0] if line else "")
        if not match:
            self.proc.kill()
            pytest.fail(f"server did not start: {line} {self.proc.stderr.read()}")
        self.url = f"http://127.0.0.1:{match.group(1)}/"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)  # no cleanup, no flush: what a crash or `kill -9` does
        self.proc.wait(10)


@pytest.fixture
def browser(tmp_path):
    pytest.importorskip("selenium", reason="needs selenium (pip install -e '.[test]')")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager try to download a driver
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,900", f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def shown_id(driver, previous: str | None = None, timeout: float = 30) -> str:
    """Wait until the page shows a comparison other than `previous`; return its id."""
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(d):
        cid = d.execute_script("return document.body.dataset.comparisonId || null")
        return cid if cid and cid != previous else False

    return WebDriverWait(driver, timeout).until(ready)


def side_of(driver, model: str) -> str:
    """Which side (A or B) shows `model`'s response; the test's texts start with "[model]"."""
    from selenium.webdriver.common.by import By

    for side in "AB":
        if driver.find_element(By.ID, f"text-{side}").get_attribute("textContent").startswith(f"[{model}]"):
            return side
    raise AssertionError(f"{model} is on neither side")


def press(driver, key: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(key).perform()


def post(url: str, body: dict) -> int:
    req = urllib.request.Request(url + "api/label", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def test_label_five_kill_resume_and_train_reward(tmp_path, browser):
    from selenium.webdriver.common.by import By

    run = tmp_path / "run"
    write_generations(run)
    out = run / "label" / "labels.jsonl"
    order = [c.id for c in plan_comparisons(load_run_generations(run), seed=SEED)]
    assert len(order) == N_PROMPTS

    server = Server(run)
    browser.get(server.url)
    cid = shown_id(browser)
    assert cid == order[0]

    # ---- model text is text: <script> is shown, not run; no element is made from it ----
    text_a = browser.find_element(By.ID, "text-A").get_attribute("textContent")
    assert "<script>window.__xss = 1</script>" in text_a and "second line" in text_a
    assert "<b>bold</b>" in browser.find_element(By.ID, "prompt").get_attribute("textContent")
    assert browser.execute_script("return window.__xss") is None
    assert browser.execute_script("return document.querySelectorAll('main img, main script, main b').length") == 0
    assert "baseline" not in browser.find_element(By.TAG_NAME, "body").text.replace("[baseline]", "")

    # ---- label 5: click, keys, tie, both bad; a note typed with shortcut letters labels nothing ----
    expected = {}  # comparison id -> (label, chosen model or None)
    note = browser.find_element(By.ID, "note")
    note.click()
    note.send_keys("ppo is clearer, tab 1 2 x")
    assert shown_id(browser) == cid  # typing in the note did not choose
    browser.save_screenshot(str(tmp_path / "label_page.png"))
    shutil.copy(tmp_path / "label_page.png", "/tmp/label_screenshot.png")
    side = side_of(browser, "ppo")
    browser.find_element(By.ID, f"btn-{side}").click()
    expected[cid] = (side, "ppo")

    cid = shown_id(browser, cid)
    side = side_of(browser, "ppo")
    press(browser, "1" if side == "A" else "2")
    expected[cid] = (side, "ppo")

    cid = shown_id(browser, cid)
    press(browser, "t")
    expected[cid] = ("tie", None)

    cid = shown_id(browser, cid)
    browser.find_element(By.ID, "btn-both_bad").click()
    expected[cid] = ("both_bad", None)

    cid = shown_id(browser, cid)
    side = side_of(browser, "baseline")
    press(browser, side.lower())
    expected[cid] = (side, "baseline")
    cid = shown_id(browser, cid)
    assert browser.find_element(By.ID, "progress").text == f"5 / {N_PROMPTS} labelled"

    rows = read_labels(out)
    assert len(rows) == 5 and {r["meta"]["comparison_id"] for r in rows} == set(order[:5]) == set(expected)
    for r in rows:
        m = r["meta"]
        label, winner = expected[m["comparison_id"]]
        assert (m["label"], m["chosen_model"]) == (label, winner)
        if winner:
            assert r["chosen"].startswith(f"[{winner}]") and not r["rejected"].startswith(f"[{winner}]")
            assert r["prompt"][1]["content"].startswith(f"Question {m['prompt_id'][1:]}:")
    assert next(r for r in rows if r["meta"]["comparison_id"] == order[0])["meta"]["note"] == "ppo is clearer, tab 1 2 x"
    assert len(out.read_text().splitlines()) == 3 and len(ties_path(out).read_text().splitlines()) == 2

    # ---- a bad id is refused and writes nothing ----
    before = (out.read_bytes(), ties_path(out).read_bytes())
    assert post(server.url, {"id": "0123456789abcdef", "label": "A"}) == 404
    assert post(server.url, {"id": order[5], "label": "best"}) == 400
    assert (out.read_bytes(), ties_path(out).read_bytes()) == before

    # ---- SIGKILL mid-session, restart: it resumes at the 6th comparison, nothing duplicated ----
    assert cid == order[5]
    server.kill()
    server = Server(run)
    try:
        browser.get(server.url)
        cid = shown_id(browser)
        assert cid == order[5]
        assert browser.find_element(By.ID, "progress").text == f"5 / {N_PROMPTS} labelled"
        side = side_of(browser, "ppo")
        press(browser, side)
        cid = shown_id(browser, cid)
        # another tab labels the comparison on screen; this tab's choice is refused and it moves on
        assert post(server.url, {"id": cid, "label": "both_bad"}) == 200
        press(browser, "t")
        assert shown_id(browser, cid) == order[7]
        assert "already labelled" in browser.find_element(By.ID, "status").text
    finally:
        server.kill()
    rows = read_labels(out)
    ids = [r["meta"]["comparison_id"] for r in rows]
    assert len(ids) == 7 and len(set(ids)) == 7 and set(ids) == set(order[:7])
    assert next(r for r in rows if r["meta"]["comparison_id"] == order[6])["meta"]["label"] == "both_bad"

    # ---- the file is preference data for the reward stage as it is ----
    from stages.core.config_schema import RunConfig
    from stages.reward import run as run_reward

    cfg = RunConfig.model_validate({
        "name": "label-e2e", "model": "tiny-random-llama", "runs_root": str(tmp_path),
        "reward": {"data": {"source": str(out), "format": "canonical"}, "init_from": "tiny-random-llama",
                   "max_steps": 2, "batch_size": 2, "eval_fraction": 0.0, "max_length": 128},
        "guard": {"enabled": False},
    })
    metrics = run_reward(cfg, tmp_path / "label-e2e")
    assert (tmp_path / "label-e2e" / "reward" / "model" / "config.json").exists()
    # it trained on the 4 labelled wins, one per prompt; ties and both-bad are not in FILE
    assert metrics["train_groups"] + metrics["eval_groups"] == 4 and metrics["steps"] == 2
