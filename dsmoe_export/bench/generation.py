"""Generation throughput: greedy generation of N tokens after a prompt, as an app runs it.

Our exports run in dsmoe_runtime's DSMoESession; the builder's models and our sparse ones also
run in onnxruntime-genai's generator. Each runner is a process of its own (workers.py) holding its
models, so no runner shares a process with the benchmark's other sessions; that is repeated
``processes`` times with fresh processes and, as with the timed sessions (timing.SessionSamples),
a variant's best time is the median over those processes of each one's best, since one session
of a model keeps a level of its own on a shared VM. Every variant generates once per round, in a
fresh random order each round; the sessions keep
ONNX Runtime's default thread spinning (one session doing one thing, as deployed), so each
generation waits SETTLE_S first: a pool that spins after its last call would otherwise take the
cores from the next variant.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .timing import SessionSamples
from .workers import GenaiWorker, RuntimeWorker

SETTLE_S = 0.05


def run(paths: dict[str, Path], prompt: list[int], new: int, *, threads: int, library: str, rounds: int,
        builder_python: str | None, seed: int = 0, processes: int = 1) -> list[dict]:
    """Rows {"phase": "generate", "variant", "runner", tokens_s, ...} for every variant: ours in
    DSMoESession ("dsmoe_runtime"), the builder's and our sparse ones in genai ("genai"), each
    runner in `processes` processes, one after the other (each holds all its models: two sets at
    a time fit a small machine's memory), `rounds` rounds in each."""
    samples: dict[tuple[str, str], list[list[tuple[float, float]]]] = {}
    for i in range(processes):
        for key, times in _one_process_each(paths, prompt, new, threads=threads, library=library, rounds=rounds,
                                            builder_python=builder_python, seed=seed + i).items():
            samples.setdefault(key, []).append(times)
    return [_row(name, runner, per_process, new, len(prompt)) for (name, runner), per_process in samples.items()]


def _one_process_each(paths: dict[str, Path], prompt: list[int], new: int, *, threads: int, library: str,
                      rounds: int, builder_python: str | None, seed: int) -> dict[tuple[str, str], list]:
    """(prefill ms, decode ms) per round of each (variant, runner), each runner a fresh process."""
    runtime = RuntimeWorker()
    genai = GenaiWorker(builder_python) if builder_python else None
    try:
        runners = {}
        for name, path in paths.items():
            kind = name.partition("-")[0]
            if kind in ("sparse", "dense", "projected"):
                def call(path=path, dense=kind == "dense"):
                    return runtime.generate(path, prompt, new, threads=threads, library=None if dense else library,
                                            dense=dense)
                runners[(name, "dsmoe_runtime")] = call
            if genai is not None and kind in ("builder", "sparse", "projected"):
                runners[(name, "genai")] = lambda folder=path.parent: genai.generate(folder, prompt, new)
        samples = {key: [] for key in runners}
        for fn in runners.values():
            fn()  # warm-up: sessions, caches, the workers' model loading
        rng = np.random.default_rng(seed)
        keys = list(runners)
        for _ in range(rounds):
            for i in rng.permutation(len(keys)):
                time.sleep(SETTLE_S)
                reply = runners[keys[i]]()
                if len(reply["new"]) != new:
                    raise RuntimeError(f"{keys[i][1]} generated {len(reply['new'])} tokens with {keys[i][0]}, "
                                       f"not {new}")
                samples[keys[i]].append((reply["prefill_ms"], reply["decode_ms"]))
    finally:
        runtime.close()
        if genai is not None:
            genai.close()
    return samples


def _row(name: str, runner: str, per_process: list[list[tuple[float, float]]], new: int, past: int) -> dict:
    """One variant's row from its (prefill ms, decode ms) samples in each process."""
    def samples(part) -> SessionSamples:
        per = [[part(p, d) for p, d in times] for times in per_process]
        return SessionSamples([t for ms in per for t in ms], per)

    total, prefill, decode = samples(lambda p, d: p + d), samples(lambda p, d: p), samples(lambda p, d: d)
    kind, _, precision = name.partition("-")
    return {"level": "e2e", "phase": "generate", "tokens": new, "past": past, "kind": kind,
            "precision": precision or "fp32", "variant": name, "runner": runner,
            "ms_min": total.min, "ms_median": total.median, "rounds": len(per_process[0]),
            "processes": len(per_process), "ms_process_mins": [min(ms) for ms in total.per_session],
            "ms_process_samples": [list(ms) for ms in total.per_session],  # for paired rounds (report.py)
            "tokens_s": new / (total.min / 1e3), "tokens_s_median": new / (total.median / 1e3),
            "prefill_ms_min": prefill.min,
            "decode_tokens_s": (new - 1) / (decode.min / 1e3) if new > 1 else None}
