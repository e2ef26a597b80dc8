"""`kvlens reuse`: chunk-cache reuse for retrieval-augmented prompts (CacheBlend, Yao et al.
2025; Cache-Craft, Agarwal et al. 2025; KVCOMM, Ye et al. 2025). Each chunk of a generated
multi-document QA prompt is prefilled alone, moved to its place and reused; the table gives,
per method, answer accuracy, teacher-forced KL against the full prefill, the share of chunk
tokens recomputed, prefill FLOPs saved and how far the reused keys/values are from the full
prefill's (CacheBlend's deviation, mean over layers and chunk tokens)."""

from __future__ import annotations

import json
import sys

from probes.errors import KvlensError

DEFAULT_METHODS = "full,naive,cacheblend:recompute=0.15,cachecraft,kvcomm"


def add_reuse_parser(sub) -> None:
    """Register ``reuse`` on the top-level subparsers."""
    p = sub.add_parser(
        "reuse", help="chunk-cache reuse (CacheBlend, Cache-Craft, KVCOMM) on a RAG task"
    )
    p.add_argument("--model", default="smollm2-135m", help="embedded model name, folder or .gguf")
    p.add_argument("--task", default="rag", help="the generated task: rag (multi-document QA)")
    p.add_argument("--two-hop", action="store_true", help="the answer needs facts from two chunks")
    p.add_argument("--chunks", type=int, default=6, help="number of document chunks")
    p.add_argument("--chunk-tokens", type=int, default=256, help="tokens per chunk (>= 32)")
    p.add_argument(
        "--answer-chunk", type=int, help="chunk holding the answer (default: a seeded one)"
    )
    p.add_argument("--seed", type=int, default=0, help="task seed")
    p.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help="comma-separated reuse specs: full, naive, cacheblend:recompute=0.15, "
        "cachecraft:recompute=0.15, kvcomm:anchors=3",
    )
    p.add_argument(
        "--rotation",
        default="delta",
        help="how chunk keys move: delta (rotate by the offset) or pre_rope (RoPE afresh)",
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=10, help="tokens generated (>= 1; a number takes 8)"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--json", help="write the settings and every result here ('-': stdout)")
    p.set_defaults(func=cmd_reuse)


def check_args(args) -> list[str]:
    """Every refusal that needs no model; the method specs, split."""
    from methods.registry import split_specs
    from methods.reuse import create_reuse
    from methods.reuse.chunks import ROTATIONS
    from probes.rag_tasks import check_rag_settings

    if args.task != "rag":
        raise KvlensError(f"--task must be rag, not '{args.task}' (two hops: --two-hop)")
    kind = "twohop" if args.two_hop else "rag"
    check_rag_settings(kind, args.chunks, args.chunk_tokens, args.answer_chunk)
    if args.max_new_tokens < 1:
        raise KvlensError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.rotation not in ROTATIONS:
        raise KvlensError(
            f"--rotation must be one of {', '.join(ROTATIONS)}, not '{args.rotation}'"
        )
    specs = split_specs(args.methods)
    if not specs:
        raise KvlensError("--methods is empty")
    for spec in specs:
        create_reuse(spec)
    return specs


def deviation_by_method(run, segments: list[int]) -> dict[str, dict]:
    """Per method: mean relative key/value deviation over chunk tokens, overall and per layer."""
    import polars as pl

    from analysis.chunk_reuse import kv_deviation, layer_summary

    full = run.tensors["full"]
    out = {}
    for spec, t in run.tensors.items():
        if spec == "full":
            continue
        kv = kv_deviation(full["keys"], full["values"], t["keys"], t["values"], segments)
        chunk = kv.filter(pl.col("segment") >= 0)
        out[spec] = {
            "key_rel": float(chunk["key_rel"].mean()),
            "value_rel": float(chunk["value_rel"].mean()),
            "per_layer": layer_summary(kv).to_dicts(),
        }
    return out


def cmd_reuse(args) -> int:
    from tqdm import tqdm

    from app.cli import _one_line
    from methods.reuse.run import reuse_compare, task_layout
    from probes import load_model
    from probes.rag_tasks import make_rag_task

    specs = check_args(args)  # every refusal before the model loads
    print(f"loading {args.model} ...", file=sys.stderr)
    model, tokenizer = load_model(args.model, device=args.device)
    kind = "twohop" if args.two_hop else "rag"
    task = make_rag_task(
        kind, tokenizer, n_chunks=args.chunks, chunk_tokens=args.chunk_tokens,
        answer_chunk=args.answer_chunk, seed=args.seed,
    )  # fmt: skip
    layout = task_layout(task, tokenizer)
    with tqdm(total=len(specs), desc="reuse", unit="run", file=sys.stderr) as bar:

        def progress(name: str) -> None:
            bar.set_postfix_str(name)
            if name != "full":
                bar.update(1)

        run = reuse_compare(
            model, tokenizer, layout, specs, max_new_tokens=args.max_new_tokens,
            score=task.score, rotation=args.rotation, keep_tensors=True, progress=progress,
        )  # fmt: skip
        bar.update(bar.total - bar.n)
    deviation = deviation_by_method(run, layout.segments())
    s = run.settings
    out = sys.stderr if args.json == "-" else sys.stdout
    print(
        f"{kind}: {s['n_chunks']} chunks of {'/'.join(map(str, s['chunk_lengths']))} tokens, "
        f"{s['n_prompt_tokens']} prompt tokens, answer {task.answers[0]} in chunk "
        f"{'+'.join(map(str, task.answer_chunks))}; rotation {args.rotation}\n"
        f"{'method':<40} {'acc':>4} {'KL':>8} {'top-1':>5} {'recomp':>6} {'saved':>6} "
        f"{'Kdev':>6} {'Vdev':>6} {'time s':>6}  text",
        file=out,
    )
    for r in run.results:
        dev = deviation.get(r.spec)
        kdev = "-" if dev is None else f"{dev['key_rel']:.3f}"
        vdev = "-" if dev is None else f"{dev['value_rel']:.3f}"
        acc = "-" if r.accuracy is None else f"{r.accuracy:.2f}"
        print(
            f"{_one_line(r.spec, 40):<40} {acc:>4} {r.kl_mean:>8.4f} {r.top1:>5.2f} "
            f"{r.recomputed:>6.1%} {r.flops_saved:>6.1%} {kdev:>6} {vdev:>6} {r.time_s:>6.1f}  "
            f"{_one_line(repr(r.text), 40)}",
            file=out,
        )
    print(
        "acc: the answer in the output; KL: teacher-forced KL(full || method) over the full "
        "prefill's tokens; recomp: chunk tokens recomputed; saved: prefill FLOPs avoided; "
        "Kdev/Vdev: reused keys/values' relative distance from the full prefill's",
        file=out,
    )
    if args.json:
        data = run.to_json()
        data["settings"].update(task.settings)
        data["deviation"] = deviation
        text = json.dumps(data, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w", encoding="utf-8") as fh:
                fh.write(text)
            print(args.json)
    return 0
