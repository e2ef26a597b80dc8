"""Sweeps: a grid of model x method x task x length x example, one long table, resumable.

Each unit of work is one example (model, task, length, seed): the full cache runs once and
every method of the grid that this example still lacks runs against it through ``compare``.
Rows are appended to the parquet table as each unit finishes (written to a temporary file and
renamed), so a crash or Ctrl-C loses at most the unit in flight, and a rerun skips every row
the table already holds. ``backend="ray"`` sends units to Ray tasks (one GPU each when GPUs
exist, else CPUs); the table is the same either way, except the measured times.
"""

from __future__ import annotations

import os
import tomllib
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from methods.registry import create, split_specs
from probes.errors import KvlensError
from probes.tasks import TASK_KINDS

KEY = ("model", "method", "task", "length", "seed")
SCHEMA = {
    "model": pl.Utf8,
    "method": pl.Utf8,
    "family": pl.Utf8,
    "task": pl.Utf8,
    "length": pl.Int32,
    "seed": pl.Int32,
    "n_tokens": pl.Int32,
    "accuracy": pl.Float64,
    "kl_mean": pl.Float64,
    "kl_max": pl.Float64,
    "top1": pl.Float64,
    "bytes": pl.Int64,
    "bytes_ratio": pl.Float64,
    "time_s": pl.Float64,
}


@dataclass
class Grid:
    models: list[str] = field(default_factory=lambda: ["smollm2-135m"])
    methods: list[str] = field(
        default_factory=lambda: ["snapkv:budget=128", "streamingllm:budget=128"]
    )
    tasks: list[str] = field(default_factory=lambda: ["niah"])
    lengths: list[int] = field(default_factory=lambda: [1024])
    seeds: int = 2
    max_new_tokens: int = 12

    def __post_init__(self) -> None:
        self.methods = [create(m).spec() if create(m) else "full" for m in self.methods]
        for t in self.tasks:
            if t not in TASK_KINDS:
                raise KvlensError(f"sweep task must be one of {', '.join(TASK_KINDS)}, not '{t}'")
        if self.seeds < 1 or any(n < 64 for n in self.lengths) or self.max_new_tokens < 1:
            raise KvlensError("sweep seeds and max_new_tokens must be >= 1 and lengths >= 64")

    def examples(self) -> list[tuple[str, str, int, int]]:
        return [
            (m, t, n, s)
            for m in self.models
            for t in self.tasks
            for n in self.lengths
            for s in range(self.seeds)
        ]

    def total_rows(self) -> int:
        return len(self.examples()) * (len(self.methods) + 1)


def load_grid(path: str | Path) -> Grid:
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise KvlensError(
            f"sweep config {path}: not a readable TOML file ({exc.__class__.__name__})"
        ) from None
    grid = data.get("grid", data)
    known = set(Grid.__dataclass_fields__)
    unknown = sorted(set(grid) - known)
    if unknown:
        listed = ", ".join(sorted(known))
        raise KvlensError(
            f"sweep config {path}: unknown keys {', '.join(unknown)}; known: {listed}"
        )
    if isinstance(grid.get("methods"), str):
        grid["methods"] = split_specs(grid["methods"])
    return Grid(**grid)


def read_table(path: Path) -> pl.DataFrame:
    if not path.exists():
        return pl.DataFrame(schema=SCHEMA)
    try:
        df = pl.read_parquet(path)
    except Exception as exc:
        raise KvlensError(
            f"{path}: not a readable sweep table ({exc.__class__.__name__})"
        ) from None
    if set(df.columns) != set(SCHEMA):
        raise KvlensError(f"{path}: not a kvlens sweep table")
    return df.select(list(SCHEMA))


def _append(path: Path, table: pl.DataFrame, rows: list[dict]) -> pl.DataFrame:
    table = pl.concat([table, pl.DataFrame(rows, schema=SCHEMA)])
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    table.write_parquet(tmp)
    os.replace(tmp, path)
    return table


