"""Latent attention readiness (TransMLA, Meng et al. 2025) on synthetic traces.

The reference is written another way: the stacked matrix built column block by column block
in numpy, its energy spectrum from the eigenvalues of X^T X (numpy.linalg.eigvalsh), where
the module takes singular values of X in torch; the joint latent's key/value balance from
per-channel norms summed in a loop.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis import cross_layer, latent
from probes import KvlensError
from tests.analysis.synthetic import random_kv
from tests.analysis.synthetic import trace as synthetic_trace

N_KV, HEAD_DIM, T = 3, 8, 40
WIDTH = N_KV * HEAD_DIM


def _reference(x: torch.Tensor) -> np.ndarray:
    """Cumulative energy fraction at ranks 1..width from the covariance's eigenvalues."""
    blocks = [x[h].double().numpy() for h in range(x.shape[0])]  # each [T, D]
    stacked = np.concatenate(blocks, axis=1)  # [T, Hkv*D], head h in columns h*D..(h+1)*D
    eig = np.sort(np.clip(np.linalg.eigvalsh(stacked.T @ stacked), 0, None))[::-1]
    return np.cumsum(eig) / eig.sum()


def _reference_joint(keys: torch.Tensor, values: torch.Tensor, balance: bool) -> np.ndarray:
    """Cumulative energy of [K / ratio, V] (ratio: mean channel norm of K over V's)."""
    k = np.concatenate([keys[h].double().numpy() for h in range(keys.shape[0])], axis=1)
    v = np.concatenate([values[h].double().numpy() for h in range(values.shape[0])], axis=1)
    if balance:
        k_norm = sum(np.sqrt((k[:, c] ** 2).sum()) for c in range(k.shape[1])) / k.shape[1]
        v_norm = sum(np.sqrt((v[:, c] ** 2).sum()) for c in range(v.shape[1])) / v.shape[1]
        k = k * (v_norm / k_norm)
    x = np.concatenate([k, v], axis=1)
    eig = np.sort(np.clip(np.linalg.eigvalsh(x.T @ x), 0, None))[::-1]
    return np.cumsum(eig) / eig.sum()


