"""The sparse op's per-call fixed cost at a model's FFN shape: what a call costs before any
block's weights are read.

One GatedBlockSparseFFN node with the model's d, D and n (random weights, the down layout the
exporter writes at that d) and a threshold no score passes (1.0: sigmoid < 1), so no block is
ever active: a call routes its tokens, sorts the (empty) pairs, writes Y = 0 and, on the
prefill path, hands the output's column tasks to the pool once. Timed like the other calls
(interleaved over the token counts, the caches evicted before each). A model pays it once per
layer and call; e2e.py reports it per call and as a share of the sparse FFN's node time.
"""
from __future__ import annotations

import numpy as np

from . import graphs, timing
from .op import Shape


def op_fixed_cost(shape: Shape, tokens: list[int], *, threads: int, library: str, rounds: int,
                  flush: timing.Flusher | None = None, gate: timing.QuietGate | None = None,
                  seed: int = 0) -> dict[int, timing.Samples]:
    """{T: Samples of microseconds per call} for each token count T, no block active."""
    rng = np.random.default_rng(seed)
    e = graphs.Experts.random(rng, shape.d, shape.D, shape.n)
    runner = graphs.Runner(*graphs.sparse_graph(e, threshold=1.0), threads=threads, library=library)
    router = rng.standard_normal((shape.n, shape.d), dtype=np.float32)
    calls = {}
    for T in sorted(set(tokens)):
        x = rng.standard_normal((T, shape.d), dtype=np.float32)
        calls[T] = runner.bind(x, router)
    res = timing.interleaved(calls, rounds, flush=flush, gate=gate, warmup=1, seed=seed)
    return {T: timing.Samples([ms * 1e3 for ms in s.ms]) for T, s in res.items()}
