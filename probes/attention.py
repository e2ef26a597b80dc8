"""kvlens' attention function, registered with transformers' attention registry.

Every model kvlens loads runs ``attn_implementation="kvlens"``. The function computes the
attention output (SDPA when nothing is being recorded) and, while a probe is active in the
calling context, records post-RoPE keys, values and attention statistics for the layers the
probe asked for. Pre-RoPE keys come from forward hooks on each layer's key projection
(``k_proj``, or the key part of a fused ``qkv_proj`` / ``query_key_value``, followed by the
model's own ``k_norm`` where it has one), installed once per model and
inert unless a probe is active. Recording state lives in a ``ContextVar``, so two threads
(two app users) probing one cached model never see each other's recordings.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvlens_kernels.attention_stats import (
    AttentionStats,
    attention_stats_reference,
    attention_with_stats,
    decode_probs,
)

ATTN_NAME = "kvlens"


@dataclass
class Recorder:
    """What one probe call asked for, and what it has recorded so far (per layer)."""

    layers: frozenset[int] | None = None
    kv: bool = True
    stats: bool = True
    maps: bool = False
    window: int = 32
    sinks: int = 4
    local: int = 16
    on_layer: Callable[[int], None] | None = None
    phase: str = "prefill"  # or "decode": one new token per call, its attention row kept
    #: decoding follows: keep the prefill's last attention row too (step 0: the query that
    #: produces the first generated token)
    steps: bool = False
    step: int = 0
    #: record only the attention row of each step (step 0: the prompt's last query) and leave
    #: the output to the unrecorded path (SDPA), so a run under this recorder gives exactly the
    #: logits of a run without one: a model's own greedy run and its attention rows in one pass
    rows_only: bool = False
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    keys_pre_rope: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    stats_by_layer: dict[int, AttentionStats] = field(default_factory=dict)
    step_rows: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)

    def wants(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers


_RECORDER: contextvars.ContextVar[Recorder | None] = contextvars.ContextVar(
    "kvlens_recorder", default=None
)


def active_recorder() -> Recorder | None:
    return _RECORDER.get()


# A compressed cache layer hands itself over here from its ``update`` (called by the model
# right before attention); the attention function then lets that layer attend over its own
# compressed storage instead of dense keys. Any object with ``layer_idx`` and
# ``attend(query, key, value, scale=..., sliding_window=...)`` qualifies.
_PENDING_LAYER: contextvars.ContextVar[object | None] = contextvars.ContextVar(
    "kvlens_pending_layer", default=None
)


def hand_over(layer: object) -> None:
    """Called by a compressed cache layer's ``update``: attend through it on the next call."""
    _PENDING_LAYER.set(layer)


