"""Shared state of the Streamlit app: the cached model, this user's trace, per-trace results.

The model is a process-wide resource (``st.cache_resource``); the trace and everything
computed from it live in ``st.session_state`` so users never see each other's work. Every
result computed from a trace (tables, a comparison, an X-ray, a UMAP, a report) is stored
under the id of the trace it came from, so a new probe can never show a stale result.
Each probed trace is also written to ``cache_dumps/`` so a reload of the tab loses nothing.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import streamlit as st

from probes.errors import KvlensError, one_line

DUMPS = Path("cache_dumps")
RECENT_PREFIX = "recent-"
KEEP_RECENT = 5  # a 1k-token trace with K/V is about 80 MB on disk
# Widget keys with these prefixes are form inputs kept across page switches (see keep_inputs);
# buttons and charts never use them.
INPUT_PREFIXES = ("probe_", "task_", "lab_", "lb_", "rh_", "hh_", "out_", "cl_kind", "attn_measure")
INPUT_PREFIXES += ("sp_",)  # the Sparse attention page
INPUT_PREFIXES += ("cr_",)  # the Chunk reuse page
NOT_INPUTS = ("_btn", "_run")  # button keys (probe_run predates the _btn rule)


@st.cache_resource(show_spinner="Loading the model (first time only) ...")
def model(name: str):
    from probes import load_model

    return load_model(name)


def set_trace(trace, label: str, task=None, dump: str | None = None) -> None:
    """Make ``trace`` the current one; results of the previous trace are dropped."""
    trace_id = uuid.uuid4().hex
    st.session_state["trace"] = trace
    st.session_state["trace_id"] = trace_id
    st.session_state["trace_label"] = label
    st.session_state["trace_dump"] = dump
    st.session_state["results"] = {"trace_id": trace_id, "items": {"task": task}}


def trace():
    return st.session_state.get("trace")


def trace_id() -> str | None:
    return st.session_state.get("trace_id") if trace() is not None else None


def trace_label() -> str:
    label = st.session_state.get("trace_label") if trace() is not None else None
    return f"trace: {label}" if label else "no trace yet"


def require_trace():
    t = trace()
    if t is None:
        st.info("No trace yet: run a probe or open a dump on the Probe page.")
        st.stop()
    return t


def _items() -> dict:
    """This trace's results; a store left by another trace is discarded, never read."""
    store = st.session_state.get("results")
    current = trace_id()
    if not isinstance(store, dict) or store.get("trace_id") != current:
        store = {"trace_id": current, "items": {}}
        st.session_state["results"] = store
    return store["items"]


def result(name: str) -> Any:
    """A result computed from the current trace, or None."""
    return _items().get(name)


def put(name: str, value: Any) -> None:
    """Store a result computed from the current trace."""
    _items()[name] = value


def drop(name: str) -> None:
    _items().pop(name, None)


def task():
    """The needle task the current trace was probed with, if any."""
    return result("task")


def table(name: str, compute: Callable[[], Any]) -> Any:
    """Compute a table once per trace (per user), then reuse it."""
    items = _items()
    key = f"table:{name}"
    if key not in items:
        items[key] = compute()
    return items[key]


def cached_table(name: str) -> Any:
    """A table ``table`` (or ``put_table``) stored for the current trace, or None."""
    return _items().get(f"table:{name}")


def put_table(name: str, value: Any) -> None:
    """Store a table computed elsewhere (a background job) for the current trace."""
    _items()[f"table:{name}"] = value


def guarded(fn: Callable[[], Any]) -> Any:
    """Run ``fn``; show a one-line error in the page instead of a traceback."""
    try:
        return fn()
    except KvlensError as exc:
        st.error(str(exc))
    except MemoryError:
        st.error("out of memory: try a shorter prompt, fewer layers or statistics only")
    except Exception as exc:  # the app must stay up whatever a run does
        st.error(one_line(exc))
    return None


def keep_inputs() -> None:
    """Keep form inputs across page switches.

    Streamlit forgets a widget's value when a run does not draw it; writing the value back
    into the session state at the top of every run makes it the user's value instead.
    """
    for key in list(st.session_state.keys()):
        if isinstance(key, str) and key.startswith(INPUT_PREFIXES) and not key.endswith(NOT_INPUTS):
            st.session_state[key] = st.session_state[key]


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


def autosave(trace, task=None) -> str:
    """Write ``trace`` (and its task) to ``cache_dumps/recent-...``; keep the newest few."""
    if task is not None:
        trace.settings["task"] = dataclasses.asdict(task)
    name = f"{RECENT_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    trace.save(safe_dump_path(name))
    for old in recent_dumps()[KEEP_RECENT:]:
        import shutil

        shutil.rmtree(DUMPS / old["name"], ignore_errors=True)
    return name


