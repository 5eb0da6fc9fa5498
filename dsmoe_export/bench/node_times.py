"""The FFN's own time inside whole-model calls, from ONNX Runtime's profiler.

The end-to-end FFN ratio ``(sparse - attn) / (dense - attn)`` subtracts the time of a separate
attention-only export, timed in its own calls: a difference of two whole-model times, each
with its own noise, and with the assumption that the attention, norms and LM head take as long
alone as between the FFNs. Measured here on the converted SmolLM2 (128-token prefill, 8 rounds):
that ratio read 0.72 and 0.80 in two runs of one build. This module measures the FFN where it
runs instead: a second session of each sparse and dense export with ONNX Runtime's profiling
on, called in interleaved rounds like the timed ones (caches evicted before each call), and per
call the summed kernel time of the nodes of the FFN (``/model/layers/*/mlp/``) and of all the
others. Profiling costs a timestamp pair per node, so these times run a little above the
timed calls; the ratio of the FFN's node time, sparse over dense, is the FFN-level ratio.
"""
from __future__ import annotations

import bisect
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import onnxruntime as ort

from . import graphs, timing

FFN_SCOPE = "/mlp/"  # the exporter's node names: /model/layers/{i}/mlp/...
# Where a step's time goes, by node name (this exporter's, and the model builder's, which
# names its scopes alike): the FFN, attention's MatMuls, the attention op itself (with its
# rotary and cache writes), the norms (residual adds fused in), the LM head, and the rest
# (embedding lookup, mask arithmetic, the logits' slice).
PARTS = ("ffn", "attention projections", "attention", "norms", "lm_head", "rest")


def node_part(name: str) -> str:
    """The PARTS entry a node belongs to, by its name."""
    if FFN_SCOPE in name:
        return "ffn"
    if "/lm_head/" in name:
        return "lm_head"
    if "/self_attn/" in name or "/attn/" in name:
        return "attention projections" if "_proj/" in name else "attention"
    if "layernorm" in name.lower() or "/norm/" in name:
        return "norms"
    return "rest"


def run_node_times(events: list[dict]) -> list[dict[str, float]]:
    """Per model run of a profile, in order: the kernel ms of each of PARTS' node groups."""
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")
    sums = [dict.fromkeys(PARTS, 0.0) for _ in runs]
    starts = [a for a, _ in runs]
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        i = bisect.bisect_right(starts, e["ts"]) - 1
        if i < 0 or e["ts"] > runs[i][1]:
            continue  # not inside a run (none are, in ORT's profiles; kept safe)
        sums[i][node_part(e["name"][:-len("_kernel_time")])] += e["dur"] / 1e3
    return sums


def ended_runs(session: ort.InferenceSession) -> list[dict[str, float]]:
    """Ends a profiled session's profile and returns run_node_times of it."""
    return run_node_times(json.loads(Path(session.end_profiling()).read_text()))


@dataclass
class Segment:
    key: tuple
    skip: int            # runs before the samples (priming, warm-up)
    runs_per_sample: int
    samples: int


@dataclass
class ProfiledSessions:
    """Profiled sessions of some exports ({variant: path}); ``measure`` times one phase on all of
    them, ``finish`` ends the profiles and returns {phase key: {variant: samples_of_runs' entry}},
    per call (or per run for calls of several runs: decode steps)."""
    paths: dict[str, Path]
    threads: int
    library: str | None
    sessions: dict[str, ort.InferenceSession] = field(init=False)
    _segments: dict[str, list[Segment]] = field(init=False)

    def __post_init__(self):
        self._dir = Path(tempfile.mkdtemp(prefix="dsmoe-profile-"))
        self.sessions, self._segments = {}, {}
        for name, path in self.paths.items():
            opts = graphs.session_options(self.threads, self.library if name.partition("-")[0] == "sparse" else None,
                                          str(self._dir / name))
            self.sessions[name] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            self._segments[name] = []

    def measure(self, key: tuple, make_call: Callable[[ort.InferenceSession], Callable[[], None]], rounds: int, *,
                runs_per_call: int = 1, prep_runs: int = 0, flush: timing.Flusher | None = None,
                gate: timing.QuietGate | None = None, seed: int = 0) -> None:
        """make_call(session) -> a call of `runs_per_call` model runs (after `prep_runs` runs it may
        make itself); one warm-up round, then `rounds` interleaved rounds."""
        calls = {name: make_call(s) for name, s in self.sessions.items()}
        res = timing.interleaved(calls, rounds, flush=flush, gate=gate, warmup=1, seed=seed)
        for name in calls:
            self._segments[name].append(Segment(key, prep_runs + runs_per_call, runs_per_call, len(res[name].ms)))

    def finish(self) -> dict:
        out: dict = {}
        try:
            for name, s in self.sessions.items():
                runs = ended_runs(s)
                for key, samples in samples_of_runs(runs, self._segments[name], name).items():
                    out.setdefault(key, {})[name] = samples
        finally:
            self.close()
        return out

    def close(self) -> None:
        """Drops the sessions and their profile files (finish does it, and leaving a `with` block)."""
        self.sessions.clear()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "ProfiledSessions":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def samples_of_runs(runs: list[dict[str, float]], segments: list[Segment], name: str = "the session") -> dict:
    """{segment key: {"ffn": Samples, "other": Samples, "parts": {part: Samples}}}: the runs (in
    order) cut by the segments, a sample's times summed over its runs and divided by their
    number; "other" is every part but the FFN."""
    out, i = {}, 0
    for seg in segments:
        i += seg.skip
        parts: dict[str, list[float]] = {p: [] for p in PARTS}
        for _ in range(seg.samples):
            some = runs[i:i + seg.runs_per_sample]
            if len(some) < seg.runs_per_sample:
                raise RuntimeError(f"the profile of {name} has {len(runs)} runs, fewer than its calls made")
            for p in PARTS:
                parts[p].append(sum(run[p] for run in some) / seg.runs_per_sample)
            i += seg.runs_per_sample
        other = [sum(v) for v in zip(*(parts[p] for p in PARTS if p != "ffn"))]
        out[seg.key] = {"ffn": timing.Samples(parts["ffn"]), "other": timing.Samples(other),
                        "parts": {p: timing.Samples(v) for p, v in parts.items()}}
    if i != len(runs):
        raise RuntimeError(f"the profile of {name} has {len(runs)} runs, its calls made {i}")
    return out


def ffn_node_fields(kind: str, precision: str, times: dict, variant_name: Callable[[str, str], str]) -> dict:
    """The row fields of one variant from finish()'s entry of its phase: FFN and other node ms
    (min, median), each part's median, and for a sparse variant the FFN node-time ratio against
    its dense twin."""
    me = times.get(variant_name(kind, precision))
    if me is None:
        return {}
    fields = {"ffn_node_ms_min": me["ffn"].min, "ffn_node_ms_median": me["ffn"].median,
              "other_node_ms_min": me["other"].min,
              "node_ms_parts_median": {p: v.median for p, v in me["parts"].items()}}
    dense = times.get(variant_name("dense", precision))
    if kind == "sparse" and dense is not None and dense["ffn"].min > 0:
        fields["ffn_node_ratio_min"] = me["ffn"].min / dense["ffn"].min
        fields["ffn_node_ratio_median"] = me["ffn"].median / dense["ffn"].median
    return fields