class recording:
    """Context manager: make ``recorder`` the active one for this thread/context."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self._token: contextvars.Token | None = None

    def __enter__(self) -> Recorder:
        self._token = _RECORDER.set(self.recorder)
        return self.recorder

    def __exit__(self, *exc) -> None:
        _RECORDER.reset(self._token)


def _to_cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True).contiguous()


def _sdpa(query, key, value, attention_mask, scaling, dropout):
    tq, tk = query.shape[2], key.shape[2]
    is_causal = False
    if attention_mask is None and tq > 1:
        if tq == tk:
            is_causal = True
        else:  # queries are the last tq positions: bottom-right aligned causal mask
            qpos = torch.arange(tk - tq, tk, device=query.device)[:, None]
            attention_mask = torch.arange(tk, device=query.device)[None, :] <= qpos
    group = query.shape[1] // key.shape[1]
    if group > 1 and attention_mask is not None:
        # SDPA's own GQA runs only in its flash kernels (no mask; on the CPU the numbers of
        # repeated heads, bit for bit: tests/probes/test_attention_gqa.py) and the math path:
        # with a mask the KV heads are repeated per query group, a copy of the cache
        key = key.repeat_interleave(group, dim=1)
        value = value.repeat_interleave(group, dim=1)
        group = 1
    return torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=is_causal,
        **({"enable_gqa": True} if group > 1 else {}),
    )


def kvlens_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The attention function transformers calls for every layer (shapes as it passes them).

    query [B, Hq, Tq, D]; key/value [B, Hkv, Tk, D] (GQA not yet repeated). Returns the
    output as [B, Tq, Hq, D], like transformers' own functions, and no weights.
    """
    layer = int(getattr(module, "layer_idx", -1))
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    pending = _PENDING_LAYER.get()
    if pending is not None:
        _PENDING_LAYER.set(None)
        if pending.layer_idx != layer:
            raise RuntimeError(
                f"compressed cache layer {pending.layer_idx} attended at layer {layer}"
            )
        output = pending.attend(
            query, key, value, scale=scale, sliding_window=sliding_window, softcap=softcap
        )
        return output.transpose(1, 2).contiguous(), None
    rec = _RECORDER.get()
    recording_here = rec is not None and rec.wants(layer)
    if recording_here and rec.kv:
        _append(rec.keys, layer, key[0], replace=True)
        _append(rec.values, layer, value[0], replace=True)
    rows_only = recording_here and rec.rows_only
    if rows_only:
        _record_row(rec, layer, query, key, value, attention_mask, scale, sliding_window, softcap)
    if recording_here and not rows_only and (rec.stats or rec.maps):
        if query.shape[0] != 1:
            raise ValueError("kvlens probes record one sequence at a time (batch size 1)")
        mask = None
        if attention_mask is not None:
            mask = attention_mask[0, 0] if attention_mask.dim() == 4 else attention_mask
        out, stats = attention_with_stats(
            query[0],
            key[0],
            value[0],
            scale=scale,
            window=rec.window,
            sinks=rec.sinks,
            local=rec.local,
            sliding_window=sliding_window if mask is None else None,
            mask=mask,
            want_probs=rec.maps and rec.phase == "prefill",
            softcap=softcap,
        )
        if rec.phase == "decode":
            rec.step_rows.append((rec.step, layer, _to_cpu(stats.received.float())))
        else:
            rec.stats_by_layer[layer] = stats
            if rec.steps:
                row = _last_query_row(
                    query[0], key[0], value[0], scale, mask, sliding_window, softcap
                )
                rec.step_rows.append((0, layer, _to_cpu(row)))
        output = out.unsqueeze(0)
    elif softcap is not None:  # soft-capped logits (Gemma 2): SDPA has no cap, use the exact path
        output = torch.stack(
            [
                _softcapped(query, key, value, attention_mask, b, scale, sliding_window, softcap)
                for b in range(query.shape[0])
            ]
        )
    else:
        output = _sdpa(query, key, value, attention_mask, scale, dropout)
    if rec is not None and rec.on_layer is not None:
        rec.on_layer(layer)
    return output.transpose(1, 2).contiguous(), None


def _softcapped(query, key, value, attention_mask, b, scale, sliding_window, softcap):
    """Attention output [Hq, Tq, D] of sequence ``b`` with soft-capped logits."""
    mask = None
    if attention_mask is not None:
        mask = attention_mask[b, 0] if attention_mask.dim() == 4 else attention_mask
    out, _ = attention_with_stats(
        query[b],
        key[b],
        value[b],
        scale=scale,
        sliding_window=sliding_window if mask is None else None,
        mask=mask,
        softcap=softcap,
    )
    return out


def _record_row(rec, layer, query, key, value, attention_mask, scale, sliding_window, softcap):
    """Rows-only recording: the attention row [Hq, Tk] of this call's last query, as step 0
    in the prefill and as ``rec.step`` while decoding."""
    if query.shape[0] != 1:
        raise ValueError("kvlens probes record one sequence at a time (batch size 1)")
    mask = None
    if attention_mask is not None:
        mask = attention_mask[0, 0] if attention_mask.dim() == 4 else attention_mask
    row = _last_query_row(query[0], key[0], value[0], scale, mask, sliding_window, softcap)
    rec.step_rows.append((rec.step if rec.phase == "decode" else 0, layer, _to_cpu(row)))


