"""Every analysis against an independent computation written another way (issue 20, part 4).

The references are plain numpy/scipy/sklearn written from each paper's definition, never by
calling kvlens: attention from the real SmolLM2 run eagerly with ``output_attentions``
(H2O's accumulated score, StreamingLLM's sink mass, Scissorhands' persistence, the head
measures), scipy's kurtosis and numpy's median on the captured keys (KIVI / KVQuant), an
explicit loop of round-to-nearest quantisation, linear CKA from HSIC with explicit centring
and Gram matrices (Kornblith et al. 2019), MiniCache's per-token cosine from a loop, xKV's
energy from ``numpy.linalg.svd``, and k-nearest neighbours in a UMAP embedding of planted
clusters. Tolerances are tight: each test fails if the module drifts from its reference.

Where ranks are compared on real attention, near-ties (the k-th and the next score closer
than ``GAP_REL`` x score + ``GAP_ABS``) could swap under float noise between the eager and
blockwise passes; such heads are left out of set comparisons, and each test asserts that
few were left out.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import polars as pl
import pytest
import scipy.linalg
import scipy.stats
import torch

from analysis import cross_layer, head_profiles, head_types, heavy_hitters, outliers
from probes import capture
from tests.analysis.synthetic import trace as synthetic_trace
from tests.conftest import passage

N_PROMPT = 80
GENERATE = 6
SINKS = 4
LOCAL = 16
GAP_REL, GAP_ABS = 1e-4, 1e-5  # 5x the largest eager-vs-blockwise difference measured
TOL = 1e-4


@pytest.fixture(scope="module")
def real(smol):
    """A SmolLM2 probe (full maps, statistics, K/V, decoding steps) and eager attention maps
    [layers][heads, T, T] (float64 numpy) of the same prompt plus the generated tokens."""
    model, tok = smol
    ids = tok(passage(2))["input_ids"][:N_PROMPT]
    trace = capture(model, tok, ids, attention="full", generate=GENERATE, sinks=SINKS)
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = model(torch.tensor([trace.token_ids]), output_attentions=True)
    finally:
        model.set_attn_implementation("kvlens")
    maps = [a[0].double().numpy() for a in out.attentions]
    return trace, maps


def _prompt_maps(maps):
    """Eager probabilities of prompt queries over prompt keys: [layers, heads, n, n]."""
    return np.stack([m[:, :N_PROMPT, :N_PROMPT] for m in maps])


def _clear_top(scores: np.ndarray, k: int) -> bool:
    """Whether the top-k set of ``scores`` is unambiguous (no near-tie at the cut)."""
    s = np.sort(scores)[::-1]
    return k >= s.size or s[k - 1] - s[k] > GAP_REL * abs(s[k - 1]) + GAP_ABS


def _top_set(scores: np.ndarray, k: int) -> set[int]:
    return set(np.argsort(-scores, kind="stable")[:k].tolist())


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


# ---------------------------------------------------------------- heavy hitters (H2O, sinks)


def _eager_scores(maps) -> dict[str, np.ndarray]:
    p = _prompt_maps(maps)
    received = p.sum(2)  # column sums over queries: [layers, heads, n]
    seen_by = N_PROMPT - np.arange(N_PROMPT)
    return {"received": received, "received_norm": received / seen_by}


@pytest.mark.parametrize("by", ["received", "received_norm"])
def test_top_k_is_h2o_accumulated_attention_from_eager_maps(real, by):
    trace, maps = real
    ref = _eager_scores(maps)[by]
    k = 8
    top = heavy_hitters.top_k(trace, k, by)
    clear = 0
    for (layer, head), part in top.group_by("layer", "head"):
        part = part.sort("rank")
        expected = np.sort(ref[layer, head])[::-1][:k]
        np.testing.assert_allclose(part[by].to_numpy(), expected, rtol=TOL, atol=TOL)
        if _clear_top(ref[layer, head], k):
            clear += 1
            assert set(part["position"]) == _top_set(ref[layer, head], k), (layer, head)
    assert top.height == 30 * 9 * k
    assert clear >= 0.9 * 30 * 9


def test_model_top_is_the_mean_score_over_every_head(real):
    trace, maps = real
    ref = _eager_scores(maps)["received_norm"].mean((0, 1))  # [n]
    got = heavy_hitters.model_top(trace, 10)
    np.testing.assert_allclose(got["received_norm"].to_numpy(), np.sort(ref)[::-1][:10], rtol=TOL)
    assert _clear_top(ref, 10)
    assert set(got["position"]) == _top_set(ref, 10)


def test_head_and_layer_overlap_are_jaccard_of_eager_top_sets(real):
    trace, maps = real
    ref = _eager_scores(maps)["received_norm"]
    k = 8
    overlap = heavy_hitters.head_overlap(trace, k)
    checked = 0
    for r in overlap.iter_rows(named=True):
        a, b = ref[r["layer"], r["head_a"]], ref[r["layer"], r["head_b"]]
        if _clear_top(a, k) and _clear_top(b, k):
            checked += 1
            assert r["jaccard"] == _jaccard(_top_set(a, k), _top_set(b, k))
    assert checked >= 0.8 * overlap.height
    layer_mean = ref.mean(1)  # [layers, n]
    layers = heavy_hitters.layer_overlap(trace, k)
    assert layers.height == 30 * 30
    checked = 0
    for r in layers.iter_rows(named=True):
        a, b = layer_mean[r["layer_a"]], layer_mean[r["layer_b"]]
        if _clear_top(a, k) and _clear_top(b, k):
            checked += 1
            assert r["jaccard"] == pytest.approx(_jaccard(_top_set(a, k), _top_set(b, k)))
    assert checked >= 0.8 * layers.height


def test_sink_mass_is_streamingllm_mass_on_the_first_tokens(real):
    trace, maps = real
    p = _prompt_maps(maps)
    expected = p[:, :, SINKS:, :SINKS].sum(-1).mean(-1)  # queries past the sinks: [layers, heads]
    got = heavy_hitters.sinks(trace).sort("layer", "head")
    np.testing.assert_allclose(got["sink_mass"].to_numpy(), expected.ravel(), atol=TOL)
    assert (got["n_sinks"] == SINKS).all()


def test_persistence_is_jaccard_of_consecutive_steps_from_eager_rows(real):
    trace, maps = real
    k = 8
    steps = sorted(trace.step_stats["step"].unique().to_list())
    assert len(steps) >= GENERATE - 1
    # the row of step s is the query at position n_prompt - 1 + s (the one producing token s)
    got = heavy_hitters.persistence(trace, k)
    checked = 0
    for r in got.iter_rows(named=True):
        rows = [maps[r["layer"]][r["head"], N_PROMPT - 1 + s, :N_PROMPT] for s in steps]
        if not all(_clear_top(row, k) for row in rows):
            continue
        checked += 1
        sets = [_top_set(row, k) for row in rows]
        expected = np.mean([_jaccard(a, b) for a, b in zip(sets, sets[1:])])
        assert r["persistence"] == pytest.approx(expected, abs=1e-9), (r["layer"], r["head"])
        assert r["steps"] == len(steps)
    assert got.height == 30 * 9
    assert checked >= 0.5 * got.height


# ---------------------------------------------------------------- outliers (KIVI, KVQuant)


def test_channel_stats_match_numpy_and_scipy_on_the_captured_tensors(real):
    trace, _ = real
    stats = outliers.channel_stats(trace, ratio=4.0, top=4)
    for kind in outliers.KINDS:
        x = np.stack([trace.tensors[f"layers.{lay}.{kind}"].double().numpy() for lay in range(30)])
        ax = np.abs(x)  # [layers, Hkv, T, D]
        mean_abs = ax.mean(2)
        ratio = mean_abs / np.median(mean_abs, axis=-1, keepdims=True)
        ranks = np.argsort(-ax, axis=-1)[..., :4]  # the top-4 channels of every token
        d = x.shape[-1]
        top_fraction = np.stack([(ranks == c).any(-1).mean(-1) for c in range(d)], -1)
        ref = {
            "max_abs": ax.max(2),
            "mean_abs": mean_abs,
            "kurtosis": scipy.stats.kurtosis(x, axis=2, fisher=True, bias=True),
            "ratio_to_median": ratio,
            "top_fraction": top_fraction,
        }
        got = stats.filter(kind=kind).sort("layer", "kv_head", "channel")
        for column, expected in ref.items():
            np.testing.assert_allclose(
                got[column].to_numpy(), expected.ravel(), rtol=TOL, atol=1e-6, err_msg=column
            )
        flagged = got["outlier"].to_numpy()
        assert (flagged == (ratio.ravel() >= 4.0)).all()
        persistent = flagged & (top_fraction.ravel() >= 0.5)
        assert (got["persistent"].to_numpy() == persistent).all()


def _rtn(x: np.ndarray, bits: int) -> np.ndarray:
    """Round-to-nearest with min/max of the whole array x (one group)."""
    lo, hi = x.min(), x.max()
    step = max((hi - lo) / (2**bits - 1), 1e-12)
    return np.clip(np.round((x - lo) / step), 0, 2**bits - 1) * step + lo


def _loop_error(x: np.ndarray, bits: int, grouping: str, group: int) -> float:
    """x [Hkv, T, D]: KIVI's keys per channel in groups of ``group`` tokens, or per token."""
    q = np.empty_like(x)
    hkv, t, d = x.shape
    for h in range(hkv):
        if grouping == "per_token":
            for i in range(t):
                q[h, i] = _rtn(x[h, i], bits)
        else:
            for c in range(d):
                for s in range(0, t, group):
                    q[h, s : s + group, c] = _rtn(x[h, s : s + group, c], bits)
    return float(np.linalg.norm(x - q) / np.linalg.norm(x))