def recent_dumps() -> list[dict]:
    """Auto-saved traces, newest first: name, model, tokens, prompt head."""
    from probes.dump import read_manifest

    rows = []
    if not DUMPS.is_dir():
        return rows
    for path in sorted(DUMPS.glob(f"{RECENT_PREFIX}*"), reverse=True):
        try:
            m = read_manifest(path)
        except KvlensError:
            continue
        rows.append(
            {
                "name": path.name,
                "created": m.get("created", ""),
                "model": m["model"].get("model_id", "?"),
                "tokens": len(m["token_ids"]),
                "prompt": " ".join(m["prompt"].split())[:80],
            }
        )
    return rows


def task_of(trace):
    """The needle task saved with a dump, rebuilt; None for a free prompt."""
    from probes.tasks import Task

    saved = trace.settings.get("task")
    if not isinstance(saved, dict):
        return None
    try:
        return Task(**saved)
    except TypeError:
        return None


def open_dump(name: str) -> None:
    """Load a saved dump and make it the current trace."""
    from probes import Trace

    t = Trace.load(safe_dump_path(name))
    set_trace(t, f"dump {name}", task=task_of(t), dump=name)
    st.session_state["model_name"] = t.model.model_id


def head_selector(key: str, n_layers: int, n_heads: int, event=None) -> tuple[int, int]:
    """Layer/head chosen by clicking a heatmap cell (``event``) or by the number inputs.

    A click is applied once (when the selection changes), so the number inputs stay usable
    while the cell remains selected.
    """
    points = []
    if event and getattr(event, "selection", None):
        points = event.selection.get("points") or []
    if points:
        point = points[0]
        click = (int(point["y"]), int(point["x"]))
        if st.session_state.get(f"{key}_click") != click:
            st.session_state[f"{key}_click"] = click
            st.session_state[f"{key}_layer"], st.session_state[f"{key}_head"] = click
    for name, top in ((f"{key}_layer", n_layers - 1), (f"{key}_head", n_heads - 1)):
        if name in st.session_state:
            st.session_state[name] = max(0, min(top, int(st.session_state[name])))
    c1, c2 = st.columns(2)
    layer = c1.number_input(
        "layer", 0, n_layers - 1, key=f"{key}_layer", help="click a cell of the heatmap, or type"
    )
    head = c2.number_input(
        "head", 0, n_heads - 1, key=f"{key}_head", help="click a cell of the heatmap, or type"
    )
    return int(layer), int(head)


def compare_picker() -> None:
    """Sidebar select of a saved trace to show beside the current one (two prompts, or two
    models on one prompt); the loaded trace is cached in the session under its dump name."""
    names = dump_names()
    if trace() is None or not names:
        return
    pick = st.selectbox(
        "compare with",
        ["(none)", *names],
        key="compare_pick",
        help="a saved trace shown beside the current one on the Attention and Heavy hitters "
        "pages, e.g. the same prompt probed with another model",
    )
    second = st.session_state.get("second")
    if pick == "(none)":
        st.session_state.pop("second", None)
    elif not second or second["name"] != pick:

        def load():
            from probes import Trace

            t = Trace.load(safe_dump_path(pick))
            st.session_state["second"] = {"name": pick, "trace": t, "tables": {}}

        guarded(load)


def second_trace():
    """The trace chosen to compare with, or None."""
    second = st.session_state.get("second")
    return second["trace"] if second else None


def second_label() -> str:
    second = st.session_state.get("second")
    if not second:
        return ""
    m = second["trace"].model
    return f"{second['name']} ({m.model_id}, {second['trace'].n_tokens} tokens)"


def second_table(name: str, compute: Callable[[Any], Any]) -> Any:
    """Like ``table``, for the trace to compare with (``compute`` receives that trace)."""
    second = st.session_state.get("second")
    if not second:
        return None
    if name not in second["tables"]:
        second["tables"][name] = compute(second["trace"])
    return second["tables"][name]


def clicked_x(chart_key: str) -> int | None:
    """The x of a point just clicked in the chart drawn with ``key=chart_key`` and
    ``on_select="rerun"``; each click is reported once (a selection stays in the chart's state)."""
    event = st.session_state.get(chart_key)
    try:
        points = event["selection"]["points"]
    except (KeyError, TypeError):
        return None
    if not points:
        return None
    x = int(points[0]["x"])
    if st.session_state.get(f"{chart_key}_last") == (x, len(points)):
        return None
    st.session_state[f"{chart_key}_last"] = (x, len(points))
    return x
