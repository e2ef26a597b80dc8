"""Long work off the script thread: one job per session and kind, with progress and Cancel.

Streamlit runs a page's script top to bottom on every interaction, so a model run inside the
script freezes the page until it ends. A job runs the work in a thread of its own instead.
The page draws the job's progress in a fragment that reruns every second on its own (the rest
of the page stays usable meanwhile), with a Cancel button; when the job ends, the whole page
reruns once and the result is handed to the page, which stores it under the trace the job was
started for (``app.state``): a job of an older trace is dropped, never shown. Work that does
not come from the current trace (a probe, which makes a new one; a sweep) is started with
``for_trace=False`` and is handed over whatever trace is current when it ends.

Progress and cancel reach into the model run without the methods knowing: each layer's
attention module gets a forward pre-hook (once per model) that, inside a job's thread only,
counts the layer calls and raises ``Cancelled`` once the user asked to stop. Elsewhere (other
users, the CLI) the hook does nothing.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import streamlit as st

from app import state
from probes.attention import attention_modules
from probes.errors import KvlensError, one_line

POLL_S = 1.0  # how often the progress fragment redraws
QUICK_S = 0.5  # how long a page waits for its tables' job before showing its progress


class Cancelled(KvlensError):
    """The user pressed Cancel; raised inside the model run at the next layer."""


@dataclass
class Job:
    kind: str
    trace_id: str | None
    layer_calls: int  # expected layer calls of the whole job, for the progress fraction
    for_trace: bool = True  # dropped when another trace becomes the current one
    text: str = "starting ..."
    calls: int = 0
    started: float = field(default_factory=time.perf_counter)
    ended: float | None = None
    result: Any = None
    error: str | None = None
    cancelled: bool = False
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    @property
    def done(self) -> bool:
        return self.ended is not None

    def fraction(self) -> float:
        return min(1.0, self.calls / max(1, self.layer_calls))

    def seconds(self) -> float:
        return (self.ended or time.perf_counter()) - self.started

    def say(self, text: str) -> None:
        """Set the progress text; also a cancel point between model runs."""
        self.text = text
        if self.stop.is_set():
            raise Cancelled("cancelled")


_CURRENT: contextvars.ContextVar[Job | None] = contextvars.ContextVar("kvlens_job", default=None)


def _tick(_module, _args) -> None:
    job = _CURRENT.get()
    if job is None:
        return
    job.calls += 1
    if job.stop.is_set():
        raise Cancelled("cancelled")


def install_hooks(model) -> None:
    """Count and cancel at every layer call of ``model`` inside a job (idempotent)."""
    if getattr(model, "_kvlens_job_hooks", False):
        return
    for module in attention_modules(model):
        module.register_forward_pre_hook(_tick)
    model._kvlens_job_hooks = True


def _jobs() -> dict[str, Job]:
    return st.session_state.setdefault("jobs", {})


def job(kind: str) -> Job | None:
    return _jobs().get(kind)


def start(
    kind: str,
    work: Callable[[Job], Any],
    model=None,
    layer_calls: int = 0,
    for_trace: bool = True,
) -> Job:
    """Run ``work(job)`` in a thread; a running job of the same kind is cancelled first.
    Without a ``model`` (work that runs no model, e.g. UMAP) progress is the elapsed time and
    Cancel drops the result at once (the work itself cannot be stopped midway).
    ``for_trace=False``: the work does not come from the current trace, so a new trace
    meanwhile does not drop it. ``work`` runs outside the script: it must not use
    ``st.session_state`` (read what it needs before, store the result in ``panel``)."""
    old = job(kind)
    if old is not None and not old.done:
        old.stop.set()
    if model is not None:
        install_hooks(model)
    new = Job(kind=kind, trace_id=state.trace_id(), layer_calls=layer_calls, for_trace=for_trace)

    def run() -> None:
        _CURRENT.set(new)
        try:
            new.result = work(new)
        except Cancelled:
            new.cancelled = True
        except KvlensError as exc:
            new.error = str(exc)
        except MemoryError:
            new.error = "out of memory: try a shorter prompt or fewer new tokens"
        except Exception as exc:  # shown as one line, like state.guarded
            new.error = one_line(exc)
        finally:
            new.ended = time.perf_counter()

    new.thread = threading.Thread(target=run, name=f"kvlens-{kind}", daemon=True)
    _jobs()[kind] = new
    new.thread.start()
    return new


def cancel(kind: str) -> None:
    """Stop the job of ``kind`` and forget it: nothing of it is handed to the page."""
    j = _jobs().pop(kind, None)
    if j is not None:
        j.stop.set()


def wait(kind: str, timeout: float | None = None) -> None:
    """Block until the job of ``kind`` ends (tests and scripts)."""
    j = job(kind)
    if j is not None and j.thread is not None:
        j.thread.join(timeout)


def panel(kind: str, store: Callable[[Any], None]) -> bool:
    """Draw the job of ``kind``: live progress and Cancel while it runs; when it has ended,
    hand its result to ``store`` (or show its error) once. True while it runs."""
    j = job(kind)
    if j is None:
        return False
    if j.for_trace and j.trace_id != state.trace_id():  # started for another trace: never shown
        cancel(kind)
        return False
    if j.done or j.stop.is_set():  # a cancelled job is over for the page at once
        _jobs().pop(kind, None)
        if j.cancelled or j.stop.is_set():
            st.info(f"cancelled after {j.seconds():.1f} s")
        elif j.error:
            st.error(j.error)
        else:
            store(j.result)
        return False
    _live(kind)
    return True


@st.fragment(run_every=POLL_S)
def _live(kind: str) -> None:
    j = job(kind)
    if j is None or j.done or j.stop.is_set():
        st.rerun()  # the whole page: the result is shown outside this fragment
        return
    c1, c2 = st.columns([5, 1])
    if j.layer_calls:
        c1.progress(j.fraction(), text=f"{j.text} ({j.seconds():.0f} s)")
    else:  # no measure of the work done: the time so far
        c1.progress(min(0.99, j.seconds() / 60), text=f"{j.text} ({j.seconds():.0f} s so far)")
    if c2.button(
        "Cancel",
        key=f"{kind}_cancel_btn",
        help="stop this run at its next layer; nothing of it is kept",
    ):
        j.stop.set()
        st.rerun()


def tables(kind: str, computes: dict[str, Callable[[], Any]], text: str) -> dict[str, Any] | None:
    """A page's tables of the current trace, each computed once (``state.table``'s store);
    the missing ones in a job of ``kind`` with progress (one step per table) and Cancel.
    Returns the tables, or None while the job runs or after a Cancel (then a button computes
    them again)."""
    missing = {n: f for n, f in computes.items() if state.cached_table(n) is None}
    if missing:
        current = job(kind)
        if current is not None and current.for_trace and current.trace_id != state.trace_id():
            cancel(kind)  # started for another trace: its tables are not this trace's
            current = None
        if current is not None and current.stop.is_set():
            state.put(f"{kind}:cancelled", True)
        if current is None:
            if state.result(f"{kind}:cancelled"):
                again = st.button(
                    f"Compute {text}",
                    key=f"{kind}_again_btn",
                    help="the computation was cancelled; run it again (in the background)",
                )
                if not again:
                    return None
                state.drop(f"{kind}:cancelled")

            def work(j: Job) -> dict[str, Any]:
                out = {}
                for i, (name, compute) in enumerate(missing.items()):
                    j.say(f"{text} ({i + 1} of {len(missing)})")
                    out[name] = compute()
                    j.calls += 1
                return out

            started = start(kind, work, layer_calls=len(missing))
            # short work (a short trace's tables) is drawn in this run, without waiting a
            # poll of the progress fragment; long work shows its progress from here on
            started.thread.join(QUICK_S)

        def store(result: dict[str, Any]) -> None:
            for name, value in result.items():
                state.put_table(name, value)

        if panel(kind, store):
            return None
    if any(state.cached_table(n) is None for n in computes):
        return None
    return {n: state.cached_table(n) for n in computes}
