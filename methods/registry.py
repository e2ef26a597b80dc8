"""The registry of methods by name, and the spec strings the CLI and the app share.

A spec is ``name`` or ``name:param=value,param=value``; ``full`` names the uncompressed
baseline. ``create("snapkv:budget=256,window=32")`` returns a validated method instance.
"""

from __future__ import annotations

import dataclasses
import typing

from methods.base import Method
from probes.errors import KvlensError

REGISTRY: dict[str, type[Method]] = {}
FULL = "full"


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add a method class to the registry under ``cls.name``."""
    if not cls.name or cls.name in REGISTRY or cls.name == FULL:
        raise ValueError(f"bad or duplicate method name {cls.name!r}")
    REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    import methods.eviction  # noqa: F401  (registers the eviction family)
    import methods.headaware  # noqa: F401
    import methods.lowrank  # noqa: F401
    import methods.merging  # noqa: F401
    import methods.quantization  # noqa: F401
    import methods.sparse  # noqa: F401


def available() -> dict[str, type[Method]]:
    _load_all()
    return dict(sorted(REGISTRY.items()))


def _convert(method: str, param: str, kind, text: str):
    kind = {"int": int, "float": float, "bool": bool, "str": str}.get(kind, kind)
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return kind(text)
    except (TypeError, ValueError):
        name = getattr(kind, "__name__", str(kind))
        raise KvlensError(f"{method}: parameter '{param}' must be {name}, not '{text}'") from None


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    spec = spec.strip()
    if not spec:
        raise KvlensError("empty method spec; e.g. snapkv:budget=128")
    name, _, rest = spec.partition(":")
    params: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise KvlensError(f"{name}: parameters are key=value, not '{part}'")
        params[key.strip()] = value.strip()
    return name.strip().lower(), params


def create(spec: str) -> Method | None:
    """A validated method from its spec string; ``None`` for ``full`` (no compression).
    ``first+second`` composes two methods (``methods.compose``: eviction, then quantisation)."""
    if "+" in spec:
        from methods.compose import compose

        parts = spec.split("+")
        if len(parts) != 2:
            raise KvlensError(f"compose two methods with one '+', not {len(parts)} in '{spec}'")
        return compose(create(parts[0]), create(parts[1]))
    name, params = parse_spec(spec)
    if name == FULL:
        if params:
            raise KvlensError("full takes no parameters")
        return None
    methods = available()
    if name not in methods:
        raise KvlensError(f"unknown method '{name}'; known: {FULL}, {', '.join(methods)}")
    cls = methods[name]
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, text in params.items():
        if key not in known:
            listed = ", ".join(sorted(known)) or "none"
            raise KvlensError(f"{name}: unknown parameter '{key}'; parameters: {listed}")
        values[key] = _convert(name, key, hints[key], text)
    return cls(**values)


def split_specs(text: str) -> list[str]:
    """Split ``"full,snapkv:budget=128,window=32,h2o:budget=64"`` into one spec per method.

    A comma starts a new spec only when the next part names a method (has no '=' before any
    ':'); in a composition ``snapkv:budget=64,window=8+kivi:bits=4`` the part
    ``window=8+kivi:bits=4`` continues the spec before it.
    """
    specs: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        head = part.split("+", 1)[0]
        if "=" in head and ":" not in head and specs:
            specs[-1] += "," + part
        else:
            specs.append(part)
    if not specs:
        raise KvlensError("no methods given; e.g. --methods full,snapkv:budget=128")
    return specs
