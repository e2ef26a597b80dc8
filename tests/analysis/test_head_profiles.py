"""Head profiles on the real SmolLM2: they round-trip through parquet and compare across models."""

from __future__ import annotations

import polars as pl
import pytest
from streamlit.testing.v1 import AppTest

from analysis.head_profiles import (
    MEASURES,
    PROFILE_COLUMNS,
    compare_profiles,
    read_profile,
    type_shares,
)
from app.jobs import head_profile
from probes import KvlensError


@pytest.fixture(scope="module")
def profile(smol):
    model, tok = smol
    return head_profile(model, tok, lengths=(256,), depths=(0.5,))


def test_profile_has_every_head_and_measure(profile):
    assert profile.height == 30 * 9 and tuple(profile.columns) == PROFILE_COLUMNS
    assert set(profile["type"].unique()) <= {"retrieval", "sink", "local", "diffuse", "mixed"}
    assert profile["depth"].min() == 0.0 and profile["depth"].max() == 1.0
    assert type_shares(profile)["share"].sum() == pytest.approx(1.0)


def test_profile_round_trips_and_compares(profile, tmp_path):
    path = tmp_path / "smol.parquet"
    profile.write_parquet(path)
    again = read_profile(path)
    assert again.equals(profile)
    other = again.with_columns(
        model=pl.lit("other-model"),
        retrieval=pl.lit(0.0),
        layer=pl.col("layer") // 2,
        depth=pl.col("depth"),
    )
    table = compare_profiles(again, other, bins=5)
    assert set(table["model"]) == {"smollm2-135m", "other-model"}
    assert set(MEASURES) <= set(table.columns)
    assert table.filter(model="other-model")["retrieval"].max() == 0.0
    same = compare_profiles(again, again)
    a = same.filter(pl.col("model").str.ends_with("(a)")).drop("model")
    b = same.filter(pl.col("model").str.ends_with("(b)")).drop("model")
    assert a.equals(b)


def test_a_foreign_file_is_refused(tmp_path):
    path = tmp_path / "x.parquet"
    pl.DataFrame({"a": [1]}).write_parquet(path)
    with pytest.raises(KvlensError, match="not a kvlens head profile"):
        read_profile(path)


def test_app_compares_two_saved_profiles(profile, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "cache_dumps" / "profiles"
    folder.mkdir(parents=True)
    profile.write_parquet(folder / "a.parquet")
    profile.with_columns(model=pl.lit("other")).write_parquet(folder / "b.parquet")
    at = AppTest.from_string(
        "from pages import retrieval_heads\nretrieval_heads.render()\n", default_timeout=120
    )
    at.run()
    assert not at.exception and not at.error
    assert (
        at.selectbox(key="hp_a").value == "a.parquet"
        and at.selectbox(key="hp_b").value == "b.parquet"
    )
    assert len(at.dataframe) >= 2