def test_quantisation_error_matches_an_explicit_loop(real):
    trace, _ = real
    got = outliers.quantization_error(trace, bits=(2, 4), group=32)
    rotation = scipy.linalg.hadamard(64) / 8.0
    worst = 0.0
    for kind in outliers.KINDS:
        for layer in (0, 13, 29):
            x = trace.tensors[f"layers.{layer}.{kind}"].double().numpy()  # T = 86: a ragged tail
            for bits in (2, 4):
                for grouping in ("per_channel", "per_token"):
                    for rotated in (False, True):
                        data = x @ rotation if rotated else x
                        expected = _loop_error(data, bits, grouping, 32)
                        row = got.filter(
                            kind=kind, layer=layer, bits=bits, grouping=grouping, rotated=rotated
                        )
                        assert row.height == 1
                        worst = max(worst, abs(row["error"][0] - expected) / expected)
    assert worst < 1e-3


# ---------------------------------------------------------------- cross-layer (MiniCache, CKA, xKV)

CROSS_LAYERS = (10, 11, 12, 13)


def _kv_only(trace, layers):
    tensors = {name: t for name, t in trace.tensors.items() if int(name.split(".")[1]) in layers}
    return dataclasses.replace(trace, tensors=tensors, key_stats=None, query_stats=None)


