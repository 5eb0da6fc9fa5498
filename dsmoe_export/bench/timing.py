"""Interleaved timing: every variant of a group is called once per round, in a fresh random
order each round, so that machine noise (other processes, frequency changes) hits all variants
alike; ratios are taken between variants of the same rounds.

Before each timed call a :class:`Flusher` reads a buffer several times the last-level cache, so
every call starts with cold weights, as in a model whose other layers' weights pass through the
cache between two calls of one layer (``--no-flush`` measures warm instead).

Before each round a :class:`QuietGate` waits (a bounded time) until other processes leave the
CPUs mostly idle: on a small machine one busy neighbour can stall a multi-threaded call by a
whole scheduler time slice. Rounds that ran anyway on a busy machine are counted.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np


def last_level_cache_bytes(default: int = 64 * 2**20) -> int:
    """Size of the largest CPU cache (sysfs), or ``default`` when it cannot be read."""
    best = 0
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = path.read_text().strip().upper()
            scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
            best = max(best, int(text.rstrip("KMG")) * scale)
        except (OSError, ValueError):
            continue
    return best or default


class Flusher:
    """Evicts the caches by reading ``factor`` x the last-level cache (read-only: no dirty lines
    whose write-back the next timed call would pay)."""

    def __init__(self, factor: float = 3.0, enabled: bool = True):
        self.enabled = enabled
        self.bytes = int(factor * last_level_cache_bytes()) if enabled else 0
        self._buf = np.ones(self.bytes // 8, np.float64) if enabled else None

    def __call__(self) -> None:
        if self.enabled:
            self._buf.sum()


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs from /proc/stat, or None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields[:8])


class QuietGate:
    """``wait()`` sleeps until the CPUs were at most ``max_busy`` busy over a short window
    (while this process sleeps, so the load is other processes'), for at most ``max_wait_s``
    per round and ``max_total_wait_s`` per run (then it stops waiting).
    Counts the waits and the rounds that started on a busy machine anyway."""

    def __init__(self, *, max_busy: float = 0.2, window_s: float = 0.15, max_wait_s: float = 30.0,
                 max_total_wait_s: float = 300.0, enabled: bool = True):
        self.enabled = enabled and _cpu_times() is not None
        self.max_busy, self.window_s, self.max_wait_s = max_busy, window_s, max_wait_s
        self.max_total_wait_s = max_total_wait_s
        self.waited_s = 0.0
        self.busy_rounds = 0
        self.rounds = 0

    def busy(self) -> float:
        a = _cpu_times()
        time.sleep(self.window_s)
        b = _cpu_times()
        total = b[1] - a[1]
        return 1.0 - (b[0] - a[0]) / total if total > 0 else 0.0

    def wait(self) -> None:
        if not self.enabled:
            return
        self.rounds += 1
        t0 = time.perf_counter()
        while self.busy() > self.max_busy:
            if time.perf_counter() - t0 > self.max_wait_s or self.waited_s > self.max_total_wait_s:
                self.busy_rounds += 1
                break
            time.sleep(0.5)
        self.waited_s += time.perf_counter() - t0

    def summary(self) -> dict:
        return {"enabled": self.enabled, "max_busy": self.max_busy, "rounds": self.rounds,
                "rounds_started_busy": self.busy_rounds, "seconds_waited": round(self.waited_s, 1)}


@dataclass
class Samples:
    ms: list[float]

    @property
    def min(self) -> float:
        return min(self.ms)

    @property
    def median(self) -> float:
        return statistics.median(self.ms)

    def summary(self) -> dict:
        return {"ms_min": self.min, "ms_median": self.median, "samples": len(self.ms)}


@dataclass
class SessionSamples(Samples):
    """One variant's samples from several sessions of it. On a shared VM a session keeps a level of
    its own (up to 25 % apart for one model), so the minimum is the median over the sessions of
    each one's minimum; the median is over all samples."""
    per_session: list[list[float]]

    @property
    def min(self) -> float:
        return statistics.median(min(ms) for ms in self.per_session)

    def summary(self) -> dict:
        # The samples themselves, each session's in the order timed (round by round), so that a
        # run's results can be analysed again (paired rounds, other statistics) without a rerun.
        return super().summary() | {"ms_session_mins": [min(ms) for ms in self.per_session],
                                    "ms_session_samples": [list(ms) for ms in self.per_session]}


def creation_order(names: list[str], sessions: int) -> list[tuple[str, int]]:
    """(name, session index) pairs in the order to create the sessions: session i of every variant
    in a group, each group's order turned by i * len(names) / sessions, so that every variant is
    early in one group and late in another. On the development VM (AMD EPYC, ORT 1.31) a process's
    first session of a model decoded 5-11 % slower than its later ones (the builder's d = 2048
    model, 6-8 sessions created one after the other, four processes), the second up to 2 %;
    created in a fixed order, the first variants of every group paid it. It comes with the
    pre-packed weights on 4 KB pages (docs/runtime.md, "Memory pages"), hence the untimed session
    of create_in_turns."""
    order = []
    for i in range(sessions):
        turn = (i * len(names)) // sessions
        order += [(name, i) for name in names[turn:] + names[:turn]]
    return order


def create_in_turns(names: list[str], sessions: int, make: Callable[[str], object]) -> dict[str, object]:
    """{session_key(name, i): make(name)} for every variant and session index, keyed in the
    variants' order (i, then name) but created in creation_order, after an untimed make(names[0])
    that takes the process's first, slow place and is dropped once the others exist."""
    untimed = make(names[0])
    created = {session_key(name, i): make(name) for name, i in creation_order(names, sessions)}
    del untimed
    return {session_key(name, i): created[session_key(name, i)] for i in range(sessions) for name in names}


def session_key(name: str, index: int) -> str:
    return f"{name}#{index}"


def by_variant(res: dict[str, Samples]) -> dict[str, SessionSamples]:
    """Samples keyed session_key(variant, i) -> SessionSamples per variant, in first-seen order."""
    groups: dict[str, list[list[float]]] = {}
    for key, samples in res.items():
        groups.setdefault(key.rpartition("#")[0], []).append(samples.ms)
    return {k: SessionSamples([t for ms in v for t in ms], v) for k, v in groups.items()}


def interleaved(calls: dict[str, Callable[[], None]], rounds: int, *, flush: Flusher | None = None,
                gate: QuietGate | None = None, warmup: int = 1, seed: int = 0, budget_s: float | None = None,
                min_rounds: int = 2, on_call: Callable[[], None] | None = None) -> dict[str, Samples]:
    """Milliseconds of each call over ``rounds`` rounds, after ``warmup`` untimed rounds.

    With ``budget_s``, the rounds are cut so that they take about that long (judged from the
    last warm-up round), but never below ``min_rounds`` (nor above ``rounds``).
    """
    rng = np.random.default_rng(seed)
    names = list(calls)
    samples = {k: [] for k in names}
    round_s = 0.0
    for _ in range(warmup):
        t0 = time.perf_counter()
        for name in names:
            if flush is not None:
                flush()
            calls[name]()
        round_s = time.perf_counter() - t0
    if budget_s is not None and warmup and round_s > 0:
        rounds = max(min(rounds, min_rounds), min(rounds, int(budget_s / round_s)))
    for _ in range(rounds):
        if gate is not None:
            gate.wait()
        for i in rng.permutation(len(names)):
            name = names[i]
            if flush is not None:
                flush()
            t0 = time.perf_counter()
            calls[name]()
            samples[name].append((time.perf_counter() - t0) * 1e3)
            if on_call is not None:
                on_call()
    return {k: Samples(v) for k, v in samples.items()}
