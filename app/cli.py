"""The `kvlens` command line: one subcommand per job, one-line errors, progress on stderr."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from probes.errors import KvlensError


def _layers_arg(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--layers takes comma-separated integers, not '{text}'"
        ) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, not '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, not {value}")
    return value


def _read_prompt(args) -> str:
    if args.prompt is not None and args.prompt_file is not None:
        raise KvlensError("give either --prompt or --prompt-file, not both")
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise KvlensError(f"--prompt-file {path}: no such file")
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise KvlensError(f"--prompt-file {path}: not UTF-8 text") from None
    if args.prompt is None:
        raise KvlensError("give a prompt with --prompt TEXT or --prompt-file FILE")
    return args.prompt


def _model_and_prompt(args, chat: bool = False):
    """What compare, sparse and prefill-sparse share: --task or a prompt (not both), the model
    loaded, the generated task (None for a prompt) and the prompt's token ids."""
    from probes import load_model
    from probes.capture import tokenize
    from probes.tasks import make_task

    if args.task is not None and (args.prompt is not None or args.prompt_file is not None):
        raise KvlensError("give either --task or a prompt, not both")
    print(f"loading {args.model} ...", file=sys.stderr)
    model, tokenizer = load_model(args.model, device=args.device)
    task = None
    if args.task is not None:
        task = make_task(args.task, args.length, tokenizer, depth=args.depth, seed=args.seed)
        text = task.prompt
    else:
        text = _read_prompt(args)
    return model, tokenizer, task, tokenize(tokenizer, text, chat=chat)


def cmd_models(args) -> int:
    from probes.models import list_models

    if args.check:
        return _check_model(args.check)
    for row in list_models():
        state = "installed" if row["installed"] else f"not installed ({row['install']})"
        if row["converted"]:
            state += ", converted"
        print(f"{row['name']:<14} {state}\n{'':<14} {row['description']}")
    return 0


def _check_model(path: str) -> int:
    """``kvlens models --check PATH``: which kvlens features that model supports."""
    from probes.support import FEATURES, check_model

    support = check_model(path)
    f = support.facts
    print(
        f"{f.model_id}: {f.architecture}, {f.n_layers} layers, {f.n_heads} q / "
        f"{f.n_kv_heads} kv heads, d={f.head_dim}"
    )
    for feature, label in FEATURES.items():
        why = support.missing[feature]
        print(f"  {label:<64} {'yes' if why is None else 'no: ' + why}")
    return 0


def cmd_probe(args) -> int:
    from tqdm import tqdm

    from probes import capture, load_model
    from probes.capture import check_length, tokenize
    from probes.models import model_facts

    text = _read_prompt(args)
    out = Path(args.out)
    if not text.strip():
        raise KvlensError("the prompt is empty; give some text")
    print(f"loading {args.model} ...", file=sys.stderr)
    max_memory = None
    if args.max_memory:
        try:
            max_memory = {
                (int(k) if k.strip().isdigit() else k.strip()): v.strip()
                for k, v in (part.split("=") for part in args.max_memory.split(","))
            }
        except ValueError:
            raise KvlensError(
                f"--max-memory takes DEVICE=SIZE pairs like 0=20GiB, not '{args.max_memory}'"
            ) from None
    model, tokenizer = load_model(
        args.model, device=args.device, device_map=args.device_map, max_memory=max_memory
    )
    facts = model_facts(model)
    check_length(len(tokenize(tokenizer, text, chat=args.chat)), facts.max_positions)
    total = facts.n_layers * (1 + args.generate)
    with tqdm(total=total, desc="probe", unit="layer", file=sys.stderr) as bar:
        trace = capture(
            model,
            tokenizer,
            text,
            attention=args.attention,
            kv=not args.no_kv,
            layers=args.layers,
            window=args.window,
            sinks=args.sinks,
            chat=args.chat,
            generate=args.generate,
            progress=lambda _layer: bar.update(1),
        )
    path = trace.save(out)
    s = trace.settings
    print(
        f"{trace.n_tokens} tokens, {facts.n_layers} layers, attention={s['attention']}, "
        f"kv={'yes' if s['kv'] else 'no'}, forward {trace.timings['forward_s']:.2f} s",
        file=sys.stderr,
    )
    print(path)
    return 0


