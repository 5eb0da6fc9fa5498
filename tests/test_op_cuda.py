"""The CUDA kernel of org.dsmoe::GatedBlockSparseFFN (custom_ops/cuda/, docs/cuda.md).

Everywhere (no GPU needed): the op library links no CUDA library at load time, and
when nvcc is installed its CUDA kernels are compiled in.
With a CUDA GPU and torch built with CUDA: the kernels through the test harness
(libdsmoe_cuda_harness, DSMOE_CUDA_HARNESS) on torch buffers against the float64
reference (dsmoe_export/testing/reference.py), float32 within 1e-4, float16 within 1e-2 and
bfloat16 within 3e-2 of max(1, max |Y_ref|); `active` exactly; k = 0 rows exactly 0.
With onnxruntime-gpu (CUDAExecutionProvider) too: the op in a CUDA EP session.
Without them these tests skip, saying which piece is missing.
"""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto

from dsmoe_export.testing.cuda_harness import Harness, find_library, rounded
from dsmoe_export.testing.cases import make_case
from op_graph import make_model

TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 3e-2}
DECODE_TOKENS = (1, 2, 5, 8)
GEMM_TOKENS = (9, 37, 300)


def _readelf(args, path):
    tool = shutil.which("readelf")
    if tool is None:
        pytest.skip("readelf not installed")
    return subprocess.run([tool, *args, path], check=True, capture_output=True, text=True).stdout


def test_library_loads_without_cuda(op_library):
    needed = [line for line in _readelf(["-d"], op_library).splitlines() if "(NEEDED)" in line]
    assert needed and not [n for n in needed if "cuda" in n.lower() or "cublas" in n.lower()], needed


def test_cuda_kernels_compiled_when_nvcc_present(op_library):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed: the library is built without CUDA kernels")
    assert ".nv_fatbin" in _readelf(["-S", "-W"], op_library), (
        f"{op_library} has no CUDA kernels although nvcc is installed (built with DSMOE_WITH_CUDA=OFF?)")


# --- GPU: the kernels through the harness ------------------------------------------------------

@pytest.fixture(scope="module")
def harness():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible to torch (GPU tests run on a GPU machine: scripts/gpu_check.sh)")
    path = find_library()
    if path is None:
        pytest.skip("libdsmoe_cuda_harness.so not built (cmake with CUDA, or set DSMOE_CUDA_HARNESS)")
    h = Harness(path)
    count, err = h.device_count()
    if count == 0:
        pytest.skip(f"the harness sees no CUDA device: {err}")
    return h


def run_harness(h, case, dtype, **kw):
    import torch

    td = getattr(torch, dtype)
    dev = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to("cuda", td)  # noqa: E731
    x = dev(case.x.reshape(-1, case.x.shape[-1]))
    active = torch.empty(x.shape[0], case.num_experts, dtype=torch.bool, device="cuda")
    down = case.feeds()["down_weight"]  # in the layout case.attrs' down_tile names
    y = h.forward(x, dev(case.router_weight), dev(case.gate), dev(case.up), dev(down), dev(case.router_bias),
                  active=active, **case.attrs, **kw)
    torch.cuda.synchronize()
    return y.float().cpu().numpy().reshape(case.x.shape), active.cpu().numpy().reshape(*case.x.shape[:-1], -1)


def check(case, y, active, dtype):
    y_ref, active_ref = case.reference()
    np.testing.assert_array_equal(active, active_ref)
    scale = max(1.0, float(np.abs(y_ref).max(initial=0.0)))
    err = float(np.abs(y - y_ref).max(initial=0.0)) / scale
    assert err <= TOLERANCE[dtype], f"{dtype}: max |Y - Y_ref| / {scale:.3g} = {err:.3g}"
    assert (y[~active_ref.any(-1)] == 0).all(), "tokens with k = 0 must give exact zeros"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("tokens", DECODE_TOKENS + GEMM_TOKENS)
def test_harness_block_counts(harness, rng, dtype, tokens):
    for n in (1, 8, 16):
        case = rounded(make_case(rng, (tokens,), d=256, n=n, B=int(rng.choice([24, 64, 136])),
                                 bias=bool(rng.integers(2)), threshold=float(rng.uniform(0.2, 0.8))), dtype)
        check(case, *run_harness(harness, case, dtype), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("down_tile", [0, 64])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("d,n,B", [(7, 5, 3), (1, 1, 1), (17, 3, 33), (130, 2, 9), (64, 6, 65), (520, 8, 200)])
@pytest.mark.parametrize("tokens", [1, 2, 9, 70, 257])
def test_harness_odd_sizes(harness, rng, dtype, d, n, B, tokens, down_tile):
    case = rounded(make_case(rng, (tokens,), d=d, n=n, B=B, bias=bool(rng.integers(2)),
                             threshold=float(rng.uniform(0.3, 0.7)),
                             activation=str(rng.choice(["silu", "gelu", "gelu_tanh"])), down_tile=down_tile), dtype)
    check(case, *run_harness(harness, case, dtype), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("weighting", ["score", "binary"])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0])
