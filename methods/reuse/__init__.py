"""Chunk-cache reuse: per-chunk caches reused at new positions (CacheBlend, Cache-Craft,
KVCOMM). These methods change how a prompt is prefilled, not what a cache keeps, so they are
not compression methods of ``methods.registry`` (whose caches ``compare``/``sweep`` run): they
have this registry of their own, with the same spec grammar (``cacheblend:recompute=0.15``)."""

from __future__ import annotations

import dataclasses
import typing

from methods.registry import FULL, _convert, parse_spec
from methods.reuse.base import ReuseMethod
from methods.reuse.cacheblend import CacheBlend
from methods.reuse.cachecraft import CacheCraft
from methods.reuse.kvcomm import KVComm
from methods.reuse.naive import NaiveReuse
from probes.errors import KvlensError

REUSE_METHODS: dict[str, type[ReuseMethod]] = {
    c.name: c for c in (NaiveReuse, CacheBlend, CacheCraft, KVComm)
}


def create_reuse(spec: str) -> ReuseMethod | None:
    """A validated reuse method from its spec; None for ``full`` (the full prefill)."""
    name, params = parse_spec(spec)
    if name == FULL:
        if params:
            raise KvlensError("full takes no parameters")
        return None
    if name not in REUSE_METHODS:
        raise KvlensError(
            f"unknown reuse method '{name}'; known: {FULL}, {', '.join(REUSE_METHODS)}"
        )
    cls = REUSE_METHODS[name]
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, text in params.items():
        if key not in known:
            listed = ", ".join(sorted(known)) or "none"
            raise KvlensError(f"{name}: unknown parameter '{key}'; parameters: {listed}")
        values[key] = _convert(name, key, hints[key], text)
    return cls(**values)
