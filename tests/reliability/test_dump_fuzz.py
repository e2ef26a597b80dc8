"""Fuzzing the dump loader: mutated manifests, truncated and corrupted tensor and parquet files,
swapped shapes and dtypes. Every case loads or ends in the project's one-line DumpError."""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probes import DumpError, Trace, capture

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def pristine(smol, tmp_path_factory):
    model, tok = smol
    trace = capture(
        model, tok, "A short prompt for the fuzzer.", attention="full", layers=[0, 1], generate=2
    )
    return trace.save(tmp_path_factory.mktemp("fuzz") / "dump")


def _copy(pristine, tmp_path_factory):
    target = tmp_path_factory.mktemp("case") / "dump"
    shutil.copytree(pristine, target)
    return target


def _load_or_refuse(folder) -> None:
    try:
        Trace.load(folder)
    except DumpError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("dump ")


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:3]):
            yield from _paths(v, (*prefix, i))


@SETTINGS
@given(data=st.data())
def test_mutated_manifests_are_loaded_or_refused(pristine, tmp_path_factory, data):
    folder = _copy(pristine, tmp_path_factory)
    manifest = json.loads((folder / "manifest.json").read_text())
    paths = [p for p in _paths(manifest) if p]
    path = data.draw(st.sampled_from(paths))
    value = data.draw(JSON_VALUES)
    node = manifest
    for key in path[:-1]:
        node = node[key]
    if data.draw(st.booleans()) and isinstance(node, dict):
        del node[path[-1]]
    else:
        node[path[-1]] = value
    (folder / "manifest.json").write_text(json.dumps(manifest))
    _load_or_refuse(folder)


@SETTINGS
@given(
    name=st.sampled_from(
        [
            "tensors.safetensors",
            "stats.parquet",
            "query_stats.parquet",
            "step_stats.parquet",
            "manifest.json",
        ]
    ),
    cut=st.floats(0.0, 1.0),
    flips=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 255)), max_size=8),
)
def test_truncated_or_corrupted_files_are_loaded_or_refused(
    pristine, tmp_path_factory, name, cut, flips
):
    folder = _copy(pristine, tmp_path_factory)
    data = bytearray((folder / name).read_bytes())
    for where, byte in flips:
        data[int(where * (len(data) - 1))] = byte
    data = data[: max(0, int(cut * len(data)))] if cut < 0.999 else data
    (folder / name).write_bytes(bytes(data))
    _load_or_refuse(folder)


@SETTINGS
@given(
    swap=st.sampled_from(["shape", "dtype"]),
    shape=st.lists(st.integers(-3, 5000), max_size=4),
    dtype=st.sampled_from(["float16", "int64", "bool", "", "float64", "nonsense"]),
)
def test_swapped_shapes_and_dtypes_are_refused(pristine, tmp_path_factory, swap, shape, dtype):
    folder = _copy(pristine, tmp_path_factory)
    manifest = json.loads((folder / "manifest.json").read_text())
    name = sorted(manifest["tensors"])[0]
    true = dict(manifest["tensors"][name])
    if swap == "shape":
        manifest["tensors"][name]["shape"] = shape
    else:
        manifest["tensors"][name]["dtype"] = dtype
    (folder / "manifest.json").write_text(json.dumps(manifest))
    claimed = manifest["tensors"][name]
    try:
        Trace.load(folder)
        loaded = True
    except DumpError:
        loaded = False
    if loaded:  # only the true shape and dtype may load
        assert claimed == true


def test_a_probe_killed_mid_write_leaves_no_dump(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "killed"
    prompt = tmp_path / "p.txt"
    prompt.write_text("The keeper counted the waves. " * 120)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "app.cli",
            "probe",
            "--prompt-file",
            str(prompt),
            "--out",
            str(out),
            "--attention",
            "full",
        ],
        cwd=root,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if any(p.name.startswith(".killed.writing") for p in tmp_path.iterdir()):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the probe finished before it could be killed mid-write")
    assert not out.exists()
    with pytest.raises(DumpError):
        Trace.load(out)