def test_harness_attributes_and_extreme_k(harness, rng, dtype, weighting, rescale, threshold):
    for tokens in (3, 40):  # the forced first tokens: k = n and (threshold > 0) k = 0
        case = rounded(make_case(rng, (tokens,), d=64, n=8, B=24, bias=True, threshold=threshold,
                                 weighting=weighting, rescale=rescale), dtype)
        y, active = run_harness(harness, case, dtype)
        check(case, y, active, dtype)
        if 0.0 < threshold < 1.0:
            assert active[0].all() and not active[1].any()


@pytest.mark.gpu
def test_harness_llama_shape(harness, rng):
    """d = 4096, D = 11008, n = 8 (LLaMA-7B FFN) in float16, decode and prefill paths."""
    for tokens in (1, 8, 512):
        case = rounded(make_case(rng, (tokens,), d=4096, n=8, B=1376), "float16")
        check(case, *run_harness(harness, case, "float16"), "float16")


@pytest.fixture(scope="module")
def cutlass_gpu(harness):
    """A GPU where the CUTLASS path runs: sm_90 (its own kernels, and the sm_80 ones forced) or 8.x."""
    import torch

    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip(f"the CUTLASS path needs sm_80 or newer, this is {torch.cuda.get_device_name()}")
    if harness.path(512, 4096, 8, 1376, "float16", cutlass="sm80") != "gemm-cutlass-sm80":
        pytest.skip("library built without the CUTLASS GEMMs (DSMOE_WITH_CUTLASS)")
    return harness


def _cutlass_modes():
    """(harness flag, path) of each CUTLASS kernel family this GPU can run."""
    import torch

    native = "gemm-cutlass" if torch.cuda.get_device_capability() == (9, 0) else "gemm-cutlass-sm80"
    return [(True, native)] + ([("sm80", "gemm-cutlass-sm80")] if native == "gemm-cutlass" else [])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("tokens", [9, 64, 513])
def test_cutlass_path(cutlass_gpu, rng, dtype, tokens):
    """The CUTLASS grouped GEMMs (sm_90a, and CUTLASS 2.x's) against the reference and the WMMA path,
    run to run bit-identical (no float atomics), on the LLaMA-7B shape and a small odd one."""
    for mode, path in _cutlass_modes():
        for d, n, B in ((4096, 8, 1376), (136, 5, 24)):
            case = rounded(make_case(rng, (tokens,), d=d, n=n, B=B, bias=True,
                                     threshold=float(rng.uniform(0.3, 0.7)),
                                     activation=str(rng.choice(["silu", "gelu", "gelu_tanh"]))), dtype)
            assert cutlass_gpu.path(tokens, d, n, B, dtype, cutlass=mode) == path
            y, active = run_harness(cutlass_gpu, case, dtype, cutlass=mode)
            check(case, y, active, dtype)
            y2, _ = run_harness(cutlass_gpu, case, dtype, cutlass=mode)
            assert np.array_equal(y, y2), f"the CUTLASS path ({path}) must be deterministic"
            y_wmma, _ = run_harness(cutlass_gpu, case, dtype, cutlass=False)
            scale = max(1.0, float(np.abs(y).max()))
            assert float(np.abs(y - y_wmma).max()) / scale <= TOLERANCE[dtype], path


@pytest.mark.gpu
@pytest.mark.parametrize("bias", [-60.0, 60.0])
def test_cutlass_path_no_block_and_all_blocks(cutlass_gpu, rng, bias):
    for mode, _ in _cutlass_modes():
        case = rounded(make_case(rng, (300,), d=256, n=8, B=64, bias=True), "float16")
        case.router_bias = np.full(8, bias, np.float32)
        y, active = run_harness(cutlass_gpu, case, "float16", cutlass=mode)
        check(case, y, active, "float16")
        assert active.all() if bias > 0 else (not active.any() and not y.any())


# --- GPU: the op in an ONNX Runtime CUDA EP session ------------------------------------------

@pytest.fixture(scope="module")
def cuda_ep():
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu)")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")


def cuda_session(model, library):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.register_custom_ops_library(library)
    s = ort.InferenceSession(model.SerializeToString(), opts, providers=["CUDAExecutionProvider"])
    assert s.get_providers()[0] == "CUDAExecutionProvider"
    return s


@pytest.mark.gpu
@pytest.mark.parametrize("down_tile", [0, 64])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("tokens", [1, 6, 33, 300])
def test_cuda_ep(cuda_ep, op_library, rng, dtype, tokens, down_tile):
    case = make_case(rng, (tokens,), d=128, n=8, B=40, bias=True, down_tile=down_tile)
    elem = TensorProto.FLOAT if dtype == "float32" else TensorProto.FLOAT16
    case = rounded(case, dtype)
    feeds = {k: v.astype(np.float16 if dtype == "float16" else np.float32) for k, v in case.feeds().items()}
    # Without the function body: a CPU fallback would be an error, not a silent pass.
    y, active = cuda_session(make_model(case, with_function=False, elem_type=elem), op_library).run(None, feeds)
    check(case, y.astype(np.float32), active, dtype)
