"""Shared state of the Streamlit app: the cached model, this user's trace, cached tables.

The model is a process-wide resource (``st.cache_resource``); the trace and everything
computed from it live in ``st.session_state`` so users never see each other's work, and a
page change never recomputes a table it already has.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import streamlit as st

from probes.errors import KvlensError

DUMPS = Path("cache_dumps")


@st.cache_resource(show_spinner="Loading the model (first time only) ...")
def model(name: str):
    from probes import load_model

    return load_model(name)


def set_trace(trace, label: str) -> None:
    st.session_state["trace"] = trace
    st.session_state["trace_id"] = uuid.uuid4().hex
    st.session_state["trace_label"] = label
    st.session_state["tables"] = {}
    st.session_state.pop("comparison", None)


def trace():
    return st.session_state.get("trace")


def require_trace():
    t = trace()
    if t is None:
        st.info("No trace yet: run a probe or open a dump on the Probe page.")
        st.stop()
    return t


def table(name: str, compute: Callable[[], Any]) -> Any:
    """Compute a table once per trace (per user), then reuse it."""
    tables = st.session_state.setdefault("tables", {})
    if name not in tables:
        tables[name] = compute()
    return tables[name]


def guarded(fn: Callable[[], Any]) -> Any:
    """Run ``fn``; show a one-line error in the page instead of a traceback."""
    try:
        return fn()
    except KvlensError as exc:
        st.error(str(exc))
    except MemoryError:
        st.error("out of memory: try a shorter prompt, fewer layers or statistics only")
    except Exception as exc:  # the app must stay up whatever a run does
        st.error(f"{exc.__class__.__name__}: {' '.join(str(exc).split())[:300]}")
    return None


def dump_names() -> list[str]:
    if not DUMPS.is_dir():
        return []
    return sorted(p.name for p in DUMPS.iterdir() if (p / "manifest.json").is_file())


def safe_dump_path(name: str) -> Path:
    """A dump folder inside the dumps folder; refuses names that climb out of it."""
    name = name.strip()
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise KvlensError(f"dump name '{name}' is not allowed: use letters, digits, - and _")
    path = (DUMPS / name).resolve()
    if path.parent != DUMPS.resolve():
        raise KvlensError(f"dump name '{name}' is outside {DUMPS}")
    return path


def head_selector(key: str, n_layers: int, n_heads: int, event=None) -> tuple[int, int]:
    """Layer/head chosen by clicking a heatmap cell (``event``) or by the number inputs."""
    if event and getattr(event, "selection", None) and event.selection.get("points"):
        point = event.selection["points"][0]
        st.session_state[f"{key}_layer"] = int(point["y"])
        st.session_state[f"{key}_head"] = int(point["x"])
    c1, c2 = st.columns(2)
    layer = c1.number_input("layer", 0, n_layers - 1, key=f"{key}_layer")
    head = c2.number_input("head", 0, n_heads - 1, key=f"{key}_head")
    return int(layer), int(head)
