"""The analysis pipeline on the real SmolLM2: end to end, with properties checked on the model."""

from __future__ import annotations

import polars as pl
import pytest

from analysis import heavy_hitters, outliers
from analysis.run_all import analyze, save_tables, summarize
from app.jobs import find_retrieval_heads
from probes import capture
from tests.app.test_cli import run
from tests.conftest import passage


@pytest.fixture(scope="module")
def dump(smol, tmp_path_factory):
    model, tok = smol
    ids = tok(passage(20))["input_ids"][:1024]
    trace = capture(model, tok, ids, attention="stats", generate=4)
    return trace, trace.save(tmp_path_factory.mktemp("an") / "dump")


def test_pipeline_runs_and_finds_the_model_s_known_traits(dump):
    trace, _ = dump
    tables = analyze(trace)
    assert {
        "heavy_hitters_top",
        "sinks",
        "persistence",
        "outlier_channels",
        "quantization_error",
        "similarity_key",
        "cka_key",
        "svd_energy_key",
        "latent_readiness",
        "head_types",
    } <= set(tables)
    # checked on SmolLM2: the first token is the strongest heavy hitter (an attention sink)
    assert heavy_hitters.model_top(trace, 1)["position"][0] == 0
    assert (tables["sinks"]["sink_mass"] >= 0.5).sum() > 10
    # checked on SmolLM2: 2-bit keys quantise far better per channel than per token (KIVI)
    q = tables["quantization_error"].filter(kind="key", bits=2, rotated=False)
    per_channel = q.filter(grouping="per_channel")["error"].mean()
    per_token = q.filter(grouping="per_token")["error"].mean()
    assert per_channel < per_token / 2
    # pre-RoPE keys carry more outlier channels than values
    summary = outliers.outlier_summary(tables["outlier_channels"])
    assert (
        summary.filter(kind="key_pre_rope")["outliers"].sum()
        > summary.filter(kind="value")["outliers"].sum()
    )
    # checked on SmolLM2: a joint latent of half the GQA width keeps more of the pre-RoPE
    # keys' energy than of the values' in every layer (TransMLA: keys compress better)
    ready = tables["latent_readiness"]
    keys, values = ready.filter(kind="key").sort("layer"), ready.filter(kind="value").sort("layer")
    assert keys["source"].unique().to_list() == ["key_pre_rope"]
    assert (keys["energy_at_half"] > values["energy_at_half"]).all()
    assert set(tables["head_types"]["type"].unique()) <= {
        "retrieval",
        "sink",
        "local",
        "diffuse",
        "mixed",
    }


def test_cli_analyze_prints_the_numbers_in_its_parquet_files(dump):
    _, folder = dump
    result = run("analyze", str(folder))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.strip().splitlines()[-1] == str(folder / "analysis")
    model_top = pl.read_parquet(folder / "analysis" / "heavy_hitters_model.parquet")
    first = model_top.row(0, named=True)
    assert f"{first['token']!r}@{first['position']} {first['received_norm']:.3f}" in out
    types = pl.read_parquet(folder / "analysis" / "head_types.parquet").group_by("type").len()
    for r in types.iter_rows(named=True):
        assert f"{r['type']} {r['len']}" in out
    sinks = pl.read_parquet(folder / "analysis" / "sinks.parquet")
    assert f"sink mass: mean {sinks['sink_mass'].mean():.3f}" in out


def test_summary_and_saved_tables_agree(dump, tmp_path):
    trace, _ = dump
    tables = analyze(trace)
    out = save_tables(tables, tmp_path)
    for name, df in tables.items():
        assert pl.read_parquet(out / f"{name}.parquet").equals(df)
    assert "head types:" in summarize(trace, tables)


def test_retrieval_heads_on_a_short_needle(smol):
    model, tok = smol
    scores = find_retrieval_heads(model, tok, lengths=[300], depths=[0.5], generate=10, period=32)
    assert scores.height == 30 * 9
    assert set(scores.columns) == {"layer", "head", "retrieval", "echo", "induction"}
    # checked on SmolLM2: some heads copy the needle, and induction heads exist
    assert scores["retrieval"].max() > 0.2
    assert scores["induction"].max() > 0.3
    assert scores["retrieval"].min() >= 0 and scores["retrieval"].max() <= 1
