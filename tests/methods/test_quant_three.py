"""1.x-bit (VidKV), block floating point with rearranged outliers, and COMET-style KV4: at high
bits each is near the full cache on the real SmolLM2; its defining rule holds on a crafted
tensor and its dequantised values equal an independent numpy computation of the same
quantiser; its bytes are the stored codes, scales and indices counted by hand; bad parameters
give one line."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from methods.cache import CompressedCache
from methods.evaluate import prefill_logits, step_logits
from methods.registry import create
from probes.errors import KvlensError
from tests.conftest import passage

N = 120
HIGH = {
    "vidkv": "vidkv:key_bits=8,value_bits=8,normal_bits=8,anomalous_bits=8,salient_values=0",
    "bfp": "bfp:mantissa=8,block=16",
    "comet": "comet:bits=8,outlier_bits=8",
}


@pytest.fixture(scope="module")
def ids(smol):
    _, tok = smol
    out = tok(passage(3))["input_ids"][:N]
    assert len(out) == N
    return out


@pytest.fixture(scope="module")
def full_next(smol, ids):
    """The full cache's greedy next token after the prompt and the logits after feeding it."""
    model, _ = smol
    with torch.inference_mode():
        first = model(input_ids=torch.tensor([ids])).logits[0, -1]
        tok = int(first.argmax())
        after = model(input_ids=torch.tensor([ids + [tok]])).logits[0, -1].float()
    return tok, after


def _kl(p_logits, q_logits) -> float:
    p = torch.log_softmax(p_logits.float(), -1)
    q = torch.log_softmax(q_logits.float(), -1)
    return float((p.exp() * (p - q)).sum())


def _prefill(model, ids, spec):
    cache = CompressedCache(model, create(spec))
    with torch.inference_mode():
        prefill_logits(model, ids, cache)
    return cache


# -- near the full cache at high bits ------------------------------------------------------


@pytest.mark.parametrize("name", sorted(HIGH))
def test_high_bits_are_near_the_full_cache(smol, ids, full_next, name):
    model, _ = smol
    tok, want = full_next
    cache = _prefill(model, ids, HIGH[name])
    with torch.inference_mode():
        got = step_logits(model, tok, cache)  # the first step that reads the quantised prompt
    assert _kl(want, got) < 2e-3
    # and the prompt really is stored quantised: every layer's head 0 holds an encoding
    assert all(layer.store.encodings[0] is not None for layer in cache.layers)


# -- numpy references of the three quantisers ----------------------------------------------


def _np_uniform(x: np.ndarray, bits: int) -> np.ndarray:
    """Asymmetric round-to-nearest over axis 0 of x, fp16 minimum and step (methods.quant);
    at 1 bit (vidkv) the levels are the means of the entries below and above the mean."""
    if bits == 1:
        x64 = x.astype(np.float64)
        up = x64 >= x.mean(0, dtype=np.float64).astype(np.float32)
        n_up, n_dn = up.sum(0), (~up).sum(0)
        mean_up = (x64 * up).sum(0) / np.maximum(n_up, 1)
        mean_dn = (x64 * ~up).sum(0) / np.maximum(n_dn, 1)
        lo = np.where(n_dn > 0, mean_dn, mean_up).astype(np.float16)
        hi = np.where(n_up > 0, mean_up, mean_dn).astype(np.float16)
    else:
        lo = x.min(0).astype(np.float16)
        hi = x.max(0).astype(np.float16)
    step = np.maximum((hi.astype(np.float32) - lo) / (2**bits - 1), 1e-8).astype(np.float16)
    step32 = step.astype(np.float32)
    codes = np.clip(np.round((x - lo.astype(np.float32)) / step32), 0, 2**bits - 1)
    return codes * step32 + lo.astype(np.float32)


def _np_channels(x: np.ndarray, bits: int, group: int) -> np.ndarray:
    """Per channel over groups of ``group`` tokens."""
    return np.concatenate([_np_uniform(x[i : i + group], bits) for i in range(0, len(x), group)])