@pytest.mark.parametrize("kind", ["key", "value"])
def test_pair_similarity_is_minicache_per_token_cosine_from_a_loop(real, kind):
    trace, _ = real
    sub = _kv_only(trace, CROSS_LAYERS)
    got = cross_layer.pair_similarity(sub, kind)
    x = {lay: trace.tensors[f"layers.{lay}.{kind}"].double().numpy() for lay in CROSS_LAYERS}
    for r in got.iter_rows(named=True):
        a, b = x[r["layer_a"]], x[r["layer_b"]]
        cosines, ratios = [], []
        for h in range(a.shape[0]):
            for t in range(a.shape[1]):
                na, nb = np.linalg.norm(a[h, t]), np.linalg.norm(b[h, t])
                cosines.append(np.dot(a[h, t], b[h, t]) / (na * nb))
                ratios.append(min(na, nb) / max(na, nb))
        assert r["cosine"] == pytest.approx(np.mean(cosines), abs=1e-5)
        assert r["magnitude_ratio"] == pytest.approx(np.mean(ratios), abs=1e-5)
        assert r["adjacent"] == (abs(r["layer_a"] - r["layer_b"]) == 1)


def _hsic(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741 (HSIC's usual names)
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(k @ h @ l @ h)) / (n - 1) ** 2


def _cka_formula(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA from explicit n x n Gram matrices: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))."""
    k, l = x @ x.T, y @ y.T  # noqa: E741
    return _hsic(k, l) / np.sqrt(_hsic(k, k) * _hsic(l, l))


def test_linear_cka_equals_the_hsic_formula_and_keeps_its_invariances():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 20)) @ rng.normal(size=(20, 20))  # correlated features
    q, _ = np.linalg.qr(rng.normal(size=(20, 20)))

    def module(a, b):
        return cross_layer.linear_cka(torch.tensor(a), torch.tensor(b))

    # invariances CKA promises: orthogonal transform, isotropic scaling, translation
    planted = 3.7 * x @ q + 5.0
    assert _cka_formula(x, planted) == pytest.approx(1.0, abs=1e-9)
    assert module(x, planted) == pytest.approx(1.0, abs=1e-6)
    # a planted partial match, and a non-isotropic scaling (which CKA does not forgive)
    noisy = x @ q + 2.0 * rng.normal(size=x.shape)
    stretched = x * np.geomspace(0.05, 20.0, 20)
    for y in (noisy, stretched):
        reference = _cka_formula(x, y)
        assert reference < 0.95
        assert module(x, y) == pytest.approx(reference, abs=1e-6)
    # features wider than items: K, L are n x n either way
    wide = rng.normal(size=(30, 90))
    assert module(wide, wide @ np.diag(np.linspace(1, 2, 90))) == pytest.approx(
        _cka_formula(wide, wide @ np.diag(np.linspace(1, 2, 90))), abs=1e-6
    )


def test_cka_table_on_the_real_model_equals_the_formula(real):
    trace, _ = real
    got = cross_layer.cka(_kv_only(trace, CROSS_LAYERS), "key")
    feats = {
        lay: trace.tensors[f"layers.{lay}.key"].double().numpy().transpose(1, 0, 2).reshape(86, -1)
        for lay in CROSS_LAYERS
    }
    for r in got.iter_rows(named=True):
        expected = _cka_formula(feats[r["layer_a"]], feats[r["layer_b"]])
        assert r["cka"] == pytest.approx(expected, abs=1e-5)


def test_svd_energy_of_stacked_layers_matches_numpy_svd(real):
    trace, _ = real
    ranks = (4, 8, 16, 32, 64)
    for kind in ("key_pre_rope", "value"):
        got = cross_layer.svd_energy(
            _kv_only(trace, CROSS_LAYERS), kind, group_sizes=(1, 2, 4), ranks=ranks
        )
        for g in (1, 2, 4):
            for first in CROSS_LAYERS[::g]:
                group = [lay for lay in CROSS_LAYERS if first <= lay < first + g]
                stacked = np.concatenate(  # xKV: layers side by side, [T, g * Hkv * D]
                    [
                        trace.tensors[f"layers.{lay}.{kind}"].double().numpy().transpose(1, 0, 2)
                        for lay in group
                    ],
                    axis=1,
                ).reshape(86, -1)
                s = np.linalg.svd(stacked, compute_uv=False)
                for r in ranks:
                    expected = (s[:r] ** 2).sum() / (s**2).sum()
                    row = got.filter(group_size=g, first_layer=first, rank=r)
                    assert row.height == 1
                    assert row["energy"][0] == pytest.approx(expected, abs=1e-5), (kind, g, r)


def test_umap_keeps_planted_clusters_as_neighbours():
    from sklearn.manifold import trustworthiness
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(1)
    n_clusters, per, d = 4, 50, 32
    centres = rng.normal(scale=6.0, size=(n_clusters, d))
    labels = np.repeat(np.arange(n_clusters), per)
    order = rng.permutation(labels.size)  # clusters interleaved along the positions
    labels = labels[order]
    keys = centres[labels] + rng.normal(size=(labels.size, d))
    t = synthetic_trace(
        n_tokens=labels.size,
        n_layers=1,
        n_heads=1,
        n_kv_heads=1,
        head_dim=d,
        tensors={"layers.0.key": torch.tensor(keys, dtype=torch.float32)[None]},
    )
    emb = cross_layer.umap_keys(t, 0, 0, max_points=150)  # exercises the subsampling path
    pos = emb["position"].to_numpy()
    assert emb.height <= 150 and len(set(pos)) == emb.height
    xy = emb.select("x", "y").to_numpy()
    y = labels[pos]
    # leave-one-out: each point's 5 nearest other points vote
    neighbours = NearestNeighbors(n_neighbors=6).fit(xy).kneighbors(xy, return_distance=False)
    neighbours = neighbours[:, 1:]
    vote = np.array([Counter(y[nb]).most_common(1)[0][0] for nb in neighbours])
    assert (vote == y).mean() >= 0.98
    assert trustworthiness(keys[pos], xy, n_neighbors=5) >= 0.9
    # the same check fails on labels that ignore the clusters
    shuffled = rng.permutation(y)
    neighbours_vote = np.array([Counter(shuffled[nb]).most_common(1)[0][0] for nb in neighbours])
    assert (neighbours_vote == shuffled).mean() < 0.6


# ---------------------------------------------------------------- head types and profiles


def _eager_measures(maps) -> dict[str, np.ndarray]:
    """Head measures from full maps, queries past the sinks: each [layers, heads]."""
    p = _prompt_maps(maps)[:, :, SINKS:, :]  # [L, H, queries, keys]
    qpos = np.arange(SINKS, N_PROMPT)[:, None]
    kpos = np.arange(N_PROMPT)[None, :]
    distance = qpos - kpos
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(p), 0.0)
    entropy = -plogp.sum(-1)
    return {
        "entropy": entropy.mean(-1),
        "entropy_norm": (entropy / np.log(qpos[:, 0] + 1)).mean(-1),
        "mean_distance": (p * np.where(distance >= 0, distance, 0)).sum(-1).mean(-1),
        "sink_ratio": p[..., :SINKS].sum(-1).mean(-1),
        "locality": (p * ((distance >= 0) & (distance < LOCAL))).sum(-1).mean(-1),
    }


def _rule(m: dict[str, float]) -> str:
    """head_types' rule written as plain if/elif."""
    if m["retrieval"] >= 0.1:
        return "retrieval"
    if m["sink_ratio"] >= 0.5:
        return "sink"
    if m["locality"] >= 0.5:
        return "local"
    if m["entropy_norm"] >= 0.6:
        return "diffuse"
    return "mixed"


