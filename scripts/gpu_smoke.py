"""One small call of each CUDA path through the test harness, before the long checks of
scripts/gpu_check.sh: a crash or a hang here names the path (decode GEMV, tensor-core GEMM,
CUDA-core GEMM; both down_weight layouts) instead of failing every later test.
`--case NAME` runs one case (for compute-sanitizer); prints one line per case."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
from dsmoe_export.testing.cuda_harness import Harness, find_library, rounded  # noqa: E402
from dsmoe_export.testing.cases import make_case  # noqa: E402
from dsmoe_export.testing.checks import run_checks  # noqa: E402

TOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 3e-2}
# name: (dtype, tokens, d, n, B, down_tile)
CASES = {
    "decode-f32": ("float32", 3, 256, 8, 40, 0),
    "decode-f16-tiled": ("float16", 5, 256, 8, 40, 64),
    "gemm-tc-f16": ("float16", 70, 256, 8, 40, 0),
    "gemm-tc-f16-tiled": ("float16", 70, 256, 8, 40, 64),
    "gemm-tc-bf16": ("bfloat16", 70, 256, 8, 40, 0),
    "gemm-cc-f32": ("float32", 70, 256, 8, 40, 0),
    "gemm-cc-f32-tiled-odd": ("float32", 37, 130, 3, 33, 64),
}


def run(h: Harness, name: str, rng) -> tuple[bool, str]:
    dtype, tokens, d, n, B, tile = CASES[name]
    td = getattr(torch, dtype)
    case = rounded(make_case(rng, (tokens,), d=d, n=n, B=B, bias=True, down_tile=tile), dtype)
    dev = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to("cuda", td)  # noqa: E731
    active = torch.empty(tokens, n, dtype=torch.bool, device="cuda")
    y = h.forward(dev(case.x), dev(case.router_weight), dev(case.gate), dev(case.up), dev(case.feeds()["down_weight"]),
                  dev(case.router_bias), active=active, down_tile=tile)
    torch.cuda.synchronize()
    y_ref, a_ref = case.reference()
    err = float(np.abs(y.float().cpu().numpy() - y_ref).max() / max(1.0, np.abs(y_ref).max()))
    same_active = bool((active.cpu().numpy() == a_ref).all())
    ok = err <= TOL[dtype] and same_active
    return ok, f"{name} ({h.path(tokens, d, n, B, dtype)}): err {err:.3g}, active {'ok' if same_active else 'WRONG'}"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--case", choices=sorted(CASES))
    args = p.parse_args()
    h = Harness(find_library())
    count, err = h.device_count()
    print(f"harness: {count} CUDA device(s) {err}")
    rng = np.random.default_rng(1)
    # A sticky CUDA error fails the cases after it too: each prints its line.
    return run_checks([args.case] if args.case else CASES, lambda name: run(h, name, rng))


if __name__ == "__main__":
    sys.exit(main())
