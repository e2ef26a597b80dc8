"""`kvlens sparse`: run sparse-attention methods (the whole cache kept, each decoding step
reads a selected part) against the full cache on one input and print, per method, the
attention recall of its selections, the oracle's at the same read, output error, KL, and the
bytes held (device / host) and read per step."""

from __future__ import annotations

import json
import sys

from probes.errors import KvlensError

DEFAULT_METHODS = "oracle:budget=128,quest:budget=128,squeezed:budget=128,random_pages:budget=128"


def add_sparse_parser(sub) -> None:
    from app.cli import _depth, _positive_int

    p = sub.add_parser(
        "sparse", help="attention recall and bytes of sparse-attention methods on one input"
    )
    p.add_argument("--model", default="smollm2-135m", help="embedded model name, folder or .gguf")
    p.add_argument("--prompt", help="the prompt text")
    p.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    p.add_argument("--task", choices=["niah", "multikey", "vartrack"], help="a generated task")
    p.add_argument("--length", type=_positive_int, default=1024, help="task length in tokens")
    p.add_argument("--depth", type=_depth, default=0.5, help="needle depth in [0, 1]")
    p.add_argument("--seed", type=int, default=0, help="task seed")
    p.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help="comma-separated sparse method specs, e.g. quest:budget=256,page=16",
    )
    p.add_argument(
        "--max-new-tokens", type=_positive_int, default=8, help="decoding steps measured (>= 2)"
    )
    p.add_argument("--hard", type=float, default=0.5, help="recall below which a head is hard")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--json", help="write the summaries, curve and hard heads here")
    p.set_defaults(func=cmd_sparse)


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def cmd_sparse(args) -> int:
    import polars as pl
    from tqdm import tqdm

    from analysis.sparse_recall import hard_heads, recall_curve
    from app.cli import _model_and_prompt, _one_line
    from methods.memory import SERVING_NOTE
    from methods.registry import create, split_specs
    from methods.sparse.run import sparse_compare

    specs = split_specs(args.methods)
    for spec in specs:  # a bad spec fails before the model loads
        method = create(spec)
        if method is not None and not method.selects:
            raise KvlensError(
                f"{method.name} is not a sparse method (family {method.family}); the sparse "
                "family keeps the cache and selects what each step reads"
            )
    if not 0.0 <= args.hard <= 1.0:
        raise KvlensError(f"--hard must be in [0, 1], got {args.hard}")
    model, tokenizer, task, ids = _model_and_prompt(args)
    with tqdm(total=len(specs) + 1, desc="sparse", unit="run", file=sys.stderr) as bar:
        started: list[str] = []

        def progress(name: str) -> None:
            if started:
                bar.update(1)
            started.append(name)
            bar.set_postfix_str(name)

        runs = sparse_compare(
            model, tokenizer, ids, specs, max_new_tokens=args.max_new_tokens,
            score=task.score if task else None, progress=progress,
        )  # fmt: skip
        bar.update(bar.total - bar.n)
    table = pl.concat([r.recall for r in runs])
    curve = {row["method"]: row for row in recall_curve(table).iter_rows(named=True)}
    full = runs[0].full_bytes
    print(
        f"{len(ids)} prompt tokens, {args.max_new_tokens} new; full cache {_mb(full)} MiB\n"
        f"{'method':<36} {'read':>6} {'read%':>6} {'recall':>6} {'oracle':>6} {'err':>6} "
        f"{'KL':>7} {'top-1':>5} {'acc':>4} {'dev MiB':>8} {'host MiB':>8} {'step MiB':>8}"
    )
    full_acc = "-" if runs[0].full_accuracy is None else f"{runs[0].full_accuracy:.2f}"
    print(f"{'full':<36} {'all':>6} {1:>6.1%} {1:>6.3f} {1:>6.3f} {0:>6.3f} {0:>7.4f} "
          f"{1:>5.2f} {full_acc:>4} {_mb(full):>8} {_mb(0):>8} {_mb(full):>8}")  # fmt: skip
    for r in runs:
        c = curve[r.spec]
        acc = "-" if r.accuracy is None else f"{r.accuracy:.2f}"
        m = r.memory
        print(
            f"{_one_line(r.spec, 36):<36} {c['tokens_read']:>6.0f} {c['read_fraction']:>6.1%} "
            f"{c['recall']:>6.3f} {c['oracle_recall']:>6.3f} {c['output_error']:>6.3f} "
            f"{sum(r.kl_per_step) / len(r.kl_per_step):>7.4f} {r.top1:>5.2f} {acc:>4} "
            f"{_mb(m['device']):>8} {_mb(m['host']):>8} {_mb(m['read_per_step']):>8}"
        )
    print(
        "read: tokens per KV head and step (mean over layers); recall: attention mass in the "
        "selection; oracle: the top tokens' mass at the same read; err: relative output error; "
        f"step MiB: bytes one decoding step reads (selection + rows), all layers; {SERVING_NOTE}"
    )
    hard = hard_heads(table, args.hard)
    if hard.height:
        listed = ", ".join(
            f"L{r['layer']}H{r['head']} ({r['best_recall']:.2f})"
            for r in hard.head(8).iter_rows(named=True)
        )
        print(f"hard heads (recall < {args.hard} under every method): {listed}")
    else:
        print(f"no head below recall {args.hard} under every method")
    if args.json:
        out = {
            "settings": {"model": args.model, "n_prompt": len(ids), "methods": specs,
                         "max_new_tokens": args.max_new_tokens, "full_bytes": full},
            "runs": [r.summary() for r in runs],
            "curve": recall_curve(table).to_dicts(),
            "hard_heads": hard.to_dicts(),
        }  # fmt: skip
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=2)
        print(args.json)
    return 0
