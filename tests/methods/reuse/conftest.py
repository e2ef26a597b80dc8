"""One torch thread for the chunk-reuse tests: on a small shared CPU, two threads that other
processes preempt run these short prompts several times slower than one."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
