"""The one on-disk format of a Trace: a folder of JSON + safetensors + parquet. Never pickle.

    manifest.json        schema name and version, model facts, prompt, tokens, settings,
                         timings, and the expected name/shape/dtype of every tensor and the
                         row count and columns of every table
    tensors.safetensors  the Trace's tensors under their ``layers.{l}.{kind}`` names
    stats.parquet        key statistics (layer, head, kv_head, position, received, ...)
    query_stats.parquet  query statistics (entropy, sink mass, ...)
    step_stats.parquet   per decoding step attention (generate mode only)

Writing goes to a hidden temporary folder beside the target, then one rename, so a killed
probe never leaves a folder that looks complete. Reading checks every promise of the
manifest and turns any failure into one ``DumpError`` line naming the problem.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

import polars as pl
from safetensors import safe_open
from safetensors.torch import save_file

from probes.errors import DumpError
from probes.models import ModelFacts
from probes.trace import (
    KEY_STATS_SCHEMA,
    QUERY_STATS_SCHEMA,
    STEP_STATS_SCHEMA,
    TENSOR_KINDS,
    Trace,
)

SCHEMA = "kvlens.dump"
SCHEMA_VERSION = 2
#: version 1 numbered decoding steps from 1 and kept a last step whose produced token is not in
#: the trace; it is read by dropping that step (see ``_step_rows_v1``). It lacks step 0.
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"
TABLES = {
    "key_stats": ("stats.parquet", KEY_STATS_SCHEMA),
    "query_stats": ("query_stats.parquet", QUERY_STATS_SCHEMA),
    "step_stats": ("step_stats.parquet", STEP_STATS_SCHEMA),
}


def write_dump(trace: Trace, folder: str | Path) -> Path:
    """Write ``trace`` to ``folder`` atomically; an existing dump there is replaced."""
    target = Path(folder)
    if target.exists() and not (target / MANIFEST).exists() and any(target.iterdir()):
        raise DumpError(f"{target} exists and is not a kvlens dump; choose another --out")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.writing-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        tensors = {name: t.contiguous() for name, t in trace.tensors.items()}
        save_file(tensors, str(tmp / TENSORS), metadata={"schema": SCHEMA})
        tables = {}
        for attr, (filename, _schema) in TABLES.items():
            df = getattr(trace, attr)
            if df is None:
                continue
            df.write_parquet(tmp / filename)
            tables[attr] = {"file": filename, "rows": df.height, "columns": df.columns}
        manifest = {
            "schema": SCHEMA,
            "version": SCHEMA_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": trace.model.to_json(),
            "prompt": trace.prompt,
            "token_ids": list(trace.token_ids),
            "tokens": list(trace.tokens),
            "settings": trace.settings,
            "timings": trace.timings,
            "tensors": {
                n: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
                for n, t in tensors.items()
            },
            "tables": tables,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _fail(folder: Path, what: str) -> DumpError:
    return DumpError(f"dump {folder}: {what}")


def read_manifest(folder: str | Path) -> dict:
    """Read and check a dump's manifest (schema, version, required fields)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise _fail(folder, "no such folder")
    path = folder / MANIFEST
    if not path.is_file():
        raise _fail(folder, f"no {MANIFEST}; not a kvlens dump")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(folder, f"{MANIFEST} is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise _fail(folder, f"{MANIFEST} is not a kvlens dump manifest")
    if manifest.get("version") not in READABLE_VERSIONS:
        raise _fail(
            folder,
            f"schema version {manifest.get('version')!r} is not supported "
            f"(this kvlens reads versions {', '.join(map(str, READABLE_VERSIONS))})",
        )
    required = {
        "model": dict,
        "prompt": str,
        "token_ids": list,
        "tokens": list,
        "settings": dict,
        "tensors": dict,
        "tables": dict,
    }
    for key, kind in required.items():
        if not isinstance(manifest.get(key), kind):
            raise _fail(folder, f"manifest field '{key}' is missing or not a {kind.__name__}")
    if len(manifest["token_ids"]) != len(manifest["tokens"]):
        raise _fail(folder, "manifest has different numbers of token ids and token texts")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in manifest["token_ids"]):
        raise _fail(folder, "manifest token_ids are not all integers")
    return manifest


