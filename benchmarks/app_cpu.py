"""The web app's speed on the CPU: start to ready (cold model cache, then warm), and page
switches on a cached 1k-token trace, driven in Debian chromium by Playwright.

    .venv/bin/python benchmarks/app_cpu.py
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PAGES = [
    "Attention",
    "Heavy hitters",
    "Outlier channels",
    "Cross-layer",
    "Compression lab",
    "Probe",
]


def start(cache: str) -> tuple[subprocess.Popen, str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", KVLENS_CACHE=cache)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "app", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=1).read() == b"ok":
                return proc, url, time.perf_counter() - t0
        except OSError:
            time.sleep(0.1)


def ready_with_model(browser, url: str, prompt: str) -> tuple[float, object]:
    """Seconds from opening the page to a finished first probe (model load included)."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    t0 = time.perf_counter()
    page.goto(url)
    page.get_by_role("textbox", name="prompt").fill(prompt)
    page.get_by_role("button", name="Run probe").click()
    page.get_by_text("probed").wait_for(timeout=300_000)
    return time.perf_counter() - t0, page


def main() -> None:
    prompt = ((ROOT / "README.md").read_text() * 2)[:4200]
    cold_cache = tempfile.mkdtemp(prefix="kvlens-cold-")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=ARGS)
        for label, cache in (
            ("cold (empty model cache: GGUF converted)", cold_cache),
            ("warm (converted model cached)", cold_cache),
        ):
            proc, url, server_s = start(cache)
            first_s, page = ready_with_model(browser, url, prompt)
            print(
                f"{label}: server ready {server_s:.1f} s; first probe finished {first_s:.1f} s after opening"
            )
            if label.startswith("warm"):
                tokens = page.get_by_text("probed").inner_text()
                rounds = []
                for _ in range(2):
                    times = []
                    rounds.append(times)
                    for name in PAGES:
                        t0 = time.perf_counter()
                        page.get_by_role("link", name=name).click()
                        page.get_by_role(
                            "heading",
                            name=name if name != "Cross-layer" else "Cross-layer similarity",
                        ).wait_for()
                        page.wait_for_function(
                            "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')"
                        )
                        times.append(time.perf_counter() - t0)
                for what, times in zip(
                    ("first visits (tables computed)", "repeat visits (cached)"), rounds
                ):
                    detail = ", ".join(f"{n} {t:.2f}" for n, t in zip(PAGES, times))
                    print(
                        f"page switches, {what}, {tokens}: median {statistics.median(times):.2f} s, "
                        f"max {max(times):.2f} s ({detail})"
                    )
            page.close()
            proc.terminate()
            proc.wait()
        browser.close()
    shutil.rmtree(cold_cache, ignore_errors=True)


if __name__ == "__main__":
    main()
