"""End to end in a real browser: Debian chromium driven by Playwright against `kvlens app`.

One server for the module; one walk through the app as a new user makes it (deep link, form
kept across pages, probe, a click on a head, every page, the lab, the report download).
Screenshots go to test-artifacts/browser/ for a person to look at.
"""

from __future__ import annotations

import os
import signal
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
def server(tmp_path_factory):
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    workdir = tmp_path_factory.mktemp("app")  # auto-saved dumps land here, not in the repo
    # its own process group: `kvlens app` starts streamlit as a child, both must stop
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "app", "--port", str(port)],
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
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
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("kvlens app did not start")
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


def _settle(page, timeout_ms: int = 180_000) -> None:
    """Wait until the script run is over (Streamlit marks its root with the run's state)."""
    page.wait_for_timeout(500)
    page.wait_for_function(
        "() => document.querySelector('[data-testid=stApp]')"
        ".getAttribute('data-test-script-state') === 'notRunning'",
        timeout=timeout_ms,
    )


def _shot(page, name: str) -> None:
    """The whole page: Streamlit scrolls inside its main section, so the window grows to it."""
    _settle(page)
    size = page.viewport_size
    height = page.evaluate(
        "() => (document.querySelector('[data-testid=stMain]') || document.body).scrollHeight"
    )
    page.set_viewport_size({"width": size["width"], "height": min(max(height, 600), 8000)})
    page.wait_for_timeout(500)
    page.screenshot(path=SHOTS / f"{name}.png", full_page=True)
    page.set_viewport_size(size)


def _click_cell(page, plot, layer: int, head: int) -> None:
    """Click the centre of the (layer, head) cell of a plotly heatmap, as a user would."""
    x, y = plot.evaluate(
        """(gd, [layer, head]) => {
            const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
            const r = gd.getBoundingClientRect();
            return [r.left + xa._offset + xa.l2p(head), r.top + ya._offset + ya.l2p(layer)];
        }""",
        [layer, head],
    )
    page.mouse.click(x, y)


def _plot_colours(page, title: str) -> list[str]:
    """Stroke (lines) or fill (bars) colour of each trace of the plot titled ``title``."""
    return page.evaluate(
        """(title) => {
            const gd = [...document.querySelectorAll('.js-plotly-plot')]
                .find(g => (g.layout.title.text || '').startsWith(title));
            return [...gd.querySelectorAll('g.trace')].map(t => {
                const line = t.querySelector('path.js-line');
                if (line) return getComputedStyle(line).stroke;
                return getComputedStyle(t.querySelector('path')).fill;
            });
        }""",
        title,
    )


