"""`kvlens prefill-sparse`: prefill-side sparse attention (XAttention, MInference-style
vertical-slash, PSA) on one input. Prints, per method config, the density, mass recall and
output error of its masks over the prompt's real queries, keys and values (mean over the
chosen layers and heads, ``analysis.prefill_sparse``); with ``--answer`` also runs each
config inside the model's prefill (``methods.sparse.prefill``) and prints accuracy, KL and
top-1 agreement against the full prefill."""

from __future__ import annotations

import json

DEFAULT_METHODS = (
    "xattention:threshold=0.9,vertical_slash:vertical=64,slash=64,psa:thresholds=0.7/0.8/0.9/0.95"
)


def add_prefill_sparse_parser(sub) -> None:
    from app.cli import _depth, _positive_int

    p = sub.add_parser(
        "prefill-sparse",
        help="density, mass recall and output error of prefill sparse-attention masks",
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
        help="comma-separated specs: xattention:block=64,stride=8,threshold=0.9; "
        "vertical_slash:last_q=64,vertical=64,slash=64; psa:block=64,thresholds=0.7/0.8/0.9",
    )
    p.add_argument("--layers", help="comma-separated layers to measure (default: all)")
    p.add_argument("--answer", action="store_true", help="also run each config inside the prefill")
    p.add_argument("--max-new-tokens", type=_positive_int, default=10, help="with --answer")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--json", help="write the tables here")
    p.set_defaults(func=cmd_prefill_sparse)


def cmd_prefill_sparse(args) -> int:
    from analysis.prefill_sparse import layer_table, parse_spec, summary
    from app.cli import _model_and_prompt, _one_line
    from methods.registry import split_specs
    from probes.errors import KvlensError
    from probes.queries import capture_qkv

    methods = [parse_spec(s) for s in split_specs(args.methods)]  # fail before loading
    layers = None
    if args.layers:
        try:
            layers = [int(x) for x in args.layers.split(",") if x.strip()]
        except ValueError:
            raise KvlensError(
                f"--layers must be comma-separated integers, got {args.layers!r}"
            ) from None
    model, tokenizer, task, ids = _model_and_prompt(args)
    qkv = capture_qkv(model, tokenizer, ids, layers=layers)
    table = layer_table(
        {x: (qkv.queries[x], qkv.keys[x], qkv.values[x]) for x in qkv.layers}, qkv.scale, methods
    )
    order = {m.label(): i for i, m in enumerate(methods)}
    rows = sorted(summary(table).iter_rows(named=True), key=lambda r: order[r["config"]])
    print(
        f"{len(ids)} prompt tokens, {len(qkv.layers)} layers\n"
        f"{'config':<52} {'density':>7} {'recall':>6} {'min':>6} {'err':>6} {'max err':>7}"
    )
    for r in rows:
        print(
            f"{_one_line(r['config'], 52):<52} {r['density']:>7.3f} {r['recall']:>6.3f} "
            f"{r['min_recall']:>6.3f} {r['output_error']:>6.3f} {r['max_output_error']:>7.3f}"
        )
    print(
        "density: share of causal entries computed (PSA: pooled blocks at 1/2**level); "
        "recall: mean per-query attention mass kept; min: worst query; err: relative output "
        "error per head vs full attention (mean, worst head)"
    )
    runs_out = []
    if args.answer:
        from methods.sparse.prefill import prefill_compare

        full, runs = prefill_compare(
            model, tokenizer, ids, methods, max_new_tokens=args.max_new_tokens,
            score=task.score if task else None,
        )  # fmt: skip
        print(f"\ninside the prefill, {args.max_new_tokens} new tokens; full: {full.text!r}")
        print(f"{'config':<52} {'KL':>7} {'top-1':>5} {'acc':>4}  text")
        for run in runs:
            d = run.summary()
            acc = "-" if d["accuracy"] is None else f"{d['accuracy']:.2f}"
            print(
                f"{_one_line(d['config'], 52):<52} {d['kl_mean']:>7.4f} {d['top1']:>5.2f} "
                f"{acc:>4}  {_one_line(d['text'], 40)!r}"
            )
            runs_out.append(d)
    if args.json:
        out = {
            "settings": {"model": args.model, "n_prompt": len(ids), "layers": qkv.layers},
            "masks": rows,
            "runs": runs_out,
        }
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=2)
        print(args.json)
    return 0
