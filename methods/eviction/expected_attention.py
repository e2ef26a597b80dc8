"""Expected Attention (Devoto et al., 2025, "Expected Attention: KV Cache Compression by
Estimating Attention from Future Queries Distribution"; NVIDIA kvpress's ExpectedAttentionPress).

A key's worth is the attention it will draw from queries not seen yet. Model the next queries
as a Gaussian q ~ N(mu, Sigma) fitted to the recent ones; then the logit scale * q.k is
Gaussian too, and its exponential has a closed-form mean:

    E[exp(scale * q.k)] = exp(scale * mu.k + scale^2 * k^T Sigma k / 2)

(with scale = 1/sqrt(d) this is exp(mu.k/sqrt(d) + k^T Sigma k / (2d))). Normalised over the
head's keys it is the expected attention weight; times ||v|| (``vnorm``) it bounds the key's
expected contribution to the output. Each KV head keeps its ``budget`` highest.

How the future queries are modelled (each a documented choice):
- Statistics come from the last ``window`` queries of the prompt, made pre-RoPE by undoing
  their rotation at their own positions (RoPE is a rotation per channel pair, so this is
  exact), then fitted: mean and population covariance (``covariance=false`` drops Sigma).
  kvpress fits every query after its ``n_sink`` first: ``window`` = prompt length - sinks.
- The future is the next ``future`` positions: the fitted mean and covariance are carried
  there by the *average* RoPE rotation over those positions, R = mean_p R_p (mu -> R mu,
  Sigma -> R Sigma R^T), as kvpress does. The average of rotations is not a rotation: it
  shrinks fast-turning channel pairs, whose future phase is unknown, towards zero.
- Query heads of a KV group are scored separately and their expected attention weights
  averaged (kvlens's rule for every eviction score; kvpress 0.5.5 does the same).
- The first ``sinks`` tokens are always kept (kvpress's n_sink): attention sinks draw
  attention that no Gaussian of ordinary queries predicts. ``softmax=all`` (default)
  normalises each query head's expected attention over all keys, sinks included;
  ``softmax=after_sinks`` over the keys after the sinks, as kvpress does. Within one query
  head this only rescales; across a KV group it reweights the heads in the average
  (benchmarks/RESULTS.md, parity addendum of 2026-12-04).
It compresses once, after the prefill, and keeps every later token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.base import Observation, require
from methods.eviction.base import EvictionMethod
from methods.registry import register
from probes.errors import KvlensError

SOFTMAX = ("all", "after_sinks")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Invert x * cos + rotate_half(x) * sin (any RoPE amplitude scaling included)."""
    return (x * cos - rotate_half(x) * sin) / (cos * cos + sin * sin)


def mean_rotation(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """[D, D] average of the RoPE rotations whose cos/sin rows [F, D] are given."""
    c, s = cos.mean(0), sin.mean(0)
    eye = torch.eye(c.numel(), dtype=c.dtype, device=c.device)
    return (eye * c + rotate_half(eye) * s).T  # column j: the map applied to e_j


def expected_logits(
    keys: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """log E[exp(scale * q.k)] for q ~ N(mean, cov): keys [L, D], mean [G, D], cov [G, D, D]
    -> [G, L]."""
    logits = scale * mean @ keys.T
    if cov is not None:
        logits = logits + 0.5 * scale**2 * torch.einsum("ld,gde,le->gl", keys, cov, keys)
    return logits


@register
@dataclass
class ExpectedAttention(EvictionMethod):
    window: int = 64
    future: int = 512
    sinks: int = 4
    covariance: bool = True
    vnorm: bool = True
    softmax: str = "all"

    name: ClassVar[str] = "expected_attention"
    paper: ClassVar[str] = (
        "Devoto et al. 2025, Expected Attention: KV Cache Compression by Estimating Attention "
        "from Future Queries Distribution"
    )
    summary: ClassVar[str] = (
        "attention expected from a Gaussian of recent queries, RoPE-averaged over the next "
        "positions, times the value norm, at prefill (query-agnostic)"
    )
    decode_needs_attention: ClassVar[bool] = False

    def validate(self) -> None:
        super().validate()
        require(self.window >= 1, self.name, f"window must be >= 1 query, got {self.window}")
        require(self.future >= 1, self.name, f"future must be >= 1 position, got {self.future}")
        require(self.sinks >= 0, self.name, f"sinks must be >= 0, got {self.sinks}")
        require(
            self.softmax in SOFTMAX,
            self.name,
            f"softmax must be {' or '.join(SOFTMAX)}, not '{self.softmax}'",
        )

    def observation_window(self) -> int:
        return self.window

    def setup(self, model) -> None:
        rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
        if rotary is None:
            raise KvlensError(
                f"{self.name} needs a model with a standard rotary embedding "
                "(model.model.rotary_emb)"
            )
        self._rotary = rotary

    def _rope(self, positions: torch.Tensor, like: torch.Tensor):
        cos, sin = self._rotary(like[None].float(), positions[None].to(like.device))
        return cos[0].float(), sin[0].float()

    def protected(self, obs: Observation, head: int) -> torch.Tensor | None:
        return obs.positions[head] < self.sinks if self.sinks else None

    def scores(self, store, obs, head) -> torch.Tensor:
        q = obs.window_queries[head].float()  # [G, W, D] post-RoPE
        w = q.shape[1]
        seen = torch.arange(obs.n_seen - w, obs.n_seen)
        cos, sin = self._rope(seen, q[0])
        pre = unrotate(q, cos, sin)
        mean = pre.mean(1)  # [G, D]
        ahead = torch.arange(obs.n_seen, obs.n_seen + self.future)
        rot = mean_rotation(*self._rope(ahead, q[0]))
        mean = mean @ rot.T
        cov = None
        if self.covariance:
            centred = pre - pre.mean(1, keepdim=True)
            cov = centred.transpose(1, 2) @ centred / w  # [G, D, D]
            cov = rot @ cov @ rot.T
        logits = expected_logits(obs.keys[head].float(), mean, cov, obs.scale)
        sink = obs.positions[head] < self.sinks
        if self.softmax == "after_sinks" and not sink.all():  # sinks stay: protected
            logits = logits.masked_fill(sink.to(logits.device), float("-inf"))
        score = torch.softmax(logits, dim=-1).mean(0)
        if self.vnorm:
            score = score * store.values[head].float().norm(dim=-1)
        return score
