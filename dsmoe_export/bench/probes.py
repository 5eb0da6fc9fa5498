"""The machine's ceilings, measured in ONNX Runtime (CPU EP, fp32) at the benchmark's thread count.

- memory bandwidth: the best read rate over a few streaming kernels on an array several times
  the last-level cache, fed as a graph input (nothing pre-packed): a row-sum (ReduceSum) and a
  matrix-vector product in both layouts (MatMul, Gemm transB). GB/s = array bytes / time.
- GEMM: the best rate of large fp32 MatMuls with pre-packed (initializer) weights, in
  GFLOP/s = 2 M K N / time.
- MatMul chains (`matmul_chain`, `python -m dsmoe_export.bench.probes`): the rate at which
  one-token MatMul nodes read their weights, by node size: not a ceiling, the reason a decode
  step's many small nodes read slower than its few large ones.

Each probe is the minimum over ``reps`` calls. The ceilings are what this runtime achieves on
this machine, not the vendor's peak figures: a kernel at 100 % of them is at the limit that
ONNX Runtime itself reaches.
"""
from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from .graphs import IR_VERSION, OPSET, session_options
from .timing import last_level_cache_bytes

F32 = TensorProto.FLOAT


def _session(nodes, inputs, outputs, inits, threads: int) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "probe", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    return ort.InferenceSession(model.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"])


def _best_seconds(session: ort.InferenceSession, feeds: dict[str, np.ndarray], reps: int) -> float:
    binding = session.io_binding()
    keep = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()}
    for k, v in keep.items():
        binding.bind_ortvalue_input(k, v)
    for o in session.get_outputs():
        binding.bind_output(o.name, "cpu")
    session.run_with_iobinding(binding)  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        session.run_with_iobinding(binding)
        best = min(best, time.perf_counter() - t0)
    return best


def bandwidth(threads: int, *, megabytes: int | None = None, reps: int = 6, on_probe=None) -> dict:
    """Best read bandwidth (GB/s) over the streaming probes, with each probe's figure."""
    if megabytes is None:
        megabytes = max(256, 4 * last_level_cache_bytes() // 2**20)
    cols = 4096
    rows = max(8, megabytes * 2**20 // (4 * cols))
    a = np.random.default_rng(0).random((rows, cols), dtype=np.float32)
    vi = helper.make_tensor_value_info
    probes = {
        "ReduceSum rows": ([helper.make_node("ReduceSum", ["A", "axes"], ["y"], keepdims=0)],
                           [vi("A", F32, [rows, cols])], [numpy_helper.from_array(np.array([1], np.int64), "axes")],
                           {"A": a}),
        "MatMul x[1,R] @ A[R,C]": ([helper.make_node("MatMul", ["x", "A"], ["y"])],
                                   [vi("x", F32, [1, rows]), vi("A", F32, [rows, cols])], [],
                                   {"x": np.ones((1, rows), np.float32), "A": a}),
        "Gemm x[1,C] @ A[R,C]^T": ([helper.make_node("Gemm", ["x", "A"], ["y"], transB=1)],
                                   [vi("x", F32, [1, cols]), vi("A", F32, [rows, cols])], [],
                                   {"x": np.ones((1, cols), np.float32), "A": a}),
    }
    results = {}
    for name, (nodes, inputs, inits, feeds) in probes.items():
        s = _session(nodes, inputs, [vi("y", F32, None)], inits, threads)
        results[name] = a.nbytes / _best_seconds(s, feeds, reps) / 1e9
        del s
        if on_probe:
            on_probe()
    best = max(results, key=results.get)
    return {"bandwidth_gb_s": results[best], "bandwidth_probe": best, "bandwidth_bytes": int(a.nbytes),
            "bandwidth_all": results}


GEMM_SHAPES = ((1024, 4096, 4096), (512, 2048, 5632))


def gemm(threads: int, *, shapes=GEMM_SHAPES, reps: int = 4, on_probe=None) -> dict:
    """Best fp32 GEMM rate (GFLOP/s) of ORT's MatMul with pre-packed weights."""
    rng = np.random.default_rng(0)
    vi = helper.make_tensor_value_info
    results = {}
    for m, k, n in shapes:
        w = rng.random((k, n), dtype=np.float32)
        s = _session([helper.make_node("MatMul", ["X", "W"], ["y"])], [vi("X", F32, [m, k])],
                     [vi("y", F32, [m, n])], [numpy_helper.from_array(w, "W")], threads)
        results[f"{m}x{k}x{n}"] = 2.0 * m * k * n / _best_seconds(s, {"X": rng.random((m, k), dtype=np.float32)},
                                                                 reps) / 1e9
        del s
        if on_probe:
            on_probe()
    best = max(results, key=results.get)
    return {"gemm_gflop_s": results[best], "gemm_probe": best, "gemm_all": results}


def ceilings(threads: int, *, quick: bool = False, on_probe=None) -> dict:
    out = {"threads": threads}
    if quick:
        out.update(bandwidth(threads, megabytes=64, reps=3, on_probe=on_probe))
        out.update(gemm(threads, shapes=((256, 1024, 1024),), reps=3, on_probe=on_probe))
    else:
        out.update(bandwidth(threads, on_probe=on_probe))
        out.update(gemm(threads, on_probe=on_probe))
    return out


PROBE_STEPS = {False: 3 + len(GEMM_SHAPES), True: 4}

# Node sizes of the chain probe at d = 576 (SmolLM2): widths 576, 1728 and 6912 make nodes of
# 1.33, 3.98 and 15.9 MB: SmolLM2's o_proj, about one of its FFN matrices, and a large node.
CHAIN_WIDTHS = (576, 1728, 6912)


def chain_session(d: int, width: int, count: int, threads: int, rng) -> tuple[ort.InferenceSession, list]:
    """A session of `count` float32 MatMul nodes x [1, d] @ [d, width] @ [width, d] @ ... (count even),
    and its weights in order."""
    vi = helper.make_tensor_value_info
    nodes, weights, x = [], [], "x"
    for i in range(count):
        shape = (d, width) if i % 2 == 0 else (width, d)
        weights.append(rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(shape[0])))
        y = "y" if i == count - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [y]))
        x = y
    inits = [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)]
    return _session(nodes, [vi("x", F32, [1, d])], [vi("y", F32, [1, d])], inits, threads), weights


