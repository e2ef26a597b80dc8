"""Dumps round-trip exactly; damaged, foreign or mismatched dumps are refused in one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from probes import DumpError, Trace, capture
from tests.conftest import passage


@pytest.fixture(scope="module")
def small_trace(smol):
    model, tok = smol
    return capture(model, tok, passage(1), attention="full", layers=[0, 2])


@pytest.fixture()
def dump(small_trace, tmp_path):
    return small_trace.save(tmp_path / "dump")


def test_round_trip_gives_equal_tensors_and_tables(small_trace, dump):
    loaded = Trace.load(dump)
    assert loaded.token_ids == small_trace.token_ids
    assert loaded.tokens == small_trace.tokens
    assert loaded.prompt == small_trace.prompt
    assert loaded.model == small_trace.model
    assert loaded.settings == small_trace.settings
    assert set(loaded.tensors) == set(small_trace.tensors)
    for name, t in small_trace.tensors.items():
        assert torch.equal(loaded.tensors[name], t), name
    assert loaded.key_stats.equals(small_trace.key_stats)
    assert loaded.query_stats.equals(small_trace.query_stats)
    assert {"layers.0.key", "layers.0.key_pre_rope", "layers.0.value", "layers.0.attn"} <= set(
        loaded.tensors
    )
    assert loaded.key(2).shape == (3, loaded.n_tokens, 64)


def test_write_is_atomic_and_replaces_an_old_dump(small_trace, dump):
    small_trace.save(dump)  # overwrite in place
    leftovers = [p.name for p in dump.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    assert Trace.load(dump).n_tokens == small_trace.n_tokens


def test_refuses_to_overwrite_a_folder_that_is_not_a_dump(small_trace, tmp_path):
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(DumpError, match="not a kvlens dump"):
        small_trace.save(other)
    assert (other / "notes.txt").read_text() == "keep me"


def _one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


def test_truncated_tensor_file_is_refused(dump):
    path = dump / "tensors.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DumpError) as info:
        Trace.load(dump)
    assert "tensors.safetensors" in _one_line(info)


def test_wrong_schema_version_is_refused(dump):
    manifest = json.loads((dump / "manifest.json").read_text())
    manifest["version"] = 99
    (dump / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DumpError) as info:
        Trace.load(dump)
    assert "schema version 99" in _one_line(info)


def test_mismatched_shapes_are_refused(dump):
    manifest = json.loads((dump / "manifest.json").read_text())
    manifest["model"]["head_dim"] = 32
    (dump / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DumpError) as info:
        Trace.load(dump)
    assert "shape" in _one_line(info)


def test_token_count_mismatch_is_refused(dump):
    manifest = json.loads((dump / "manifest.json").read_text())
    manifest["token_ids"] = manifest["token_ids"][:-1]
    manifest["tokens"] = manifest["tokens"][:-1]
    (dump / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DumpError, match="shape|not a token count"):
        Trace.load(dump)


def test_truncated_table_is_refused(dump):
    path = dump / "stats.parquet"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DumpError) as info:
        Trace.load(dump)
    assert "stats.parquet" in _one_line(info)


def test_foreign_folder_and_json_are_refused(tmp_path, dump):
    with pytest.raises(DumpError, match="no manifest.json"):
        Trace.load(tmp_path)
    (dump / "manifest.json").write_text('{"hello": "world"}')
    with pytest.raises(DumpError, match="not a kvlens dump manifest"):
        Trace.load(dump)
    (dump / "manifest.json").write_text("{not json")
    with pytest.raises(DumpError, match="not valid JSON"):
        Trace.load(dump)


def test_missing_file_is_refused(dump):
    (dump / "query_stats.parquet").unlink()
    with pytest.raises(DumpError, match="query_stats.parquet is missing"):
        Trace.load(dump)
    shutil.rmtree(dump)
    with pytest.raises(DumpError, match="no such folder"):
        Trace.load(dump)


def test_generate_trace_round_trips_and_version_one_steps_are_read_by_today_s_convention(
    smol, tmp_path
):
    import polars as pl

    model, tok = smol
    t = capture(model, tok, passage(1), attention="stats", kv=False, layers=[1], generate=3)
    folder = t.save(tmp_path / "gen")
    loaded = Trace.load(folder)
    assert loaded.step_stats.equals(t.step_stats)
    assert loaded.decode_steps().equals(t.decode_steps())
    # a version-1 dump held steps 1..M, the last one producing a token outside the trace
    n, m = t.n_prompt_tokens, 3
    extra = t.step_stats.filter(step=m - 1).with_columns(pl.lit(m, pl.Int32).alias("step"))
    old = pl.concat([t.step_stats.filter(pl.col("step") > 0), extra])
    old.write_parquet(folder / "step_stats.parquet")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["version"] = 1
    manifest["tables"]["step_stats"]["rows"] = old.height
    (folder / "manifest.json").write_text(json.dumps(manifest))
    v1 = Trace.load(folder)
    assert sorted(v1.step_stats["step"].unique().to_list()) == [1, 2]
    assert v1.step_stats.filter(step=2).equals(t.step_stats.filter(step=2))
    assert v1.decode_steps()["query_position"][1] == n


def test_step_rows_past_their_query_are_refused(smol, tmp_path):
    import polars as pl

    model, tok = smol
    t = capture(model, tok, passage(1), attention="stats", kv=False, layers=[1], generate=2)
    bad = t.step_stats.with_columns(
        pl.when(pl.col("step") == 0).then(pl.col("position") + 1).otherwise(pl.col("position"))
    )
    t.step_stats = bad
    with pytest.raises(DumpError) as info:
        Trace.load(t.save(tmp_path / "bad"))
    assert "step_stats" in _one_line(info)
