"""Run by path with the project's interpreter (workers.RuntimeWorker): reads one JSON command per
line from stdin, {"path": ONNX, "prompt": [ids], "new": N, "threads": T, "library": PATH or null,
"dense": bool}, and answers one JSON line: the milliseconds of the prompt (DSMoESession.stream's
first token) and of the N - 1 steps after it, and the new ids; or {"error": ...}. Sessions stay
open for the whole run, one per path, with onnxruntime's default spinning (an app's setting); each
is timed once its weights are on huge pages (DSMoESession moves them in the background: the steady
state of an app, not the first seconds after loading)."""
import json
import sys
import time

import numpy as np

from dsmoe_runtime import DSMoESession

sessions = {}


def generate(cmd: dict) -> dict:
    path = cmd["path"]
    if path not in sessions:
        library = cmd.get("library")
        sessions[path] = DSMoESession(path, threads=int(cmd["threads"]), library=library or False,
                                      allow_dense=bool(cmd.get("dense")), providers=["CPUExecutionProvider"])
        sessions[path].huge_pages.wait(120)
    session = sessions[path]
    ids = np.array([cmd["prompt"]], np.int64)
    t0 = time.perf_counter()
    stream = session.stream(ids, int(cmd["new"]), collect_stats=False)
    new = [int(next(stream)[0])]
    t1 = time.perf_counter()
    new += [int(tokens[0]) for tokens in stream]
    t2 = time.perf_counter()
    return {"prefill_ms": (t1 - t0) * 1e3, "decode_ms": (t2 - t1) * 1e3, "new": new}


for line in sys.stdin:
    try:
        reply = generate(json.loads(line))
    except Exception as e:  # noqa: BLE001 (reported to the caller, which raises)
        reply = {"error": f"{type(e).__name__}: {e}"}
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()