def matmul_chain(threads: int, *, d: int = 576, widths=CHAIN_WIDTHS, megabytes: int = 80, rounds: int = 40,
                 seed: int = 0) -> list[dict]:
    """How fast one-token MatMul nodes stream their weights by node size: per width w a chain of
    float32 MatMuls [1, d] @ [d, w] @ [w, d] ... of about `megabytes` of weights in all (take more
    than the last-level cache, so that every call reads them from memory), each chain a session of
    its own, the sessions timed in turns (a fresh order each round), best of `rounds`. Each node pays a fixed cost besides its bytes (ORT's
    dispatch, the pool waking its sleeping worker), which the small ones feel: `extra_us_per_node`
    is the time a chain takes beyond the largest nodes' rate, per node (docs/benchmarks.md uses it to
    explain why the FFN's share of a decode step's time is below its share of the bytes)."""
    rng = np.random.default_rng(seed)
    chains = {}
    for w in widths:
        node_bytes = 4 * d * w
        count = max(2, 2 * round(megabytes * 2**20 / node_bytes / 2))  # even: the chain ends at [1, d]
        chains[w] = (chain_session(d, w, count, threads, rng)[0], count, count * node_bytes)
    feeds = {"x": rng.standard_normal((1, d), dtype=np.float32)}
    for s, _, _ in chains.values():
        s.run(None, feeds)  # warm-up
    best = {w: float("inf") for w in chains}
    for _ in range(rounds):
        for w in rng.permutation(list(chains)):
            s = chains[w][0]
            t0 = time.perf_counter()
            s.run(None, feeds)
            best[w] = min(best[w], time.perf_counter() - t0)
    largest = max(chains)
    rate = chains[largest][2] / best[largest]
    return [{"d": d, "width": int(w), "nodes": count, "node_mb": total / count / 1e6, "ms": best[w] * 1e3,
             "gb_s": total / best[w] / 1e9, "extra_us_per_node": (best[w] - total / rate) / count * 1e6}
            for w, (_, count, total) in chains.items()]


def main(argv=None) -> None:
    import argparse

    from .cli import _ints  # the benchmark's parser of positive integer lists (cli imports this module)
    p = argparse.ArgumentParser(prog="python -m dsmoe_export.bench.probes",
                                description="How fast chains of one-token float32 MatMul nodes stream their "
                                            "weights by node size, beside the read bandwidth probe (ONNX "
                                            "Runtime, CPU EP, idle workers asleep as in the benchmark).")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (default: 2)")
    p.add_argument("--d", type=int, default=576, help="the chain's hidden size (default: 576)")
    p.add_argument("--widths", type=_ints, default=list(CHAIN_WIDTHS),
                   help="node widths, comma-separated: nodes of d x width floats (default: 576,1728,6912)")
    p.add_argument("--megabytes", type=int, default=80, help="weights per chain (default: 80)")
    p.add_argument("--rounds", type=int, default=40, help="timed rounds (default: 40)")
    args = p.parse_args(argv)
    if min(args.threads, args.d, args.megabytes, args.rounds) < 1:
        p.error("--threads, --d, --megabytes and --rounds must be at least 1")
    if len(set(args.widths)) != len(args.widths):
        p.error(f"--widths: each width once, got {','.join(map(str, args.widths))}")
    widths = tuple(args.widths)
    bw = bandwidth(args.threads)
    print(f"{args.threads} threads; read bandwidth {bw['bandwidth_gb_s']:.1f} GB/s ({bw['bandwidth_probe']}, "
          f"{bw['bandwidth_bytes'] / 2**20:.0f} MiB)")
    print("| nodes | MB a node | ms (best) | GB/s | us a node beyond the largest nodes' rate |")
    print("|---|---|---|---|---|")
    for r in matmul_chain(args.threads, d=args.d, widths=widths, megabytes=args.megabytes, rounds=args.rounds):
        print(f"| {r['nodes']} | {r['node_mb']:.2f} | {r['ms']:.3f} | {r['gb_s']:.1f} | {r['extra_us_per_node']:.1f} |")


if __name__ == "__main__":
    main()
