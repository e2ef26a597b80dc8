"""Parity with kvpress (NVIDIA), the reference library for KV-cache eviction.

kvpress pins an older transformers, so it runs in a side environment this script builds
(``.parity-venv/``, git-ignored: the CPU torch wheel on disk first, then ``kvpress`` from
PyPI). The kvlens side runs here; the kvpress side runs in a subprocess of the side venv's
python (``--side JOB``), loading the de-quantised SmolLM2 copy kvlens keeps under
$KVLENS_CACHE with plain transformers. Data goes through JSON and safetensors files in a
temporary folder, never pickle.

For each prompt (kvlens' own needle generator, several lengths and seeds) and each press
with a kvlens counterpart, both sides compress the context (the question unseen, kvpress's
protocol) at the same settings, kvlens' budget being the number of tokens kvpress keeps per
head. Reported: the overlap of kept positions per layer and KV head (|kvlens & kvpress| /
|kvpress|; mean and minimum), and the needle answers after the question is read from the
compressed context. ThinK prunes key channels, so its overlap is over kept channels.

    .venv/bin/python benchmarks/parity_kvpress.py [--lengths 300,700,1200,2000] [--seeds 0,1]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIDE_VENV = ROOT / ".parity-venv"
TORCH = "2.13.0"


# ---------------------------------------------------------------- the side environment
def side_python(venv: Path = SIDE_VENV) -> Path:
    """The side venv's python, building the venv (torch CPU first, then kvpress) if needed."""
    py = venv / "bin" / "python"
    probe = [str(py), "-c", "import kvpress, torch; print(torch.__version__)"]
    if py.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return py
    print(f"building the kvpress side environment in {venv} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    # the CPU build lying on disk, installed first so that nothing pulls a CUDA build
    wheels = sorted(glob.glob(f"/opt/wheels/torch-{TORCH}+cpu-*.whl"))
    subprocess.run([*pip, wheels[-1] if wheels else f"torch=={TORCH}"], check=True)
    subprocess.run([*pip, f"torch=={TORCH}", "kvpress"], check=True)
    return py


# ---------------------------------------------------------------- the kvpress side
def make_press(spec: dict, n_kept: int, n_tokens: int, n_cells: int = 1):
    """A kvpress press from the job's description (side environment only); ``n_cells`` is
    layers x KV heads (KVzip's budget is global over them)."""
    import kvpress

    ratio = 1 - (n_kept + 0.5) / n_tokens  # so that int(T * (1 - ratio)) == n_kept
    kind, p = spec["press"], spec.get("args", {})
    if kind == "kvzip":
        # KVzip prunes int(N * ratio) of all N = cells x T pairs: so that n_kept per head on
        # average stay, int(N * ratio) must be N - cells * n_kept
        n = n_cells * n_tokens
        press = kvpress.KVzipPress((n - n_cells * n_kept + 0.5) / n, n_sink=p["sinks"])
        # the press frames its repeat prompt by the tokenizer's chat template when it has
        # one (SmolLM2's has); chat=False hides the template (kvlens' framing: none)
        from kvpress.presses import kvzip_press
        from transformers import AutoTokenizer

        class Tokenizer:
            @staticmethod
            def from_pretrained(path, *a, **k):
                tok = AutoTokenizer.from_pretrained(path, *a, **k)
                if not p["chat"]:
                    tok.chat_template = None
                return tok

        kvzip_press.AutoTokenizer = Tokenizer
        return press
    if kind == "knorm":
        return kvpress.KnormPress(ratio)
    if kind == "expected":
        return kvpress.ExpectedAttentionPress(
            ratio, n_future_positions=p["future"], n_sink=p["sinks"]
        )
    if kind == "adakv":
        return kvpress.AdaKVPress(
            kvpress.SnapKVPress(ratio, window_size=p["window"], kernel_size=p["kernel"]),
            alpha_safeguard=p["floor"],
        )
    if kind == "think":
        return kvpress.ThinKPress(p["prune"], window_size=p["window"])
    if kind == "duo":
        press = kvpress.DuoAttentionPress(head_compression_ratio=0.5)
        press.sink_size, press.recent_size = p["sinks"], p["recent"]
        import torch

        press.streaming_mask = torch.tensor(p["streaming"], dtype=torch.bool)
        press.post_init_from_model = lambda model: None  # the head choice comes from the job
        return press
    cls = {
        "snapkv": kvpress.SnapKVPress,
        "pyramidkv": kvpress.PyramidKVPress,
        "streamingllm": kvpress.StreamingLLMPress,
        "tova": kvpress.TOVAPress,
        "observed": kvpress.ObservedAttentionPress,
        "random": kvpress.RandomPress,
    }[kind]
    rename = {"window": "window_size", "kernel": "kernel_size", "sinks": "n_sink"}
    return cls(ratio, **{rename.get(k, k): v for k, v in p.items()})


def kept_from_rows(before, after):
    """Per KV head, which rows of ``before`` [H, T, D] survive in ``after`` [H, n, D]."""
    import torch

    mask = torch.zeros(before.shape[:2], dtype=torch.uint8)
    for h in range(before.shape[0]):
        index = {bytes(row.numpy().tobytes()): i for i, row in enumerate(before[h])}
        for row in after[h]:
            mask[h, index[bytes(row.numpy().tobytes())]] = 1
    return mask


def side_answer(model, cache, question: list[int], start: int, max_new: int, eos) -> list[int]:
    """Greedy answer from a compressed kvpress cache, as kvpress's pipeline does it (positions
    continue from the uncompressed context length; the answer is removed from the cache
    afterwards), except that the question is read one token at a time: the same attention
    as one chunk, and SDPA's mask then does not trip over per-layer cache lengths."""
    import torch

    lengths = [layer.keys.shape[2] for layer in cache.layers]
    eos = set(eos if isinstance(eos, list) else [eos])
    out: list[int] = []
    feed = list(question)
    pos = start
    while True:
        for t in feed:
            logits = model(
                input_ids=torch.tensor([[t]]),
                past_key_values=cache,
                position_ids=torch.tensor([[pos]]),
            ).logits[0, -1]
            pos += 1
        out.append(int(logits.argmax()))
        if out[-1] in eos or len(out) == max_new:
            break
        feed = out[-1:]
    for layer, n in zip(cache.layers, lengths):
        layer.keys, layer.values = layer.keys[:, :, :n], layer.values[:, :, :n]
    return out


def run_side(job_path: str) -> None:
    """Side-environment entry: run every (prompt, press) of the job, write kept masks."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    job = json.loads(Path(job_path).read_text())
    out_dir = Path(job_path).parent
    torch.manual_seed(0)
    torch.set_num_threads(1)  # the kvlens side runs beside it on the same cores
    tok = AutoTokenizer.from_pretrained(job["model"])
    models = {
        impl: AutoModelForCausalLM.from_pretrained(
            job["model"], dtype=torch.float32, attn_implementation=impl
        ).eval()
        for impl in ("sdpa", "eager")
    }
    tensors, answers = {}, {}
    with torch.inference_mode():
        first = job["prompts"][0]["context"]
        logits = models["sdpa"](input_ids=torch.tensor([first])).logits[0, -1]
        tensors["sanity.logits"] = logits.float().contiguous()
        for pi, prompt in enumerate(job["prompts"]):
            ctx = torch.tensor([prompt["context"]])
            t = ctx.shape[1]
            done: dict[str, int] = {}
            for si, spec in enumerate(job["presses"]):
                impl = "eager" if spec["press"] == "observed" else "sdpa"
                model = models[impl]
                key = json.dumps(spec, sort_keys=True)
                if key in done:  # the same press twice (kvlens defaults vs reference)
                    tensors[f"kept.{pi}.{si}"] = tensors[f"kept.{pi}.{done[key]}"].clone()
                    answers[f"{pi}.{si}"] = answers[f"{pi}.{done[key]}"]
                    continue
                done[key] = si
                n_cells = model.config.num_hidden_layers * model.config.num_key_value_heads
                press = make_press(spec, prompt["n_kept"], t, n_cells)
                record: dict = {}
                inner = press.compress

                def recording(module, hidden, keys, values, attn, kwargs, _inner=inner, _r=record):
                    before = keys[0].detach().clone()
                    k2, v2 = _inner(module, hidden, keys, values, attn, kwargs)
                    _r[module.layer_idx] = (before, k2[0].detach().clone())
                    return k2, v2

                press.compress = recording
                # kvpress's protocol: compress the context, then read each question
                cache = DynamicCache()
                with press(model):
                    model.model(input_ids=ctx, past_key_values=cache)
                eos = model.generation_config.eos_token_id
                answers[f"{pi}.{si}"] = [
                    tok.decode(
                        side_answer(model, cache, q, t, job["max_new_tokens"], eos),
                        skip_special_tokens=True,
                    )
                    for q in prompt["questions"]
                ]
                layers = model.model.layers
                masks = []
                for li in range(len(layers)):
                    # KVzip compresses after its replay, by masks, not through compress
                    before, after = record.get(li, (cache.layers[li].keys[0], None))
                    masked = getattr(layers[li].self_attn, "masked_key_indices", None)
                    if spec["press"] == "think":  # kept channels: not zeroed by the press
                        zeroed = (after == 0).all(1) & ~(before == 0).all(1)
                        masks.append((~zeroed).to(torch.uint8))
                    elif masked is not None:  # masking presses (AdaKV, DuoAttention)
                        m = torch.ones(before.shape[:2], dtype=torch.uint8)
                        m[masked[1], masked[2]] = 0
                        masks.append(m)
                    else:
                        masks.append(kept_from_rows(before, after))
                    layers[li].self_attn.masked_key_indices = None
                tensors[f"kept.{pi}.{si}"] = torch.stack(masks).contiguous()
                print(f"side: prompt {pi} press {spec['press']} done", flush=True)
    save_file(tensors, str(out_dir / "side.safetensors"))
    (out_dir / "side.json").write_text(json.dumps({"answers": answers}))


# ---------------------------------------------------------------- the kvlens side
def kvlens_kept(cache, spec_name: str):
    """[layers, H, T] uint8 masks of what the kvlens cache holds (ThinK: kept channels)."""
    import torch

    masks = []
    for layer in cache.layers:
        store = layer.store
        if spec_name == "think":
            d = store.encodings[0].head_dim
            m = torch.zeros(store.n_heads, d, dtype=torch.uint8)
            for h, enc in enumerate(store.encodings):
                m[h, enc.channels.long()] = 1
        else:
            m = torch.zeros(store.n_heads, layer.n_seen, dtype=torch.uint8)
            for h, pos in enumerate(store.positions):
                m[h, pos.long()] = 1
        masks.append(m)
    return torch.stack(masks)


def pairs(n_kept: int, duo_streaming, n_tokens: int | None = None) -> list[tuple[str, dict, str]]:
    """(label, kvpress press description, kvlens spec) at the same settings; ``n_tokens``,
    the context length, for the settings that depend on it (None: shown symbolically)."""
    b = n_kept
    kp_snap = {"window": 64, "kernel": 5}
    t = n_tokens
    # kvpress's ExpectedAttention fits its query statistics to every query after the sinks
    ea_window = t - 4 if t else "T-4"
    # KVzip keeps a fraction of all pairs (global allocation): B of T per head on average
    zip_ratio = b / t if t else "B/T"
    return [
        ("SnapKV", {"press": "snapkv", "args": kp_snap},
         f"snapkv:budget={b},window=64,kernel=5,pooling=avg"),
        ("PyramidKV", {"press": "pyramidkv", "args": kp_snap | {"beta": 20}},
         f"pyramidkv:budget={b},window=64,kernel=5,pooling=avg,beta=20"),
        ("AdaKV", {"press": "adakv", "args": kp_snap | {"floor": 0.2}},
         f"adakv:budget={b},window=64,kernel=5,pooling=avg,floor=0.2"),
        ("StreamingLLM", {"press": "streamingllm", "args": {"sinks": 4}},
         f"streamingllm:budget={b},sinks=4"),
        ("TOVA", {"press": "tova"}, f"tova:budget={b},schedule=prefill,average=layer"),
        ("TOVA (kvlens defaults)", {"press": "tova"}, f"tova:budget={b}"),
        ("ObservedAttention / H2O", {"press": "observed"},
         f"h2o:budget={b},recent=0,normalise=mean,schedule=prefill"),
        ("ObservedAttention / H2O (kvlens defaults)", {"press": "observed"}, f"h2o:budget={b}"),
        ("ThinK (channels)", {"press": "think", "args": {"prune": 0.5, "window": 32}},
         "think:prune=0.5,window=32"),
        ("DuoAttention (same heads)", {"press": "duo", "args": {
            "sinks": 64, "recent": 128, "streaming": duo_streaming}},
         "duo:heads=0.5,sinks=64,recent=128"),
        ("random", {"press": "random", "args": {"seed": 0}}, f"random:budget={b}"),
        ("Knorm", {"press": "knorm"}, f"knorm:budget={b}"),
        ("ExpectedAttention", {"press": "expected", "args": {"future": 512, "sinks": 4}},
         f"expected_attention:budget={b},window={ea_window},future=512,sinks=4,"
         "softmax=after_sinks"),
        ("ExpectedAttention (window=T-4 only)", {"press": "expected", "args": {
            "future": 512, "sinks": 4}},
         f"expected_attention:budget={b},window={ea_window},future=512,sinks=4"),
        ("ExpectedAttention (kvlens defaults)", {"press": "expected", "args": {
            "future": 512, "sinks": 4}}, f"expected_attention:budget={b}"),
        ("KVzip (no chat template)", {"press": "kvzip", "args": {"sinks": 4, "chat": False}},
         f"kvzip:ratio={zip_ratio},level=pair,allocation=global,chunk=2048,sinks=4"),
        ("KVzip (kvpress with the chat template)", {"press": "kvzip", "args": {
            "sinks": 4, "chat": True}},
         f"kvzip:ratio={zip_ratio},level=pair,allocation=global,chunk=2048,sinks=4"),
        ("ThinK (channels; group_pool=square)", {"press": "think", "args": {
            "prune": 0.5, "window": 32}}, "think:prune=0.5,window=32,group_pool=square"),
    ]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--lengths", default="300,700,1200,2000")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--keep", type=float, default=0.5, help="fraction of the context kept")
    ap.add_argument("--questions", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=9)
    ap.add_argument("--out", help="also write the table as JSON here")
    ap.add_argument("--only", default="", help="only these methods (labels, comma-separated)")
    ap.add_argument(
        "--per-prompt",
        action="store_true",
        help="also print, per method and prompt, the overlap and the tokens each side keeps "
        "per head in the first and last layer (PyramidKV: pyramid or uniform)",
    )
    args = ap.parse_args()
    if args.side:
        run_side(args.side)
        return

    import torch
    from safetensors.torch import load_file

    import probes
    from methods.ask import answer_question, compress_context
    from methods.registry import create
    from probes.models import _cache_root
    from probes.tasks import make_qa_task

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    py = side_python()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))  # one core for the side
    model, tok = probes.load_model()
    folder = _cache_root() / "models" / "smollm2-135m"
    n_layers, n_kv = model.config.num_hidden_layers, model.config.num_key_value_heads

    # DuoAttention: kvpress's own head choice needs a download (a pattern table or BookSum),
    # so both sides get kvlens' choice and the comparison checks the keep rule per head
    duo = create("duo:heads=0.5,sinks=64,recent=128")
    duo.setup(model)
    streaming = [[(li, h) not in duo.protected_kv for h in range(n_kv)] for li in range(n_layers)]

    prompts = []
    for n in (int(x) for x in args.lengths.split(",")):
        for seed in (int(x) for x in args.seeds.split(",")):
            qa = make_qa_task(n, tok, n_keys=args.questions, seed=seed)
            ctx = tok(qa.context)["input_ids"]
            qs = [tok(q, add_special_tokens=False)["input_ids"] for q in qa.questions]
            prompts.append({"context": ctx, "questions": qs, "answers": qa.answers,
                            "n_kept": int(len(ctx) * args.keep), "n_tokens": n, "seed": seed})  # fmt: skip
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    known = [p[0] for p in pairs(1, streaming)]
    if only - set(known):
        sys.exit(f"--only: unknown {sorted(only - set(known))}; known: {known}")

    def chosen(n_kept: int, n_tokens: int | None = None) -> list[tuple[str, dict, str]]:
        return [p for p in pairs(n_kept, streaming, n_tokens) if not only or p[0] in only]

    labels = [p[0] for p in chosen(1)]
    job_presses = [p[1] for p in chosen(1)]

    with tempfile.TemporaryDirectory() as tmp:
        job = {"model": str(folder), "prompts": prompts, "presses": job_presses,
               "max_new_tokens": args.max_new_tokens}  # fmt: skip
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        t0 = time.perf_counter()
        side = subprocess.Popen([str(py), __file__, "--side", str(Path(tmp) / "job.json")])
        # the kvlens side runs meanwhile
        eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        ours: dict = {}
        with torch.inference_mode():
            sanity = model(input_ids=torch.tensor([prompts[0]["context"]])).logits[0, -1]
            for pi, prompt in enumerate(prompts):
                n_ctx = len(prompt["context"])
                for si, (_, _, spec) in enumerate(chosen(prompt["n_kept"], n_ctx)):
                    cache = compress_context(model, prompt["context"], spec, tok)
                    kept = kvlens_kept(cache, spec.split(":")[0])
                    texts = []
                    for q in prompt["questions"]:
                        toks = answer_question(model, cache.copy(), q, args.max_new_tokens, eos)
                        texts.append(tok.decode(toks, skip_special_tokens=True))
                    ours[(pi, si)] = (kept, texts)
                print(f"kvlens: prompt {pi} done", flush=True)
        if side.wait() != 0:
            sys.exit("the kvpress side failed (see its output above)")
        theirs = load_file(str(Path(tmp) / "side.safetensors"))
        their_answers = json.loads((Path(tmp) / "side.json").read_text())["answers"]
        elapsed = time.perf_counter() - t0

    diff = (sanity - theirs["sanity.logits"]).abs().max().item()
    print(f"sanity: max |logit difference| full model, {len(prompts[0]['context'])} tokens: "
          f"{diff:.2e}")  # fmt: skip
    rows = []
    for si, label in enumerate(labels):
        overlaps, ok_ours, ok_theirs, agree, n_q = [], 0, 0, 0, 0
        for pi, prompt in enumerate(prompts):
            kept, texts = ours[(pi, si)]
            ref = theirs[f"kept.{pi}.{si}"].bool()
            mine = kept.bool()
            assert mine.shape == ref.shape, (label, mine.shape, ref.shape)
            inter = (mine & ref).sum(-1).float()
            overlaps.append((inter / ref.sum(-1).clamp_min(1).float()).flatten())
            if args.per_prompt:
                kept_ours, kept_theirs = mine.sum(-1), ref.sum(-1)  # [layers, H]
                print(
                    f"{label}, prompt {pi} ({len(prompt['context'])} tokens, B "
                    f"{prompt['n_kept']}): overlap mean {overlaps[-1].mean():.3f} min "
                    f"{overlaps[-1].min():.3f}; kept per head, first / last layer: kvlens "
                    f"{kept_ours[0].tolist()} / {kept_ours[-1].tolist()}, kvpress "
                    f"{kept_theirs[0].tolist()} / {kept_theirs[-1].tolist()}"
                )
            for qi, gold in enumerate(prompt["answers"]):
                a, b = texts[qi], their_answers[f"{pi}.{si}"][qi]
                ok_ours += gold in a
                ok_theirs += gold in b
                agree += a.strip() == b.strip()
                n_q += 1
        ov = torch.cat(overlaps)
        chance = sum(p["n_kept"] / len(p["context"]) for p in prompts) / len(prompts)
        rows.append({"method": label, "spec": chosen(0)[si][2].replace("budget=0", "budget=B"),
                     "mean": ov.mean().item(), "min": ov.min().item(), "kvlens": ok_ours,
                     "kvpress": ok_theirs, "same_text": agree, "n": n_q, "chance": chance})  # fmt: skip
    lengths = sorted({len(p["context"]) for p in prompts})
    print(f"\n{len(prompts)} prompts ({lengths[0]}-{lengths[-1]} tokens, seeds {args.seeds}), "
          f"{args.keep:.0%} kept, {elapsed:.0f} s\n")  # fmt: skip
    print(
        "| method | kvlens spec (B = tokens kvpress keeps) | overlap mean | overlap min "
        "| needles kvlens | needles kvpress | same answer |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | `{r['spec']}` | {r['mean']:.3f} | {r['min']:.3f} | "
            f"{r['kvlens']}/{r['n']} | {r['kvpress']}/{r['n']} | {r['same_text']}/{r['n']} |"
        )
    print(f"\nrandom vs random is the overlap expected by chance: about {rows[0]['chance']:.2f}")
    if args.out:
        Path(args.out).write_text(
            json.dumps({"sanity_max_logit_diff": diff, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
