"""Each analysis finds a planted truth in a synthetic trace, and only that."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis import cross_layer, heavy_hitters, outliers, retrieval_heads
from tests.analysis.synthetic import random_kv, trace


def test_planted_heavy_hitter_is_ranked_first():
    rng = np.random.default_rng(0)
    received = rng.uniform(0.1, 1.0, size=(2, 4, 32))
    received[:, :, 7] = 100.0
    t = trace(received=received)
    top = heavy_hitters.top_k(t, k=3)
    assert (top.filter(rank=0)["position"] == 7).all()
    assert heavy_hitters.model_top(t, 1)["position"][0] == 7
    overlap = heavy_hitters.head_overlap(t, k=1)
    assert (overlap["jaccard"] == 1.0).all()  # every head's top-1 is the planted token


def test_persistence_is_one_for_a_stable_ranking_and_lower_for_a_moving_one():
    rows = []
    for step in range(1, 5):
        for head in range(2):
            for pos in range(10):
                stable = 1.0 if pos in (2, 5) else 0.01
                moving = 1.0 if pos in (step, step + 4) else 0.01
                rows.append(
                    {
                        "step": step,
                        "layer": 0,
                        "head": head,
                        "kv_head": head,
                        "position": pos,
                        "attention": stable if head == 0 else moving,
                    }
                )
    t = trace(n_tokens=14, n_layers=1, n_heads=2, n_kv_heads=2, step_rows=rows, n_prompt=10)
    p = heavy_hitters.persistence(t, k=2)
    assert p.filter(head=0)["persistence"][0] == 1.0
    assert p.filter(head=1)["persistence"][0] == 0.0


def test_planted_outlier_channel_is_found_and_no_other():
    kv = random_kv(2, 2, 64, 16)
    kv["layers.1.key_pre_rope"][:, :, 5] *= 20
    stats = outliers.channel_stats(trace(n_tokens=64, tensors=kv))
    flagged = stats.filter(outlier=True)
    assert set(zip(flagged["kind"], flagged["layer"], flagged["channel"])) == {
        ("key_pre_rope", 1, 5)
    }
    assert flagged["persistent"].all()


def test_per_channel_quantisation_beats_per_token_on_outlier_channels():
    kv = random_kv(1, 2, 64, 16)
    kv["layers.0.key"][:, :, 3] = 30 + 0.1 * kv["layers.0.key"][:, :, 3]  # offset outlier channel
    q = outliers.quantization_error(trace(n_tokens=64, n_layers=1, tensors=kv), bits=(2,))
    key = q.filter(kind="key", rotated=False)
    per_channel = key.filter(grouping="per_channel")["error"][0]
    per_token = key.filter(grouping="per_token")["error"][0]
    assert per_channel < per_token / 2


def test_hadamard_is_orthonormal():
    h = outliers.hadamard(16)
    torch.testing.assert_close(h @ h.T, torch.eye(16))
    with pytest.raises(ValueError):
        outliers.hadamard(12)


def test_fake_quantize_error_is_within_half_a_step():
    x = torch.randn(4, 50, 8)
    for bits in (2, 4):
        q = outliers.fake_quantize(x, bits, dim=-1)
        step = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / (2**bits - 1)
        assert ((x - q).abs() <= step / 2 + 1e-6).all()


def test_identical_layers_have_similarity_and_cka_one():
    kv = random_kv(3, 2, 40, 16)
    kv["layers.1.key"] = kv["layers.0.key"].clone()
    t = trace(n_tokens=40, n_layers=3, tensors=kv)
    sim = cross_layer.pair_similarity(t, "key")
    same = sim.filter(layer_a=0, layer_b=1)
    assert same["cosine"][0] == pytest.approx(1.0, abs=1e-5)
    assert same["magnitude_ratio"][0] == pytest.approx(1.0, abs=1e-5)
    assert abs(sim.filter(layer_a=0, layer_b=2)["cosine"][0]) < 0.1
    cka = cross_layer.cka(t, "key")
    assert cka.filter(layer_a=0, layer_b=1)["cka"][0] == pytest.approx(1.0, abs=1e-5)
    assert cka.filter(layer_a=0, layer_b=2)["cka"][0] < 0.6


def test_the_cka_table_is_linear_cka_of_every_pair():
    kv = random_kv(4, 2, 48, 16)
    t = trace(n_tokens=48, n_layers=4, tensors=kv)
    table = cross_layer.cka(t, "key")
    values = {(a, b): v for a, b, v in table.select("layer_a", "layer_b", "cka").rows()}
    assert len(values) == 16
    for (a, b), value in values.items():
        x, y = (kv[f"layers.{n}.key"].permute(1, 0, 2).flatten(1) for n in (a, b))
        # each pair's product is computed once for both orders: float32 rounding of A^T B
        # against B^T A apart, linear_cka's own value
        expected = 1.0 if a == b else cross_layer.linear_cka(x, y)
        assert value == pytest.approx(expected, rel=1e-5, abs=1e-7)
        assert value == values[b, a]


def test_stacked_identical_layers_need_no_extra_rank():
    kv = random_kv(2, 1, 64, 8)
    low_rank = torch.randn(1, 64, 2) @ torch.randn(1, 2, 8)
    kv["layers.0.key"] = low_rank
    kv["layers.1.key"] = low_rank.clone()
    e = cross_layer.svd_energy(
        trace(n_tokens=64, n_heads=1, n_kv_heads=1, head_dim=8, tensors=kv),
        group_sizes=(1, 2),
        ranks=(2,),
    )
    assert (e["energy"] > 0.999).all()  # rank 2 holds each layer and the stacked pair


def test_echo_and_induction_heads_score_one():
    period, offset = 6, 1
    n = offset + 2 * period
    attn = torch.zeros(3, n, n)
    for q in range(n):
        attn[:, q, 0] = 1.0  # default: attend to the first token
    for q in range(offset + period, n):
        attn[0, q] = 0
        attn[0, q, q - period] = 1.0  # echo: the previous occurrence of the same token
        attn[1, q] = 0
        attn[1, q, q - period + 1] = 1.0  # induction: the token after it
    t = trace(n_tokens=n, n_layers=1, n_heads=3, n_kv_heads=1, tensors={"layers.0.attn": attn})
    s = retrieval_heads.echo_induction_scores(t, offset, period)
    assert s.filter(head=0)["echo"][0] == 1.0 and s.filter(head=0)["induction"][0] < 0.2
    assert s.filter(head=1)["induction"][0] == 1.0 and s.filter(head=1)["echo"][0] == 0.0
    assert s.filter(head=2)["echo"][0] == 0.0


def test_retrieval_score_follows_the_produced_token_not_the_fed_one():
    # prompt: 10 tokens, a 3-token needle at positions 4..6 (ids 44, 45, 46), ending in 44;
    # the model then generates 45, 46, 99. Step s is the query that produces generated token
    # s: step 0 fed 44 (the prompt's last token) and produced 45, step 1 fed 45 -> 46, step 2
    # fed 46 -> 99. Head 0 echoes: it attends to the earlier copy of the token it was fed.
    # Head 1 retrieves: it attends to the needle position holding the token it produces.
    ids = [10, 11, 12, 13, 44, 45, 46, 17, 18, 44, 45, 46, 99]
    echo_target = {0: 4, 1: 5, 2: 6}
    retrieval_target = {0: 5, 1: 6, 2: 2}
    rows = []
    for step in range(3):
        for head, target in enumerate((echo_target[step], retrieval_target[step])):
            for pos in range(10 + step):
                rows.append(
                    {
                        "step": step,
                        "layer": 0,
                        "head": head,
                        "kv_head": 0,
                        "position": pos,
                        "attention": 0.9 if pos == target else 0.01,
                    }
                )
    t = trace(
        n_tokens=13, n_layers=1, n_heads=2, n_kv_heads=1, step_rows=rows, token_ids=ids, n_prompt=10
    )
    steps = t.decode_steps()
    assert steps["fed"].to_list() == [44, 45, 46] and steps["produced"].to_list() == [45, 46, 99]
    scores = retrieval_heads.retrieval_scores(t, [4, 5, 6])
    assert scores.filter(head=1)["retrieval"][0] == pytest.approx(2 / 3)
    assert scores.filter(head=0)["retrieval"][0] == 0.0  # the echo head retrieves nothing
