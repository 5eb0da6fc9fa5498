"""The sparse op's per-call fixed cost at a model's FFN shape: what a call costs before any
block's weights are read.

One GatedBlockSparseFFN node with the model's d, D and n (random weights, the down layout the
exporter writes at that d) and a threshold no score passes (1.0: sigmoid < 1), so no block is
ever active: a call routes its tokens, sorts the (empty) pairs, writes Y = 0 and, on the
prefill path, hands the output's column tasks to the pool once. Its time is the node's kernel
time from ONNX Runtime's profiler (a session call adds the executor's own overhead, which a
model pays once per call, not per layer), with the caches warm, as between the layers of a
model, where the op's code and the routing's data stay cached (evicting everything before each
call measured 154 us at one token for SmolLM2's shape, against 6-8 us warm). A model pays it once
per layer and call; e2e.py reports it per call and as a share of the sparse FFN's node time.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from . import graphs, timing
from .node_times import ended_runs
from .op import Shape


def op_fixed_cost(shape: Shape, tokens: list[int], *, threads: int, library: str, rounds: int,
                  seed: int = 0) -> dict[int, timing.Samples]:
    """{T: Samples of the op's kernel microseconds per call} for each token count T, no block active."""
    rng = np.random.default_rng(seed)
    e = graphs.Experts.random(rng, shape.d, shape.D, shape.n)
    router = rng.standard_normal((shape.n, shape.d), dtype=np.float32)
    folder = Path(tempfile.mkdtemp(prefix="dsmoe-fixed-"))
    try:
        runner = graphs.Runner(*graphs.sparse_graph(e, threshold=1.0), threads=threads, library=library,
                               profile_prefix=str(folder / "fixed"))
        order = sorted(set(tokens))
        for T in order:
            call = runner.bind(rng.standard_normal((T, shape.d), dtype=np.float32), router)
            for _ in range(rounds + 1):  # the first: warm-up
                call()
        runs = ended_runs(runner.session)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if len(runs) != len(order) * (rounds + 1):
        raise RuntimeError(f"the fixed-cost profile has {len(runs)} runs, not {len(order) * (rounds + 1)}")
    out = {}
    for j, T in enumerate(order):
        some = runs[j * (rounds + 1) + 1:(j + 1) * (rounds + 1)]
        out[T] = timing.Samples([sum(run.values()) * 1e3 for run in some])  # every node of the run
    return out