def _planted(rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every head's keys/values in one shared rank-``rank`` subspace of the stacked width
    (a latent [T, rank] times one up-projection [rank, Hkv*D] split into heads)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for kind in ("key_pre_rope", "key", "value"):
        z = torch.randn(T, rank, generator=g)
        up = torch.randn(rank, WIDTH, generator=g)
        out[f"layers.0.{kind}"] = (z @ up).reshape(T, N_KV, HEAD_DIM).transpose(0, 1)
    return out


def _trace(tensors, n_layers=2):
    return synthetic_trace(
        n_tokens=T,
        n_layers=n_layers,
        n_kv_heads=N_KV,
        n_heads=2 * N_KV,
        head_dim=HEAD_DIM,
        tensors=tensors,
    )


def test_energy_matches_covariance_eigenvalues():
    kv = random_kv(2, N_KV, T, HEAD_DIM, seed=3)
    # give the heads unequal scales and shared directions, so the spectrum is not flat
    for name in kv:
        kv[name] = kv[name] * torch.tensor([1.0, 3.0, 0.5])[:, None, None]
        kv[name][1] += 0.7 * kv[name][0]
    tr = _trace(kv)
    ranks = tuple(range(1, WIDTH + 1))
    table = latent.latent_energy(tr, ranks)
    summary = latent.latent_summary(tr)
    for layer in (0, 1):
        for kind, source in (("key", "key_pre_rope"), ("value", "value")):
            ref = _reference(kv[f"layers.{layer}.{source}"])
            part = table.filter(kind=kind, layer=layer).sort("rank")
            assert part["source"].unique().to_list() == [source]
            np.testing.assert_allclose(part["energy"].to_numpy(), ref, atol=1e-9)
            # and the singular values themselves (an SVD, not a Gram matrix) give the same
            x = kv[f"layers.{layer}.{source}"].double()
            s2 = np.linalg.svd(torch.cat(list(x), 1).numpy(), compute_uv=False) ** 2
            np.testing.assert_allclose(
                part["energy"].to_numpy(), np.cumsum(s2) / s2.sum(), atol=1e-9
            )
            row = summary.filter(kind=kind, layer=layer).row(0, named=True)
            assert row["half_rank"] == WIDTH // 2
            assert row["energy_at_half"] == pytest.approx(ref[WIDTH // 2 - 1], abs=1e-9)
            assert row["rank_90"] == int(np.argmax(ref >= 0.9)) + 1
            assert row["rank_99"] == int(np.argmax(ref >= 0.99)) + 1


def test_planted_shared_subspace_is_kept_whole_at_its_rank():
    rank = 5
    tr = _trace(_planted(rank), n_layers=1)
    table = latent.latent_energy(tr, tuple(range(1, WIDTH + 1)))
    for kind in ("key", "value"):
        part = table.filter(kind=kind).sort("rank")
        energy = part["energy"].to_numpy()
        assert energy[rank - 1] == pytest.approx(1.0, abs=1e-9)
        assert (energy[: rank - 1] < 1 - 1e-3).all()
        row = latent.latent_summary(tr).filter(kind=kind).row(0, named=True)
        assert row["rank_99"] <= rank and row["energy_at_half"] == pytest.approx(1.0, abs=1e-9)


def test_energy_is_non_decreasing_in_rank_and_reaches_one():
    tr = _trace(random_kv(2, N_KV, T, HEAD_DIM, seed=1))
    table = latent.latent_energy(tr)  # the default grid
    grids = {"key": [1, 2, 4, 8, 12, 16, 24], "value": [1, 2, 4, 8, 12, 16, 24]}
    grids["joint"] = [1, 2, 4, 8, 16, 24, 32, 48]
    assert set(table["kind"]) == set(grids)
    for (kind, _), part in table.group_by("kind", "layer"):
        part = part.sort("rank")
        assert part["rank"].to_list() == grids[kind]
        energy = part["energy"].to_numpy()
        assert (np.diff(energy) >= -1e-12).all()
        assert energy[-1] == pytest.approx(1.0, abs=1e-9)


def test_post_rope_keys_when_the_trace_has_no_pre_rope_keys():
    kv = random_kv(1, N_KV, T, HEAD_DIM, seed=2)
    del kv["layers.0.key_pre_rope"]
    table = latent.latent_summary(_trace(kv, n_layers=1))
    assert table.filter(kind="key")["source"].to_list() == ["key"]
    ref = _reference(kv["layers.0.key"])
    got = table.filter(kind="key")["energy_at_half"][0]
    assert got == pytest.approx(ref[WIDTH // 2 - 1], abs=1e-9)


def test_trace_without_keys_is_a_one_line_error():
    tr = _trace({})
    with pytest.raises(KvlensError, match="no key tensors") as err:
        latent.latent_summary(tr)
    assert "\n" not in str(err.value)


def test_post_rope_setting_measures_the_cached_keys_as_xkv_single_layers():
    kv = random_kv(2, N_KV, T, HEAD_DIM, seed=4)
    tr = _trace(kv)
    table = latent.latent_energy(tr, (4, 8, 16), keys="post_rope").filter(kind="key")
    assert table["source"].unique().to_list() == ["key"]
    for r in table.iter_rows(named=True):
        ref = _reference(kv[f"layers.{r['layer']}.key"])
        assert r["energy"] == pytest.approx(ref[r["rank"] - 1], abs=1e-9)
    xkv = cross_layer.svd_energy(tr, "key", group_sizes=(1,), ranks=(4, 8, 16))
    joined = table.join(xkv, left_on=["layer", "rank"], right_on=["first_layer", "rank"])
    assert joined.height == table.height
    np.testing.assert_allclose(joined["energy"], joined["energy_right"], atol=1e-6)
    with pytest.raises(KvlensError, match="keys must be one of"):
        latent.latent_summary(tr, keys="pre")


@pytest.mark.parametrize("balance", [True, False])
def test_joint_latent_matches_the_balanced_covariance_eigenvalues(balance):
    kv = random_kv(2, N_KV, T, HEAD_DIM, seed=5)
    for layer in (0, 1):  # keys ten times the values' scale, sharing a direction with them
        kv[f"layers.{layer}.key_pre_rope"] = 10 * kv[f"layers.{layer}.key_pre_rope"]
        kv[f"layers.{layer}.value"][0] += 0.5 * kv[f"layers.{layer}.key_pre_rope"][2]
    tr = _trace(kv)
    ranks = tuple(range(1, 2 * WIDTH + 1))
    table = latent.latent_energy(tr, ranks, balance=balance).filter(kind="joint")
    summary = latent.latent_summary(tr, balance=balance).filter(kind="joint")
    for layer in (0, 1):
        ref = _reference_joint(
            kv[f"layers.{layer}.key_pre_rope"], kv[f"layers.{layer}.value"], balance
        )
        part = table.filter(layer=layer).sort("rank")
        assert part["source"].unique().to_list() == ["key_pre_rope+value"]
        np.testing.assert_allclose(part["energy"].to_numpy(), ref, atol=1e-9)
        row = summary.filter(layer=layer).row(0, named=True)
        assert row["width"] == 2 * WIDTH and row["half_rank"] == WIDTH  # n_kv * head_dim
        assert row["energy_at_half"] == pytest.approx(ref[WIDTH - 1], abs=1e-9)
        assert row["rank_99"] == int(np.argmax(ref >= 0.99)) + 1


def test_balance_changes_the_joint_spectrum_when_keys_dominate():
    kv = random_kv(1, N_KV, T, HEAD_DIM, seed=6)
    kv["layers.0.key_pre_rope"] = 30 * kv["layers.0.key_pre_rope"]
    tr = _trace(kv, n_layers=1)
    plain = latent.latent_summary(tr, balance=False).filter(kind="joint")["energy_at_half"][0]
    balanced = latent.latent_summary(tr).filter(kind="joint")["energy_at_half"][0]
    # unbalanced, the keys' WIDTH directions hold nearly all the energy at rank WIDTH
    assert plain > 0.99 and balanced < plain - 0.05


def test_planted_shared_kv_latent_is_kept_whole_at_its_rank():
    """Keys and values of every head read one latent z [T, rank] through one up-projection
    (MLA's form): the joint latent keeps all the energy at that rank and not before."""
    rank = 7
    g = torch.Generator().manual_seed(8)
    z = torch.randn(T, rank, generator=g, dtype=torch.float64)
    up = torch.randn(rank, 2 * WIDTH, generator=g, dtype=torch.float64)
    kv_rows = z @ up
    tensors = {
        "layers.0.key_pre_rope": kv_rows[:, :WIDTH].reshape(T, N_KV, HEAD_DIM).transpose(0, 1),
        "layers.0.value": kv_rows[:, WIDTH:].reshape(T, N_KV, HEAD_DIM).transpose(0, 1),
    }
    tensors["layers.0.key"] = tensors["layers.0.key_pre_rope"]
    tr = _trace(tensors, n_layers=1)
    energy = (
        latent.latent_energy(tr, tuple(range(1, 2 * WIDTH + 1)))
        .filter(kind="joint")
        .sort("rank")["energy"]
        .to_numpy()
    )
    assert energy[rank - 1] == pytest.approx(1.0, abs=1e-9)
    assert (energy[: rank - 1] < 1 - 1e-3).all()
    assert (np.diff(energy) >= -1e-12).all()


def test_kinds_picks_rows_and_leaves_their_numbers_unchanged():
    tr = _trace(random_kv(2, N_KV, T, HEAD_DIM, seed=5))
    every = latent.latent_summary(tr, keys="post_rope")
    keys_only = latent.latent_summary(tr, keys="post_rope", kinds=("key",))
    assert keys_only["kind"].unique().to_list() == ["key"]
    assert keys_only.equals(every.filter(kind="key"))
    with pytest.raises(KvlensError, match="kinds"):
        latent.latent_summary(tr, kinds=("keys",))
