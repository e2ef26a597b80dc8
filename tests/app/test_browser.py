"""End to end in a real browser: Debian chromium driven by Playwright against `kvlens app`.

Screenshots go to test-artifacts/browser/ for a person to look at.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import passage

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "test-artifacts" / "browser"

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="Debian chromium is not installed"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "app", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("kvlens app did not start")
    yield url
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


def _probe(page, url: str, prompt: str) -> None:
    page.goto(url)
    page.get_by_role("button", name="Run probe").wait_for(timeout=90_000)
    page.get_by_role("textbox", name="prompt").fill(prompt)
    page.get_by_role("button", name="Run probe").click()
    page.get_by_text("probed").wait_for(timeout=180_000)


def test_probe_pages_lab_and_report(server, browser, tmp_path):
    SHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    _probe(page, server, passage(2))
    page.screenshot(path=SHOTS / "01-probe.png", full_page=True)
    for i, name in enumerate(
        ["Attention", "Heavy hitters", "Retrieval heads", "Outlier channels", "Cross-layer"]
    ):
        page.get_by_role("link", name=name).click()
        page.get_by_role(
            "heading", name=name if name != "Cross-layer" else "Cross-layer similarity"
        ).wait_for(timeout=60_000)
        page.wait_for_timeout(1500)
        assert page.locator("text=Traceback").count() == 0
        page.screenshot(
            path=SHOTS / f"0{i + 2}-{name.replace(' ', '-').lower()}.png", full_page=True
        )
    page.get_by_role("link", name="Compression lab").click()
    page.get_by_role("button", name="Run comparison").click()
    page.locator(".kvlens-output").nth(2).wait_for(timeout=180_000)
    outputs = page.locator(".kvlens-output")
    assert outputs.count() == 3  # full, streamingllm, snapkv
    assert all(outputs.nth(i).inner_text().strip() for i in range(3))
    page.screenshot(path=SHOTS / "07-compression-lab.png", full_page=True)
    page.get_by_role("link", name="Report").click()
    page.get_by_role("button", name="Build report").click()
    download = page.get_by_role("button", name="Download report.html")
    page.locator("[data-testid='stAlert'], [data-testid='stDownloadButton']").first.wait_for(
        timeout=300_000
    )
    assert download.count() == 1, page.locator("[data-testid='stAlert']").all_inner_texts()
    with page.expect_download(timeout=120_000) as info:
        page.get_by_role("button", name="Download report.html").click()
    report = tmp_path / "report.html"
    info.value.save_as(report)
    page.screenshot(path=SHOTS / "08-report-page.png", full_page=True)
    viewer = browser.new_page(viewport={"width": 1400, "height": 1000})
    viewer.goto(report.as_uri())
    viewer.get_by_text("Compression comparison").wait_for(timeout=30_000)
    assert viewer.locator(".js-plotly-plot").count() >= 5
    viewer.screenshot(path=SHOTS / "09-report.png", full_page=False)
    assert errors == []


def test_report_shows_script_tags_as_text_and_runs_nothing(server, browser, tmp_path):
    from app.report import build_report
    from probes import capture, load_model

    model, tok = load_model()
    hostile = (
        'Look: <script>alert(1)</script> <img src=x onerror="alert(2)"> '
        "[x](javascript:alert(3)) done."
    )
    trace = capture(model, tok, hostile, attention="full")
    comparison = {
        "results": [
            {
                "spec": "full",
                "text": "<script>alert(4)</script>",
                "kl_mean": 0.0,
                "top1": 1.0,
                "ppl": 1.0,
                "accuracy": None,
                "bytes_ratio": 1.0,
                "time_s": 0.1,
                "kl_per_step": [0.0],
                "kept_per_layer": [],
            }
        ]
    }
    path = tmp_path / "hostile.html"
    path.write_text(build_report(trace, comparison), encoding="utf-8")
    page = browser.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(path.as_uri())
    page.wait_for_timeout(1500)
    assert dialogs == []
    text = page.locator("pre.prompt").inner_text()
    assert "<script>alert(1)</script>" in text and 'onerror="alert(2)"' in text
    assert page.locator("img[src=x]").count() == 0
    assert "<script>alert(4)</script>" in page.locator("body").inner_text()
