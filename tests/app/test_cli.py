"""The `kvlens` command line, run as a real subprocess on the embedded model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from probes import Trace
from tests.conftest import passage

KVLENS = [sys.executable, "-m", "app.cli"]
ROOT = Path(__file__).resolve().parents[2]


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [*KVLENS, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
    )


def test_models_lists_the_embedded_model():
    result = run("models")
    assert result.returncode == 0
    assert "smollm2-135m" in result.stdout
    line = next(x for x in result.stdout.splitlines() if x.startswith("smollm2-135m"))
    assert "installed" in line and "not installed" not in line


def test_probe_writes_a_dump_and_prints_its_path_last(tmp_path):
    out = tmp_path / "demo"
    result = run("probe", "--prompt", passage(1), "--out", str(out), "--layers", "0,5,10")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["n_layers"] == 30 and manifest["model"]["n_kv_heads"] == 3
    assert manifest["model"]["rope_theta"] == 100000.0
    assert manifest["settings"]["layers"] == [0, 5, 10]
    assert "forward_s" in manifest["timings"]
    trace = Trace.load(out)
    assert trace.layers == [0, 5, 10]
    assert trace.key(5).shape == (3, trace.n_tokens, 64)
    assert "probe" in result.stderr  # the progress bar


def test_probe_from_file_with_stats_only(tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(passage(3))
    out = tmp_path / "stats"
    result = run(
        "probe", "--prompt-file", str(prompt), "--out", str(out), "--attention", "stats", "--no-kv"
    )
    assert result.returncode == 0, result.stderr
    trace = Trace.load(out)
    assert trace.tensors == {}
    assert trace.key_stats.height == 30 * 9 * trace.n_tokens


def _assert_one_clean_error(result: subprocess.CompletedProcess, out: Path, text: str) -> None:
    assert result.returncode != 0
    errors = [x for x in result.stderr.splitlines() if "error" in x.lower()]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("kvlens: error:") and text in errors[0]
    assert "Traceback" not in result.stderr
    assert not out.exists()
    assert not any(p.name.startswith(f".{out.name}") for p in out.parent.iterdir())


@pytest.mark.parametrize(
    "args, text",
    [
        (["--model", "/no/such/model", "--prompt", "hello"], "neither an embedded model"),
        (["--prompt", "   "], "prompt is empty"),
        (["--prompt-file", "/no/such/file.txt"], "no such file"),
        (["--prompt", "hi", "--layers", "0,99"], "layers must be in 0..29"),
    ],
)
def test_bad_input_gives_one_line_and_writes_nothing(tmp_path, args, text):
    out = tmp_path / "out"
    _assert_one_clean_error(run("probe", *args, "--out", str(out)), out, text)


def test_prompt_longer_than_the_context_is_refused(tmp_path):
    prompt = tmp_path / "long.txt"
    prompt.write_text(passage(160))  # about 9,600 tokens > 8,192
    out = tmp_path / "out"
    _assert_one_clean_error(
        run("probe", "--prompt-file", str(prompt), "--out", str(out)), out, "allows at most 8192"
    )


def test_the_app_command_names_real_streamlit_options_and_no_per_run_gc():
    """``kvlens app`` turns off Streamlit's gc.collect after every script run (the progress
    fragment reruns each second while a job runs, and each full collection stalled the job)
    and its polling of source files; every flag must be an option Streamlit knows."""
    from streamlit import config

    from app.cli import app_command

    cmd = app_command(8765, "127.0.0.1")
    flags = dict(zip(cmd[5::2], cmd[6::2], strict=True))
    known = config.get_config_options()
    assert all(flag.startswith("--") and flag[2:] in known for flag in flags), flags
    assert flags["--runner.postScriptGC"] == "false"
    assert flags["--server.fileWatcherType"] == "none"
    assert flags["--server.port"] == "8765"
