"""``python -m dsmoe_export.bench [op|e2e|all]``: see the README's "Benchmarks" section."""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import DSMoEError
from . import builder, e2e, graphs, metrics, op, probes, report, timing

# The converted SmolLM2 (d = 576, blocks of 192 or 96 rows), a d = 1024 model, and the large shapes.
DEFAULT_SHAPES = "576x1536x8,576x1536x16,1024x2816x8,2048x5632x8,4096x11008x8"
DEFAULT_TOKENS = "1,16,128,256,512"
QUICK = dict(shapes="256x704x8", tokens="1,16", ks="1,4,8", rounds=2, budget=5.0, e2e_shape="128x352x8", e2e_layers=1,
             e2e_heads=4, e2e_kv_heads=2, e2e_vocab=256, decode_past=16, decode_steps=4, gen_tokens=8, gen_rounds=1, e2e_precisions="fp32")


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _shapes(text: str) -> list[op.Shape]:
    try:
        return [op.Shape.parse(s) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dsmoe_export.bench",
        description="Side-by-side, interleaved latency of the sparse op, the dense FFN and ONNX Runtime's "
                    "com.microsoft.MoE (op level), and of the sparse vs dense export (end to end).")
    p.add_argument("what", nargs="?", choices=("op", "e2e", "all"), default="all", help="default: all")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes, few rounds: a smoke run (under a minute); other options still override")
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: all visible cores)")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="output folder (default: %(default)s)")
    p.add_argument("--shapes", type=_shapes, default=None,
                   help=f"op-level FFN shapes dxD[xn], comma-separated (default: {DEFAULT_SHAPES})")
    p.add_argument("--tokens", type=_ints, default=None,
                   help=f"tokens per call (default: {DEFAULT_TOKENS}); end to end uses those > 1 as prefill lengths")
    p.add_argument("--ks", type=_ints, default=None, help="exact active-block counts k (default: 1..n)")
    p.add_argument("--rounds", type=int, default=None,
                   help=f"timed rounds per group (default 5; calls under {op.SHORT_CALL_MS:g} ms get "
                        f"{op.SHORT_CALL_FACTOR}x; end to end, each of --e2e-sessions sessions per variant)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed rounds per group (a shape and token count): fewer rounds when they "
                        "would take longer, but at least 2 (default: 30; --quick: 5)")
    p.add_argument("--precisions", type=lambda t: [x for x in t.split(",") if x], default=[],
                   help="also run the op level with weight-only quantized blocks, e.g. int4,int8,float16: the sparse "
                        "op against the dense FFN as com.microsoft.MatMulNBits and com.microsoft.QMoE at the same "
                        "precision, and against the float32 sparse op (default: none)")
    p.add_argument("--group-size", type=int, default=32, help="quantization group of --precisions (default: 32)")
    p.add_argument("--compare-layouts", action="store_true",
                   help="op level: also time the sparse op with its down weights in the other layout than the "
                        "exporter's default at that d (--down-layout auto: rows below 2048, tiled from it on) in the "
                        "same rounds; the table gains e.g. 'rows-layout ms' and 'rows/tiled'")
    p.add_argument("--model", type=Path, default=None, metavar="MODEL_DIR",
                   help="end to end: time this DSMoE model folder (its sparse and --dense exports, and an "
                        "attention-only copy for the FFN share) instead of a random model; the --e2e-* shape "
                        "options do not apply")
    p.add_argument("--text", type=Path, default=None, metavar="FILE",
                   help="with --model: prompts and decode steps from this text file, tokenized with the folder's "
                        "tokenizer (default: random token ids)")
    p.add_argument("--e2e-shape", default=None, help="end-to-end model FFN shape dxD[xn] (default: 2048x5632x8)")
    p.add_argument("--e2e-layers", type=int, default=None, help="end-to-end model layers (default: 2)")
    p.add_argument("--e2e-sessions", type=int, default=e2e.SESSIONS,
                   help=f"sessions timed per end-to-end variant, all held at once, and processes per generation "
                        f"runner, one after the other (default: {e2e.SESSIONS}; 1 on a machine short of memory)")
    p.add_argument("--e2e-heads", type=int, default=None, help="attention heads (default: 32)")
    p.add_argument("--e2e-kv-heads", type=int, default=None, help="KV heads (default: 4)")
    p.add_argument("--e2e-vocab", type=int, default=None, help="vocabulary (default: 2048)")
    p.add_argument("--decode-past", type=int, default=None, help="prompt length before decoding (default: 128)")
    p.add_argument("--decode-steps", type=int, default=None, help="decode steps per timed sequence (default: 8)")
    p.add_argument("--e2e-precisions", type=lambda t: [x for x in t.split(",") if x], default=None,
                   help="end-to-end weight precisions: fp32 and int4 (int4 FFN, attention, lm_head and embedding; "
                        "MatMulNBits at accuracy_level 4, as the model builder's -p int4) (default: fp32,int4)")
    p.add_argument("--gen-tokens", type=int, default=None,
                   help="end to end: also time greedy generation of this many tokens after the decode prompt, in "
                        "DSMoESession and onnxruntime-genai's generator; 0: skip (default: 64)")
    p.add_argument("--gen-rounds", type=int, default=None, help="rounds of the generation timing (default: 3)")
    p.add_argument("--genai-python", default=None, metavar="PYTHON",
                   help="interpreter with onnxruntime-genai and its model builder, whose models of the same "
                        f"weights join the end-to-end comparison (default: ${builder.ENV_VAR}, else "
                        f"{builder.DEFAULT_VENV}/bin/python here or beside this interpreter's venv, when it imports them)")
    p.add_argument("--no-builder", action="store_true", help="end to end: leave out the model builder's models")
    p.add_argument("--no-flush", action="store_true", help="do not evict the caches before each timed call")
    p.add_argument("--max-wait", type=float, default=30.0,
                   help="before each round, wait up to this many seconds for other processes to leave the CPUs "
                        "idle (0: never wait; default: %(default)s)")
    p.add_argument("--keep-exports", action="store_true",
                   help="keep the end-to-end model folders and exports under OUT/e2e (about 1.3 GB at the default "
                        "shape; removed after the run otherwise)")
    p.add_argument("--library", default=None,
                   help="op library (default: $DSMOE_OPS_LIBRARY, else the installed dsmoe_runtime's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _defaults(args) -> None:
    quick = QUICK if args.quick else {}
    full = dict(shapes=DEFAULT_SHAPES, tokens=DEFAULT_TOKENS, ks=None, rounds=5, budget=30.0, e2e_shape="2048x5632x8",
                e2e_layers=2, e2e_heads=32, e2e_kv_heads=4, e2e_vocab=2048, decode_past=128, decode_steps=8,
                e2e_precisions="fp32,int4", gen_tokens=64, gen_rounds=3)
    for key, value in {**full, **quick}.items():
        if getattr(args, key) is None:
            if key == "shapes":
                value = _shapes(value)
            elif key in ("tokens", "ks") and value is not None:
                value = _ints(value)
            elif key == "e2e_precisions":
                value = value.split(",")
            setattr(args, key, value)
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _library_module():
    """dsmoe_runtime's library lookup (runtime/_library.py): the installed package's, else the
    source tree's, by path."""
    try:
        from dsmoe_runtime import _library
        return _library
    except ImportError:  # a source checkout without `pip install .`
        import importlib.util

        path = Path(__file__).resolve().parents[2] / "runtime" / "_library.py"
        if not path.is_file():
            raise SystemExit("cannot find the op library: pip install . or set DSMOE_OPS_LIBRARY") from None
        spec = importlib.util.spec_from_file_location("_dsmoe_runtime_library", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


def find_library(explicit: str | None) -> str:
    """--library, else DSMOE_OPS_LIBRARY / the installed dsmoe_runtime, else the source tree's lookup."""
    if explicit:
        if not Path(explicit).is_file():
            raise SystemExit(f"--library {explicit}: no such file")
        return str(Path(explicit).resolve())
    try:
        return _library_module().get_library_path()
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None


def cache_blocking(library: str) -> dict | None:
    """How the library's CPU kernels block for this machine's caches (None: it does not say)."""
    try:
        return _library_module().cpu_cache_blocking(library)
    except RuntimeError as e:  # LibraryError: a malformed DSMOE_CPU_L1D_BYTES
        raise SystemExit(str(e)) from None


def _text_ids(text: Path, model_dir: Path, needed: int) -> list[int]:
    """The text file's token ids under the model folder's tokenizer, at least `needed` of them."""
    try:
        from dsmoe_runtime import load_tokenizer
    except ImportError:
        raise SystemExit("--text needs the dsmoe_runtime package (pip install .)") from None
    try:
        content = text.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"{text}: cannot read it as UTF-8 text ({e})") from None
    tokenizer = load_tokenizer(model_dir)
    if tokenizer is None:
        raise SystemExit(f"{model_dir}: no tokenizer files (tokenizer.json or tokenizer.model), needed by --text")
    ids = tokenizer.encode(content)
    if len(ids) < needed:
        raise SystemExit(f"{text}: {len(ids)} tokens, the run needs {needed} (the longest prefill, or the "
                         f"decode prompt plus its steps)")
    return ids


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict:
    import numpy
    import onnx
    import onnxruntime

    versions = {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
                "onnx": onnx.__version__, "numpy": numpy.__version__}
    try:
        import torch
        versions["torch"] = torch.__version__
    except ImportError:
        pass
    return versions


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _defaults(args)
    argv = sys.argv[1:] if argv is None else argv
    library = find_library(args.library)
    # The exporter's validation registers the library through dsmoe_runtime, which honours this.
    os.environ.setdefault("DSMOE_OPS_LIBRARY", library)
    run = _resolve(args)
    flush = timing.Flusher(enabled=not args.no_flush)
    gate = timing.QuietGate(max_wait_s=args.max_wait, enabled=args.max_wait > 0)
    results = {"meta": _meta(args, argv, library, flush), "op": [], "e2e": [], "checks": []}
    from tqdm.auto import tqdm

    bar = tqdm(total=_planned_steps(args, run), desc="probes", unit="call", disable=args.no_progress or None,
               dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        gate.wait()
        before = probes.ceilings(args.threads, quick=args.quick, on_probe=lambda: bar.update(1))
        if run.do_op:
            _run_op(args, run, library, flush, gate, bar, results, before)
        if run.do_e2e:
            _run_e2e(args, run, library, flush, gate, bar, results, before)
        bar.set_description("probes")
        gate.wait()
        after = probes.ceilings(args.threads, quick=args.quick, on_probe=lambda: bar.update(1))
    finally:
        bar.close()
    results["ceilings"] = _best(before, after)
    results["probes"] = {"before": before, "after": after}
    for rows in (results["op"], results.get("quant", []), results["e2e"]):
        metrics.annotate(rows, results["ceilings"])
    results["meta"]["seconds"] = round(time.perf_counter() - t0, 1)
    results["meta"]["quiet_gate"] = gate.summary()
    if run.builder_note:
        results.setdefault("notes", []).append(run.builder_note)
    paths = report.write_all(args.out, results)
    (args.out / "results.partial.json").unlink(missing_ok=True)
    print(report.markdown(results))
    print("wrote " + ", ".join(str(p) for p in paths.values()) + f" ({results['meta']['seconds']:.0f} s)")
    for note in results.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    return 0


@dataclass
class _Run:
    """What the arguments ask for, checked before anything is timed."""
    do_op: bool
    do_e2e: bool
    ks_for: Callable
    prefill: list[int]
    model_shape: "e2e.ModelShape | None" = None
    builder_python: str | None = None
    builder_note: str | None = None
    token_ids: list[int] | None = None


def _resolve(args) -> _Run:
    run = _Run(do_op=args.what in ("op", "all"), do_e2e=args.what in ("e2e", "all"),
               ks_for=(lambda s: [k for k in args.ks if k <= s.n]) if args.ks else (lambda s: list(range(1, s.n + 1))),
               prefill=[t for t in args.tokens if t > 1])
    if run.do_e2e and args.model is not None:
        try:
            run.model_shape = e2e.ModelShape.of_folder(args.model)
        except DSMoEError as e:  # a clear message, not a traceback, before anything is timed
            raise SystemExit(f"--model: {e}") from None
    elif run.do_e2e:
        run.model_shape = e2e.ModelShape(ffn=op.Shape.parse(args.e2e_shape), layers=args.e2e_layers,
                                         heads=args.e2e_heads, kv_heads=args.e2e_kv_heads, vocab=args.e2e_vocab)
    elif args.model is not None:
        raise SystemExit("--model applies to the end-to-end benchmark (e2e or all), not to op")
    if args.e2e_sessions < 1:
        raise SystemExit(f"--e2e-sessions: expected at least 1, got {args.e2e_sessions}")
    bad = [p for p in args.e2e_precisions if p not in e2e.PRECISION_OPTIONS]
    if bad:
        raise SystemExit(f"--e2e-precisions: {', '.join(bad)} (expected {', '.join(e2e.PRECISION_OPTIONS)})")
    if "fp32" not in args.e2e_precisions:
        args.e2e_precisions.insert(0, "fp32")  # the attention-only and sparse/dense baseline
    if run.do_e2e and not args.no_builder:
        run.builder_python, run.builder_note = builder.find_python(args.genai_python)
    if args.text is not None:
        if not run.do_e2e or args.model is None:
            raise SystemExit("--text needs --model and the end-to-end benchmark (e2e or all)")
        run.token_ids = _text_ids(args.text, args.model,
                                  e2e.tokens_needed(run.prefill, args.decode_past, args.decode_steps))
    return run


def _meta(args, argv: list[str], library: str, flush) -> dict:
    return {
        "command": "python -m dsmoe_export.bench " + shlex.join(argv),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads,
        "thread_pool": graphs.THREAD_POOL, "versions": _versions(),
        "library": library, "cpu_cache_blocking": cache_blocking(library), "platform": platform.platform(),
        "cache": (f"evicted before each timed call (read of {flush.bytes / 2**20:.0f} MiB = 3 x last-level cache)"
                  if flush.enabled else "warm (--no-flush)"),
        "rounds_note": f"{args.rounds} timed rounds after 1 warm-up round; op-level groups whose dense call takes "
                       f"under {op.SHORT_CALL_MS:g} ms get {args.rounds * op.SHORT_CALL_FACTOR}; end to end, "
                       f"{args.e2e_sessions} sessions per variant, each timed in every round, a variant's min the "
                       f"median of its sessions' minima (generation: of its runner's {args.e2e_sessions} processes' "
                       f"best); fewer (at least 2) "
                       f"where a group's rounds would take over {args.budget:g} s (each row says how many)",
        "quick": args.quick}


def _planned_steps(args, run: _Run) -> int:
    """Calls the progress bar counts: probes, op-level calls, e2e variants and their rounds."""
    steps = 2 * probes.PROBE_STEPS[args.quick]
    if run.do_op:
        steps += op.planned_calls(args.shapes, args.tokens, run.ks_for, args.rounds, args.compare_layouts)
        if args.precisions:
            steps += op.planned_quant_calls(args.shapes, args.tokens, run.ks_for, args.rounds, args.precisions)
    if run.do_e2e:
        variants = 1 + len(args.e2e_precisions) * (3 if run.builder_python else 2)
        phases = len(run.prefill) + (1 if args.decode_steps else 0)
        steps += variants + args.rounds * variants * args.e2e_sessions * phases
    return steps


def _run_op(args, run: _Run, library, flush, gate, bar, results: dict, before: dict) -> None:
    for i, shape in enumerate(args.shapes):
        rows, check = op.run_shape(shape, args.tokens, run.ks_for(shape), threads=args.threads, library=library,
                                   rounds=args.rounds, flush=flush, seed=args.seed + i, gate=gate,
                                   budget_s=args.budget, bar=bar, layouts=args.compare_layouts)
        results["op"] += rows
        results["checks"].append(check)
        _save_partial(args.out, results, before)
        if args.precisions:
            rows, check = op.run_shape_quant(
                shape, args.tokens, run.ks_for(shape), args.precisions, group_size=args.group_size,
                threads=args.threads, library=library, rounds=args.rounds, flush=flush, seed=args.seed + i,
                gate=gate, budget_s=args.budget, bar=bar)
            results.setdefault("quant", []).extend(rows)
            results.setdefault("quant_checks", []).append(check)
            _save_partial(args.out, results, before)


def _run_e2e(args, run: _Run, library, flush, gate, bar, results: dict, before: dict) -> None:
    try:
        rows, info = e2e.run(args.out / "e2e", run.model_shape, prefill_tokens=run.prefill,
                             decode_past=args.decode_past, decode_steps=args.decode_steps, threads=args.threads,
                             library=library, rounds=args.rounds, flush=flush, seed=args.seed, gate=gate,
                             budget_s=args.budget, bar=bar, token_ids=run.token_ids,
                             precisions=tuple(args.e2e_precisions), builder_python=run.builder_python,
                             gen_tokens=args.gen_tokens, gen_rounds=args.gen_rounds,
                             sessions_per_variant=args.e2e_sessions)
    except e2e.NotEnoughMemory as e:
        if not args.keep_exports:
            shutil.rmtree(args.out / "e2e", ignore_errors=True)
        raise SystemExit(f"--e2e-sessions {args.e2e_sessions}: {e}") from None
    if args.text is not None:
        info["prompt"] = f"the text of {args.text.name}, {len(run.token_ids)} tokens"
    results["e2e"], results["e2e_info"] = rows, info
    _save_partial(args.out, results, before)
    if not args.keep_exports:
        shutil.rmtree(args.out / "e2e", ignore_errors=True)


def _save_partial(out: Path, results: dict, ceilings: dict) -> None:
    """results.partial.json after each stage, so that an interrupted run keeps what it measured."""
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(out / "results.partial.json", {**results, "ceilings": ceilings})


def _best(before: dict, after: dict) -> dict:
    """The higher of the two probe runs, per ceiling."""
    out = {"threads": before["threads"]}
    for prefix, key in (("bandwidth", "bandwidth_gb_s"), ("gemm", "gemm_gflop_s")):
        best = before if before[key] >= after[key] else after
        out.update({k: v for k, v in best.items() if k.startswith(prefix)})
    return out


if __name__ == "__main__":
    sys.exit(main())