def test_head_measures_equal_their_definitions_on_eager_maps(real):
    trace, maps = real
    ref = _eager_measures(maps)
    got = head_types.head_measures(trace).sort("layer", "head")
    assert got.height == 30 * 9
    for column, expected in ref.items():
        np.testing.assert_allclose(
            got[column].to_numpy(), expected.ravel(), rtol=TOL, atol=TOL, err_msg=column
        )
    assert (got["retrieval"] == 0.0).all()


def _edge_rows() -> list[dict]:
    """For every rule: a head exactly at its threshold and one just below it."""
    below = {"retrieval": 0.0, "sink_ratio": 0.2, "locality": 0.2, "entropy_norm": 0.3}
    rows = []
    for name, threshold in (
        ("retrieval", 0.1),
        ("sink_ratio", 0.5),
        ("locality", 0.5),
        ("entropy_norm", 0.6),
    ):
        for value in (threshold, float(np.nextafter(threshold, 0.0))):
            rows.append({**below, name: value})
    # precedence: a head past every threshold is a retrieval head
    rows.append({"retrieval": 0.1, "sink_ratio": 0.9, "locality": 0.9, "entropy_norm": 0.9})
    rows.append({"retrieval": 0.0, "sink_ratio": 0.5, "locality": 0.9, "entropy_norm": 0.9})
    return rows