def read_dump(folder: str | Path) -> Trace:
    """Load a dump, checking it against its manifest; raises DumpError naming any problem.

    Whatever a damaged or hostile folder holds, the result is a Trace or one DumpError line:
    any unexpected failure while reading is reported as a malformed dump.
    """
    folder = Path(folder)
    try:
        return _read_dump(folder)
    except (DumpError, KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:
        raise _fail(folder, f"is malformed ({exc.__class__.__name__})") from None


INT_FACTS = ("n_layers", "n_heads", "n_kv_heads", "head_dim", "max_positions", "vocab_size")


def _read_facts(folder: Path, data: dict) -> ModelFacts:
    try:
        facts = ModelFacts.from_json(data)
    except (TypeError, ValueError) as exc:
        raise _fail(
            folder, f"manifest model facts are malformed ({exc.__class__.__name__})"
        ) from None
    for name in INT_FACTS:
        value = getattr(facts, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value > 10**7:
            raise _fail(folder, f"manifest model fact '{name}' is not a sensible count")
    if facts.n_layers < 1 or facts.n_heads < 1 or facts.n_kv_heads < 1 or facts.head_dim < 1:
        raise _fail(folder, "manifest model facts must have at least one layer, head and channel")
    return facts


def _read_dump(folder: Path) -> Trace:
    manifest = read_manifest(folder)
    facts = _read_facts(folder, manifest["model"])
    if not all(isinstance(t, str) for t in manifest["tokens"]):
        raise _fail(folder, "manifest tokens are not all strings")
    n_tokens = len(manifest["token_ids"])
    tensors = _read_tensors(folder, manifest, facts, n_tokens)
    tables = {}
    for attr, (filename, schema) in TABLES.items():
        spec = manifest["tables"].get(attr)
        tables[attr] = None if spec is None else _read_table(folder, filename, spec, schema)
    n_prompt = manifest["settings"].get("n_prompt_tokens", n_tokens)  # checked with tensors
    steps = tables["step_stats"]
    if steps is not None and manifest["version"] == 1:
        steps = tables["step_stats"] = _step_rows_v1(steps, n_tokens - n_prompt)
    if steps is not None and steps.height:
        bad_step = steps["step"].min() < 0 or steps["step"].max() >= n_tokens - n_prompt
        # the query of step s sits at n_prompt - 1 + s and sees no later position
        late = steps.filter(pl.col("position") > pl.col("step") + (n_prompt - 1)).height
        if bad_step or late:
            raise _fail(
                folder,
                "step_stats.parquet holds steps or positions the generated tokens do not allow",
            )
    for attr in ("key_stats", "query_stats", "step_stats"):
        df = tables[attr]
        if (
            df is not None
            and df.height
            and (
                df["layer"].min() < 0
                or df["layer"].max() >= facts.n_layers
                or df["head"].min() < 0
                or df["head"].max() >= facts.n_heads
                or df["position"].min() < 0
                or df["position"].max() >= n_tokens
            )
        ):
            raise _fail(
                folder, f"{TABLES[attr][0]} holds layers, heads or positions the model lacks"
            )
    return Trace(
        model=facts,
        prompt=manifest["prompt"],
        token_ids=manifest["token_ids"],
        tokens=manifest["tokens"],
        settings=manifest["settings"],
        tensors=tensors,
        key_stats=tables["key_stats"],
        query_stats=tables["query_stats"],
        step_stats=tables["step_stats"],
        timings=manifest.get("timings") or {},
    )


def _step_rows_v1(steps: pl.DataFrame, n_generated: int) -> pl.DataFrame:
    """Version-1 step rows under today's convention: their step s was already the query at
    n_prompt - 1 + s, but the last one produced a token outside the trace; drop it."""
    return steps.filter(pl.col("step") < n_generated)


def _expected_shape(
    name: str, facts: ModelFacts, n_tokens: int, n_prompt: int, folder: Path
) -> list[int]:
    parts = name.split(".")
    if (
        len(parts) != 3
        or parts[0] != "layers"
        or not parts[1].isdigit()
        or parts[2] not in TENSOR_KINDS
    ):
        raise _fail(folder, f"unexpected tensor name '{name}'")
    if int(parts[1]) >= facts.n_layers:
        raise _fail(folder, f"tensor '{name}' names a layer the model does not have")
    if parts[2] == "attn":
        return [facts.n_heads, n_prompt, n_prompt]
    return [facts.n_kv_heads, n_tokens, facts.head_dim]


def _read_tensors(folder: Path, manifest: dict, facts: ModelFacts, n_tokens: int) -> dict:
    expected = manifest["tensors"]
    n_prompt = manifest["settings"].get("n_prompt_tokens", n_tokens)
    if not isinstance(n_prompt, int) or not 0 < n_prompt <= n_tokens:
        raise _fail(folder, "manifest settings.n_prompt_tokens is not a token count")
    path = folder / TENSORS
    if not path.is_file():
        raise _fail(folder, f"{TENSORS} is missing")
    tensors = {}
    try:
        with safe_open(str(path), framework="pt") as fh:
            names = set(fh.keys())
            if names != set(expected):
                missing = sorted(set(expected) - names)[:3]
                extra = sorted(names - set(expected))[:3]
                raise _fail(
                    folder,
                    f"{TENSORS} holds other tensors than the manifest lists "
                    f"(missing {missing}, unexpected {extra})",
                )
            for name in sorted(names):
                want = _expected_shape(name, facts, n_tokens, n_prompt, folder)
                t = fh.get_tensor(name)
                if list(t.shape) != want or list(t.shape) != expected[name].get("shape"):
                    raise _fail(
                        folder, f"tensor '{name}' has shape {list(t.shape)}, expected {want}"
                    )
                if str(t.dtype).replace("torch.", "") != expected[name].get("dtype"):
                    raise _fail(
                        folder,
                        f"tensor '{name}' has dtype {t.dtype}, manifest says "
                        f"{expected[name].get('dtype')}",
                    )
                tensors[name] = t
    except DumpError:
        raise
    except Exception as exc:  # safetensors raises several types for damaged files
        raise _fail(
            folder, f"{TENSORS} is damaged or truncated ({exc.__class__.__name__})"
        ) from None
    return tensors


def _read_table(folder: Path, filename: str, spec: dict, schema: dict) -> pl.DataFrame:
    path = folder / filename
    if not isinstance(spec, dict) or spec.get("file") != filename:
        raise _fail(folder, f"manifest entry for {filename} is malformed")
    if not path.is_file():
        raise _fail(folder, f"{filename} is missing")
    try:
        df = pl.read_parquet(path)
    except Exception as exc:
        raise _fail(
            folder, f"{filename} is damaged or truncated ({exc.__class__.__name__})"
        ) from None
    if df.height != spec.get("rows"):
        raise _fail(folder, f"{filename} has {df.height} rows, manifest says {spec.get('rows')}")
    for col, dtype in schema.items():
        if col not in df.columns:
            raise _fail(folder, f"{filename} lacks column '{col}'")
        if df.schema[col] != dtype:
            raise _fail(folder, f"{filename} column '{col}' is {df.schema[col]}, expected {dtype}")
    return df