def cmd_methods(_args) -> int:
    from methods.registry import FULL, available

    print(f"{FULL:<14} {'baseline':<13} the uncompressed cache")
    for name, cls in available().items():
        params = ", ".join(f"{n}={d}" for n, _t, d in cls.parameters()) or "none"
        print(f"{name:<14} {cls.family:<13} {cls.summary}")
        print(f"{'':<14} {'':<13} parameters: {params}")
        print(f"{'':<14} {'':<13} paper: {cls.paper}")
    return 0


def _one_line(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def cmd_compare(args) -> int:
    import json

    from tqdm import tqdm

    from methods.evaluate import compare
    from methods.registry import create, split_specs

    specs = split_specs(args.methods)
    for spec in specs:
        create(spec)  # fail on a bad spec before loading anything
    model, tokenizer, task, ids = _model_and_prompt(args, chat=args.chat)
    with tqdm(total=len(specs), desc="compare", unit="method", file=sys.stderr) as bar:
        done = []

        def progress(name: str) -> None:
            if done:
                bar.update(1)
            done.append(name)
            bar.set_postfix_str(name)

        result = compare(
            model,
            tokenizer,
            ids,
            specs,
            max_new_tokens=args.max_new_tokens,
            answers=task.answers if task else None,
            score=task.score if task else None,
            continuation=(task.continuation if task else args.continuation),
            progress=progress,
            fast_decode=False if args.eager_decode else None,
        )
        bar.update(len(specs) - bar.n)
    header = (
        f"{'method':<34} {'KL mean':>8} {'KL max':>7} {'top-1':>6} {'ppl':>7} {'acc':>5} "
        f"{'bytes':>7} {'time s':>7}  text"
    )
    print(header)
    for r in result.results:
        acc = "-" if r.accuracy is None else f"{r.accuracy:.2f}"
        text = _one_line(r.text, 60)
        print(
            f"{_one_line(r.spec, 34):<34} {r.kl_mean:>8.4f} {r.kl_max:>7.3f} {r.top1:>6.2f} "
            f"{r.ppl:>7.2f} {acc:>5} {r.bytes_ratio:>6.1%} {r.time_s:>7.2f}  {text!r}"
        )
    from methods.memory import SERVING_NOTE

    print(f"bytes: held at the end vs the full cache, {SERVING_NOTE}")
    xrays = []
    if args.xray:
        from methods.xray import xray

        for spec in specs:
            if spec.strip().lower() == "full":
                continue
            x = xray(model, tokenizer, ids, spec, max_new_tokens=max(2, args.max_new_tokens))
            xrays.append(x.to_json())
            if x.first_divergence is None:
                where = "never diverges from the full cache"
            else:
                i = x.first_divergence
                ref = tokenizer.decode([x.reference[i]])
                got = tokenizer.decode([x.generated[i]])
                where = f"first differs at generated token {i} ({ref!r} vs {got!r})"
            heads = ", ".join(
                f"L{r['layer']}H{r['head']} {r['dropped_mass']:.2f}"
                for r in x.culprit_heads.iter_rows(named=True)
            )
            mean_drop = x.dropped["dropped_mass"].mean() if x.dropped.height else 0.0
            print(
                f"xray {_one_line(x.spec, 40)}: {where}; mean dropped attention {mean_drop:.3f}"
                + (f"; most dropped there: {heads}" if heads else "")
            )
    if args.json:
        data = result.to_json()
        data["settings"]["task"] = task.settings if task else None
        if xrays:
            data["xray"] = xrays
        Path(args.json).write_text(json.dumps(data, indent=1, ensure_ascii=False))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def cmd_analyze(args) -> int:
    import polars as pl
    from tqdm import tqdm

    from analysis.run_all import analyze, save_tables, summarize
    from probes import Trace

    trace = Trace.load(args.dump)
    retrieval = None
    if args.retrieval:
        try:
            retrieval = pl.read_parquet(args.retrieval)
        except Exception as exc:
            raise KvlensError(
                f"--retrieval {args.retrieval}: not a readable parquet file "
                f"({exc.__class__.__name__})"
            ) from None
        if not {"layer", "head", "retrieval"} <= set(retrieval.columns):
            raise KvlensError(f"--retrieval {args.retrieval}: needs columns layer, head, retrieval")
    with tqdm(desc="analyze", unit="table", file=sys.stderr) as bar:
        tables = analyze(
            trace, retrieval, progress=lambda name: (bar.set_postfix_str(name), bar.update(1))
        )
    out = save_tables(tables, args.dump)
    print(summarize(trace, tables))
    print(out)
    return 0


def _float_list(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise KvlensError(f"{flag} takes comma-separated numbers, not '{text}'") from None


def cmd_retrieval_heads(args) -> int:
    from tqdm import tqdm

    from analysis.retrieval_heads import top_heads
    from app.jobs import find_retrieval_heads
    from probes import load_model

    lengths = [int(x) for x in _float_list(args.lengths, "--lengths")]
    depths = _float_list(args.depths, "--depths")
    if not lengths or min(lengths) < 64:
        raise KvlensError(f"--lengths must be token counts >= 64, got {args.lengths}")
    print(f"loading {args.model} ...", file=sys.stderr)
    model, tokenizer = load_model(args.model, device=args.device)
    total = len(lengths) * len(depths) + 1
    with tqdm(total=total, desc="retrieval-heads", unit="probe", file=sys.stderr) as bar:

        def progress(name: str) -> None:
            bar.set_postfix_str(name)
            bar.update(1)

        scores = find_retrieval_heads(
            model, tokenizer, lengths, depths, seed=args.seed, progress=progress
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    scores.write_parquet(out)
    for column in ("retrieval", "echo", "induction"):
        top = top_heads(scores, column, 5)
        items = ", ".join(
            f"L{r['layer']}H{r['head']} {r[column]:.2f}" for r in top.iter_rows(named=True)
        )
        print(f"top {column} heads: {items}")
    print(out)
    return 0


def cmd_report(args) -> int:
    import json

    from app.report import build_report
    from probes import Trace

    trace = Trace.load(args.dump)
    comparison = None
    if args.compare:
        try:
            comparison = json.loads(Path(args.compare).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise KvlensError(
                f"--compare {args.compare}: not a readable JSON file ({exc.__class__.__name__})"
            ) from None
        if not isinstance(comparison, dict) or not isinstance(comparison.get("results"), list):
            raise KvlensError(f"--compare {args.compare}: not a `kvlens compare --json` result")
    sweep_table = None
    if args.sweep:
        from methods.sweep import read_table

        sweep_table = read_table(Path(args.sweep))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_text(build_report(trace, comparison, sweep=sweep_table), encoding="utf-8")
    tmp.replace(out)
    print(out)
    return 0


def app_command(port: int, address: str) -> list[str]:
    """The Streamlit command line ``kvlens app`` runs."""
    entry = Path(__file__).resolve().parent / "streamlit_app.py"
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(entry),
        "--server.port",
        str(port),
        "--server.address",
        address,
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        # users see the app, not Streamlit's developer toolbar (Deploy, rerun, settings)
        "--client.toolbarMode",
        "viewer",
        # no watching of kvlens' source files for edits (a developer's reload): without the
        # watchdog package Streamlit polls every module file several times a second, in
        # threads that take Python's lock from a running comparison
        "--server.fileWatcherType",
        "none",
        # no full garbage collection after every script run: the progress fragment reruns
        # every second while a job runs, and each gc.collect(2) over a process holding torch
        # and transformers (0.23 s with the model alone loaded, more in the app) held Python's
        # lock: a comparison ran 1.5x slower in the app than alone, and page switches paid it
        "--runner.postScriptGC",
        "false",
    ]


def cmd_app(args) -> int:
    import subprocess

    print(f"kvlens app on http://{args.address}:{args.port}", file=sys.stderr)
    return subprocess.call(app_command(args.port, args.address))


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag gives one line (``kvlens: error: ...``) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"kvlens: error: {' '.join(message.split())}\n")


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--port must be an integer, not '{text}'") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"--port must be in 1..65535, got {value}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, not '{text}'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, not {value}")
    return value


def _depth(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--depth must be a number, not '{text}'") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"--depth must be in [0, 1], got {value}")
    return value


def cmd_ask(args) -> int:
    import json

    from tqdm import tqdm

    from methods.ask import answers_to_json, ask
    from methods.registry import create, split_specs
    from probes import load_model
    from probes.tasks import context_and_question, make_qa_task, make_task

    specs = split_specs(args.methods)
    for spec in specs:
        create(spec)
    if args.task is None and args.context_file is None:
        raise KvlensError(
            "give --context-file with --question (repeatable), or --task niah|multikey"
        )
    if args.task is not None and (args.context_file or args.question):
        raise KvlensError("give either --task or --context-file/--question, not both")
    print(f"loading {args.model} ...", file=sys.stderr)
    model, tokenizer = load_model(args.model, device=args.device)
    gold = None
    if args.task == "niah":  # one needle at --depth, its question held back
        one = make_task("niah", args.length, tokenizer, depth=args.depth, seed=args.seed)
        context, question = context_and_question(one)
        questions, gold = [question], one.answers
    elif args.task:
        task = make_qa_task(args.length, tokenizer, n_keys=args.keys, seed=args.seed)
        context, questions, gold = task.context, task.questions, task.answers
    else:
        path = Path(args.context_file)
        if not path.is_file():
            raise KvlensError(f"--context-file {path}: no such file")
        context = path.read_text(encoding="utf-8", errors="replace")
        questions = [f"\n\nQuestion: {q}\nAnswer:" for q in args.question or []]
        if not questions:
            raise KvlensError("give at least one --question")
    rows = []
    modes = [False, True] if args.both else [args.question_aware]
    with tqdm(total=len(specs) * len(modes), desc="ask", unit="method", file=sys.stderr) as bar:
        for aware in modes:
            rows += ask(
                model,
                tokenizer,
                context,
                questions,
                specs,
                answers=gold,
                max_new_tokens=args.max_new_tokens,
                question_aware=aware,
                progress=lambda _s: bar.update(1),
            )
    print(f"{'method':<34} {'mode':<6} {'q':>2} {'=full':>5} {'right':>5}  answer")
    for r in rows:
        right = "-" if r.correct is None else ("yes" if r.correct else "no")
        same = "yes" if r.agrees_with_full else "no"
        print(
            f"{_one_line(r.spec, 34):<34} {r.mode:<6} {r.question:>2} {same:>5} {right:>5}  "
            f"{_one_line(r.text, 50)!r}"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"questions": questions, "answers": gold, "results": answers_to_json(rows)},
                indent=1,
            )
        )
    return 0


def cmd_heads(args) -> int:
    from tqdm import tqdm

    from analysis.head_profiles import type_shares
    from app.jobs import head_profile
    from probes import load_model

    lengths = [int(x) for x in _float_list(args.lengths, "--lengths")]
    if not lengths or min(lengths) < 64:
        raise KvlensError(f"--lengths must be token counts >= 64, got {args.lengths}")
    print(f"loading {args.model} ...", file=sys.stderr)
    model, tokenizer = load_model(args.model, device=args.device)
    with tqdm(total=len(lengths) * 3 + 2, desc="heads", unit="probe", file=sys.stderr) as bar:
        profile = head_profile(
            model,
            tokenizer,
            lengths,
            seed=args.seed,
            progress=lambda name: (bar.set_postfix_str(name), bar.update(1)),
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    profile.write_parquet(out)
    shares = ", ".join(
        f"{r['type']} {r['len']}" for r in type_shares(profile).iter_rows(named=True)
    )
    print(f"{profile['model'][0]}: {profile.height} heads; types: {shares}")
    print(out)
    return 0


def cmd_sweep(args) -> int:
    from tqdm import tqdm

    from methods.sweep import Grid, leaderboard, load_grid, sweep

    if args.config:
        grid = load_grid(args.config)
    else:
        from methods.registry import split_specs

        try:
            lengths = [int(x) for x in args.lengths.split(",")]
        except ValueError:
            raise KvlensError(
                f"--lengths takes comma-separated integers, not '{args.lengths}'"
            ) from None
        grid = Grid(
            models=args.models.split(","),
            methods=split_specs(args.methods),
            tasks=args.tasks.split(","),
            lengths=lengths,
            seeds=args.seeds,
            max_new_tokens=args.max_new_tokens,
        )
    bar = tqdm(total=grid.total_rows(), desc="sweep", unit="row", file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        table = sweep(
            grid,
            args.out,
            backend=args.backend,
            progress=progress,
            device=args.device,
            num_cpus=args.num_cpus,
        )
    finally:
        bar.close()
    board = leaderboard(table)
    print(f"{'model':<14} {'task':<9} {'len':>5} {'method':<40} {'acc':>5} {'KL':>7} {'bytes':>7}")
    for r in board.iter_rows(named=True):
        print(
            f"{r['model']:<14} {r['task']:<9} {r['length']:>5} {_one_line(r['method'], 40):<40} "
            f"{r['accuracy']:>5.2f} {r['kl_mean']:>7.3f} {r['bytes_ratio']:>6.1%}"
        )
    from methods.memory import SERVING_NOTE

    print(f"bytes: held vs the full cache, {SERVING_NOTE}")
    print(args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="kvlens", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the embedded models and whether they are installed")
    p.add_argument(
        "--check",
        metavar="PATH",
        help="which kvlens features this model (folder, .gguf or embedded name) supports",
    )
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("probe", help="run one forward pass and write a dump folder")
    p.add_argument("--prompt", help="the prompt text")
    p.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    p.add_argument("--out", required=True, help="dump folder to write (replaced if a dump)")
    p.add_argument("--model", default="smollm2-135m", help="embedded model name, folder or .gguf")
    p.add_argument("--attention", default="auto", choices=["auto", "full", "stats", "none"])
    p.add_argument("--no-kv", action="store_true", help="do not record keys and values")
    p.add_argument("--layers", type=_layers_arg, help="comma-separated layers, e.g. 0,5,10")
    p.add_argument("--window", type=_positive_int, default=32, help="SnapKV window (queries)")
    p.add_argument(
        "--sinks", type=_non_negative, default=4, help="first positions counted as sinks"
    )
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument(
        "--generate",
        type=_non_negative,
        default=0,
        help="then decode N tokens greedily, recording each step's attention (for persistence)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--device-map", default=None, help="'auto' spreads the model over GPUs")
    p.add_argument(
        "--max-memory", default=None, help="with --device-map: caps, e.g. 0=20GiB,1=20GiB"
    )
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("analyze", help="run every analysis a dump has data for")
    p.add_argument("dump", help="a dump folder written by `kvlens probe`")
    p.add_argument("--retrieval", help="a retrieval-heads parquet to join into head types")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("retrieval-heads", help="score retrieval, echo and induction heads")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lengths", default="512,1024,2048")
    p.add_argument("--depths", default="0.1,0.5,0.9")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="parquet file to write")
    p.set_defaults(func=cmd_retrieval_heads)

    p = sub.add_parser("ask", help="compress a context once, then answer several questions from it")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--context-file")
    p.add_argument("--question", action="append", help="a question (repeat the flag for more)")
    p.add_argument(
        "--task",
        choices=["niah", "multikey"],
        help="a generated context: niah one needle and its question, multikey one question per key",
    )
    p.add_argument("--length", type=_positive_int, default=1024)
    p.add_argument("--keys", type=_positive_int, default=4)
    p.add_argument("--depth", type=_depth, default=0.5, help="niah: needle depth in [0, 1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default="full,snapkv:budget=128,streamingllm:budget=128")
    p.add_argument(
        "--question-aware",
        action="store_true",
        help="compress context + question together, once per question",
    )
    p.add_argument("--both", action="store_true", help="run question-agnostic and question-aware")
    p.add_argument("--max-new-tokens", type=_positive_int, default=12)
    p.add_argument("--device", default="auto")
    p.add_argument("--json")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser(
        "heads", help="write a model's head profile (retrieval, echo, induction, sink, ...)"
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lengths", default="512,1024")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_heads)

    p = sub.add_parser(
        "sweep", help="run a method x budget x task x model grid into one table (resumable)"
    )
    p.add_argument(
        "config", nargs="?", help="a TOML file with a [grid] table (else the flags below)"
    )
    p.add_argument("--models", default="smollm2-135m")
    p.add_argument("--methods", default="snapkv:budget=128,streamingllm:budget=128")
    p.add_argument("--tasks", default="niah")
    p.add_argument("--lengths", default="1024")
    p.add_argument("--seeds", type=_positive_int, default=2)
    p.add_argument("--max-new-tokens", type=_positive_int, default=12)
    p.add_argument("--backend", choices=["local", "ray"], default="local")
    p.add_argument("--num-cpus", type=_positive_int, default=None, help="Ray: CPUs to use")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="the parquet table (rows already there are kept)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="write a self-contained HTML report of a dump")
    p.add_argument("dump")
    p.add_argument("--compare", help="a `kvlens compare --json` result to include")
    p.add_argument("--sweep", help="a `kvlens sweep` table whose leaderboard to include")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("app", help="start the web app")
    p.add_argument("--port", type=_port, default=8501)
    p.add_argument("--address", default="127.0.0.1")
    p.set_defaults(func=cmd_app)

    p = sub.add_parser("methods", help="list every compression method and its parameters")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("compare", help="run methods against the full cache on one input")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompt")
    p.add_argument("--prompt-file")
    p.add_argument("--task", choices=["niah", "multikey", "vartrack"])
    p.add_argument(
        "--length", type=_positive_int, default=1024, help="task length in tokens (>= 64)"
    )
    p.add_argument("--depth", type=_depth, default=0.5, help="needle depth in [0, 1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--methods", default="full,streamingllm:budget=128,snapkv:budget=128,h2o:budget=128"
    )
    p.add_argument("--max-new-tokens", type=_positive_int, default=32)
    p.add_argument("--continuation", help="held-out text after the prompt, for perplexity")
    p.add_argument("--chat", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="write everything the table shows, plus settings, here")
    p.add_argument(
        "--xray",
        action="store_true",
        help="also X-ray each method: kept/evicted tokens, dropped attention, first divergence",
    )
    p.add_argument(
        "--eager-decode",
        action="store_true",
        help="on a GPU, decode token by token in Python instead of replaying one captured CUDA "
        "graph per step where the method allows (the default; same tokens up to rounding)",
    )
    p.set_defaults(func=cmd_compare)

    from app.sparse_cli import add_sparse_parser

    add_sparse_parser(sub)
    from app.prefill_sparse_cli import add_prefill_sparse_parser

    add_prefill_sparse_parser(sub)
    from app.reuse_cli import add_reuse_parser

    add_reuse_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KvlensError as exc:
        print(f"kvlens: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        sys.stderr.close()  # output piped into e.g. `head`: stop quietly
        return 0
    except KeyboardInterrupt:
        print("kvlens: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
