"""GPU check of the CUDA kernel (run by scripts/gpu_check.sh on a GPU machine; docs/cuda.md).

1. correctness: the kernels through libdsmoe_cuda_harness on torch CUDA buffers against the
   float64 reference (dsmoe_export/testing/reference.py) on fresh random inputs: float32 (1e-4), float16
   (1e-2), bfloat16 (3e-2); decode and GEMM paths, both down_weight layouts, k = 0 and k = n
   tokens, odd sizes;
2. timing, float16, d=4096 / D=11008 / n=8 (LLaMA-7B FFN): sparse at exactly k active blocks
   per token (random subsets) against the dense FFN in torch (cuBLAS), tokens 1..8, 9-64, 512
   and 4096 (--tokens). Three variants: `rows` (the float16 exporter's layout; on sm_90 with
   the CUTLASS GEMMs built, the CUTLASS path from 9 tokens), `rows_wmma` (the same layout on
   the WMMA grouped GEMMs) and `tiled` (down_weight in 64-column tiles, WMMA);
   each call replayed from a CUDA graph after an L2 flush (the flush's own time subtracted);
3. (--part ort) the op under ONNX Runtime's CUDA EP against the dense FFN and com.microsoft.MoE
   (scripts/gpu_ort.py), when onnxruntime-gpu is there.
Prints tables last and writes them (with the card and the date) to --out: markdown, and JSON
lines written row by row (they survive a timeout).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
from dsmoe_export.testing.cuda_harness import Harness, find_library, rounded  # noqa: E402
from dsmoe_export.testing.cases import make_case  # noqa: E402

from dsmoe_export.onnx_op import tile_down  # noqa: E402

TOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 3e-2}


def to_dev(a, dtype):
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to("cuda", getattr(torch, dtype))


def correctness(h: Harness, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    failures, count = [], 0
    shapes = [(t, 256, 8, 136) for t in (1, 2, 5, 8, 9, 37, 300)] + \
             [(t, d, n, B) for t in (1, 3, 9, 70, 257) for d, n, B in ((7, 5, 3), (17, 3, 33), (130, 2, 9), (520, 8, 200))] + \
             [(1, 4096, 8, 1376), (8, 4096, 8, 1376), (512, 4096, 8, 1376)]
    for dtype in ("float32", "float16", "bfloat16"):
        for tokens, d, n, B in shapes:
            attrs = dict(threshold=float(rng.uniform(0.3, 0.7)), activation=str(rng.choice(["silu", "gelu", "gelu_tanh"])),
                         weighting=str(rng.choice(["score", "binary"])), rescale=bool(rng.integers(2)))
            down_tile = int(rng.choice([0, 64]))
            case = make_case(rng, (tokens,), d=d, n=n, B=B, bias=bool(rng.integers(2)), down_tile=down_tile, **attrs)
            rounded(case, dtype)  # the reference sees what the kernel sees
            act = torch.empty(tokens, n, dtype=torch.bool, device="cuda")
            down = case.feeds()["down_weight"]  # in the layout down_tile names
            try:
                y = h.forward(to_dev(case.x, dtype), to_dev(case.router_weight, dtype), to_dev(case.gate, dtype),
                              to_dev(case.up, dtype), to_dev(down, dtype), to_dev(case.router_bias, dtype),
                              active=act, down_tile=down_tile, **attrs)
                torch.cuda.synchronize()
                y = y.float().cpu().numpy()
                act_np = act.cpu().numpy()
            except Exception as ex:  # noqa: BLE001 (recorded; a sticky CUDA error fails the rest too)
                count += 1
                failures.append(f"{dtype} N={tokens} d={d} n={n} B={B} down_tile={down_tile}: {type(ex).__name__}: "
                                f"{str(ex)[:200]}")
                continue
            y_ref, a_ref = case.reference()
            err = float(np.abs(y - y_ref).max()) / max(1.0, float(np.abs(y_ref).max()))
            ok_active = bool((act_np == a_ref).all())
            ok_zero = bool((y[~a_ref.any(-1)] == 0).all())
            count += 1
            if not (err <= TOL[dtype] and ok_active and ok_zero):
                failures.append(f"{dtype} N={tokens} d={d} n={n} B={B} down_tile={down_tile} {attrs}: err={err:.3g} "
                                f"active={'ok' if ok_active else 'WRONG'} k0={'ok' if ok_zero else 'WRONG'} "
                                f"path={h.path(tokens, d, n, B, dtype)}")
    print(f"correctness: {count - len(failures)}/{count} cases within tolerance (seed {seed})")
    for f in failures:
        print("  FAIL", f)
    return failures


def graph_time_ms(fn, flush, reps=20) -> float:
    """Median ms of fn() replayed from a CUDA graph, each replay after an L2 flush (subtracted)."""
    def capture(body):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            body()  # warm-up outside the graph (allocations)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            body()
        return g

    def timed(g):
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return float(np.median(times))

    both = capture(lambda: (flush(), fn()))
    only_flush = capture(flush)
    timed(both), timed(only_flush)  # warm
    return max(timed(both) - timed(only_flush), 1e-4)


def target(tokens: int, r: float, union: int, n: int) -> float:
    """The bound of docs/cuda.md on sparse/dense: 1 token r + 0.1; 2-8 tokens the union of their
    blocks (what must be read) / n + 0.1; 9-64 tokens never slower than dense; more 1.15 r."""
    if tokens == 1:
        return r + 0.1
    if tokens <= 8:
        return union / n + 0.1
    return 1.0 if tokens <= 64 else 1.15 * r


def timing(h: Harness, tokens_list, ks, d=4096, D=11008, n=8, seed=0, log=None):
    """Sparse (both down_weight layouts) against the dense FFN, same weights, same replays."""
    torch.manual_seed(seed)
    B = D // n
    dt = torch.float16
    gate = torch.randn(n, B, d, device="cuda", dtype=dt) / math.sqrt(d)
    up = torch.randn(n, B, d, device="cuda", dtype=dt) / math.sqrt(d)
    down = torch.randn(n, B, d, device="cuda", dtype=dt) / math.sqrt(B)
    variants = {"rows": (down, 0, True), "rows_wmma": (down, 0, False), "tiled": (tile_down(down), 64, True)}
    wg, wu = gate.reshape(D, d), up.reshape(D, d)
    wd = down.reshape(D, d)  # down_proj.weight.T
    router = torch.zeros(n, d, device="cuda", dtype=dt)
    router[:, :n] = 20 * torch.eye(n, device="cuda", dtype=dt)  # logit_i = 20 * x[:, i]
    flush_buf = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    flush = lambda: flush_buf.zero_()  # noqa: E731
    rows = []
    for T in tokens_list:
        x = torch.randn(T, d, device="cuda", dtype=dt) * 0.1
        y = torch.empty_like(x)

        def dense():
            torch.matmul(torch.nn.functional.silu(x @ wg.T) * (x @ wu.T), wd, out=y)

        t_dense = graph_time_ms(dense, flush)
        for k in ks:
            xs = x.clone()
            sel = torch.rand(T, n, device="cuda").argsort(-1) < k  # exactly k random blocks per token
            xs[:, :n] = torch.where(sel, 1.0, -1.0).to(dt)
            union = int(sel.any(0).sum())
            r = k / n
            limit = target(T, r, union, n)
            row = dict(tokens=T, k=k, r=r, union=union, dense_ms=t_dense, target=limit,
                       path=h.path(T, d, n, B, "float16"))
            for name, (dw, tile, cutlass) in variants.items():
                t = graph_time_ms(lambda: h.forward(xs, router, gate, up, dw, y=y, down_tile=tile, cutlass=cutlass),
                                  flush)
                row[f"{name}_ms"] = t
                row[f"{name}_ratio"] = t / t_dense
            row["sparse_ms"], row["ratio"] = row["rows_ms"], row["rows_ratio"]  # the float16 exporter's layout
            row["ok"] = row["ratio"] <= limit
            rows.append(row)
            line = (f"  T={T:5d} k={k} rows[{row['path']}] {row['rows_ms']:8.4f} rows_wmma {row['rows_wmma_ms']:8.4f} "
                    f"tiled {row['tiled_ms']:8.4f} dense {t_dense:8.4f} ms  rows/dense {row['ratio']:.3f} "
                    f"rows_wmma/dense {row['rows_wmma_ratio']:.3f} tiled/dense {row['tiled_ratio']:.3f} "
                    f"(target <= {limit:.3f})")
            print(line, flush=True)
            if log is not None:
                log.write(json.dumps(row) + "\n")
                log.flush()
    return rows


def harness_table(rows) -> list[str]:
    """The timing rows as a markdown table."""
    lines = ["| tokens | k | r | union | path | rows ms | rows_wmma ms | tiled ms | dense ms | rows/dense | "
             "rows_wmma/dense | tiled/dense | target | met |",
             "|---:|---:|---:|---:|:--|---:|---:|---:|---:|---:|---:|---:|---:|:-:|"]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['k']} | {r['r']:.3f} | {r['union']} | {r['path']} | {r['rows_ms']:.4f} | "
                     f"{r['rows_wmma_ms']:.4f} | {r['tiled_ms']:.4f} | {r['dense_ms']:.4f} | {r['ratio']:.3f} | "
                     f"{r['rows_wmma_ratio']:.3f} | {r['tiled_ratio']:.3f} | {r['target']:.3f} | "
                     f"{'yes' if r['ok'] else 'no'} |")
    return lines


def ort_available() -> str | None:
    """None when onnxruntime has the CUDA EP, else why not."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime not importable"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return (f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (bring onnxruntime-gpu: "
                "scripts/gpu_prepare.sh, docs/cuda.md)")
    return None


def harness_part(args, out: Path, card: str, date: str) -> int:
    path = find_library()
    if path is None:
        print("no harness library (libdsmoe_cuda_harness.so)", file=sys.stderr)
        return 2
    h = Harness(path)
    failures = correctness(h, args.seed)
    with open(out / "gpu-harness.jsonl", "w") as log:
        log.write(json.dumps(dict(card=card, date=date, seed=args.seed, failures=failures)) + "\n")
        log.flush()
        rows = timing(h, [int(t) for t in args.tokens.split(",")], [int(k) for k in args.ks.split(",")], log=log)
    lines = [f"### The kernels through the test harness: {card}, {date}", "",
             f"torch {torch.__version__}, float16, d=4096, D=11008, n=8; exactly k random blocks per token; "
             "CUDA-graph replays after an L2 flush, median of 20; dense = torch (cuBLAS) SwiGLU FFN. "
             "`rows` is the [n, B, d] layout the float16 exporter writes, on the path named (gemm-cutlass: "
             "CUTLASS grouped GEMMs), `rows_wmma` the same on the WMMA grouped GEMMs, `tiled` down_weight "
             "in 64-column tiles (WMMA).", "",
             f"Correctness: {'all cases within tolerance' if not failures else f'{len(failures)} FAILURES'} "
             f"(fp32 1e-4, fp16 1e-2, bf16 3e-2; seed {args.seed}).", "",
             *harness_table(rows)]
    text = "\n".join(lines) + "\n"
    (out / "gpu-harness.md").write_text(text)
    print()
    print(text)
    return 1 if failures else 0


def ort_part(args, out: Path, card: str, date: str) -> int:
    why = ort_available()
    if why:
        print(f"ORT CUDA EP part not run: {why}")
        return 0
    if not args.library:
        print("ORT CUDA EP part needs --library (libdsmoe_ops.so)", file=sys.stderr)
        return 2
    import onnxruntime as ort
    from gpu_ort import ort_op_timing, table

    with open(out / "gpu-ort.jsonl", "w") as log:
        log.write(json.dumps(dict(card=card, date=date, onnxruntime=ort.__version__)) + "\n")
        rows, notes = ort_op_timing(args.library, tokens_list=[int(t) for t in args.ort_tokens.split(",")],
                                    ks=[int(k) for k in args.ort_ks.split(",")], log=log)
    lines = [f"### The op in ONNX Runtime {ort.__version__} (CUDA EP): {card}, {date}", "",
             "float16, d=4096, D=11008, n=8, exactly k random blocks per token; one graph each (the CPU "
             "benchmark's graphs in float16): the sparse op (tiled and rows layouts), the dense FFN as MatMuls, "
             "com.microsoft.MoE fed the same blocks with top-k = k; IOBinding on the device, an L2 flush "
             "before each run, wall-clock median of 25 interleaved runs (ORT's launch overhead included). "
             "`graph` columns: the same sessions with enable_cuda_graph (1 and 8 tokens).", "",
             *table(rows), ""]
    lines += [f"- {n}" for n in notes]
    agree = {(r["tokens"], r["k"]): r["agree"] for r in rows}
    lines.append(f"- max relative difference to the sparse op's Y: {json.dumps({f'{t}x{k}': a for (t, k), a in agree.items()})}")
    text = "\n".join(lines) + "\n"
    (out / "gpu-ort.md").write_text(text)
    with open(out / "gpu-ort.jsonl", "a") as log:
        log.write(json.dumps(dict(notes=notes)) + "\n")
    print()
    print(text)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="gpu-check-out")
    p.add_argument("--part", choices=("harness", "ort", "all"), default="all")
    p.add_argument("--library", default=None, help="libdsmoe_ops.so (for the ORT CUDA EP part)")
    p.add_argument("--tokens", default="1,2,4,8,9,16,64,512,4096")
    p.add_argument("--ks", default="1,2,3,4,5,6,7,8")
    p.add_argument("--ort-tokens", default="1,8,512,4096")
    p.add_argument("--ort-ks", default="1,2,4,8")
    p.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        print("no CUDA device visible to torch", file=sys.stderr)
        return 2
    card, date = torch.cuda.get_device_name(0), datetime.date.today().isoformat()
    rc = 0
    if args.part in ("harness", "all"):
        rc = max(rc, harness_part(args, out, card, date))
    if args.part in ("ort", "all"):
        rc = max(rc, ort_part(args, out, card, date))
    return rc


if __name__ == "__main__":
    sys.exit(main())
