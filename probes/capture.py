"""Capture: run one forward pass with kvlens recording, and return a Trace.

``attention`` chooses what is recorded about attention:
  ``none``   nothing (keys/values only, if ``kv``);
  ``stats``  blockwise statistics (O(T) memory per head), never the T x T maps;
  ``full``   statistics plus the full probability maps (float16) of the chosen layers;
  ``auto``   ``full`` when T <= 1024 and the maps fit in ``max_map_bytes``, else ``stats``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import polars as pl
import torch
from transformers import DynamicCache

from probes.attention import Recorder, recording
from probes.compat import cache_arg
from probes.errors import KvlensError
from probes.models import model_facts
from probes.resources import check_fits, estimate_probe_bytes
from probes.trace import (
    KEY_STATS_SCHEMA,
    QUERY_STATS_SCHEMA,
    STEP_STATS_SCHEMA,
    Trace,
    tensor_name,
)

ATTENTION_MODES = ("auto", "full", "stats", "none")
AUTO_FULL_MAX_TOKENS = 1024
DEFAULT_MAX_MAP_BYTES = 512 * 2**20


def tokenize(
    tokenizer, text_or_ids: str | Sequence[int] | torch.Tensor, chat: bool = False
) -> list[int]:
    """Token ids of a prompt (a string, or ids given directly); refuses an empty prompt."""
    if isinstance(text_or_ids, str):
        if not text_or_ids.strip():
            raise KvlensError("the prompt is empty; give some text")
        if chat:
            messages = [{"role": "user", "content": text_or_ids}]
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
        else:
            ids = tokenizer(text_or_ids, add_special_tokens=True)["input_ids"]
    elif isinstance(text_or_ids, torch.Tensor):
        ids = text_or_ids.reshape(-1).tolist()
    else:
        ids = list(text_or_ids)
    if len(ids) == 0:
        raise KvlensError("the prompt is empty; give some text")
    return [int(i) for i in ids]


def check_length(n_tokens: int, max_positions: int) -> None:
    if max_positions and n_tokens > max_positions:
        raise KvlensError(
            f"the prompt has {n_tokens} tokens but the model allows at most {max_positions}; "
            "shorten it"
        )


def _parse_layers(layers: Sequence[int] | None, n_layers: int) -> frozenset[int] | None:
    if layers is None:
        return None
    chosen = frozenset(int(x) for x in layers)
    bad = sorted(x for x in chosen if not 0 <= x < n_layers)
    if bad or not chosen:
        raise KvlensError(f"layers must be in 0..{n_layers - 1}, got {sorted(chosen) or 'none'}")
    return chosen


def capture(
    model,
    tokenizer,
    text_or_ids: str | Sequence[int] | torch.Tensor,
    *,
    attention: str = "auto",
    kv: bool = True,
    layers: Sequence[int] | None = None,
    window: int = 32,
    sinks: int = 4,
    chat: bool = False,
    max_map_bytes: int = DEFAULT_MAX_MAP_BYTES,
    generate: int = 0,
    forced: Sequence[int] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Trace:
    """Run the prompt through ``model`` once and return what was recorded as a Trace.

    ``generate=M`` then decodes M tokens greedily, recording each step's attention row
    (``step_stats``) and extending keys/values over the generated tokens. Step s is the query
    that *produces* generated token s: step 0 is the prompt's last query, step s >= 1 the query
    of generated token s-1 (``Trace.decode_steps()`` lists which token each step fed and
    produced). ``forced`` feeds these tokens instead of the greedy ones (teacher forcing;
    ``generate`` becomes their count).
    ``progress`` is called with the layer index as each layer's attention finishes
    (``n_layers * (1 + generate)`` calls in all).
    """
    t_start = time.perf_counter()
    if attention not in ATTENTION_MODES:
        raise KvlensError(
            f"attention must be one of {', '.join(ATTENTION_MODES)}, not '{attention}'"
        )
    if window < 1:
        raise KvlensError(f"window must be >= 1 (the last W queries), got {window}")
    if sinks < 0:
        raise KvlensError(f"sinks must be >= 0, got {sinks}")
    if forced is not None:
        forced = [int(t) for t in forced]
        generate = len(forced)
    if generate < 0:
        raise KvlensError(f"generate must be >= 0 tokens, got {generate}")
    facts = model_facts(model)
    ids = tokenize(tokenizer, text_or_ids, chat=chat)
    check_length(len(ids) + generate, facts.max_positions)
    chosen = _parse_layers(layers, facts.n_layers)
    n_rec_layers = facts.n_layers if chosen is None else len(chosen)
    n = len(ids)
    map_bytes = n_rec_layers * facts.n_heads * n * n * 2
    if attention == "auto":
        attention = "full" if n <= AUTO_FULL_MAX_TOKENS and map_bytes <= max_map_bytes else "stats"
    device = next(model.parameters()).device
    need = estimate_probe_bytes(
        facts,
        n,
        attention=attention,
        kv=kv,
        n_layers=n_rec_layers,
        generate=generate,
        hidden=getattr(model.config, "hidden_size", None),
    )
    suggestion = (
        "try --attention stats instead of full maps, fewer --layers or a shorter prompt"
        if attention == "full"
        else "try fewer --layers, --no-kv or a shorter prompt"
    )
    check_fits(need, device, f"probing {n} tokens", suggestion)
    rec = Recorder(
        layers=chosen,
        kv=kv,
        stats=attention in ("stats", "full"),
        maps=attention == "full",
        window=window,
        sinks=sinks,
        on_layer=progress,
        steps=generate > 0,
    )
    input_ids = torch.tensor([ids], device=device)
    t_forward = time.perf_counter()
    generated: list[int] = []
    try:
        with torch.inference_mode(), recording(rec):
            cache = DynamicCache() if generate else None
            out = model(
                input_ids=input_ids,
                **cache_arg(model, cache),
                use_cache=bool(generate),
                logits_to_keep=1,
            )
            rec.phase = "decode"
            for step in range(1, generate + 1):
                token = forced[step - 1] if forced else int(out.logits[0, -1].argmax())
                generated.append(token)
                rec.step = step
                step_ids = torch.tensor([[token]], device=device)
                out = model(input_ids=step_ids, **cache_arg(model, cache), use_cache=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the forward time must include the kernels
    except (torch.OutOfMemoryError, MemoryError) as exc:
        raise KvlensError(
            f"out of memory probing {n} tokens ({exc.__class__.__name__}); try --attention stats, "
            "fewer --layers or a shorter prompt"
        ) from None
    except RuntimeError as exc:
        if "memory" not in str(exc).lower():
            raise
        raise KvlensError(
            f"out of memory probing {n} tokens; "
            "try --attention stats, fewer --layers or a shorter prompt"
        ) from None
    forward_s = time.perf_counter() - t_forward
    t_tables = time.perf_counter()
    tensors: dict[str, torch.Tensor] = {}
    for layer, t in rec.keys_pre_rope.items():
        tensors[tensor_name(layer, "key_pre_rope")] = t
    for layer, t in rec.keys.items():
        tensors[tensor_name(layer, "key")] = t
    for layer, t in rec.values.items():
        tensors[tensor_name(layer, "value")] = t
    for layer, st in rec.stats_by_layer.items():
        if st.probs is not None:
            tensors[tensor_name(layer, "attn")] = st.probs.to("cpu", torch.float16).contiguous()
    key_stats, query_stats, step_stats = (None, None, None)
    if rec.stats_by_layer:
        key_stats, query_stats = stats_tables(rec.stats_by_layer, facts.n_heads, facts.n_kv_heads)
    # the last call only extends keys/values: the token its query produces is not in the trace
    rows = [r for r in rec.step_rows if r[0] < generate]
    if rows:
        step_stats = step_table(rows, facts.n_heads, facts.n_kv_heads)
    tables_s = time.perf_counter() - t_tables
    settings = {
        "attention": attention,
        "kv": kv,
        "layers": sorted(chosen) if chosen is not None else None,
        "window": window,
        "sinks": sinks,
        "chat": chat,
        "device": str(device),
        "n_prompt_tokens": len(ids),
        "generate": generate,
    }
    all_ids = ids + generated
    return Trace(
        model=facts,
        prompt=text_or_ids if isinstance(text_or_ids, str) else _decode(tokenizer, ids),
        token_ids=all_ids,
        tokens=[_decode(tokenizer, [i]) for i in all_ids],
        settings=settings,
        tensors=tensors,
        key_stats=key_stats,
        query_stats=query_stats,
        step_stats=step_stats,
        timings={
            "forward_s": round(forward_s, 4),
            "tables_s": round(tables_s, 4),
            "total_s": round(time.perf_counter() - t_start, 4),
        },
    )


def _decode(tokenizer, ids: list[int]) -> str:
    """Token text; models without a tokenizer (random-weight benchmarks) show the ids."""
    if tokenizer is None:
        return " ".join(f"<{i}>" for i in ids)
    return tokenizer.decode(ids)


def stats_tables(
    stats_by_layer: dict, n_heads: int, n_kv_heads: int
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Turn per-layer AttentionStats into the long key and query tables of a Trace."""
    group = n_heads // n_kv_heads
    key_parts, query_parts = [], []
    for layer in sorted(stats_by_layer):
        st = stats_by_layer[layer]
        hq, tk = st.received.shape
        tq = st.lse.shape[1]
        heads = np.repeat(np.arange(hq), tk)
        positions = np.tile(np.arange(tk), hq)
        # a key at position k is seen by the queries at positions >= k (causal)
        seen_by = (tq - (positions - (tk - tq))).clip(min=1)
        received = st.received.float().cpu().numpy().reshape(-1)
        key_parts.append(
            pl.DataFrame(
                {
                    "layer": np.full(hq * tk, layer),
                    "head": heads,
                    "kv_head": heads // group,
                    "position": positions,
                    "received": received,
                    "received_norm": received / seen_by,
                    "window": st.window.float().cpu().numpy().reshape(-1),
                }
            )
        )
        qheads = np.repeat(np.arange(hq), tq)
        query_parts.append(
            pl.DataFrame(
                {
                    "layer": np.full(hq * tq, layer),
                    "head": qheads,
                    "kv_head": qheads // group,
                    "position": np.tile(np.arange(tk - tq, tk), hq),
                    "entropy": st.entropy.float().cpu().numpy().reshape(-1),
                    "sink_mass": st.sink_mass.float().cpu().numpy().reshape(-1),
                    "max_prob": st.max_prob.float().cpu().numpy().reshape(-1),
                    "mean_distance": st.mean_distance.float().cpu().numpy().reshape(-1),
                    "local_mass": st.local_mass.float().cpu().numpy().reshape(-1),
                    "lse": st.lse.float().cpu().numpy().reshape(-1),
                }
            )
        )
    keys = pl.concat(key_parts).cast(KEY_STATS_SCHEMA)
    queries = pl.concat(query_parts).cast(QUERY_STATS_SCHEMA)
    return keys, queries


def step_table(
    rows: list[tuple[int, int, torch.Tensor]], n_heads: int, n_kv_heads: int
) -> pl.DataFrame:
    """Decode-step attention rows [(step, layer, [Hq, Tk])] as the long ``step_stats`` table."""
    group = n_heads // n_kv_heads
    parts = []
    for step, layer, row in rows:
        hq, tk = row.shape
        heads = np.repeat(np.arange(hq), tk)
        parts.append(
            pl.DataFrame(
                {
                    "step": np.full(hq * tk, step),
                    "layer": np.full(hq * tk, layer),
                    "head": heads,
                    "kv_head": heads // group,
                    "position": np.tile(np.arange(tk), hq),
                    "attention": row.numpy().reshape(-1),
                }
            )
        )
    return pl.concat(parts).cast(STEP_STATS_SCHEMA)
