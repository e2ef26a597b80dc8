"""kvlens' KIVI against transformers' ``QuantizedCache`` (quanto backend), issue 20 section 3.

One SmolLM2 prompt: ``--prefill`` tokens in one call, then ``--decode`` more tokens of the same
text fed one at a time (teacher-forced, so every cache sees the same tokens). Each cache's
keys and values as attention reads them next (dequantised codes plus the full-precision
residual) are compared with those of a plain ``DynamicCache`` of the same run: mean absolute
error per element and relative error ||x' - x|| / ||x||, over every token and over the tokens
both kvlens and the QuantizedCache hold quantised; and the bytes each holds.

Layouts. kvlens ``kivi`` is the paper's: keys per channel over groups of ``group`` tokens,
values per token, the newest up to ``residual`` tokens in full precision (quantised a group at
a time as they overflow), fp16 scale and minimum. ``QuantizedCache`` quantises the whole
prefill at once, keeps later tokens in a residual until it holds ``residual_length``, then
re-quantises everything (codes dequantised, residual appended) and empties it; it dequantises
the whole cache at every step. With quanto, ``axis=0`` groups ``q_group_size`` consecutive
channels of one token (with group 64 = head_dim: per token), ``axis=-1`` one channel over
``q_group_size`` consecutive tokens (KIVI's key layout); transformers' default is
``axis_key=0, axis_value=0`` (keys per token). quanto keeps scale and shift in the compute
dtype (float32 here): bytes are given as stored and with every floating tensor counted at
16 bits (kvlens' rule, ``methods.memory``).

    .venv/bin/python benchmarks/kivi_vs_quantized_cache.py [--prefill 1024] [--decode 160]
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def run(model, ids: list[int], n_prefill: int, cache) -> tuple[torch.Tensor, float]:
    """Prefill then one token at a time into ``cache``; the last logits and decode seconds."""
    from probes.compat import cache_arg

    with torch.inference_mode():
        model(input_ids=torch.tensor([ids[:n_prefill]]), **cache_arg(model, cache), use_cache=True)
        t0 = time.perf_counter()
        for t in ids[n_prefill:]:
            logits = model(
                input_ids=torch.tensor([[t]]), **cache_arg(model, cache), use_cache=True
            ).logits[0, -1]
        return logits.float(), time.perf_counter() - t0


def quanto_state(layer) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
    """Keys, values [H, n, D] a QuantizedCache layer attends over next; quantised tokens;
    bytes as stored; bytes with floating tensors at 16 bits."""
    keys, values, stored, serving = [], [], 0, 0
    for q, res in ((layer._quantized_keys, layer.keys), (layer._quantized_values, layer.values)):
        parts = [q.dequantize()]
        if res.dim() == 4 and res.shape[-2]:
            parts.append(res)
            stored += res.numel() * res.element_size()
            serving += res.numel() * 2
        (keys if q is layer._quantized_keys else values).append(torch.cat(parts, dim=-2)[0])
        codes = q._data._data if hasattr(q._data, "_data") else q._data
        stored += codes.numel() * codes.element_size()
        serving += codes.numel() * codes.element_size()
        for t in (q._scale, q._shift):
            stored += t.numel() * t.element_size()
            serving += t.numel() * 2
    n_quant = layer._quantized_keys.shape[-2]
    return keys[0], values[0], n_quant, stored, serving


def errors(got: torch.Tensor, ref: torch.Tensor, upto: int) -> tuple[float, float, float]:
    """Mean |error| per element over all tokens, over the first ``upto``; relative error."""
    d = (got.float() - ref.float()).abs()
    rel = (got.float() - ref.float()).norm() / ref.float().norm()
    return d.mean().item(), d[:, :upto].mean().item(), rel.item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefill", type=int, default=1024)
    ap.add_argument("--decode", type=int, default=160)
    ap.add_argument("--bits", default="4,2")
    ap.add_argument("--residual", type=int, default=128)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import transformers
    from optimum.quanto import __version__ as quanto_version
    from transformers import DynamicCache, QuantizedCache

    import probes
    from methods.cache import CompressedCache, full_cache_nbytes
    from methods.registry import create
    from probes.tasks import make_qa_task

    torch.manual_seed(0)
    model, tok = probes.load_model()
    n = args.prefill + args.decode
    qa = make_qa_task(int(n * 1.3), tok, n_keys=1, seed=0)
    ids = tok(qa.context)["input_ids"][:n]
    assert len(ids) == n, f"the prompt has {len(ids)} tokens, {n} needed"
    print(
        f"SmolLM2 {model.dtype}, transformers {transformers.__version__}, optimum-quanto "
        f"{quanto_version}; {args.prefill} tokens prefilled + {args.decode} fed one at a time"
    )

    ref_cache = DynamicCache()
    ref_logits, ref_s = run(model, ids, args.prefill, ref_cache)
    ref = [(layer.keys[0], layer.values[0]) for layer in ref_cache.layers]
    full16 = full_cache_nbytes(model, n)

    rows = []
    for bits in (int(b) for b in args.bits.split(",")):
        spec = f"kivi:bits={bits},group=64,residual={args.residual}"
        cache = CompressedCache(model, create(spec))
        logits, secs = run(model, ids, args.prefill, cache)
        states = []
        for layer in cache.layers:
            store = layer.store
            states.append((torch.stack(store.keys), torch.stack(store.values), store.n_quant))
        rows.append((f"kvlens `{spec}`", states, cache.nbytes(), cache.nbytes(), logits, secs))
        for axis_key, what in ((0, "keys per token"), (-1, "keys per channel")):
            qc = QuantizedCache(
                "quanto",
                model.config,
                nbits=bits,
                axis_key=axis_key,
                axis_value=0,
                q_group_size=64,
                residual_length=args.residual,
            )
            logits, secs = run(model, ids, args.prefill, qc)
            got = [quanto_state(layer) for layer in qc.layers]
            label = (
                f"QuantizedCache quanto nbits={bits}, axis_key={axis_key}, axis_value=0, "
                f"q_group_size=64, residual_length={args.residual} ({what})"
            )
            states = [(k, v, nq) for k, v, nq, _, _ in got]
            stored = sum(g[3] for g in got)
            serving = sum(g[4] for g in got)
            rows.append((label, states, stored, serving, logits, secs))

    upto = min(st[0][2] for _, st, *_ in rows)  # tokens every cache holds quantised
    print(
        f"\nerror per element vs DynamicCache, mean over {len(ref)} layers x KV heads x "
        f"channels; 'quantised' = the first {upto} tokens, quantised in every cache; full "
        f"cache at 16 bits: {full16 / 2**20:.2f} MiB; plain decode {ref_s:.1f} s\n"
    )
    print(
        "| cache | quantised tokens | K mean abs err (all / quantised) | K rel err "
        "| V mean abs err (all / quantised) | V rel err | MiB as stored | MiB at 16 bits "
        "| % of full (16 bits) | max abs logit diff, last step | decode s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, states, stored, serving, logits, secs in rows:
        ek = [errors(k, r[0], upto) for (k, _, _), r in zip(states, ref)]
        ev = [errors(v, r[1], upto) for (_, v, _), r in zip(states, ref)]
        mean = lambda xs, i: sum(x[i] for x in xs) / len(xs)  # noqa: E731
        print(
            f"| {label} | {states[0][2]} | {mean(ek, 0):.4f} / {mean(ek, 1):.4f} | "
            f"{mean(ek, 2):.4f} | {mean(ev, 0):.4f} / {mean(ev, 1):.4f} | {mean(ev, 2):.4f} | "
            f"{stored / 2**20:.2f} | {serving / 2**20:.2f} | {100 * serving / full16:.1f} | "
            f"{(logits - ref_logits).abs().max().item():.3f} | {secs:.1f} |"
        )


if __name__ == "__main__":
    main()
