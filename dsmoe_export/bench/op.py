"""The op-level sweep: for each FFN shape and token count, the sparse op, ONNX Runtime's
com.microsoft.MoE and the dense FFN, timed in the same interleaved rounds.

Per (shape, T) group: the dense FFN once, then the sparse op and MoE at every exact k
(r = k / n, a random subset of k blocks per token) and under the "natural" random router.
All sparse calls share one session, all MoE calls another (MoE's top-k attribute is n and
the -inf sentinel leaves exactly the active blocks; see graphs.py).
"""
from __future__ import annotations

import gc
import math
from dataclasses import dataclass

import numpy as np

from ..testing.cases import rel_err
from . import graphs, metrics, routing, timing

# Calls faster than this get SHORT_CALL_FACTOR x the rounds: they are cheap and noisier.
SHORT_CALL_MS = 20.0
SHORT_CALL_FACTOR = 3


@dataclass(frozen=True)
class Shape:
    d: int
    D: int
    n: int

    @property
    def block(self) -> int:
        return self.D // self.n

    @property
    def label(self) -> str:
        return f"d={self.d} D={self.D} n={self.n}"

    @classmethod
    def parse(cls, text: str) -> "Shape":
        """``dxD`` or ``dxDxn`` (n defaults to 8)."""
        parts = [int(p) for p in text.lower().split("x")]
        if len(parts) == 2:
            parts.append(8)
        if len(parts) != 3 or min(parts) < 1 or parts[1] % parts[2]:
            raise ValueError(f"shape {text!r}: expected dxD or dxDxn with n dividing D")
        return cls(*parts)


def target_ratio(tokens: int, r: float) -> float:
    """The issue's bound on sparse/dense: r + 0.05 for one token, 1.15 r + 0.05 for a prefill."""
    return r + 0.05 if tokens == 1 else 1.15 * r + 0.05


def planned_calls(shapes, tokens, ks_for, rounds: int, layouts: bool = False) -> int:
    """Upper bound of timed calls (for the progress bar): short calls get more rounds."""
    total = 0
    for s in shapes:
        variants = 1 + (3 if layouts else 2) * (len(ks_for(s)) + 1)
        for _ in tokens:
            total += variants * rounds * SHORT_CALL_FACTOR
    return total


def check_agreement(runners: dict, e: graphs.Experts, rng: np.random.Generator) -> dict:
    """The three graphs on a few tokens: sparse vs MoE under the natural router, and sparse vs
    dense with every block active (sparse = sigmoid(ALPHA) * dense there). Max abs difference
    relative to max(1, max |reference|)."""
    nat = routing.natural(rng, 5, e.d, e.n)
    y_sparse = runners["sparse"](nat.x, nat.router_weight)[0]
    y_moe = runners["moe"](nat.x, nat.router_weight)[0]
    full = routing.exact_k(rng, 3, e.d, e.n, e.n)
    y_all = runners["sparse"](full.x, full.router_weight)[0]
    y_dense = runners["dense"](full.x, full.router_weight)[0]
    s = 1.0 / (1.0 + math.exp(-routing.ALPHA))

    out = {"moe_vs_sparse": rel_err(y_moe, y_sparse), "dense_vs_sparse_all_active": rel_err(s * y_dense, y_all)}
    for layout, kind in graphs.LAYOUT_KINDS.items():  # the same sums in the same order (op-spec, "two layouts")
        if kind in runners:
            out[f"{layout}_layout_vs_sparse"] = rel_err(runners[kind](nat.x, nat.router_weight)[0], y_sparse)
    return out


def _routings_for(bar, label: str, rng, T: int, shape, ks) -> list:
    """Routings of one token count: exact k for each of ks, then the natural router (last)."""
    if bar is not None:
        bar.set_description(label)
    return [routing.exact_k(rng, T, shape.d, shape.n, k) for k in ks] + [routing.natural(rng, T, shape.d, shape.n)]