def test_vidkv_gives_the_widest_channels_the_high_width(smol):
    from methods.quantization.vidkv import split_channels

    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (40, 8)).astype(np.float32)
    x[:, 2] *= 20  # two anomalous channels
    x[:, 5] += np.linspace(-30, 30, 40, dtype=np.float32)
    enc = split_channels(torch.from_numpy(x), 1.25, 1, 2, 16)
    # average 1.25 bits over 8 channels: 2 channels at 2 bits, 6 at 1 bit
    assert enc.high_index.tolist() == [2, 5] and enc.high_index.dtype == torch.int32
    want = np.empty_like(x)
    want[:, [2, 5]] = _np_channels(x[:, [2, 5]], 2, 16)
    rest = [0, 1, 3, 4, 6, 7]
    want[:, rest] = _np_channels(x[:, rest], 1, 16)
    np.testing.assert_allclose(enc.rebuild().numpy(), want, rtol=1e-6, atol=1e-6)
    # codes at their width: 40 x 2 x 2 bits + 40 x 6 x 1 bit = 50 bytes; fp16 step and
    # minimum per channel and group of 16 tokens (3 groups); two int32 channel indices
    assert enc.nbytes() == (40 * 2 * 2 + 40 * 6) // 8 + 3 * 8 * 2 * 2 + 2 * 4


def test_vidkv_keeps_the_most_attended_values_exactly():
    method = create("vidkv:salient_values=0.1,group=8")
    rng = np.random.default_rng(1)
    keys = torch.from_numpy(rng.normal(0, 1, (30, 8)).astype(np.float32))
    values = torch.from_numpy(rng.normal(0, 1, (30, 8)).astype(np.float32))
    received = torch.full((3, 30), 0.1)
    received[:, [4, 17, 25]] = 5.0  # the three most attended tokens (10% of 30)
    obs = SimpleNamespace(n_seen=30, received=[received])
    enc = method.encode_head(obs, 0, keys, values, torch.arange(30, dtype=torch.int32))
    assert enc.kept_rows.tolist() == [4, 17, 25]
    rebuilt = enc.values()
    torch.testing.assert_close(rebuilt[[4, 17, 25]], values[[4, 17, 25]].half().float())
    # the other 27 rows are quantised among themselves, 4 channels at 2 bits, 4 at 1 bit
    rest = [i for i in range(30) if i not in (4, 17, 25)]
    v = values[rest].numpy()
    hi = enc.value.high_index.long().tolist()
    lo = [c for c in range(8) if c not in hi]
    want = np.empty_like(v)
    want[:, hi] = _np_channels(v[:, hi], 2, 8)
    want[:, lo] = _np_channels(v[:, lo], 1, 8)
    np.testing.assert_allclose(rebuilt[rest].numpy(), want, rtol=1e-6, atol=1e-6)


def _np_bfp(x: np.ndarray, mantissa: int, block: int):
    blocks = x.reshape(x.shape[0], -1, block)
    exponent = np.floor(np.log2(np.abs(blocks).max(-1)))
    step = 2.0 ** (exponent + 2 - mantissa)
    limit = 2 ** (mantissa - 1) - 1
    q = np.clip(np.round(blocks / step[..., None]), -limit, limit)
    return (q * step[..., None]).reshape(x.shape), exponent


def test_bfp_blocks_the_outlier_channels_apart_under_the_block_max_exponent():
    from methods.quantization.bfp import BlockFloat

    rng = np.random.default_rng(2)
    x = rng.normal(0, 0.1, (6, 32)).astype(np.float32)
    planted = [3, 12, 21, 30]  # one outlier channel in each block of 8
    x[:, planted] = rng.normal(0, 1, (6, 4)).astype(np.float32) * 50
    enc = BlockFloat.encode(torch.from_numpy(x), 4, 8, rearrange=True)
    order = enc.order.long().numpy()
    assert sorted(order[:4]) == planted  # the outliers share the first block, kept apart
    want, exponent = _np_bfp(x[:, order], 4, 8)
    assert enc.exponents.dtype == torch.int8
    np.testing.assert_array_equal(enc.exponents.numpy(), exponent)
    back = np.empty_like(want)
    back[:, order] = want
    np.testing.assert_allclose(enc.rebuild().numpy(), back, rtol=0, atol=0)
    # rearranged, 28 normal channels but 4 no longer share a block with an outlier; as they
    # come, every block holds one and every normal channel is coarsened by it
    plain = BlockFloat.encode(torch.from_numpy(x), 4, 8, rearrange=False)
    clean = order[8:]
    err = np.abs(enc.rebuild().numpy() - x)[:, clean].mean()
    err_plain = np.abs(plain.rebuild().numpy() - x)[:, clean].mean()
    assert err < err_plain / 8
    # 6 x 32 mantissas at 4 bits, one int8 exponent per token and block, int32 order
    assert enc.nbytes() == 6 * 32 * 4 // 8 + 6 * 4 + 32 * 4
    assert plain.nbytes() == 6 * 32 * 4 // 8 + 6 * 4