def run_example(
    model_name: str,
    task_kind: str,
    length: int,
    seed: int,
    specs: list[str],
    max_new_tokens: int,
    device: str | None = None,
) -> list[dict]:
    """One unit of work: the full cache and ``specs`` on one generated example."""
    from methods.evaluate import compare
    from probes import load_model
    from probes.tasks import make_task

    model, tokenizer = load_model(model_name, device=device)
    task = make_task(task_kind, length, tokenizer, seed=seed)
    ids = tokenizer(task.prompt)["input_ids"]
    result = compare(
        model,
        tokenizer,
        ids,
        ["full", *[s for s in specs if s != "full"]],
        max_new_tokens=max_new_tokens,
        score=task.score,
        continuation=task.continuation,
    )
    wanted = set(specs)
    return [
        {
            "model": model_name,
            "method": r.spec,
            "family": r.family,
            "task": task_kind,
            "length": length,
            "seed": seed,
            "n_tokens": len(ids),
            "accuracy": r.accuracy,
            "kl_mean": r.kl_mean,
            "kl_max": r.kl_max,
            "top1": r.top1,
            "bytes": r.bytes,
            "bytes_ratio": r.bytes_ratio,
            "time_s": r.time_s,
        }
        for r in result.results
        if r.spec in wanted
    ]


def pending_units(grid: Grid, table: pl.DataFrame) -> list[tuple[tuple, list[str]]]:
    done = set(table.select(KEY).iter_rows())
    units = []
    for model, task, length, seed in grid.examples():
        missing = [m for m in ["full", *grid.methods] if (model, m, task, length, seed) not in done]
        if missing:
            units.append(((model, task, length, seed), missing))
    return units


def sweep(
    grid: Grid,
    out: str | Path,
    backend: str = "local",
    progress: Callable[[int, int], None] | None = None,
    device: str | None = None,
    num_cpus: int | None = None,
) -> pl.DataFrame:
    """Run what the table at ``out`` lacks; returns the whole table."""
    if backend not in ("local", "ray"):
        raise KvlensError(f"backend must be local or ray, not '{backend}'")
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = read_table(path)
    units = pending_units(grid, table)
    total = grid.total_rows()
    if progress:
        progress(table.height, total)
    if backend == "local":
        for (model, task, length, seed), specs in units:
            rows = run_example(model, task, length, seed, specs, grid.max_new_tokens, device)
            table = _append(path, table, rows)
            if progress:
                progress(table.height, total)
        return _sorted(table)
    for rows in _ray_results(units, grid.max_new_tokens, num_cpus):
        table = _append(path, table, rows)
        if progress:
            progress(table.height, total)
    return _sorted(table)


def _ray_results(units, max_new_tokens: int, num_cpus: int | None) -> Iterable[list[dict]]:
    try:
        import ray
    except ImportError:
        raise KvlensError(
            "the ray backend needs Ray: pip install ray (or use --backend local)"
        ) from None
    import torch

    started = not ray.is_initialized()
    if started:
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}},
        )
    gpus = 1 if torch.cuda.is_available() else 0
    remote = ray.remote(num_gpus=gpus, num_cpus=1)(run_example)
    try:
        pending = [remote.remote(*key, specs, max_new_tokens) for key, specs in units]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            yield ray.get(ready[0])
    finally:
        if started:
            ray.shutdown()


def _sorted(table: pl.DataFrame) -> pl.DataFrame:
    return table.sort(list(KEY))


def leaderboard(table: pl.DataFrame) -> pl.DataFrame:
    """Per model, task, length and method: mean accuracy, KL, top-1 and bytes held."""
    return (
        table.group_by("model", "task", "length", "method", "family")
        .agg(
            pl.col("accuracy").mean(),
            pl.col("kl_mean").mean(),
            pl.col("top1").mean(),
            pl.col("bytes_ratio").mean(),
            pl.len().alias("examples"),
        )
        .sort("model", "task", "length", "bytes_ratio")
    )
