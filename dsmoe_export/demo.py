"""The README's main job on the built-in default model.

Makes a small random DSMoE model folder, exports it sparse and dense, checks
both against the PyTorch reference in ONNX Runtime, and prints a short,
interleaved latency comparison (prefill and cached decode).

    python -m dsmoe_export.demo [--out demo-out] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .exporter import export
from .loader import load_model
from .synthetic import TinySpec, make_model_folder
from .validate import make_session

DEFAULT_SPEC = TinySpec(vocab_size=4096, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=2,
                        dsmoe={"num_experts": 8, "threshold": 0.5})


def _feeds(ids: np.ndarray, past_len: int, layers: int, kv_heads: int, head_dim: int, past=None) -> dict:
    b, s = ids.shape
    feeds = {"input_ids": ids, "attention_mask": np.ones((b, past_len + s), np.int64),
             "position_ids": np.arange(past_len, past_len + s, dtype=np.int64)[None].repeat(b, 0)}
    for i in range(layers):
        for j, kv in enumerate(("key", "value")):
            feeds[f"past_key_values.{i}.{kv}"] = (
                past[2 * i + j] if past is not None else np.zeros((b, kv_heads, 0, head_dim), np.float32))
    return feeds


def time_interleaved(runs: dict[str, callable], repeats: int) -> dict[str, float]:
    """Median milliseconds per variant; variants alternate so that noise hits all alike."""
    samples = {k: [] for k in runs}
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsmoe_export.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="working folder (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    spec = DEFAULT_SPEC
    args.out.mkdir(parents=True, exist_ok=True)
    folder = make_model_folder(args.out / "model", spec, seed=0, router_scale=2.0)
    print(f"model folder: {folder} (random DSMoE LLaMA: {spec.num_hidden_layers} layers, d={spec.hidden_size}, "
          f"D={spec.intermediate_size}, n={spec.dsmoe['num_experts']}, tau={spec.dsmoe['threshold']})")
    results = {}
    for kind in ("sparse", "dense"):
        results[kind] = export(folder, args.out / f"{kind}.onnx", dense=kind == "dense")

    layers, kv_heads = spec.num_hidden_layers, spec.num_key_value_heads
    head_dim = spec.hidden_size // spec.num_attention_heads
    sessions = {k: make_session(r.path, threads=args.threads, custom_ops=r.sparse) for k, r in results.items()}
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, spec.vocab_size, (1, args.prompt_tokens))
    prefill = _feeds(prompt, 0, layers, kv_heads, head_dim)
    outs = sessions["dense"].run(None, prefill)
    step = _feeds(prompt[:, -1:], args.prompt_tokens, layers, kv_heads, head_dim, past=outs[1:])

    # Active fraction of the prompt, from the PyTorch reference.
    model, _ = load_model(folder)
    ids = torch.from_numpy(prompt)
    with torch.no_grad():
        model(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None], model.empty_past(1))
    active = float(np.mean([m.last_active.float().mean().item() for m in model.mlps]))

    timings = {}
    for phase, feeds in (("prefill", prefill), ("decode", step)):
        t = time_interleaved({k: (lambda s=s, f=feeds: s.run(None, f)) for k, s in sessions.items()}, args.repeats)
        timings[phase] = t

    print()
    print("agreement with the PyTorch reference (ONNX Runtime, CPU EP):")
    for kind, r in results.items():
        print(f"  {kind:6s} {r.validation.summary()}")
    print()
    print(f"latency, median of {args.repeats} interleaved runs (whole model, attention included; "
          f"FFN active fraction r = {active:.2f}):")
    print(f"  {'phase':28s} {'sparse ms':>10s} {'dense ms':>10s} {'sparse/dense':>13s}")
    for phase, t in timings.items():
        label = f"prefill {args.prompt_tokens} tokens" if phase == "prefill" else f"decode 1 token (past {args.prompt_tokens})"
        print(f"  {label:28s} {t['sparse']:10.2f} {t['dense']:10.2f} {t['sparse'] / t['dense']:13.2f}")
    print()
    print("exports:", ", ".join(str(r.path) for r in results.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