def test_a_new_user_walks_through_the_app(server, browser, tmp_path):
    from playwright.sync_api import expect

    SHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    # broken 6: a deep link to the first page works; no developer toolbar for users
    page.goto(f"{server}/probe")
    page.get_by_role("button", name="Run probe").wait_for(timeout=90_000)
    page.wait_for_timeout(1500)
    assert page.get_by_text("Page not found").count() == 0
    assert page.get_by_role("button", name="Deploy").count() == 0
    assert page.get_by_text("kvlens shows what a language model").count() == 1
    _shot(page, "00-start")

    # form inputs survive a trip to another page
    prompt = passage(2)
    page.get_by_role("textbox", name="prompt").fill(prompt)
    page.get_by_role("textbox", name="prompt").blur()
    page.wait_for_timeout(1000)
    page.get_by_role("link", name="Attention", exact=True).click()
    page.get_by_text("No trace yet: run a probe").wait_for(timeout=90_000)
    page.get_by_role("link", name="Probe", exact=True).click()
    page.get_by_role("button", name="Run probe").wait_for(timeout=90_000)
    assert page.get_by_role("textbox", name="prompt").input_value() == prompt

    # broken 5: the sidebar names the trace as soon as the probe is done
    page.get_by_role("button", name="Run probe").click()
    page.get_by_text("probed").wait_for(timeout=180_000)
    # (the label is written when the run ends, a moment after the success message)
    sidebar = page.locator("[data-testid='stSidebar']")
    expect(sidebar).to_contain_text("trace: smollm2-135m", timeout=15_000)
    _shot(page, "01-probe")

    # broken 1: clicking a head in the overview selects it
    page.get_by_role("link", name="Attention", exact=True).click()
    page.get_by_role("heading", name="Attention").wait_for(timeout=60_000)
    grid = page.locator(".js-plotly-plot").first
    grid.wait_for(timeout=60_000)
    page.wait_for_timeout(1500)
    _click_cell(page, grid, 7, 5)
    expect(page.get_by_role("spinbutton", name="layer")).to_have_value("7", timeout=30_000)
    expect(page.get_by_role("spinbutton", name="head")).to_have_value("5", timeout=30_000)
    _shot(page, "02-attention-clicked")
    # and clicking a token's bar makes it the query of the row view
    received = page.locator(".js-plotly-plot").filter(has_text="attention received per token")
    received.scroll_into_view_if_needed()
    position, x, y = received.evaluate(
        """(gd) => {
            const bars = gd.calcdata[0].slice(1, -2);  // not the first or the last token
            const top = bars.reduce((a, b) => (b.s > a.s ? b : a));
            const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
            const r = gd.getBoundingClientRect();
            return [top.p, r.left + xa._offset + xa.l2p(top.p),
                    r.top + ya._offset + ya.l2p(top.s / 2)];
        }"""
    )
    page.mouse.click(x, y)
    page.locator(".js-plotly-plot").filter(has_text=f"what token {position} (").wait_for(
        timeout=30_000
    )

    for i, (name, heading) in enumerate(
        [
            ("Heavy hitters", "Heavy hitters"),
            ("Retrieval heads", "Retrieval heads"),
            ("Outlier channels", "Outlier channels"),
            ("Cross-layer", "Cross-layer similarity"),
            ("Sparse attention", "Sparse attention"),
            ("Chunk reuse", "Chunk reuse"),
            ("Leaderboard", "Leaderboard"),
        ]
    ):
        page.get_by_role("link", name=name, exact=True).click()
        page.get_by_role("heading", name=heading).wait_for(timeout=60_000)
        _settle(page)
        assert page.locator("text=Traceback").count() == 0
        assert page.locator("[data-testid='stException']").count() == 0
        _shot(page, f"0{i + 3}-{name.replace(' ', '-').lower()}")

    page.get_by_role("link", name="Compression lab", exact=True).click()
    page.get_by_role("button", name="Run comparison").click()
    try:
        page.locator(".kvlens-output").nth(2).wait_for(timeout=600_000)
    except Exception:
        _shot(page, "08-compression-lab-timed-out")  # what the page showed instead
        raise
    outputs = page.locator(".kvlens-output")
    assert outputs.count() == 3  # full, streamingllm, snapkv
    assert all(outputs.nth(i).inner_text().strip() for i in range(3))
    _shot(page, "08-compression-lab")

    # broken 4: the downloaded report's series keep their colours
    page.get_by_role("link", name="Report", exact=True).click()
    page.get_by_role("button", name="Build report").click()
    page.locator("[data-testid='stAlert'], [data-testid='stDownloadButton']").first.wait_for(
        timeout=300_000
    )
    download = page.get_by_role("button", name="Download report.html")
    assert download.count() == 1, page.locator("[data-testid='stAlert']").all_inner_texts()
    with page.expect_download(timeout=120_000) as info:
        download.click()
    report = tmp_path / "report.html"
    info.value.save_as(report)
    _shot(page, "09-report-page")
    viewer = browser.new_page(viewport={"width": 1400, "height": 1000})
    viewer.goto(report.as_uri())
    viewer.get_by_text("Compression comparison").wait_for(timeout=30_000)
    assert viewer.locator(".js-plotly-plot").count() >= 5
    # every figure is followed by one line saying how to read it
    assert viewer.locator("p.caption").count() == viewer.locator(".js-plotly-plot").count()
    for title in ("per-step KL", "quantisation error"):
        colours = _plot_colours(viewer, title)
        assert len(colours) >= 3 and len(set(colours)) == len(colours), (title, colours)
        assert not any(c.startswith("rgb(0, 0, ") for c in colours), (title, colours)
    viewer.get_by_text("Compression comparison").scroll_into_view_if_needed()
    viewer.screenshot(path=SHOTS / "10-report-comparison.png", full_page=False)
    assert errors == []


def test_report_shows_script_tags_as_text_and_runs_nothing(browser, tmp_path):
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
    plots = page.locator(".js-plotly-plot").count()
    assert plots > 3 and page.locator("p.caption").count() == plots
