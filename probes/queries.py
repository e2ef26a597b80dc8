"""Post-RoPE queries of a prompt, beside the keys and values ``capture`` records.

``capture`` records keys and values but not queries. Prefill-side analyses (block-sparse
prefill masks: XAttention, MInference, PSA) need every query of every head, so this module
records them in the same forward pass: a forward hook on each layer's query projection
(``q_proj``, then the model's own ``q_norm`` where it has one) keeps the pre-RoPE queries, and
the model's rotary embedding (``base_model.rotary_emb``, standard rotate-half layout, partial
rotary dimensions pass unchanged) turns them at positions 0..T-1. The same rotation applied to
the captured pre-RoPE keys must reproduce the captured post-RoPE keys; ``capture_qkv`` checks
that per layer and refuses a model where it does not hold, so the queries are the ones the
model's attention saw. Hooks are installed once per model and inert unless this module's
context variable is set (per call, so two threads probing one cached model never mix).
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from probes.attention import _head_dim, attention_modules
from probes.capture import capture
from probes.errors import KvlensError
from probes.trace import Trace

_QUERIES: contextvars.ContextVar[dict[int, torch.Tensor] | None] = contextvars.ContextVar(
    "kvlens_queries", default=None
)
_WANTED: contextvars.ContextVar[frozenset[int] | None] = contextvars.ContextVar(
    "kvlens_queries_layers", default=None
)


@dataclass
class PromptQKV:
    """One prompt's attention inputs: per layer, queries [Hq, T, D], keys and values
    [Hkv, T, D] (post-RoPE, float32, CPU), the attention scale, and the trace they came with."""

    trace: Trace
    queries: dict[int, torch.Tensor]
    keys: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]
    scale: float

    @property
    def layers(self) -> list[int]:
        return sorted(self.queries)


def _install_query_hooks(model: torch.nn.Module) -> None:
    if getattr(model, "_kvlens_query_hooked", False):
        return
    mods = attention_modules(model)
    if not mods or not all(hasattr(m, "q_proj") for m in mods):
        raise KvlensError(
            f"{type(model).__name__} has no per-layer q_proj kvlens can hook for queries"
        )
    for attn in mods:
        attn.q_proj.register_forward_hook(_make_query_hook(attn))
    model._kvlens_query_hooked = True


def _make_query_hook(attn: torch.nn.Module):
    layer, head_dim = attn.layer_idx, _head_dim(attn)
    q_norm = getattr(attn, "q_norm", None)
    norm_size = getattr(getattr(q_norm, "weight", None), "numel", lambda: head_dim)()
    whole = q_norm is not None and norm_size != head_dim

    def hook(_mod, _inp, out):
        store = _QUERIES.get()
        wanted = _WANTED.get()
        if store is None or (wanted is not None and layer not in wanted):
            return
        with torch.no_grad():
            t = out[0]  # first sequence: [T, Hq * D]
            if whole:
                t = q_norm(t)
            t = t.reshape(t.shape[0], -1, head_dim)
            if q_norm is not None and not whole:
                t = q_norm(t)
        store[layer] = t.transpose(0, 1).detach().float().cpu().contiguous()

    return hook


def rotate(model, x: torch.Tensor, layer: int) -> torch.Tensor:
    """Apply the model's RoPE to ``x`` [H, T, D] at positions 0..T-1 (float32)."""
    rotary = getattr(model.base_model, "rotary_emb", None)
    if rotary is None:
        raise KvlensError(f"{type(model).__name__} has no rotary embedding (base_model.rotary_emb)")
    positions = torch.arange(x.shape[1])[None]
    args = [x[:1].float(), positions]
    if "layer_type" in inspect.signature(type(rotary).forward).parameters:
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
        types = getattr(cfg or model.config, "layer_types", None)
        if types is not None:
            args.append(types[layer])
    device = next(rotary.parameters(), None)
    dev = device.device if device is not None else torch.device("cpu")
    with torch.no_grad():
        cos, sin = rotary(*[a.to(dev) if torch.is_tensor(a) else a for a in args])
    cos, sin = cos[0].float().cpu(), sin[0].float().cpu()  # [T, r]
    r = cos.shape[-1]
    rot, rest = x[..., :r].float(), x[..., r:].float()
    a, b = rot.chunk(2, dim=-1)
    turned = rot * cos + torch.cat([-b, a], dim=-1) * sin
    return torch.cat([turned, rest], dim=-1)


def capture_qkv(
    model,
    tokenizer,
    text_or_ids: str | Sequence[int] | torch.Tensor,
    *,
    layers: Sequence[int] | None = None,
    chat: bool = False,
    atol: float = 1e-3,
) -> PromptQKV:
    """One forward pass of the prompt recording post-RoPE queries, keys and values.

    Checks, per layer, that the RoPE used for the queries turns the captured pre-RoPE keys
    into the captured post-RoPE keys (relative error below ``atol``); refuses otherwise.
    """
    _install_query_hooks(model)
    store: dict[int, torch.Tensor] = {}
    t1 = _QUERIES.set(store)
    t2 = _WANTED.set(None if layers is None else frozenset(int(x) for x in layers))
    try:
        trace = capture(model, tokenizer, text_or_ids, attention="none", kv=True, layers=layers)
    finally:
        _QUERIES.reset(t1)
        _WANTED.reset(t2)
    mods = {m.layer_idx: m for m in attention_modules(model)}
    queries, keys, values = {}, {}, {}
    scale = None
    for layer in sorted(store):
        key = trace.key(layer).float()
        turned = rotate(model, trace.key_pre_rope(layer).float(), layer)
        err = float((turned - key).norm() / key.norm().clamp(min=1e-12))
        if err > atol:
            raise KvlensError(
                f"layer {layer}: the rotary embedding kvlens applies does not reproduce the "
                f"model's post-RoPE keys (relative error {err:.2e}); queries would be wrong"
            )
        queries[layer] = rotate(model, store[layer], layer)
        keys[layer], values[layer] = key, trace.value(layer).float()
        s = float(getattr(mods[layer], "scaling", _head_dim(mods[layer]) ** -0.5))
        if scale is not None and s != scale:
            raise KvlensError("layers with different attention scales are not supported")
        scale = s
    if scale is None:
        raise KvlensError("no queries were recorded")
    return PromptQKV(trace, queries, keys, values, scale)
