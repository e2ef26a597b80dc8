"""The web app's speed on the CPU, driven in Debian chromium by Playwright (issue 21's goals).

Measures, on one `kvlens app` server:
  start to ready (cold model cache, then warm) and the first probe of a ~1.3k-token prompt;
  page switches on that cached trace: every page of the sidebar, twice (first visits compute
  their tables, repeat visits are cached); the goal is the max of the repeat visits;
  the Compression lab on a ~500-token trace, full + 4 methods, 24 new tokens;
  the X-ray of one method, then of a second one (the full model's run is reused);
  progress and Cancel: how soon a running comparison shows its progress bar and Cancel button,
  a page switch while it runs, and how long Cancel takes to stop it.
Then prints one table with each goal.

    .venv/bin/python benchmarks/app_cpu.py            # everything
    .venv/bin/python benchmarks/app_cpu.py --no-cold  # skip the cold-cache start

``--profile`` instead runs the X-ray and the lab's comparison in this process, the first
definition of the X-ray (tests/methods/test_xray.py) beside the current one, under cProfile,
and prints time shares and call counts of the functions that matter.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
LAB_METHODS = ["streamingllm", "snapkv", "h2o", "kivi"]  # streamingllm and snapkv are preset
POLL_MS = 0  # how often the long runs' waits look at the page (--poll)
GOALS = {"switch": 1.0, "lab": 30.0, "xray": 15.0, "progress": 2.0}
IDLE = "() => document.querySelector('[data-testid=stApp]')?.getAttribute('data-test-script-state') === 'notRunning'"


def start(cache: str, workdir: str) -> tuple[subprocess.Popen, str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", KVLENS_CACHE=cache, PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "app", "--port", str(port)],
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=1).read() == b"ok":
                return proc, url, time.perf_counter() - t0
        except OSError:
            time.sleep(0.1)


def settle(page, timeout_ms: int = 600_000) -> None:
    page.wait_for_timeout(300)
    page.wait_for_function(IDLE, timeout=timeout_ms)


def probe(page, prompt: str) -> float:
    """Seconds from clicking Run probe on the Probe page to its success message."""
    page.get_by_role("link", name="Probe").first.click()
    box = page.get_by_role("textbox", name="prompt")
    box.wait_for(timeout=120_000)
    box.fill(prompt)
    box.blur()
    page.wait_for_timeout(500)
    t0 = time.perf_counter()
    page.get_by_role("button", name="Run probe").click()
    page.get_by_text("probed").wait_for(timeout=600_000)
    return time.perf_counter() - t0


def switch(page, name: str) -> float:
    """Click a sidebar link; seconds until the new page's title shows and the run is over."""
    before = page.locator("h1").first.inner_text() if page.locator("h1").count() else ""
    t0 = time.perf_counter()
    page.locator("[data-testid=stSidebarNav]").get_by_role("link", name=name, exact=True).click()
    page.wait_for_function(
        "(before) => { const h = document.querySelector('h1');"
        " return h && h.innerText !== before && " + IDLE[6:] + "; }",
        arg=before,
        timeout=600_000,
    )
    return time.perf_counter() - t0


def nav_pages(page) -> list[str]:
    links = page.locator("[data-testid=stSidebarNav] a")
    return [links.nth(i).inner_text().strip() for i in range(links.count())]


def add_methods(page) -> None:
    box = page.locator("[data-testid=stMultiSelect]").first
    for name in LAB_METHODS:
        if box.get_by_text(name, exact=True).count():
            continue
        box.locator("input").click()
        box.locator("input").fill(name)
        page.keyboard.press("Enter")
        settle(page)
    page.keyboard.press("Escape")
    settle(page)


def cpu_by_process() -> dict[str, float]:
    """CPU seconds (user + system) so far of the processes on this machine, by role: the app's
    server, the browser, Playwright's driver, and everything else."""
    import psutil

    out: dict[str, float] = {}
    for proc in psutil.process_iter(["name", "cmdline", "cpu_times"]):
        times = proc.info["cpu_times"]
        if times is None:
            continue
        name = (proc.info["name"] or "").lower()
        cmd = " ".join(proc.info["cmdline"] or [])
        role = (
            "app server" if "app.cli" in cmd or "streamlit" in cmd
            else "browser" if "chrom" in name
            else "playwright driver" if name == "node"
            else "this script" if proc.pid == os.getpid()
            else "other"
        )  # fmt: skip
        out[role] = out.get(role, 0.0) + times.user + times.system
    return out