def run_shape(shape: Shape, tokens: list[int], ks: list[int], *, threads: int, library: str, rounds: int,
              flush: timing.Flusher, seed: int, gate: timing.QuietGate | None = None,
              budget_s: float | None = None, bar=None, layouts: bool = False) -> tuple[list[dict], dict]:
    """Rows of one shape, and its agreement check. ``layouts``: the sparse op with its down
    weights in the other layout too (kind ``sparse_rows`` or ``sparse_tiled``; ``sparse`` has the
    layout the exporter writes at this d, graphs.default_layout), in the same interleaved rounds."""
    rng = np.random.default_rng(seed)
    e = graphs.Experts.random(rng, shape.d, shape.D, shape.n)
    cache: dict = {}
    runners = {"sparse": graphs.runner("sparse", e, threads=threads, library=library),
               "moe": graphs.runner("moe", e, threads=threads, cache=cache),
               "dense": graphs.runner("dense", e, threads=threads)}
    layout = graphs.default_layout(shape.d)
    other = graphs.LAYOUT_KINDS["tiled" if layout == "rows" else "rows"]
    if layouts:
        runners[other] = graphs.runner(other, e, threads=threads, library=library)
    check = {"shape": shape.label, **check_agreement(runners, e, rng)}
    rows = []
    for T in tokens:
        routings = _routings_for(bar, f"op {shape.label} T={T}", rng, T, shape, ks)
        calls = {("dense", None): runners["dense"].bind(routings[-1].x, routings[-1].router_weight)}
        for i, rt in enumerate(routings):
            for kind in ("sparse", "moe", other):
                if kind in runners:
                    calls[(kind, i)] = runners[kind].bind(rt.x, rt.router_weight)
        # The dense call's time (after a warm-up call) decides the number of rounds.
        probe = timing.interleaved({"dense": calls[("dense", None)]}, 1, flush=flush, gate=gate, warmup=1)
        n_rounds = rounds * (SHORT_CALL_FACTOR if probe["dense"].min < SHORT_CALL_MS else 1)
        keyed = {f"{k[0]}:{k[1]}": v for k, v in calls.items()}
        res = timing.interleaved(keyed, n_rounds, flush=flush, gate=gate, warmup=1, seed=seed + T,
                                 budget_s=budget_s, on_call=(lambda: bar.update(1)) if bar is not None else None)
        n_rounds = len(res["dense:None"].ms)
        if bar is not None:
            bar.update(len(keyed) * rounds * SHORT_CALL_FACTOR - len(keyed) * n_rounds)
        dense = res["dense:None"]
        for key, samples in res.items():
            kind, idx = key.split(":")
            rt = None if idx == "None" else routings[int(idx)]
            rows.append(_row(shape, T, kind, rt, samples, dense, n_rounds))
            if kind == "sparse":
                rows[-1]["layout"] = layout
    del runners, cache, e
    gc.collect()
    return rows, check


def quant_kinds(precisions: list[str]) -> list[str]:
    """Graph kinds of the quantized comparison: the float32 sparse op (the speed-up's reference), and per
    precision the sparse op with float32 activations (sparse-) and, int4/int8, with int8 ones
    (sparsei8-, accuracy_level 4: the exporter's default for int4 on the CPU EP), the dense FFN as
    MatMulNBits likewise (dense-, densei8-) and com.microsoft.QMoE (int4/int8 only: ORT's CPU EP
    has no float16-weight MatMul nor float16 QMoE for float32 activations)."""
    kinds = ["sparse"]
    for p in precisions:
        kinds.append(f"sparse-{p}")
        if p in graphs.quant.BITS:
            kinds += [f"sparsei8-{p}", f"dense-{p}", f"densei8-{p}", f"qmoe-{p}"]
    return kinds


def planned_quant_calls(shapes, tokens, ks_for, rounds: int, precisions: list[str]) -> int:
    return sum(len(quant_kinds(precisions)) * (len(ks_for(s)) + 1) * len(tokens) * rounds * SHORT_CALL_FACTOR
               for s in shapes)


