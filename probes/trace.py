"""The Trace: everything one probe captured, in one object, named one way everywhere.

Tensor names follow one scheme, shared by the Trace, the safetensors file, the tables and
the app: ``layers.{l}.key_pre_rope``, ``layers.{l}.key``, ``layers.{l}.value`` (each
[kv_heads, T, head_dim]) and ``layers.{l}.attn`` ([heads, T, T], only where full maps were
captured). Statistics are long polars tables: ``key_stats`` (one row per layer, query head
and key position) and ``query_stats`` (one row per layer, query head and query position),
both over the prompt. A probe in generate mode adds ``step_stats``: for each decoding step,
the attention row of the query that *produces* a generated token, over every position it can
see (one row per step, layer, head, position); its tokens then cover the prompt plus the
generated tokens.

Decoding steps, one convention everywhere: with a prompt of n tokens and M generated tokens,
step s (0 <= s < M) is the query at position n - 1 + s. It was fed token ``token_ids[n-1+s]``
(the prompt's last token at step 0) and produced ``token_ids[n+s]``, generated token s.
``Trace.decode_steps()`` lists these per step; retrieval scores, persistence and the X-ray
all read steps this way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import torch

from probes.models import ModelFacts

KEY_STATS_SCHEMA = {
    "layer": pl.Int16,
    "head": pl.Int16,
    "kv_head": pl.Int16,
    "position": pl.Int32,
    "received": pl.Float32,
    "received_norm": pl.Float32,
    "window": pl.Float32,
}
QUERY_STATS_SCHEMA = {
    "layer": pl.Int16,
    "head": pl.Int16,
    "kv_head": pl.Int16,
    "position": pl.Int32,
    "entropy": pl.Float32,
    "sink_mass": pl.Float32,
    "max_prob": pl.Float32,
    "mean_distance": pl.Float32,
    "local_mass": pl.Float32,
    "lse": pl.Float32,
}
STEP_STATS_SCHEMA = {
    "step": pl.Int32,
    "layer": pl.Int16,
    "head": pl.Int16,
    "kv_head": pl.Int16,
    "position": pl.Int32,
    "attention": pl.Float32,
}
TENSOR_KINDS = ("key_pre_rope", "key", "value", "attn")


def tensor_name(layer: int, kind: str) -> str:
    if kind not in TENSOR_KINDS:
        raise ValueError(f"unknown tensor kind {kind!r}; one of {TENSOR_KINDS}")
    return f"layers.{layer}.{kind}"


@dataclass
class Trace:
    """One captured forward pass: tokens, model facts, K/V per layer, attention statistics."""

    model: ModelFacts
    prompt: str
    token_ids: list[int]
    tokens: list[str]
    settings: dict
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    key_stats: pl.DataFrame | None = None
    query_stats: pl.DataFrame | None = None
    step_stats: pl.DataFrame | None = None
    timings: dict = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def n_prompt_tokens(self) -> int:
        return int(self.settings.get("n_prompt_tokens", self.n_tokens))

    @property
    def layers(self) -> list[int]:
        """Layers with any captured tensor or statistic, ascending."""
        found = {int(name.split(".")[1]) for name in self.tensors}
        if self.key_stats is not None and self.key_stats.height:
            found |= set(self.key_stats["layer"].unique().to_list())
        return sorted(found)

    def decode_steps(self) -> pl.DataFrame:
        """One row per decoding step: the query's position, the token it was fed and the token
        it produced (ids and text). Empty for a trace without generated tokens."""
        n = self.n_prompt_tokens
        steps = list(range(self.n_tokens - n))
        return pl.DataFrame(
            {
                "step": steps,
                "query_position": [n - 1 + s for s in steps],
                "fed": [self.token_ids[n - 1 + s] for s in steps],
                "produced": [self.token_ids[n + s] for s in steps],
                "fed_text": [self.tokens[n - 1 + s] for s in steps],
                "produced_text": [self.tokens[n + s] for s in steps],
            },
            schema={
                "step": pl.Int32,
                "query_position": pl.Int32,
                "fed": pl.Int64,
                "produced": pl.Int64,
                "fed_text": pl.String,
                "produced_text": pl.String,
            },
        )

    def tensor(self, layer: int, kind: str) -> torch.Tensor:
        name = tensor_name(layer, kind)
        if name not in self.tensors:
            from probes.errors import KvlensError

            if kind == "key_pre_rope" and not self.model.pre_rope_keys:
                raise KvlensError(
                    f"{self.model.architecture} has no key projection kvlens can hook (k_proj "
                    "or a known fused qkv), so this trace has no pre-RoPE keys; post-RoPE keys "
                    "are in 'key'"
                )
            raise KvlensError(f"this trace has no {name} (captured layers: {self.layers})")
        return self.tensors[name]

    def key(self, layer: int) -> torch.Tensor:
        return self.tensor(layer, "key")

    def key_pre_rope(self, layer: int) -> torch.Tensor:
        return self.tensor(layer, "key_pre_rope")

    def value(self, layer: int) -> torch.Tensor:
        return self.tensor(layer, "value")

    def attn(self, layer: int) -> torch.Tensor:
        return self.tensor(layer, "attn")

    def save(self, folder: str | Path) -> Path:
        from probes.dump import write_dump

        return write_dump(self, folder)

    @classmethod
    def load(cls, folder: str | Path) -> Trace:
        from probes.dump import read_dump

        return read_dump(folder)
