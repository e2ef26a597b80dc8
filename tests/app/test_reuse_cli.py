"""`kvlens reuse` in process on the real SmolLM2: the table has a row per method with its
recomputed share and FLOPs saved, recomputing everything matches the full prefill, the JSON
holds what the table shows and the deviation per layer; bad input is one line and exit 2
before the model loads."""

from __future__ import annotations

import json

import pytest
import torch

from app.cli import main


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # short prompts on a shared CPU: one thread is faster
    yield
    torch.set_num_threads(before)


def test_reuse_prints_a_row_per_method_and_writes_json(smol, tmp_path, capsys):
    out = tmp_path / "reuse.json"
    code = main(
        ["reuse", "--task", "rag", "--two-hop", "--chunks", "3", "--chunk-tokens", "40",
         "--max-new-tokens", "3", "--methods", "full,naive,cacheblend:recompute=1,kvcomm",
         "--json", str(out)]
    )  # fmt: skip
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("twohop: 3 chunks")
    rows = {line.split()[0].split(":")[0]: line.split() for line in lines[2:6]}
    assert set(rows) == {"full", "naive", "cacheblend", "kvcomm"}
    assert rows["full"][2] == "0.0000" and rows["full"][4] == "100.0%"
    assert rows["naive"][4] == "0.0%" and float(rows["naive"][5].rstrip("%")) > 50
    assert rows["cacheblend"][4] == "100.0%" and rows["cacheblend"][3] == "1.00"
    data = json.loads(out.read_text())
    assert data["settings"]["kind"] == "twohop" and len(data["settings"]["answer_chunks"]) == 2
    by_spec = {r["spec"].split(":")[0]: r for r in data["results"]}
    assert by_spec["cacheblend"]["kl_max"] < 1e-3
    assert by_spec["naive"]["kl_mean"] == pytest.approx(float(rows["naive"][2]), abs=1e-4)
    dev = {k.split(":")[0]: v for k, v in data["deviation"].items()}
    assert dev["cacheblend"]["value_rel"] < 1e-3 < dev["naive"]["value_rel"]
    assert len(dev["naive"]["per_layer"]) == 30


@pytest.mark.parametrize(
    "args, message",
    [
        (["--methods", "full,blend"], "unknown reuse method 'blend'"),
        (["--methods", "cacheblend:recompute=2"], "recompute must be in [0, 1]"),
        (["--chunks", "0"], "rag: chunks must be in 1.."),
        (["--two-hop", "--chunks", "1"], "twohop: chunks must be in 2.."),
        (["--chunk-tokens", "8"], "chunk tokens must be >= 32"),
        (["--task", "niah"], "--task must be rag"),
        (["--rotation", "spin"], "--rotation must be one of delta, pre_rope"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    # a model that does not exist: any refusal after loading would name it instead
    assert main(["reuse", "--model", "/nonexistent/model", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kvlens: error: ") and message in err[0]