def run_shape_quant(shape: Shape, tokens: list[int], ks: list[int], precisions: list[str], *, group_size: int,
                    threads: int, library: str, rounds: int, flush: timing.Flusher, seed: int,
                    gate: timing.QuietGate | None = None, budget_s: float | None = None, bar=None) -> tuple[list[dict], dict]:
    """Weight-only quantized variants of one shape, interleaved in the same rounds: per token count and
    routing (exact k and natural), the float32 sparse op and, per precision, the sparse op, the dense
    MatMulNBits FFN and QMoE. Rows carry the ratio to the dense FFN *at the same precision* (float16:
    to the float32 dense FFN, its only CPU peer) and the speed-up over the float32 sparse op."""
    rng = np.random.default_rng(seed)
    e = graphs.Experts.random(rng, shape.d, shape.D, shape.n)
    cache: dict = {}
    kinds = quant_kinds(precisions)
    if any(p not in graphs.quant.BITS for p in precisions):
        kinds.append("dense")
    runners = {}
    for kind in kinds:
        extra = {"group_size": group_size} if "-" in kind else {}
        runners[kind] = graphs.runner(kind, e, threads=threads, library=library, cache=cache, **extra)
    check = {"shape": shape.label, "group_size": group_size}
    nat = routing.natural(rng, 5, shape.d, shape.n)
    for p in precisions:
        if p in graphs.quant.BITS:
            ys = runners[f"sparse-{p}"](nat.x, nat.router_weight)[0]
            yq = runners[f"qmoe-{p}"](nat.x, nat.router_weight)[0]
            check[f"qmoe_vs_sparse_{p}"] = float(np.abs(yq - ys).max() / max(1.0, float(np.abs(ys).max())))
    rows = []
    for T in tokens:
        routings = _routings_for(bar, f"quant {shape.label} T={T}", rng, T, shape, ks)
        calls = {}
        for kind in kinds:
            if kind.startswith("dense"):
                calls[f"{kind}:None"] = runners[kind].bind(routings[-1].x, routings[-1].router_weight)
            else:
                for i, rt in enumerate(routings):
                    calls[f"{kind}:{i}"] = runners[kind].bind(rt.x, rt.router_weight)
        probe = timing.interleaved({"s": calls["sparse:0"]}, 1, flush=flush, gate=gate, warmup=1)
        n_rounds = rounds * (SHORT_CALL_FACTOR if probe["s"].min < SHORT_CALL_MS else 1)
        res = timing.interleaved(calls, n_rounds, flush=flush, gate=gate, warmup=1, seed=seed + T,
                                 budget_s=budget_s, on_call=(lambda: bar.update(1)) if bar is not None else None)
        got = len(next(iter(res.values())).ms)
        for key, samples in res.items():
            kind, idx = key.split(":")
            if kind.startswith("dense"):
                continue
            rt = routings[int(idx)]
            prec = kind.split("-", 1)[1] if "-" in kind else "float32"
            dense_key = f"dense-{prec}:None" if prec in graphs.quant.BITS else "dense:None"
            dense = res.get(dense_key)
            row = _row(shape, T, kind, rt, samples, dense if dense is not None else samples, got, group_size)
            i8 = res.get(f"densei8-{prec}:None")
            row.update(level="quant", precision=prec, group_size=group_size,
                       dense_kind=dense_key.split(":")[0] if dense is not None else None,
                       dense_ms_min=dense.min if dense is not None else None,
                       densei8_ms_min=i8.min if i8 is not None else None,
                       ratio_i8_min=samples.min / i8.min if i8 is not None else None,
                       fp32_sparse_ms_min=res[f"sparse:{idx}"].min,
                       speedup_vs_fp32=res[f"sparse:{idx}"].min / samples.min)
            if dense is None:
                row["ratio_min"] = row["ratio_median"] = None
            rows.append(row)
        for kind in (k for k in kinds if k.startswith("dense")):
            rows.append(dict(_row(shape, T, kind, None, res[f"{kind}:None"], res[f"{kind}:None"], got, group_size),
                             level="quant", precision=kind.split("-", 1)[1] if "-" in kind else "float32",
                             group_size=group_size))
        if bar is not None:
            bar.update(len(calls) * rounds * SHORT_CALL_FACTOR - len(calls) * got)
    del runners, cache, e
    gc.collect()
    return rows, check


def _row(shape: Shape, T: int, kind: str, rt, samples: timing.Samples, dense: timing.Samples,
         n_rounds: int, group_size: int = 32) -> dict:
    if rt is None:  # dense: every block of every token
        union, pairs, mode, k, mean_k = shape.n, shape.n * T, "all", shape.n, float(shape.n)
    else:
        union, pairs, mode, k, mean_k = rt.union, rt.pairs, rt.mode, rt.k, rt.mean_k
    bytes_, flops = metrics.call_cost(kind, d=shape.d, n=shape.n, B=shape.block, tokens=T, union=union, pairs=pairs,
                                      group_size=group_size)
    r = mean_k / shape.n
    row = {"level": "op", "shape": shape.label, "d": shape.d, "D": shape.D, "n": shape.n, "tokens": T,
           "kind": kind, "mode": mode, "k": k, "mean_k": mean_k, "r": r, "union": union, "pairs": pairs,
           **samples.summary(), "rounds": n_rounds,
           "ratio_min": samples.min / dense.min, "ratio_median": samples.median / dense.median,
           "bytes": bytes_, "flops": flops}
    if not kind.startswith("dense"):
        row["target"] = target_ratio(T, r)
    return row
