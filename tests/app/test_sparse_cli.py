"""`kvlens sparse` in process: the table names every method with its recall, bytes and read,
the JSON holds what the table shows, bad input is one line and exit 2 before any model run."""

from __future__ import annotations

import json

import pytest

from app.cli import main


def test_sparse_prints_recall_and_bytes_per_method(smol, tmp_path, capsys):
    out = tmp_path / "sparse.json"
    code = main(
        ["sparse", "--task", "niah", "--length", "256", "--max-new-tokens", "3",
         "--methods", "oracle:budget=32,quest:budget=10000", "--json", str(out)]
    )  # fmt: skip
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0].split(":")[0]: line.split() for line in lines[2:5]}
    assert set(rows) == {"full", "oracle", "quest"}
    assert rows["quest"][3] == "1.000"  # every page read: recall 1
    data = json.loads(out.read_text())
    quest = next(r for r in data["runs"] if r["spec"].startswith("quest"))
    assert quest["recall"] == pytest.approx(1.0, abs=1e-5)
    assert quest["bytes_device"] > data["settings"]["full_bytes"]  # pages summarised too
    oracle = next(r for r in data["runs"] if r["spec"].startswith("oracle"))
    assert oracle["tokens_read"] == pytest.approx(32.0)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--methods", "quest:page=0"], "quest: page must be >= 1"),
        (["--methods", "snapkv:budget=32"], "snapkv is not a sparse method"),
        (["--methods", "quest", "--hard", "2"], "--hard must be in [0, 1]"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    assert main(["sparse", "--prompt", "hello", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"kvlens: error: {err[0][len('kvlens: error: ') :]}"] and message in err[0]
