"""Sweeps: the same table through the local backend and through Ray on 2 CPUs; a killed run
resumes without recomputing the rows it had finished."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from methods.sweep import Grid, leaderboard, load_grid, read_table, sweep
from probes import KvlensError

ROOT = Path(__file__).resolve().parents[2]
GRID = dict(
    methods=["snapkv:budget=48", "snapkv:budget=96", "tova:budget=48", "tova:budget=96"],
    tasks=["niah"],
    lengths=[200],
    seeds=2,
    max_new_tokens=4,
)


def _comparable(df: pl.DataFrame) -> pl.DataFrame:
    return df.drop("time_s").sort("model", "method", "task", "length", "seed")


def assert_same_table(a: pl.DataFrame, b: pl.DataFrame) -> None:
    """Equal rows; KL may differ in the last digits (Ray workers run torch on fewer threads)."""
    a, b = _comparable(a), _comparable(b)
    exact = [c for c in a.columns if c not in ("kl_mean", "kl_max")]
    assert a.select(exact).equals(b.select(exact))
    for c in ("kl_mean", "kl_max"):
        assert (a[c] - b[c]).abs().max() < 1e-4, c


def test_local_and_ray_backends_give_the_same_table(tmp_path):
    pytest.importorskip("ray")
    grid = Grid(**GRID)
    local = sweep(grid, tmp_path / "local.parquet", backend="local")
    assert local.height == grid.total_rows() == 2 * 5
    ray_table = sweep(grid, tmp_path / "ray.parquet", backend="ray", num_cpus=2)
    assert_same_table(local, ray_table)
    board = leaderboard(local)
    assert set(board["method"]) == {"full", *[m for m in local["method"].unique()]}
    assert board.filter(method="full")["bytes_ratio"][0] == 1.0


def test_a_killed_sweep_resumes_without_recomputing(tmp_path):
    out = tmp_path / "sweep.parquet"
    config = tmp_path / "grid.toml"
    methods = ", ".join(f'"{m}"' for m in GRID["methods"])
    config.write_text(
        f'[grid]\nmethods = [{methods}]\ntasks = ["niah"]\nlengths = [200]\nseeds = 3\n'
        "max_new_tokens = 4\n"
    )
    cmd = [sys.executable, "-m", "app.cli", "sweep", str(config), "--out", str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while time.time() < deadline and not out.exists():
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    first = read_table(out)
    assert 0 < first.height < 15, "kill the sweep after its first example"
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    final = read_table(out)
    assert final.height == 15
    keys = ["model", "method", "task", "length", "seed"]
    kept = first.join(final, on=keys, suffix="_after")
    assert kept.height == first.height
    assert (kept["time_s"] == kept["time_s_after"]).all()  # finished rows were not recomputed
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and read_table(out).equals(final)


def test_bad_sweep_configs_are_refused(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[grid]\nmethods = ["snapkv:budget=0"]\n')
    with pytest.raises(KvlensError, match="budget must be >= 1"):
        load_grid(bad)
    bad.write_text('[grid]\ncolour = "red"\n')
    with pytest.raises(KvlensError, match="unknown keys colour"):
        load_grid(bad)
    bad.write_text("not toml [[[")
    with pytest.raises(KvlensError, match="not a readable TOML"):
        load_grid(bad)
    with pytest.raises(KvlensError, match="task must be one of"):
        Grid(tasks=["poetry"])


def test_leaderboard_page_and_report_show_a_sweep(tmp_path, monkeypatch, smol):
    from streamlit.testing.v1 import AppTest

    from app.report import build_report
    from probes import capture

    table = sweep(
        Grid(methods=["tova:budget=48"], lengths=[200], seeds=1, max_new_tokens=3),
        tmp_path / "cache_dumps" / "sweeps" / "s.parquet",
    )
    monkeypatch.chdir(tmp_path)
    at = AppTest.from_string(
        "from pages import leaderboard\nleaderboard.render()\n", default_timeout=120
    )
    at.run()
    assert not at.exception and not at.error and len(at.dataframe) == 1
    model, tok = smol
    html = build_report(capture(model, tok, "A short prompt.", attention="stats"), sweep=table)
    assert "Leaderboard" in html and "tova:budget=48" in html
