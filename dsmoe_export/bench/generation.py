"""Generation throughput: greedy generation of N tokens after a prompt, as an app runs it.

Our exports run in dsmoe_runtime's DSMoESession (in this process); the builder's models and our
sparse export also run in onnxruntime-genai's generator (a worker in the genai environment,
builder.GenaiWorker). Every variant generates once per round, in a fresh random order each round;
the sessions keep ONNX Runtime's default thread spinning (one session doing one thing, as
deployed), so each generation waits SETTLE_S first: a pool that spins after its last call (in
this process or in the genai worker) would otherwise take the cores from the next variant.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from . import builder as builder_mod
from .timing import Samples

SETTLE_S = 0.05


def _session_generate(session, prompt: list[int], new: int) -> tuple[float, float]:
    ids = np.array([prompt], np.int64)
    t0 = time.perf_counter()
    stream = session.stream(ids, new, collect_stats=False)
    next(stream)
    t1 = time.perf_counter()
    for _ in stream:
        pass
    t2 = time.perf_counter()
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3


def run(paths: dict[str, Path], prompt: list[int], new: int, *, threads: int, library: str, rounds: int,
        builder_python: str | None, seed: int = 0) -> list[dict]:
    """Rows {"phase": "generate", "variant", "runner", tokens_s, ...} for every variant: ours in
    DSMoESession ("dsmoe_runtime"), the builder's and our sparse ones in genai ("genai")."""
    from dsmoe_runtime import DSMoESession

    runners = {}
    for name, path in paths.items():
        kind = name.partition("-")[0]
        if kind in ("sparse", "dense", "projected"):
            s = DSMoESession(path, threads=threads, library=library if kind != "dense" else False,
                             allow_dense=kind == "dense", providers=["CPUExecutionProvider"])
            runners[(name, "dsmoe_runtime")] = lambda s=s: _session_generate(s, prompt, new)
    worker = builder_mod.GenaiWorker(builder_python) if builder_python else None
    try:
        if worker is not None:
            for name, path in paths.items():
                if name.partition("-")[0] in ("builder", "sparse", "projected"):
                    def call(folder=path.parent):
                        reply = worker.generate(folder, prompt, new)
                        if len(reply["new"]) != new:
                            raise RuntimeError(f"onnxruntime-genai generated {len(reply['new'])} tokens on {folder}, "
                                               f"not {new}")
                        return reply["prefill_ms"], reply["decode_ms"]
                    runners[(name, "genai")] = call
        samples = {key: [] for key in runners}
        for fn in runners.values():
            fn()  # warm-up: sessions, caches, the worker's model loading
        rng = np.random.default_rng(seed)
        keys = list(runners)
        for _ in range(rounds):
            for i in rng.permutation(len(keys)):
                time.sleep(SETTLE_S)
                samples[keys[i]].append(runners[keys[i]]())
    finally:
        if worker is not None:
            worker.close()
    rows = []
    for (name, runner), times in samples.items():
        total = Samples([p + d for p, d in times])
        kind, _, precision = name.partition("-")
        rows.append({"level": "e2e", "phase": "generate", "tokens": new, "past": len(prompt), "kind": kind,
                     "precision": precision or "fp32", "variant": name, "runner": runner,
                     "ms_min": total.min, "ms_median": total.median, "rounds": len(times),
                     "tokens_s": new / (total.min / 1e3), "tokens_s_median": new / (total.median / 1e3),
                     "prefill_ms_min": min(p for p, _ in times),
                     "decode_tokens_s": (new - 1) / (min(d for _, d in times) / 1e3) if new > 1 else None})
    return rows