def test_head_type_rule_hits_each_threshold_edge():
    rows = _edge_rows()
    got = head_types.classify(pl.DataFrame(rows))["type"].to_list()
    assert got == [_rule(r) for r in rows]
    assert got == [
        "retrieval",
        "mixed",
        "sink",
        "mixed",
        "local",
        "mixed",
        "diffuse",
        "mixed",
        "retrieval",
        "sink",
    ]


def test_head_types_of_a_planted_trace_sit_on_each_edge():
    """Planted per-query statistics (float32, as a probe stores them) through head_types."""
    half, below_half = 0.5, float(np.nextafter(np.float32(0.5), np.float32(0)))
    t = synthetic_trace(n_tokens=32, n_layers=2, received=np.ones((2, 4, 32)))
    planted = {  # (layer, head): (sink_mass, local_mass)
        (0, 0): (half, 0.2),
        (0, 1): (below_half, 0.2),
        (0, 2): (0.1, half),
        (0, 3): (0.1, below_half),
    }
    sink = pl.col("sink_mass")
    local = pl.col("local_mass")
    for (layer, head), (s, loc) in planted.items():
        at = (pl.col("layer") == layer) & (pl.col("head") == head)
        sink = pl.when(at).then(pl.lit(s)).otherwise(sink)
        local = pl.when(at).then(pl.lit(loc)).otherwise(local)
    t.query_stats = t.query_stats.with_columns(
        sink_mass=sink.cast(pl.Float32), local_mass=local.cast(pl.Float32)
    )
    retrieval = pl.DataFrame(
        {"layer": [1, 1], "head": [0, 1], "retrieval": [0.1, float(np.nextafter(0.1, 0.0))]}
    )
    got = head_types.head_types(t, retrieval).sort("layer", "head")
    assert got["type"].to_list() == ["sink", "mixed", "local", "mixed", "retrieval"] + ["mixed"] * 3
    # the untouched heads: entropy 1 nat at every query, so entropy_norm is mean 1 / log(q + 1)
    expected = np.mean(1 / np.log(np.arange(4, 32) + 1))
    assert got["entropy_norm"][7] == pytest.approx(expected, rel=1e-6)


