"""The benchmark's quantized graphs compute the same layer: the sparse Int4/Int8 op, com.microsoft.QMoE
(int4: float32 activations) and the dense MatMulNBits FFN, from the same block weights."""
from __future__ import annotations

import math

import numpy as np

from dsmoe_export.bench import graphs, op, routing
from dsmoe_export.bench.report import markdown
from dsmoe_export.testing.cases import rel_err



def test_quantized_graphs_agree(op_library, rng):
    e = graphs.Experts.random(rng, 128, 512, 8)
    cache = {}
    for fmt in ("int4", "int8"):
        r = {k: graphs.runner(f"{k}-{fmt}", e, threads=1, library=op_library, cache=cache)
             for k in ("sparse", "qmoe", "dense")}
        nat = routing.natural(rng, 4, e.d, e.n)
        ys = r["sparse"](nat.x, nat.router_weight)[0]
        if fmt == "int4":  # QMoE int8 quantizes activations to int8 on the CPU EP
            assert rel_err(r["qmoe"](nat.x, nat.router_weight)[0], ys) < 1e-4
        full = routing.exact_k(rng, 3, e.d, e.n, e.n)
        s = 1.0 / (1.0 + math.exp(-routing.ALPHA))
        ya, yd = r["sparse"](full.x, full.router_weight)[0], r["dense"](full.x, full.router_weight)[0]
        assert rel_err(s * yd, ya) < 1e-4
        # int8 activations (accuracy_level 4): the same blocks (routed on X as given), X rounded for gate/up
        yi8 = graphs.runner(f"sparsei8-{fmt}", e, threads=1, library=op_library, cache=cache)(
            nat.x, nat.router_weight)[0]
        assert 0 < rel_err(yi8, ys) < 0.05
    y16 = graphs.runner("sparse-float16", e, threads=1, library=op_library)(nat.x, nat.router_weight)[0]
    y32 = graphs.runner("sparse", e, threads=1, library=op_library)(nat.x, nat.router_weight)[0]
    assert 0 < rel_err(y16, y32) < 1e-2


def test_quant_rows_and_report(op_library):
    from dsmoe_export.bench import timing

    rows, check = op.run_shape_quant(op.Shape(64, 256, 4), [1, 8], [2], ["int4", "float16"], group_size=32,
                                     threads=1, library=op_library, rounds=2, flush=timing.Flusher(enabled=False),
                                     seed=0)
    kinds = {r["kind"] for r in rows}
    assert kinds == {"sparse", "sparse-int4", "sparsei8-int4", "dense-int4", "densei8-int4", "qmoe-int4",
                     "sparse-float16", "dense"}
    assert check["qmoe_vs_sparse_int4"] < 1e-4
    r = next(r for r in rows if r["kind"] == "sparse-int4" and r["mode"] == "exact" and r["tokens"] == 1)
    assert r["dense_kind"] == "dense-int4" and r["ratio_min"] > 0 and r["speedup_vs_fp32"] > 0
    assert r["ratio_i8_min"] > 0
    i8 = next(r for r in rows if r["kind"] == "sparsei8-int4" and r["mode"] == "exact" and r["tokens"] == 8)
    assert i8["precision"] == "int4" and i8["ratio_i8_min"] > 0 and i8["speedup_vs_fp32"] > 0
    md = markdown({"meta": {"command": "x", "date": "d", "cpu": "c", "cores": 1, "threads": 1, "versions": {},
                            "library": "l", "cache": "c", "rounds_note": "r"},
                   "op": [], "e2e": [], "quant": rows, "quant_checks": [check]})
    assert "weight-only quantized" in md and "int4" in md and "int4, int8 activations" in md
