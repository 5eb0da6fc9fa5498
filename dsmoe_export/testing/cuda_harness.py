"""ctypes wrapper of libdsmoe_cuda_harness (custom_ops/cuda/harness.cc): the CUDA
kernels of org.dsmoe::GatedBlockSparseFFN called on torch CUDA tensors, without
onnxruntime-gpu. Used by tests/test_op_cuda.py and the GPU scripts (scripts/gpu_*.py).

The library is found through DSMOE_CUDA_HARNESS, else the newest
build/*/libdsmoe_cuda_harness.so of this checkout (cmake builds it next to
libdsmoe_ops.so when CUDA is enabled)."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout (build/ beside dsmoe_export/)
ENV_VAR = "DSMOE_CUDA_HARNESS"
DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2}
ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
CUTLASS = {False: 0, True: 1, "sm80": 2}  # harness.cc's CutlassChoice


def find_library() -> str | None:
    override = os.environ.get(ENV_VAR)
    if override:
        return override if Path(override).is_file() else None
    found = sorted(ROOT.glob("build/*/libdsmoe_cuda_harness.so"), key=lambda p: p.stat().st_mtime)
    return str(found[-1]) if found else None


class Harness:
    def __init__(self, path: str):
        self.lib = lib = ctypes.CDLL(path)
        c_i64, c_ptr = ctypes.c_int64, ctypes.c_void_p
        lib.dsmoe_cuda_device_count.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_char_p, ctypes.c_int]
        lib.dsmoe_cuda_scratch_bytes.restype = c_i64
        lib.dsmoe_cuda_scratch_bytes.argtypes = [c_i64] * 4 + [ctypes.c_int] * 3 + [ctypes.c_char_p, ctypes.c_int]
        lib.dsmoe_cuda_path.argtypes = [c_i64] * 4 + [ctypes.c_int] * 3
        lib.dsmoe_cuda_forward.argtypes = ([ctypes.c_int] + [c_ptr] * 8 + [c_i64] * 4 + [ctypes.c_float] +
                                           [ctypes.c_int] * 5 + [c_ptr, c_i64, c_ptr, ctypes.c_char_p, ctypes.c_int])
        self._scratch = None

    def device_count(self) -> tuple[int, str]:
        count, err = ctypes.c_int(), ctypes.create_string_buffer(512)
        self.lib.dsmoe_cuda_device_count(ctypes.byref(count), err, 512)
        return count.value, err.value.decode()

    def path(self, tokens, d, n, B, dtype="float16", *, down_tile=0, cutlass=True) -> str:
        return {1: "decode", 2: "gemm-tensor-cores", 3: "gemm-cuda-cores", 4: "gemm-cutlass",
                5: "gemm-cutlass-sm80"}.get(
            self.lib.dsmoe_cuda_path(tokens, d, n, B, DTYPES[dtype], int(down_tile), CUTLASS[cutlass]), "error")

    def forward(self, x, router, gate, up, down, bias=None, *, threshold=0.5, rescale=True, weighting="score",
                activation="silu", down_tile=0, cutlass=True, y=None, active=None):
        """Y [N, d] (and active [N, n] when a bool tensor is given) on torch's current stream;
        ``down`` is [n, B, d], or [n, ceil(d / 64), B, 64] with down_tile=64 (docs/op-spec.md).
        ``cutlass=False`` keeps the WMMA grouped GEMMs where the CUTLASS ones would run, ``"sm80"``
        takes CUTLASS 2.x's sm_80 kernels on any GPU from sm_80 on (to check them on Hopper)."""
        import torch

        N, d = x.shape
        n, B, _ = gate.shape
        dtype = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[x.dtype]
        err = ctypes.create_string_buffer(512)
        need = self.lib.dsmoe_cuda_scratch_bytes(N, d, n, B, DTYPES[dtype], int(down_tile), CUTLASS[cutlass], err, 512)
        if need < 0:
            raise RuntimeError(err.value.decode())
        if self._scratch is None or self._scratch.numel() < need:  # kept between calls (timing loops)
            self._scratch = torch.empty(max(need, 256), dtype=torch.uint8, device=x.device)
        y = torch.empty_like(x) if y is None else y
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        rc = self.lib.dsmoe_cuda_forward(
            DTYPES[dtype], ptr(x), ptr(router), ptr(bias), ptr(gate), ptr(up), ptr(down), ptr(y), ptr(active),
            N, d, n, B, threshold, int(rescale), int(weighting == "binary"), ACTIVATIONS[activation], int(down_tile),
            CUTLASS[cutlass], ptr(self._scratch), self._scratch.numel(), torch.cuda.current_stream().cuda_stream, err, 512)
        if rc:
            raise RuntimeError(err.value.decode())
        return y


def rounded(case, dtype: str):
    """The case (testing.cases) with its inputs rounded to dtype (float32, float16, bfloat16), so that
    the float64 reference sees what the kernel sees."""
    import torch

    for name in ("x", "router_weight", "gate", "up", "down", "router_bias"):
        a = getattr(case, name)
        if a is not None:
            setattr(case, name, torch.from_numpy(a).to(getattr(torch, dtype)).float().numpy())
    return case
