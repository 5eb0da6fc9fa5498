"""The op under ONNX Runtime's CUDA EP (run by scripts/gpu_check.sh when onnxruntime-gpu is
there; docs/cuda.md): op-level float16 timing of the three graphs of the CPU benchmark
(dsmoe_export/bench/graphs.py: the sparse op, the dense FFN as MatMuls, com.microsoft.MoE fed
the same blocks) at d=4096 / D=11008 / n=8, exactly k active blocks per token; inputs and
outputs bound on the device (IOBinding), one session.run per call after an L2 flush, wall
clock (ORT's launch overhead included). Sparse and dense also once more captured as CUDA
graphs (provider option enable_cuda_graph) for the decode token counts.
"""
from __future__ import annotations

import json
import time

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, numpy_helper

from dsmoe_export.bench import graphs

F16 = TensorProto.FLOAT16


def to_float16(model: onnx.ModelProto, weights: dict[str, np.ndarray]):
    """The float32 benchmark graph in float16: inputs, outputs, constants, Casts, weights."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    for v in [*g.input, *g.output]:
        if v.type.tensor_type.elem_type == TensorProto.FLOAT:
            v.type.tensor_type.elem_type = F16
    weights16 = {k: v.astype(np.float16) for k, v in weights.items()}
    inits = []
    for t in g.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            inits.append(graphs._placeholder(t.name, weights16[t.name]))
        elif t.data_type == TensorProto.FLOAT:
            inits.append(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
        else:
            inits.append(t)
    del g.initializer[:]
    g.initializer.extend(inits)
    for node in g.node:
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = F16
    return model, weights16


class CudaRunner:
    """A CUDA EP session with X / router_weight / Y bound on the device."""

    def __init__(self, model, weights, library, *, cuda_graph=False, device="cuda"):
        self.device = device
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if library:
            opts.register_custom_ops_library(library)
        self._w = {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}
        opts.add_external_initializers(list(self._w), list(self._w.values()))
        cuda = {"enable_cuda_graph": "1"} if cuda_graph else {}
        providers = [("CUDAExecutionProvider", cuda)] + ([] if cuda_graph else ["CPUExecutionProvider"])
        if device == "cpu":  # a dry run of this script without a GPU
            providers = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
        if device == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise RuntimeError(f"session providers {self.session.get_providers()}")

    def bind(self, x: np.ndarray, router: np.ndarray):
        """Binds once per shape; later calls copy into the same device buffers (a captured CUDA
        graph replays with the addresses it was captured with)."""
        if getattr(self, "keep", None) is not None and self.keep[0].shape() == list(x.shape):
            self.keep[0].update_inplace(x)
            self.keep[1].update_inplace(router)
            return self
        b = self.session.io_binding()
        dev = self.device
        self.keep = [ort.OrtValue.ortvalue_from_numpy(x, dev, 0), ort.OrtValue.ortvalue_from_numpy(router, dev, 0),
                     ort.OrtValue.ortvalue_from_shape_and_type(list(x.shape), np.float16, dev, 0)]
        b.bind_ortvalue_input("X", self.keep[0])
        b.bind_ortvalue_input("router_weight", self.keep[1])
        b.bind_ortvalue_output("Y", self.keep[2])
        self.binding = b
        return self

    def __call__(self):
        self.session.run_with_iobinding(self.binding)

    def y(self) -> np.ndarray:
        return self.keep[2].numpy().astype(np.float32)


def _warm(calls: dict, notes: list[str], where: str) -> None:
    """Three calls each (and the CUDA graph's capture); a call that fails is noted and dropped."""
    for name, c in list(calls.items()):
        try:
            for _ in range(3):
                c()
        except Exception as ex:  # noqa: BLE001
            notes.append(f"{name} {where}: {str(ex).splitlines()[0][:200]}")
            del calls[name]


def _interleaved_ms(calls: dict, reps: int, flush_buf, device: str) -> dict[str, list[float]]:
    """Wall-clock ms of each call, `reps` rounds in a rotating order, the cache flushed before each."""
    times = {name: [] for name in calls}
    names = list(calls)
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            flush_buf.zero_()
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            calls[name]()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def ort_op_timing(library: str, tokens_list=(1, 8, 512, 4096), ks=(1, 2, 4, 8), d=4096, D=11008, n=8,
                  reps=25, log=None, device="cuda") -> tuple[list[dict], list[str]]:
    """Rows of (tokens, k, kind ms...) and notes (numerical agreement, what failed)."""
    notes: list[str] = []
    rng = np.random.default_rng(0)
    e = graphs.Experts.random(rng, d, D, n)
    built = {}

    def make(kind, k=None, cuda_graph=False):
        if kind == "sparse":
            # gate/up in rows: the CUDA kernel reads no other layout (gate_up_tile 0)
            m, w = graphs.sparse_graph(e, down_tile=64, gate_up_tile=0)  # the tiled layout, against rows below
        elif kind == "sparse_rows":
            m, w = graphs.sparse_graph(e, down_tile=0, gate_up_tile=0)
        elif kind == "dense":
            m, w = graphs.dense_graph(e)
        else:
            m, w = graphs.moe_graph(e, k=k)  # the op's attributes are moe_graph's defaults (OP_ATTRS)
        m, w = to_float16(m, w)
        return CudaRunner(m, w, library if kind.startswith("sparse") else None, cuda_graph=cuda_graph, device=device)

    for kind in ("sparse", "sparse_rows", "dense"):
        built[kind] = make(kind)
    for k in ks:
        try:
            built[f"moe{k}"] = make("moe", k=k)
        except Exception as ex:  # noqa: BLE001 (reported, the rest still runs)
            notes.append(f"com.microsoft.MoE k={k} on the CUDA EP: {str(ex).splitlines()[0][:200]}")
    router = np.zeros((n, d), np.float16)
    router[:, :n] = 20 * np.eye(n, dtype=np.float16)  # logit_i = 20 x_i: x_i = +-1 picks block i
    flush_buf = torch.empty(256 * 2**20 if device == "cuda" else 1, dtype=torch.uint8, device=device)
    rows = []
    for T in tokens_list:
        x = (rng.standard_normal((T, d)) * 0.1).astype(np.float16)
        graph_runners = {}
        if T <= 8 and device == "cuda":
            for kind in ("sparse", "dense"):
                try:
                    graph_runners[f"{kind}_graph"] = make(kind, cuda_graph=True)
                except Exception as ex:  # noqa: BLE001
                    notes.append(f"{kind} with enable_cuda_graph, T={T}: {str(ex).splitlines()[0][:200]}")
        for k in ks:
            xs = x.copy()
            sel = rng.random((T, n)).argsort(-1) < k
            xs[:, :n] = np.where(sel, 1.0, -1.0)
            calls = {name: r.bind(xs, router) for name, r in built.items()
                     if not name.startswith("moe") or name == f"moe{k}"}
            calls.update({name: r.bind(xs, router) for name, r in graph_runners.items()})
            _warm(calls, notes, f"T={T} k={k}")
            ref = calls["sparse"].y() if "sparse" in calls else None
            agree = {}
            for name, c in calls.items():
                if ref is not None and name != "dense":
                    agree[name] = float(np.abs(c.y() - ref).max() / max(1.0, np.abs(ref).max()))
            times = _interleaved_ms(calls, reps, flush_buf, device)
            row = dict(tokens=T, k=k, r=k / n, **{f"{name}_ms": float(np.median(v)) for name, v in times.items()},
                       agree=agree)
            if f"moe{k}_ms" in row:
                row["moe_ms"] = row.pop(f"moe{k}_ms")
                row["agree"]["moe"] = row["agree"].pop(f"moe{k}", float("nan"))
            rows.append(row)
            print("  ORT " + " ".join(f"{key}={val:.4f}" if isinstance(val, float) else f"{key}={val}"
                                      for key, val in row.items() if key != "agree"),
                  "agree(max rel diff to sparse):", {a: f"{v:.2g}" for a, v in agree.items()}, flush=True)
            if log is not None:
                log.write(json.dumps(row) + "\n")
                log.flush()
    return rows, notes


def table(rows: list[dict]) -> list[str]:
    out = ["| tokens | k | r | sparse ms | rows-layout ms | dense ms | MoE ms | sparse/dense | MoE/sparse "
           "| sparse graph ms | dense graph ms | graph ratio |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    f = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    q = lambda a, b: "-" if a is None or b is None else f"{a / b:.3f}"  # noqa: E731
    for r in rows:
        s, dn, m = r.get("sparse_ms"), r.get("dense_ms"), r.get("moe_ms")
        sg, dg = r.get("sparse_graph_ms"), r.get("dense_graph_ms")
        out.append(f"| {r['tokens']} | {r['k']} | {r['r']:.3f} | {f(s)} | {f(r.get('sparse_rows_ms'))} | {f(dn)} | "
                   f"{f(m)} | {q(s, dn)} | {q(m, s)} | {f(sg)} | {f(dg)} | {q(sg, dg)} |")
    return out
