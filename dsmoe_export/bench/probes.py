"""The machine's ceilings, measured in ONNX Runtime (CPU EP, fp32) at the benchmark's thread count.

- memory bandwidth: the best read rate over a few streaming kernels on an array several times
  the last-level cache, fed as a graph input (nothing pre-packed): a row-sum (ReduceSum) and a
  matrix-vector product in both layouts (MatMul, Gemm transB). GB/s = array bytes / time.
- GEMM: the best rate of large fp32 MatMuls with pre-packed (initializer) weights, in
  GFLOP/s = 2 M K N / time.

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
