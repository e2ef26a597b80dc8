"""Compatibility with the installed transformers: the one place that knows how a cache is passed.

transformers 5.24 renamed the KV-cache argument of every model's ``forward`` and of
``generate`` from ``past_key_values`` to ``cache`` (the old name warns, and is to be removed
in 5.40 for ``forward``, 6.0 for ``generate``); the model outputs carry it as ``.cache``.
kvlens supports releases on both sides of the rename, so every call that hands a cache to a
model goes through :func:`cache_arg` and every read of a returned cache through
:func:`output_cache`. The keyword is read once per model class from its ``forward``
signature; classes whose ``forward`` only takes ``**kwargs`` fall back to what the installed
``generate`` names its cache.
"""

from __future__ import annotations

import functools
import inspect

NEW_NAME = "cache"
OLD_NAME = "past_key_values"


@functools.cache
def _library_keyword() -> str:
    """The cache keyword of the installed transformers' ``generate`` machinery."""
    from transformers.generation import utils as generation_utils

    names = getattr(generation_utils, "ALL_CACHE_NAMES", [])
    return NEW_NAME if NEW_NAME in names else OLD_NAME


@functools.cache
def _class_keyword(cls: type) -> str:
    try:
        params = inspect.signature(cls.forward).parameters  # follows the deprecation wrapper
    except (TypeError, ValueError):
        return _library_keyword()
    if NEW_NAME in params:
        return NEW_NAME
    if OLD_NAME in params:
        return OLD_NAME
    return _library_keyword()


def cache_keyword(model: object | None = None) -> str:
    """``"cache"`` or ``"past_key_values"``: what ``model`` (or transformers) calls its cache."""
    if model is None:
        return _library_keyword()
    return _class_keyword(type(model))


def cache_arg(model: object, cache: object) -> dict[str, object]:
    """Keyword arguments handing ``cache`` to ``model(...)`` or ``model.generate(...)``."""
    return {cache_keyword(model): cache}


def output_cache(output: object) -> object:
    """The cache a model returned in ``output`` (``.cache``, or ``.past_key_values`` before)."""
    if hasattr(output, NEW_NAME):
        return getattr(output, NEW_NAME)
    return getattr(output, OLD_NAME)


@functools.cache
def _takes_cache_position(cls: type) -> bool:
    try:
        return "cache_position" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


def position_args(model: object, positions: object) -> dict[str, object]:
    """Keyword arguments giving ``model(...)`` the positions [1, T] of its input tokens as a
    device tensor: ``position_ids``, plus ``cache_position`` [T] where the installed
    transformers' ``forward`` still takes it (before 5.24), so that neither is derived from
    the cache's length on the host (a captured decode step replays them from the device)."""
    args: dict[str, object] = {"position_ids": positions}
    if _takes_cache_position(type(model)):
        args["cache_position"] = positions[0]
    return args
