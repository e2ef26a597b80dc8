"""ShadowKV on SmolLM2: rebuilt keys equal the originals at full rank, landmarks and outlier
chunks follow their definitions, a step reads the exact rows, every later token and the top
other chunks by landmark score, and the bytes held (device / host) and read are the stored
tensors'."""

from __future__ import annotations

import pytest
import torch

from methods.memory import SERVING_FLOAT_BYTES as F16
from tests.conftest import passage
from tests.methods.sparse.helpers import full_run, run

SPEC = "shadowkv:budget=40,chunk=8,outliers=3,local=16"


@pytest.fixture(scope="module")
def ids(smol):
    return smol[1](passage(3))["input_ids"]


@pytest.fixture(scope="module")
def full(smol, ids):
    return full_run(smol[0], ids, n=4)


def test_rebuilt_keys_equal_the_originals_at_full_rank(smol, ids, full):
    cache, _, _ = run(smol[0], ids, "shadowkv:budget=40,rank=192,outliers=0,local=0", n=2)
    n = len(ids)
    for layer_idx in (0, 11, 29):
        prompt = cache.layers[layer_idx].store.prompt
        want = full[0].layers[layer_idx].keys[0, :, :n]  # the full cache's post-RoPE keys
        for h in range(3):
            got = prompt.rebuild(h, torch.arange(n))
            scale = want[h].abs().max()
            torch.testing.assert_close(got / scale, want[h] / scale, atol=3e-3, rtol=0)
    rank_16, _, _ = run(smol[0], ids, "shadowkv:budget=40,rank=16,outliers=0,local=0", n=2)
    low = rank_16.layers[11].store.prompt.rebuild(0, torch.arange(n))
    assert (low - full[0].layers[11].keys[0, 0, :n]).abs().max() > 0.1  # rank 16 is lossy


def test_every_chunk_read_at_full_rank_is_the_full_cache(smol, ids, full):
    _, tokens, logits = run(
        smol[0], ids, "shadowkv:budget=100000,rank=192,outliers=2,local=16", n=4
    )
    assert tokens == full[1]
    torch.testing.assert_close(logits, full[2], atol=2e-2, rtol=0)  # 16-bit factors


@pytest.fixture(scope="module")
def case(smol, ids):
    return run(smol[0], ids, SPEC, n=4)[0]


def test_landmarks_outliers_and_reads_follow_the_definitions(case, ids, full):
    n = len(ids)
    n_chunks = (n - 16) // 8
    for layer_idx in (2, 15, 28):
        layer = case.layers[layer_idx]
        prompt = layer.store.prompt
        keys = full[0].layers[layer_idx].keys[0, :, :n].float()
        for h in range(3):
            lm, sims = [], []
            for c in range(n_chunks):
                block = keys[h, 8 * c : 8 * c + 8]
                mean = block.mean(0)
                lm.append(mean)
                sims.append(
                    min(float(torch.dot(k, mean) / (k.norm() * mean.norm())) for k in block)
                )
            torch.testing.assert_close(
                prompt.landmarks[h].float(), torch.stack(lm), atol=1e-4, rtol=1e-4
            )
            worst = sorted(sorted(range(n_chunks), key=lambda c: sims[c])[:3])
            assert prompt.outlier_chunks[h].tolist() == worst
            exact = [8 * c + i for c in worst for i in range(8)] + list(range(8 * n_chunks, n))
            assert prompt.exact_rows[h].tolist() == sorted(exact)
            for seen, q, rows, _n in layer.selections:
                s = q[3 * h : 3 * h + 3].float() @ torch.stack(lm).T * 0.125
                score = torch.softmax(s, -1).mean(0)
                others = sorted(
                    (c for c in range(n_chunks) if c not in worst), key=lambda c: -score[c]
                )
                chunks = [8 * c + i for c in others[:5] for i in range(8)]
                assert rows[h].tolist() == sorted(set(chunks + exact)) + list(range(n, seen))


def test_bytes_held_on_device_and_host_and_read(case, ids):
    n, d, r = len(ids), 64, 160
    seen = n + 3
    n_chunks = (n - 16) // 8
    exact = 3 * 8 + (n - 8 * n_chunks)
    per_layer_device = (
        n * r * F16 + 3 * d * r * F16 + 3 * n_chunks * d * F16  # factors, landmarks
        + 3 * 3 * 4 + 3 * exact * 4 + 3 * exact * 2 * d * F16 + n * 4  # ids, exact rows, positions
        + 3 * (seen - n) * (2 * d * F16 + 4)  # the tokens after the prompt
    )  # fmt: skip
    mem = case.memory()
    assert mem["host"] == 30 * 3 * n * d * F16
    assert mem["device"] == 30 * per_layer_device
    assert case.nbytes() == mem["device"] + mem["host"]
    # read per step: 5 chunks rebuilt (coefficients + the head's basis slice, values from the
    # host), the exact rows and the tokens after the prompt (keys and values)
    steps = [s for s, *_ in case.layers[0].selections]
    device = sum(3 * (40 * r * F16 + d * r * F16 + (exact + s - n) * 2 * d * F16) for s in steps)
    assert mem["read_device"] == pytest.approx(30 * device / len(steps))
    assert mem["read_host"] == pytest.approx(30 * 3 * 40 * d * F16)
    assert mem["read_select"] == pytest.approx(30 * 3 * n_chunks * d * F16)