def _last_query_row(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None,
    sliding_window: int | None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention [Hq, Tk] of the call's last query: the row of decoding step 0 at the
    prefill, of the step itself while decoding. Without a mask or a sliding window that query
    sees every key: ``decode_probs`` (the reference's numbers, without its row statistics)."""
    if mask is None and sliding_window is None:
        return decode_probs(query[:, -1:], key, scale=scale, softcap=softcap)
    _, stats = attention_stats_reference(
        query[:, -1:],
        key,
        value,
        scale=scale,
        window=1,
        sliding_window=sliding_window if mask is None else None,
        mask=None if mask is None else mask[-1:],
        softcap=softcap,
    )
    return stats.received.float()


def _append(store: dict, layer: int, t: torch.Tensor, replace: bool = False) -> None:
    if replace or layer not in store:
        store[layer] = _to_cpu(t)
    else:
        store[layer] = torch.cat([store[layer], _to_cpu(t)], dim=-2)


def register_kvlens_attention() -> None:
    """Register the function and its mask builder under the name ``kvlens`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTN_NAME, kvlens_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention module of every layer, in layer order."""
    found = [m for m in model.modules() if hasattr(m, "layer_idx") and _key_source(m)]
    return sorted(found, key=lambda m: m.layer_idx)


def _head_dim(attn: torch.nn.Module) -> int:
    return int(getattr(attn, "head_dim", None) or attn.head_size)  # GPT-NeoX: head_size


def _key_source(attn: torch.nn.Module):
    """The module whose output holds the layer's pre-RoPE keys, and how to take them out of
    one sequence's output [T, F] as [T, Hkv * D]; None where there is no such module."""
    if hasattr(attn, "k_proj"):
        return attn.k_proj, lambda out: out
    if hasattr(attn, "qkv_proj") and hasattr(attn, "num_key_value_heads"):
        # Phi-3: [all queries | all keys | all values] along the features
        start = attn.config.num_attention_heads * _head_dim(attn)
        stop = start + attn.num_key_value_heads * _head_dim(attn)
        return attn.qkv_proj, lambda out: out[:, start:stop]
    if hasattr(attn, "query_key_value") and hasattr(attn, "head_size"):
        # GPT-NeoX: [query | key | value] within each head's 3 * D features
        d = attn.head_size
        return attn.query_key_value, lambda out: out.reshape(out.shape[0], -1, 3 * d)[
            ..., d : 2 * d
        ].reshape(out.shape[0], -1)
    return None


def install_key_hooks(model: torch.nn.Module) -> None:
    """Hook each layer's key projection (and key norm, if any) to record pre-RoPE keys."""
    if getattr(model, "_kvlens_hooked", False):
        return
    for attn in attention_modules(model):
        module, _ = _key_source(attn)
        module.register_forward_hook(_make_key_hook(attn))
    model._kvlens_hooked = True


def _make_key_hook(attn: torch.nn.Module):
    layer, head_dim = attn.layer_idx, _head_dim(attn)
    _, keys_of = _key_source(attn)
    key_norm = getattr(attn, "k_norm", None)  # a norm per token: applying it here is exact
    # per head (Qwen 3, Gemma 3) or over all KV heads' projection at once (OLMo 2)
    norm_size = getattr(getattr(key_norm, "weight", None), "numel", lambda: head_dim)()
    whole = key_norm is not None and norm_size != head_dim

    def hook(_mod, _inp, out):
        rec = _RECORDER.get()
        if rec is None or not rec.kv or not rec.wants(layer):
            return
        t = keys_of(out[0])  # first sequence: [T, Hkv * D]
        with torch.no_grad():
            if whole:
                t = key_norm(t)
            t = t.reshape(out.shape[1], -1, head_dim)  # [T, Hkv, D]
            if key_norm is not None and not whole:
                t = key_norm(t)
        _append(rec.keys_pre_rope, layer, t.transpose(0, 1), replace=rec.phase == "prefill")

    return hook
