"""`kvlens prefill-sparse` in process: one row per config with density, recall and output error
(a full mask: density 1, recall 1, error 0), the JSON holds them and the in-prefill runs, bad
specs are one line and exit 2 before any model run."""

from __future__ import annotations

import json

import pytest
import torch

from analysis.prefill_sparse import PSA, VerticalSlash, XAttention, parse_spec
from app.cli import main
from probes.errors import KvlensError


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_prefill_sparse_prints_a_row_per_config(smol, tmp_path, capsys):
    out = tmp_path / "prefill.json"
    code = main(
        ["prefill-sparse", "--task", "niah", "--length", "128", "--layers", "0,7",
         "--methods", "xattention:block=16,threshold=1.0,vertical_slash:vertical=8,slash=8",
         "--answer", "--max-new-tokens", "2", "--device", "cpu", "--json", str(out)]
    )  # fmt: skip
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0].split(":")[0]: line.split() for line in lines[2:4]}
    assert set(rows) == {"xattention", "vertical_slash"}
    assert rows["xattention"][1:5] == ["1.000", "1.000", "1.000", "0.000"]
    assert float(rows["vertical_slash"][1]) < 1
    data = json.loads(out.read_text())
    assert data["settings"]["layers"] == [0, 7] and len(data["masks"]) == 2
    dense = data["runs"][0]
    assert dense["kl_mean"] < 1e-6 and dense["top1"] == 1.0


def test_specs_parse_with_defaults():
    assert parse_spec("xattention:threshold=0.8") == XAttention(threshold=0.8)
    assert parse_spec("vertical_slash:vertical=5") == VerticalSlash(vertical=5)
    assert parse_spec("psa:thresholds=0.5/0.9,block=32") == PSA(block=32, thresholds=(0.5, 0.9))
    with pytest.raises(KvlensError, match="one of xattention"):
        parse_spec("quest:budget=3")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("xattention:budget=3", "'budget=3' is not one of its parameters"),
        ("psa:thresholds=a/b", "is not a number"),
        ("vertical_slash:slash=0", "slash must be >= 1"),
    ],
)
def test_bad_specs_are_one_line_and_exit_2(spec, message, capsys):
    assert main(["prefill-sparse", "--prompt", "hello", "--methods", spec]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