def timed_with_cpu(label: str, fn) -> float:
    """fn's seconds, printing the CPU seconds each role spent meanwhile."""
    before = cpu_by_process()
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    after = cpu_by_process()
    spent = {k: after[k] - before.get(k, 0.0) for k in after}
    print(f"  {label}: CPU seconds over {wall:.1f} s wall: "
          + ", ".join(f"{k} {v:.1f}" for k, v in sorted(spent.items(), key=lambda kv: -kv[1])),
          flush=True)  # fmt: skip
    return wall


def wait_js(page, predicate: str, arg=None, timeout_ms: int = 900_000) -> None:
    """Wait until the page's ``predicate`` holds, checked every POLL_MS (every animation
    frame, Playwright's default, when POLL_MS is 0: that keeps the browser drawing frames)."""
    polling = "raf" if POLL_MS == 0 else POLL_MS
    page.wait_for_function(predicate, arg=arg, polling=polling, timeout=timeout_ms)


def run_lab(page) -> float:
    chosen = page.locator("[data-testid=stMultiSelect]").first.locator("[data-tag]").count()
    print(f"lab: {chosen} methods chosen", flush=True)

    def go() -> None:
        page.get_by_role("button", name="Run comparison").click()
        wait_js(page, "(n) => document.querySelectorAll('.kvlens-output').length > n", chosen)

    return timed_with_cpu("lab", go)


def progress_and_cancel(page) -> dict:
    """Start a comparison, time its progress bar and Cancel button, switch page while it runs,
    come back and cancel it."""
    out = {}
    t0 = time.perf_counter()
    page.get_by_role("button", name="Run comparison").click()
    page.locator("[data-testid=stProgress]").first.wait_for(timeout=60_000)
    out["progress"] = time.perf_counter() - t0
    page.get_by_role("button", name="Cancel").wait_for(timeout=60_000)
    out["cancel button"] = time.perf_counter() - t0
    out["switch while running"] = switch(page, "Attention")
    switch(page, "Compression lab")
    page.get_by_role("button", name="Cancel").wait_for(timeout=60_000)
    t1 = time.perf_counter()
    page.get_by_role("button", name="Cancel").click()
    page.get_by_text("cancelled after").wait_for(timeout=120_000)
    out["cancel to stopped"] = time.perf_counter() - t1
    return out


def run_xray(page, method: str) -> float:
    select = page.locator("[data-testid=stSelectbox]").filter(has_text="X-ray of")
    select.click()
    page.keyboard.type(method)  # the options filter as one types
    page.keyboard.press("Enter")
    settle(page)

    def go() -> None:
        page.get_by_role("button", name="Run X-ray").click()
        wait_js(
            page,
            "(m) => [...document.querySelectorAll('[data-testid=stText]')].some(e =>"
            " e.innerText.startsWith(m) && /first differs|never diverged/.test(e.innerText))",
            method,
        )

    return timed_with_cpu(f"X-ray of {method}", go)