def test_comet_stores_the_widest_groups_at_the_outlier_width():
    from methods.quantization.comet import MixedGroups

    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (10, 32)).astype(np.float32)
    x[3, 9] = 40.0  # group 3 * 4 + 1
    x[7, 30] = -40.0  # group 7 * 4 + 3
    enc = MixedGroups.encode(torch.from_numpy(x), 4, 8, 0.05, 8)  # 5% of 40 groups: 2
    assert enc.high_index.tolist() == [13, 31]
    groups = x.reshape(40, 8)
    want = np.stack(
        [_np_uniform(g[:, None], 8 if i in (13, 31) else 4)[:, 0] for i, g in enumerate(groups)]
    )
    np.testing.assert_allclose(enc.rebuild().numpy(), want.reshape(10, 32), rtol=1e-6, atol=1e-6)
    # 2 groups x 8 codes at 8 bits, 38 x 8 at 4 bits, fp16 scale and zero per group, int32
    assert enc.nbytes() == 2 * 8 + 38 * 8 // 2 + 40 * 2 * 2 + 2 * 4


# -- bytes of a real prefill, counted by hand ----------------------------------------------


def _cells(n_layers=30, n_heads=3) -> int:
    return n_layers * n_heads


def test_bytes_of_a_real_prefill_are_the_stored_codes(smol, ids):
    model, _ = smol
    d, n = 64, N
    # vidkv defaults: 1.5 bits = 32 channels at 2 bits, 32 at 1 bit, fp16 step and zero per
    # channel and group of 32 tokens; values of round(0.02 * 120) = 2 tokens kept in 16 bits
    k = 2

    def per_tensor(rows):
        return math.ceil(rows * 32 * 3 / 8) + math.ceil(rows / 32) * 64 * 2 * 2 + 32 * 4

    vid = per_tensor(n) + per_tensor(n - k) + k * (d * 2 + 4) + n * 4
    assert _prefill(model, ids, "vidkv").nbytes() == _cells() * vid
    # bfp defaults: 4-bit mantissas, 4 blocks of 16 per token, int32 order, for K and V
    bfp = 2 * (n * d * 4 // 8 + n * 4 + d * 4) + n * 4
    assert _prefill(model, ids, "bfp").nbytes() == _cells() * bfp
    # comet defaults: groups of 16 -> 4 per token; round(0.05 * 480) = 24 groups at 8 bits
    g, hi = n * 4, 24
    comet = 2 * (hi * 16 + (g - hi) * 16 // 2 + g * 2 * 2 + hi * 4) + n * 4
    assert _prefill(model, ids, "comet").nbytes() == _cells() * comet


# -- one-line refusals ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, match",
    [
        ("vidkv:key_bits=2.5", "key_bits must be in"),
        ("vidkv:normal_bits=0", "normal_bits must be in 1..8"),
        ("vidkv:normal_bits=4,anomalous_bits=2", "must be <= anomalous_bits"),
        ("vidkv:salient_values=2", "salient_values must be in"),
        ("vidkv:group=0", "group must be >= 1"),
        ("bfp:mantissa=1", "mantissa must be in 2..8"),
        ("bfp:block=0", "block must be >= 1"),
        ("bfp:rearrange=maybe", "must be bool"),
        ("comet:bits=3", "bits must be 2, 4 or 8"),
        ("comet:bits=8,outlier_bits=4", "must be >= bits"),
        ("comet:outlier_groups=1.5", "outlier_groups must be in"),
    ],
)
def test_bad_parameters_give_one_line(spec, match):
    with pytest.raises(KvlensError, match=match) as err:
        create(spec)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("spec", ["bfp:block=48", "comet:group=24"])
def test_a_block_that_does_not_divide_the_head_is_refused(smol, ids, spec):
    with pytest.raises(KvlensError, match="must divide the head dimension 64") as err:
        _prefill(smol[0], ids[:8], spec)  # the store is made at the first attention call
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", sorted(HIGH))
def test_the_lab_and_the_cli_list_each_method_with_help_for_each_parameter(name, capsys):
    from app.cli import cmd_methods
    from app.lab_params import HELP
    from methods.registry import available

    cls = available()[name]
    assert cls.family == "quantisation" and cls.paper and cls.summary
    assert not [p for p, _t, _d in cls.parameters() if p not in HELP]
    cmd_methods(None)
    listing = capsys.readouterr().out
    assert f"\n{name} " in listing and cls.paper in listing


@pytest.mark.parametrize("name", sorted(HIGH))
def test_composing_after_an_eviction_is_refused_in_one_line(name):
    # each re-encodes the whole prompt at once: no token store for an eviction to feed
    with pytest.raises(KvlensError, match="re-encodes the whole prompt") as err:
        create(f"snapkv:budget=32+{name}")
    assert "\n" not in str(err.value)