def test_profile_carries_measures_types_and_depth_from_their_references(real):
    trace, maps = real
    rng = np.random.default_rng(2)
    grid = [(layer, head) for layer in range(30) for head in range(9)]
    scores = pl.DataFrame(
        {
            "layer": [g[0] for g in grid],
            "head": [g[1] for g in grid],
            "retrieval": rng.choice([0.0, 0.05, 0.3], len(grid)),
            "echo": rng.uniform(size=len(grid)),
            "induction": rng.uniform(size=len(grid)),
        }
    )
    profile = head_profiles.build_profile(trace, scores).sort("layer", "head")
    ref = _eager_measures(maps)
    ref_scores = scores.sort("layer", "head")
    for column in ("retrieval", "echo", "induction"):
        np.testing.assert_array_equal(profile[column].to_numpy(), ref_scores[column].to_numpy())
    for column in ("sink_ratio", "locality", "entropy_norm", "mean_distance"):
        np.testing.assert_allclose(profile[column].to_numpy(), ref[column].ravel(), atol=TOL)
    np.testing.assert_allclose(profile["depth"].to_numpy(), profile["layer"].to_numpy() / 29)
    margins = {"sink_ratio": 0.5, "locality": 0.5, "entropy_norm": 0.6}
    checked = 0
    for i, r in enumerate(profile.iter_rows(named=True)):
        measures = {c: float(ref[c].ravel()[i]) for c in margins}
        if any(abs(measures[c] - edge) < 1e-3 for c, edge in margins.items()):
            continue  # float noise could move a head across an edge
        checked += 1
        assert r["type"] == _rule({**measures, "retrieval": r["retrieval"]}), r
    assert checked >= 0.95 * profile.height


def test_profile_comparison_and_shares_match_an_explicit_loop():
    rng = np.random.default_rng(3)

    def planted(model, n_layers):
        n = n_layers * 4
        return pl.DataFrame(
            {
                "model": [model] * n,
                "layer": np.repeat(np.arange(n_layers), 4),
                "head": np.tile(np.arange(4), n_layers),
                "depth": np.repeat(np.arange(n_layers) / (n_layers - 1), 4),
                **{m: rng.uniform(size=n) for m in head_profiles.MEASURES},
                "entropy": rng.uniform(size=n),
                "mean_distance": rng.uniform(size=n),
                "type": rng.choice(["sink", "local", "mixed"], n),
            }
        ).select(head_profiles.PROFILE_COLUMNS)

    a, b = planted("a", 30), planted("b", 7)
    bins = 5
    got = head_profiles.compare_profiles(a, b, bins=bins)
    for profile in (a, b):
        buckets: dict[int, list[dict]] = {}
        for r in profile.iter_rows(named=True):
            buckets.setdefault(min(int(r["depth"] * bins), bins - 1), []).append(r)
        for depth_bin, members in buckets.items():
            row = got.filter(model=profile["model"][0], depth_bin=depth_bin)
            assert row.height == 1
            for m in head_profiles.MEASURES:
                assert row[m][0] == pytest.approx(np.mean([r[m] for r in members]), abs=1e-12)
        assert got.filter(model=profile["model"][0]).height == len(buckets)
    shares = head_profiles.type_shares(pl.concat([a, b]))
    for profile in (a, b):
        counts = Counter(profile["type"].to_list())
        for kind, count in counts.items():
            row = shares.filter(model=profile["model"][0], type=kind)
            assert row["share"][0] == pytest.approx(count / profile.height, abs=1e-12)