def browser_run(cold: bool) -> list[tuple[str, float, float | None]]:
    from playwright.sync_api import sync_playwright

    rows: list[tuple[str, float, float | None]] = Rows()
    readme = (ROOT / "README.md").read_text()
    long_prompt = (readme * 2)[:4200]
    lab_prompt = (readme * 2)[:1600]
    cache = tempfile.mkdtemp(prefix="kvlens-cache-")
    workdir = tempfile.mkdtemp(prefix="kvlens-app-")  # auto-saved dumps land here
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=ARGS)
        for label in ["cold", "warm"] if cold else ["warm"]:
            proc, url, server_s = start(cache, workdir)
            rows.append((f"server ready ({label} model cache)", server_s, None))
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.get_by_role("button", name="Run probe").wait_for(timeout=120_000)
            t0 = time.perf_counter()
            probe(page, long_prompt)
            tokens = page.get_by_text("probed").inner_text().split()[1]
            rows.append((f"first probe, {tokens} tokens ({label}: model load included)",
                         time.perf_counter() - t0, None))  # fmt: skip
            if label == "warm":
                pages = [n for n in nav_pages(page) if n != "Probe"] + ["Probe"]
                for what in ("first visit", "repeat visit"):
                    times = {name: switch(page, name) for name in pages}
                    worst = max(times, key=times.get)
                    median = sorted(times.values())[len(times) // 2]
                    rows.append((f"page switch, {what}, median ({tokens} tokens)", median, None))
                    goal = GOALS["switch"] if what == "repeat visit" else None
                    rows.append((f"page switch, {what}, max ({worst})", times[worst], goal))
                    print(what, ", ".join(f"{n} {t:.2f}" for n, t in times.items()), flush=True)
                probe_s = probe(page, lab_prompt)
                tokens = page.get_by_text("probed").inner_text().split()[1]
                rows.append((f"probe, {tokens} tokens", probe_s, None))
                switch(page, "Compression lab")
                add_methods(page)
                for name, seconds in progress_and_cancel(page).items():
                    goal = GOALS["progress"] if name in ("progress", "cancel button") else None
                    goal = GOALS["switch"] if name == "switch while running" else goal
                    rows.append((f"lab running: {name}", seconds, goal))
                rows.append((f"lab: full + 4 methods, {tokens} tokens, 24 new", run_lab(page),
                             GOALS["lab"]))  # fmt: skip
                rows.append(("X-ray of snapkv (full model's run included)",
                             run_xray(page, "snapkv"), GOALS["xray"]))  # fmt: skip
                rows.append(("X-ray of h2o (full model's run reused)", run_xray(page, "h2o"),
                             GOALS["xray"]))  # fmt: skip
            page.close()
            os.killpg(proc.pid, 15)
            proc.wait()
        browser.close()
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(workdir, ignore_errors=True)
    return rows


class Rows(list):
    """Measured rows, each also printed at once (a long run on a loaded machine keeps what it
    measured if a later step times out)."""

    def append(self, row) -> None:
        super().append(row)
        print(f"  {row[0]}: {row[1]:.2f} s", flush=True)


def print_table(rows) -> None:
    print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print("| what | seconds | goal | met |\n|---|---:|---:|---|")
    for what, seconds, goal in rows:
        met = "" if goal is None else ("yes" if seconds < goal else "NO")
        goal_s = "" if goal is None else f"< {goal:g}"
        print(f"| {what} | {seconds:.2f} | {goal_s} | {met} |")


def profile_run() -> None:
    """The X-ray's first definition beside the current one, and the lab's comparison, under
    cProfile: seconds, model forwards and the share of the big parts."""
    import cProfile
    import pstats

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from methods.evaluate import compare
    from methods.xray import xray
    from probes import load_model
    from tests.methods.test_xray import _xray_as_first_defined

    model, tok = load_model("smollm2-135m", device="cpu")
    ids = tok(((ROOT / "README.md").read_text() * 2)[:1600])["input_ids"]
    parts = ("prefill_logits", "step_logits", "capture", "full_run", "replay", "_dropped_mass",
             "partition_by", "attend")  # fmt: skip
    runs = {
        "X-ray, first definition": lambda: _xray_as_first_defined(model, tok, ids, "snapkv", 24),
        "X-ray, now": lambda: xray(model, tok, ids, "snapkv", max_new_tokens=24),
        "lab, full + 4 methods, now": lambda: compare(
            model, tok, ids, ["full", *LAB_METHODS], max_new_tokens=24
        ),
    }
    forwards = {"n": 0}
    model.register_forward_pre_hook(lambda *_: forwards.__setitem__("n", forwards["n"] + 1))
    threads = __import__("torch").get_num_threads()
    print(f"{len(ids)}-token prompt, 24 new tokens, torch threads {threads}")
    for name, fn in runs.items():
        prof = cProfile.Profile()
        forwards["n"] = 0
        t0 = time.perf_counter()
        prof.runcall(fn)
        total = time.perf_counter() - t0
        print(f"\n{name}: {total:.1f} s, {forwards['n']} model forwards")
        stats = pstats.Stats(prof).stats
        for (_file, _line, func), (_cc, calls, _tt, cum, _callers) in sorted(
            stats.items(), key=lambda kv: -kv[1][3]
        ):
            if func in parts:
                print(f"  {func:16s} calls {calls:5d}  {cum:6.1f} s  {100 * cum / total:5.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-cache start")
    parser.add_argument("--profile", action="store_true", help="in-process profiles instead")
    parser.add_argument(
        "--poll",
        type=int,
        default=POLL_MS,
        help="ms between the lab's and X-ray's checks of the page; 0 = every animation frame "
        "(Playwright's default, which keeps the browser drawing on the app's cores)",
    )
    args = parser.parse_args()
    globals()["POLL_MS"] = args.poll
    if args.profile:
        profile_run()
        return
    print_table(browser_run(cold=not args.no_cold))


if __name__ == "__main__":
    main()
