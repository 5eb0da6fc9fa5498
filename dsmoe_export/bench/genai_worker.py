"""Runs in the onnxruntime-genai environment (by path, not as part of the package: that
environment does not have dsmoe_export). Reads one JSON command per line from stdin,
{"folder": DIR, "prompt": [ids], "new": N}, and answers one JSON line: the milliseconds of the
prompt (append_tokens) and of the N - 1 decode steps after it, and the new ids; or {"error": ...}."""
import json
import sys
import time

import numpy as np
import onnxruntime_genai as og

models = {}


def generate(folder: str, prompt: list, new: int) -> dict:
    if folder not in models:
        models[folder] = og.Model(folder)
    model = models[folder]
    params = og.GeneratorParams(model)
    # min_length: no early stop at an EOS, so that every runner generates the same number of tokens
    params.set_search_options(max_length=len(prompt) + new, min_length=len(prompt) + new, do_sample=False,
                              batch_size=1)
    generator = og.Generator(model, params)
    t0 = time.perf_counter()
    generator.append_tokens(np.array([prompt], dtype=np.int32))  # the prompt: its logits give token 1
    t1 = time.perf_counter()
    ids = []
    while not generator.is_done():
        generator.generate_next_token()
        ids.append(int(generator.get_next_tokens()[0]))
    t2 = time.perf_counter()
    return {"prefill_ms": (t1 - t0) * 1e3, "decode_ms": (t2 - t1) * 1e3, "new": ids}


for line in sys.stdin:
    cmd = json.loads(line)
    try:
        reply = generate(cmd["folder"], cmd["prompt"], int(cmd["new"]))
    except Exception as e:  # noqa: BLE001 (reported to the caller, which raises)
        reply = {"error": f"{type(e).__name__}: {e}"}
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()
