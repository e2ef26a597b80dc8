"""Runs a kernel check script under Triton's CPU interpreter, in its own process (Triton picks
the interpreter when it is first imported, so the flag cannot be set inside the test run)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)


def run_check(script: str) -> str:
    """Run ``tests/kvlens_kernels/<script>`` with TRITON_INTERPRET=1; its stdout once it exits 0."""
    result = subprocess.run(
        [sys.executable, f"tests/kvlens_kernels/{script}"],
        cwd=ROOT,
        env=dict(os.environ, TRITON_INTERPRET="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return result.stdout
