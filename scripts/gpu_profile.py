"""Per-kernel device times of the CUDA forward pass (torch.profiler / CUPTI), for the
performance work on the GPU machine (docs/cuda.md): d=4096, D=11008, n=8, float16, exactly
k random blocks per token; each call after an L2 flush. Prints one table per (tokens, k)."""
from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
from dsmoe_export.testing.cuda_harness import Harness, find_library  # noqa: E402

from dsmoe_export.onnx_op import tile_down  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--configs", default="1x1,1x8,4x4,8x8,512x4,4096x1,4096x8", help="TOKENSxK,...")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--layout", choices=("rows", "tiled"), default="tiled")
    args = p.parse_args()
    h = Harness(find_library())
    d, D, n = 4096, 11008, 8
    B, dt = D // n, torch.float16
    gate = torch.randn(n, B, d, device="cuda", dtype=dt) / math.sqrt(d)
    up = torch.randn(n, B, d, device="cuda", dtype=dt) / math.sqrt(d)
    down = torch.randn(n, B, d, device="cuda", dtype=dt) / math.sqrt(B)
    tile = 64 if args.layout == "tiled" else 0
    down_in = tile_down(down) if tile else down
    router = torch.zeros(n, d, device="cuda", dtype=dt)
    router[:, :n] = 20 * torch.eye(n, device="cuda", dtype=dt)
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    wg, wu, wd = gate.reshape(D, d), up.reshape(D, d), down.reshape(D, d)
    for cfg in args.configs.split(","):
        T, k = (int(v) for v in cfg.split("x"))
        x = torch.randn(T, d, device="cuda", dtype=dt) * 0.1
        sel = torch.rand(T, n, device="cuda").argsort(-1) < k
        x[:, :n] = torch.where(sel, 1.0, -1.0).to(dt)
        y = torch.empty_like(x)
        h.forward(x, router, gate, up, down_in, y=y, down_tile=tile)  # scratch, warm
        torch.matmul(torch.nn.functional.silu(x @ wg.T) * (x @ wu.T), wd, out=y)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(args.reps):
                flush.zero_()
                h.forward(x, router, gate, up, down_in, y=y, down_tile=tile)
            for _ in range(args.reps):
                flush.zero_()
                torch.matmul(torch.nn.functional.silu(x @ wg.T) * (x @ wu.T), wd, out=y)
            torch.cuda.synchronize()
        times: dict[str, list[float]] = defaultdict(list)
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                times[e.name].append(e.device_time if hasattr(e, "device_time") else e.cuda_time)
        print(f"--- T={T} k={k} union={int(sel.any(0).sum())} ({args.layout}); us per call, mean over {args.reps}")
        for name, v in sorted(times.items(), key=lambda kv: -sum(kv[1])):
            if "fill" in name.lower() and len(v) == args.reps * 2:
                continue
            print(f"  {sum(v) / args.reps:9.2f} us  x{len(v) / args.reps:4.1f}  {name[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
