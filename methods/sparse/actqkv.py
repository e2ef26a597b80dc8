"""ActQKV (Xiao et al. 2025, "Activation-aware Probe-Query: Effective Key-Value Retrieval for
Long-Context LLMs Inference").

The whole cache is kept; each decoding step retrieves the KV pairs a *probe query* scores
best, instead of scoring with the step's own query alone. The probe is built from a window of
the ``window`` most recent queries (the prompt's last queries after the prefill, then each
decoding step's query appended, the current one included), weighted by their *activation
bias*: per query head, a query's mean absolute z-score over the channels against the window
(|q_i - mean| / std, channel-wise, averaged over the head dimension), so queries whose
activations stand out of the window weigh more. The probe of query head h is
sum_i w_i q_i with w_i = bias_i / sum_j bias_j (uniform when every bias is 0, e.g. a window of
one query). It scores every key: softmax(probe . k * scale) per query head, pooled over the
KV group (``pool``); the ``local`` newest tokens are always read, and the best other keys
fill the ``budget`` of each KV head.

Departures, stated: the paper defines its activation bias on the queries of each context
window and builds the probe at prefill for block-level retrieval over an offloaded memory
(InfLLM-style units); kvlens scores single tokens over the kept cache, keeps the window
sliding through decoding, and uses the z-score form of the bias above (the abstract names the
indicator, not its formula). The paper's dynamic, per-layer KV cut-off by information density
is not implemented: every layer reads ``budget`` tokens per KV head.

Held: the whole cache plus the probe window [Hq, W, D] (16 bits). Choosing reads every key
(one probe score per key), as the oracle's does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.base import Selection, require
from methods.memory import held_bytes
from methods.registry import register
from methods.sparse.base import POOLS, SparseMethod, every_row, pool_group, top_with


def activation_bias(window: torch.Tensor) -> torch.Tensor:
    """Per query head and window query, the mean absolute channel z-score [H, W] of
    ``window`` [H, W, D] against the window's own mean and (population) std."""
    w = window.float()
    mean = w.mean(1, keepdim=True)
    std = w.std(1, unbiased=False, keepdim=True)
    z = (w - mean).abs() / std.clamp(min=1e-6)
    return z.mean(-1)


def probe_query(window: torch.Tensor) -> torch.Tensor:
    """The probe query [H, D] of each head: its window's queries [H, W, D] weighted by their
    activation bias (bias / sum of biases; uniform where every bias is 0)."""
    bias = activation_bias(window)  # [H, W]
    total = bias.sum(-1, keepdim=True)
    uniform = torch.full_like(bias, 1.0 / bias.shape[-1])
    weights = torch.where(total > 0, bias / total.clamp(min=1e-30), uniform)
    return (weights[..., None] * window.float()).sum(1)


@register
@dataclass
class ActQKV(SparseMethod):
    window: int = 16
    local: int = 16
    pool: str = "mean"

    name: ClassVar[str] = "actqkv"
    paper: ClassVar[str] = (
        "Xiao et al. 2025, Activation-aware Probe-Query: Effective Key-Value Retrieval for "
        "Long-Context LLMs Inference"
    )
    summary: ClassVar[str] = (
        "a probe query from recent queries weighted by activation bias picks the keys"
    )

    def validate(self) -> None:
        super().validate()
        require(self.window >= 1, self.name, f"window must be >= 1 query, got {self.window}")
        require(self.local >= 0, self.name, f"local must be >= 0 tokens, got {self.local}")
        require(
            self.local <= self.budget,
            self.name,
            f"local={self.local} must be <= budget={self.budget} (the newest are always read)",
        )
        require(self.pool in POOLS, self.name, f"pool must be max or mean, not '{self.pool}'")

    def observation_window(self) -> int:
        return self.window

    def _push(self, store, queries: torch.Tensor) -> None:
        """Append ``queries`` [Hq, n, D] to the probe window, keeping the newest ``window``."""
        old = store.meta.get("probe_window")
        if old is not None:
            queries = torch.cat([old, queries.to(old.dtype)], 1)
        store.meta["probe_window"] = queries[:, -self.window :].clone()

    def extend(self, store, obs) -> None:
        """A call with its queries (prefill, a later prompt, a layer that cannot select):
        they join the window. Selecting steps push their query in ``choose``."""
        if obs is not None and obs.window_queries is not None:
            self._push(
                store, torch.cat([q.to(store.dense_keys().dtype) for q in obs.window_queries])
            )

    def choose(self, store, step) -> Selection:
        keys = store.dense_keys()  # [Hkv, L, D]
        self._push(store, step.query[:, None].to(keys.dtype))
        n = keys.shape[1]
        if self.budget >= n:
            return every_row(store)
        probe = probe_query(store.meta["probe_window"])  # [Hq, D]
        q = probe.reshape(store.n_heads, step.group, -1)
        probs = torch.softmax(q @ keys.float().transpose(1, 2) * step.scale, dim=-1)
        pooled = pool_group(probs.reshape(-1, n), step.group, self.pool)
        newest = torch.zeros(n, dtype=torch.bool, device=keys.device)
        if self.local:
            newest[-self.local :] = True
        pages = [top_with(pooled[h], self.budget, newest) for h in range(store.n_heads)]
        select = held_bytes(keys, store.meta["probe_window"])
        return Selection(pages, page_size=1, select_bytes=select)
