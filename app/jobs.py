"""Jobs that run a model and then analyse what it showed: shared by the CLI and the app.

Analysis modules never run a model; these functions do the running (through ``probes``) and
hand the traces to ``analysis``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import polars as pl

from analysis.retrieval_heads import echo_induction_scores, retrieval_scores
from probes import capture
from probes.capture import tokenize
from probes.errors import KvlensError, one_line
from probes.models import model_facts
from probes.tasks import Task, make_task, needle_token_positions, repeated_random_tokens

NEEDLE_NEW_TOKENS = 12  # tokens each needle prompt of find_retrieval_heads generates
PROFILE_DEPTHS = (0.2, 0.5, 0.8)


def probe(
    model,
    tokenizer,
    text,
    *,
    attention: str,
    generate: int,
    task: Task | None = None,
    save: Callable | None = None,
    say: Callable[[str], None] | None = None,
) -> dict:
    """A probe of ``text`` (a prompt, or ``task``'s prompt) as the app runs it: the trace, the
    task, and the dump ``save(trace, task)`` wrote it to (its name) or why saving failed (a
    trace that took minutes is kept even when it cannot be saved). ``say`` gets progress."""
    n_layers = model.config.num_hidden_layers
    calls = {"n": 0}

    def progress(layer: int) -> None:
        forward = calls["n"] // n_layers
        calls["n"] += 1
        if say is None:
            return
        if forward == 0:
            say(f"probing: layer {layer + 1} of {n_layers}")
        else:
            say(f"probing: generating token {forward} of {generate}")

    trace = capture(
        model, tokenizer, text, attention=attention, generate=generate, progress=progress
    )
    dump, save_error = None, None
    if save is not None:
        if say is not None:
            say("saving the trace in cache_dumps/")
        try:
            dump = save(trace, task)
        except Exception as exc:  # the trace is shown all the same
            save_error = f"not saved: {one_line(exc)}"
    return {"trace": trace, "task": task, "dump": dump, "save_error": save_error}


def retrieval_forwards(n_prompts: int, generate: int = NEEDLE_NEW_TOKENS) -> int:
    """Forward passes of ``find_retrieval_heads`` with ``n_prompts`` needle prompts: each
    prompt's prefill and generated tokens, then the repeated random sequence."""
    return n_prompts * (1 + generate) + 1


def head_profile_forwards(n_prompts: int) -> int:
    """Forward passes of ``head_profile``: the retrieval detection, then a statistics probe."""
    return retrieval_forwards(n_prompts) + 1


def find_retrieval_heads(
    model,
    tokenizer,
    lengths: list[int] = (512, 1024, 2048),
    depths: list[float] = (0.1, 0.5, 0.9),
    seed: int = 0,
    generate: int = NEEDLE_NEW_TOKENS,
    period: int = 64,
    progress: Callable[[str], None] | None = None,
) -> pl.DataFrame:
    """Retrieval score per layer and head (mean over needle prompts), plus echo/induction."""
    for depth in depths:
        if not 0.0 <= depth <= 1.0:
            raise KvlensError(f"depths must be in [0, 1], got {depth}")
    facts = model_facts(model)
    runs = []
    for length in lengths:
        for depth in depths:
            if progress:
                progress(f"needle {length} tokens, depth {depth}")
            task = make_task("niah", length, tokenizer, depth=depth, seed=seed)
            ids = tokenize(tokenizer, task.prompt)
            needle = needle_token_positions(tokenizer, task.prompt, task.answers[0])
            trace = capture(model, tokenizer, ids, attention="stats", kv=False, generate=generate)
            runs.append(retrieval_scores(trace, needle))
    retrieval = pl.concat(runs).group_by("layer", "head").agg(pl.col("retrieval").mean())
    if progress:
        progress("echo / induction")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids, offset = repeated_random_tokens(period, facts.vocab_size, seed=seed, prefix=bos)
    trace = capture(model, tokenizer, ids, attention="full", kv=False)
    echo = echo_induction_scores(trace, offset, period)
    return (
        retrieval.join(echo, on=["layer", "head"], how="full", coalesce=True)
        .with_columns(pl.col("retrieval").fill_null(0.0))
        .sort("layer", "head")
    )


def head_profile(
    model,
    tokenizer,
    lengths=(512, 1024),
    depths=PROFILE_DEPTHS,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> pl.DataFrame:
    """The model's head profile: retrieval/echo/induction scores plus measures from a probe."""
    from analysis.head_profiles import build_profile

    scores = find_retrieval_heads(
        model, tokenizer, list(lengths), list(depths), seed=seed, progress=progress
    )
    if progress:
        progress("statistics probe")
    task = make_task("niah", max(lengths), tokenizer, depth=0.5, seed=seed + 1)
    trace = capture(model, tokenizer, task.prompt, attention="stats", kv=False)
    return build_profile(trace, scores)


def sparse_result(
    model, tokenizer, prompt: list[int], specs: list[str], *, max_new_tokens: int,
    score=None, progress: Callable[[str], None] | None = None,
) -> dict:  # fmt: skip
    """Sparse methods on a prompt against the full cache (``methods.sparse.run``) turned into
    what the Sparse attention page and the report show: the recall table and curve, a summary
    per run, the positions each run read, the full cache's bytes and text."""
    from analysis.sparse_recall import recall_curve
    from methods.sparse.run import sparse_compare

    runs = sparse_compare(
        model, tokenizer, prompt, specs, max_new_tokens=max_new_tokens, score=score,
        progress=progress,
    )  # fmt: skip
    table = pl.concat([r.recall for r in runs])
    return {
        "table": table,
        "curve": recall_curve(table),
        "runs": [r.summary() for r in runs],
        "reads": {r.spec: r.reads for r in runs},
        "full_bytes": runs[0].full_bytes,
        "full_text": runs[0].full_text,
    }


def reuse_result(
    model, tokenizer, settings: dict, specs: list[str], *, max_new_tokens: int,
    progress: Callable[[str], None] | None = None,
) -> dict:  # fmt: skip
    """Chunk-reuse methods on a generated RAG prompt (``settings``: kind, chunks,
    chunk_tokens, seed) against the full prefill, with each run's K/V and attention deviation
    per layer and position: what the Chunk reuse page and the report show."""
    from analysis.chunk_reuse import attention_deviation, kv_deviation, layer_summary
    from methods.reuse.run import reuse_compare, task_layout
    from probes.rag_tasks import make_rag_task

    task = make_rag_task(
        settings["kind"], tokenizer, n_chunks=settings["chunks"],
        chunk_tokens=settings["chunk_tokens"], seed=settings["seed"],
    )  # fmt: skip
    layout = task_layout(task, tokenizer)
    run = reuse_compare(
        model, tokenizer, layout, specs, max_new_tokens=max_new_tokens, score=task.score,
        keep_tensors=True, progress=progress,
    )  # fmt: skip
    segments = layout.segments()
    full = run.tensors["full"]
    kv, attn = {}, {}
    for spec, t in run.tensors.items():
        if spec == "full":
            continue
        kv[spec] = kv_deviation(full["keys"], full["values"], t["keys"], t["values"], segments)
        attn[spec] = attention_deviation(full["rows"], t["rows"], segments)
    return {
        "settings": settings,
        "results": run.to_json()["results"],
        "kv": kv,
        "summary": {s: layer_summary(kv[s], attn[s]) for s in kv},
        "tokens": [tokenizer.decode([i]) for i in layout.ids],
        "segments": segments,
        "starts": layout.starts,
        "answer": task.answers[0],
        "answer_chunks": task.answer_chunks,
    }


def sweep_grid(
    model: str, tasks: list[str], methods: str, length: int, seeds: int, new_tokens: int
):
    """The grid of a small sweep started in the app: one model and length, method specs
    separated by commas (``methods.sweep.Grid`` checks the rest)."""
    from methods.registry import split_specs
    from methods.sweep import Grid

    if not tasks:
        raise KvlensError("choose at least one task")
    return Grid(
        models=[model],
        methods=split_specs(methods),
        tasks=list(tasks),
        lengths=[int(length)],
        seeds=int(seeds),
        max_new_tokens=int(new_tokens),
    )


def compare_forwards(n_methods: int, max_new: int, continuation_tokens: int = 0) -> int:
    """Forward passes, at most, of ``methods.evaluate.compare``: the full run's steps, each
    method's prefill and two runs of its steps (the shared steps make it fewer), and every
    run's continuation."""
    return (
        max_new + n_methods * (2 * max_new - 1) + (n_methods + 1) * max(0, continuation_tokens - 1)
    )


def sweep_forwards(grid, out: Path, tokenizer) -> int:
    """Forward passes, at most, of what a sweep of ``grid`` still has to run into the table at
    ``out`` (rows already there are skipped): ``compare_forwards`` per example. The progress
    of a sweep started in the app."""
    from methods.sweep import pending_units, read_table

    total = 0
    for (_model, kind, length, seed), specs in pending_units(grid, read_table(Path(out))):
        task = make_task(kind, length, tokenizer, seed=seed)
        cont = len(tokenizer(task.continuation, add_special_tokens=False)["input_ids"])
        total += compare_forwards(sum(s != "full" for s in specs), grid.max_new_tokens, cont)
    return total
