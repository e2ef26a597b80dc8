"""RazorAttention (Tang et al., 2024, "RazorAttention: Efficient KV Cache Compression Through
Retrieval Heads").

A small set of heads retrieves from anywhere in the context: they keep every token. All other
heads keep the first ``sinks`` tokens, the ``recent`` newest, and one compensation token: the
mean key and value of everything they evicted, so the attention those tokens drew still has
somewhere to go. Heads are ranked by echo + induction score (RazorAttention's criterion),
measured on the fly on repeated random tokens (``analysis.retrieval_heads``), or read from a
saved ``kvlens retrieval-heads`` / ``kvlens heads`` table (``scores=PATH``). The top ``heads``
fraction of query heads is protected; a KV head is protected when any of its query heads is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import polars as pl
import torch

from methods.base import Method, require
from methods.registry import register
from probes.errors import KvlensError

_SCORE_CACHE: dict[tuple, pl.DataFrame] = {}


def head_scores(model, path: str, column: str) -> pl.DataFrame:
    """(layer, head, score) from a saved table, or echo + induction measured now (cached)."""
    if path:
        try:
            df = pl.read_parquet(path)
        except Exception as exc:
            raise KvlensError(
                f"scores {path}: not a readable parquet file ({exc.__class__.__name__})"
            ) from None
        if column == "echo+induction" and {"echo", "induction"} <= set(df.columns):
            return df.select("layer", "head", (pl.col("echo") + pl.col("induction")).alias("score"))
        if column in df.columns:
            return df.select("layer", "head", pl.col(column).alias("score"))
        raise KvlensError(f"scores {path}: needs columns layer, head and {column}")
    key = (id(model), column)
    if key not in _SCORE_CACHE:
        from analysis.retrieval_heads import echo_induction_scores
        from probes.capture import capture
        from probes.tasks import repeated_random_tokens

        ids, offset = repeated_random_tokens(64, model.config.vocab_size, seed=0)
        trace = capture(model, None, ids, attention="full", kv=False)
        scores = echo_induction_scores(trace, offset, 64)
        _SCORE_CACHE[key] = scores.select(
            "layer", "head", (pl.col("echo") + pl.col("induction")).alias("score")
        )
    return _SCORE_CACHE[key]


@register
@dataclass
class RazorAttention(Method):
    heads: float = 0.15
    sinks: int = 4
    recent: int = 64
    scores: str = ""

    name: ClassVar[str] = "razor"
    family: ClassVar[str] = "head-aware"
    paper: ClassVar[str] = "Tang et al. 2024, RazorAttention: Retrieval Heads"
    summary: ClassVar[str] = (
        "retrieval heads keep all; others sinks + recent + a compensation token"
    )
    compensation: ClassVar[bool] = True
    score_column: ClassVar[str] = "echo+induction"

    def validate(self) -> None:
        require(
            0.0 <= self.heads <= 1.0,
            self.name,
            f"heads must be a fraction in [0, 1], got {self.heads}",
        )
        require(self.sinks >= 0, self.name, f"sinks must be >= 0, got {self.sinks}")
        require(self.recent >= 1, self.name, f"recent must be >= 1, got {self.recent}")

    def _column(self) -> str:
        return self.score_column

    def setup(self, model) -> None:
        df = head_scores(model, self.scores, self._column())
        n_heads = model.config.num_attention_heads
        group = n_heads // (getattr(model.config, "num_key_value_heads", None) or n_heads)
        n_keep = round(self.heads * df.height)
        top = df.sort("score", descending=True).head(n_keep)
        self.protected_kv = {
            (int(r["layer"]), int(r["head"]) // group) for r in top.iter_rows(named=True)
        }

    def compress(self, store, obs) -> None:
        for h in range(len(obs.positions)):
            if (obs.layer, h) in self.protected_kv:
                continue
            self._window(store, obs, h)

    def _window(self, store, obs, h: int) -> None:
        pos = obs.positions[h]
        comp = (
            store.aux_state("compensation")[h] > 0
            if self.compensation
            else torch.zeros_like(pos, dtype=torch.bool)
        )
        keep = (pos < self.sinks) | (pos >= obs.n_seen - self.recent) | comp
        if keep.all():
            return
        evicted = ~keep
        if self.compensation:
            counts = store.aux["compensation"][h]
            k, v = store.keys[h].float(), store.values[h].float()
            if comp.any():
                c = counts[comp]
                total = c + evicted.sum()
                idx = comp.nonzero().squeeze(1)
                store.keys[h][idx] = (
                    (k[comp] * c[:, None] + k[evicted].sum(0)) / total[:, None]
                ).to(k.dtype)
                store.values[h][idx] = (
                    (v[comp] * c[:, None] + v[evicted].sum(0)) / total[:, None]
                ).to(v.dtype)
                counts[idx] = total
            else:  # turn the newest evicted token into the compensation token
                idx = evicted.nonzero().squeeze(1)[-1]
                n = evicted.sum().float()
                store.keys[h][idx] = (k[evicted].sum(0) / n).to(k.dtype)
                store.values[h][idx] = (v[evicted].sum(0) / n).to(v.dtype)
                counts[idx] = n
                keep[idx] = True
        store.keep(h, keep.nonzero().squeeze(1))


@register
@dataclass
class DuoAttention(RazorAttention):
    name: ClassVar[str] = "duo"
    paper: ClassVar[str] = "Xiao et al. 2024, DuoAttention: Retrieval and Streaming Heads"
    summary: ClassVar[str] = "retrieval heads keep all; streaming heads keep sinks + recent"
    compensation: ClassVar[bool] = False
    score_column: ClassVar[str] = "retrieval"

    def _column(self) -> str:
        # without a saved retrieval-score table, fall back to echo + induction
        return "retrieval" if self.scores else "echo+induction"
