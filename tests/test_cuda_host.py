"""Host-side logic of the CUDA kernel, tested without a GPU: the launch plan
(path, tiles, grids, scratch layout) of custom_ops/cuda/plan.cc and the tile
bookkeeping of custom_ops/cuda/tile_map.h and grouped_map.h (the same code the
device runs), then numpy emulations of both grouped-GEMM paths' data flow driven by
them against the float64 reference: the WMMA path (route, counting sort by block,
M tiles, h rows at tile * tile_m + r, down GEMM with the coefficient in its
epilogue) and the CUTLASS path (permuted rows, the 2n + n groups' problem sizes,
offsets and leading dimensions as the argument kernel writes them, h in place,
the down output over the permuted input, the combine in block order).

The code is compiled here with the host C++ compiler into a small shared library
(tests/cuda_host_shim.cc); nvcc is not needed.
"""
from __future__ import annotations

import ctypes
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dsmoe_export.testing.cases import make_case
from dsmoe_export.testing.reference import _activation

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("decode", "tensor_cores", "vec_loads", "elem_size", "tile_m", "gate_up_tile_n", "down_tile_n",
          "max_m_tiles", "h_ld", "decode_down_rows", "decode_cols", "router_x", "sort_x", "gate_up_x",
          "gate_up_y", "down_x", "down_y", "decode_gate_up_x", "decode_down_x", "finalize_x",
          "coef", "active", "acc", "h_decode", "pair_token", "block_count", "tile_start", "h", "bytes",
          "cutlass", "permute_x", "activate_x", "combine_x", "combine_y",
          "pair_row", "xp", "gu", "gemm_args", "gemm_workspace")
F32, F16, BF16 = 0, 1, 2
DECODE_MAX_TOKENS = 8
NO_CUTLASS = (0, 0, 0, 0, 0)        # device: arch, SM count, CUTLASS built, sm_90a workspace bytes, force sm_80
H200 = (90, 132, 1, 70_000, 0)      # sm_90 with the CUTLASS GEMMs built in
A100 = (80, 108, 1, 0, 0)
L4 = (89, 58, 1, 0, 0)
GROUP_ARG_BYTES, GROUPED_ROWS_PER_CTA, COMBINE_COLS_PER_CTA = 128, 8, 256 * 8


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the host shim")
    out = tmp_path_factory.mktemp("cuda_host") / "libcuda_host_shim.so"
    subprocess.run([cxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-I", str(ROOT / "custom_ops"),
                    str(ROOT / "custom_ops/cuda/plan.cc"), str(ROOT / "tests/cuda_host_shim.cc"), "-o", str(out)],
                   check=True, capture_output=True, text=True)
    lib = ctypes.CDLL(str(out))
    assert lib.shim_plan_field_count() == len(FIELDS)
    lib.shim_max_m_tiles.restype = ctypes.c_int64
    lib.shim_max_m_tiles.argtypes = [ctypes.c_int64] * 3
    return lib


def plan(lib, tokens, d, n, B, dtype=F16, aligned=True, *, down_tiled=False, device=NO_CUTLASS) -> dict:
    out = (ctypes.c_int64 * len(FIELDS))()
    err = ctypes.create_string_buffer(256)
    args = [ctypes.c_int64(v) for v in (tokens, d, n, B)]
    dev = (ctypes.c_int64 * 5)(*device)
    if lib.shim_plan(*args, dtype, int(aligned), int(down_tiled), dev, out, err, 256):
        raise ValueError(err.value.decode())
    return dict(zip(FIELDS, out))


GROUP_FIELDS = ("m", "n", "k", "a", "b", "d", "lda", "ldb", "ldd", "up")


def group_gemm(lib, which, row_start, group, d, B) -> dict:
    n = len(row_start) - 1
    rs = (ctypes.c_int * (n + 1))(*row_start)
    out = (ctypes.c_int64 * len(GROUP_FIELDS))()
    lib.shim_group_gemm({"gate_up": 0, "down": 1}[which], rs, group, d, B, out)
    return dict(zip(GROUP_FIELDS, out))


def permuted_row(lib, row_start, pair_token, r):
    n, N = pair_token.shape
    rs = (ctypes.c_int * (n + 1))(*row_start)
    pt = (ctypes.c_int * (n * N))(*[int(v) for v in pair_token.ravel()])
    block, token = ctypes.c_int(), ctypes.c_int()
    ok = lib.shim_permuted_row(rs, pt, n, N, r, ctypes.byref(block), ctypes.byref(token))
    return (block.value, token.value) if ok else None


def align_tiles(lib, counts, tile_m):
    n = len(counts)
    c = (ctypes.c_int * n)(*counts)
    ts = (ctypes.c_int * (n + 1))()
    lib.shim_align_tiles(c, n, tile_m, ts)
    return list(ts)


def find_tile(lib, tile_start, tile, tile_m):
    n = len(tile_start) - 1
    ts = (ctypes.c_int * (n + 1))(*tile_start)
    block, first = ctypes.c_int(), ctypes.c_int()
    ok = lib.shim_find_tile(ts, n, tile, tile_m, ctypes.byref(block), ctypes.byref(first))
    return (block.value, first.value) if ok else None


@pytest.mark.parametrize("tokens", [1, 2, 3, 8, 9, 64, 4096])
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_paths(shim, tokens, dtype):
    p = plan(shim, tokens, 4096, 8, 1376, dtype)
    assert p["decode"] == (tokens <= DECODE_MAX_TOKENS)
    assert p["vec_loads"] == 1
    assert p["tensor_cores"] == (not p["decode"] and dtype != F32)
    assert p["elem_size"] == (4 if dtype == F32 else 2)
    assert p["finalize_x"] == (0 if dtype == F32 else min(math.ceil(tokens * 4096 / 256), 65536))
    if p["decode"]:
        assert p["decode_cols"] == 32 * 16 // p["elem_size"]
        assert p["decode_gate_up_x"] == 8 * math.ceil(1376 / 8)
        assert p["decode_down_x"] == 8 * math.ceil(1376 / p["decode_down_rows"]) * math.ceil(4096 / p["decode_cols"])
        assert p["decode_down_rows"] <= 128  # the kernel's shared h tile
    else:
        assert p["max_m_tiles"] == 8 * math.ceil(tokens / p["tile_m"])
        assert (p["gate_up_x"], p["down_x"]) == (p["max_m_tiles"],) * 2
        assert p["gate_up_y"] == math.ceil(1376 / p["gate_up_tile_n"])
        assert p["down_y"] == math.ceil(4096 / p["down_tile_n"])
        assert p["h_ld"] == 1376 and p["sort_x"] == 8


def test_unaligned_or_odd_sizes_leave_tensor_cores(shim):
    assert plan(shim, 64, 4096, 8, 64, F16, aligned=False)["tensor_cores"] == 0
    assert plan(shim, 64, 4096, 8, 64, F16, aligned=False)["vec_loads"] == 0
    p = plan(shim, 64, 4100, 8, 13, F16)  # d % 8 != 0
    assert (p["tensor_cores"], p["vec_loads"], p["h_ld"]) == (0, 0, 16)
    assert plan(shim, 64, 4100, 8, 13, F32)["vec_loads"] == 1  # 4100 floats = 16400 bytes


REGION_BYTES = {  # (N, d, n, B, tile rows, h_ld, elem) -> bytes of each scratch region
    "coef": lambda N, d, n, B, p: N * n * 4,
    "active": lambda N, d, n, B, p: N * n,
    "acc": lambda N, d, n, B, p: N * d * 4,
    "h_decode": lambda N, d, n, B, p: N * n * B * 4,
    "pair_token": lambda N, d, n, B, p: n * N * 4,
    "block_count": lambda N, d, n, B, p: n * 4,
    "tile_start": lambda N, d, n, B, p: (n + 1) * 4,
    "h": lambda N, d, n, B, p: p["max_m_tiles"] * p["tile_m"] * p["h_ld"] * p["elem_size"],
}


@pytest.mark.parametrize("shape", [(1, 7, 5, 3), (8, 4096, 8, 1376), (9, 4096, 8, 1376), (4096, 4096, 8, 1376),
                                   (70, 17, 3, 33), (37, 130, 64, 9)])
@pytest.mark.parametrize("dtype", [F32, F16])
def test_scratch_layout(shim, shape, dtype):
    N, d, n, B = shape
    p = plan(shim, N, d, n, B, dtype)
    used = {"coef", "active"} | ({"acc"} if dtype != F32 else set())
    used |= {"h_decode"} if p["decode"] else {"pair_token", "block_count", "tile_start", "h"}
    spans = []
    for name, size in REGION_BYTES.items():
        if name not in used:
            assert p[name] == -1, name
            continue
        assert p[name] >= 0 and p[name] % 256 == 0, name
        spans.append((p[name], p[name] + size(N, d, n, B, p), name))
    spans.sort()
    for (a0, a1, an), (b0, _, bn) in zip(spans, spans[1:]):
        assert a1 <= b0, f"{an} overlaps {bn}"
    assert spans[-1][1] == p["bytes"]


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_cutlass_kernels_per_architecture(shim, dtype):
    """cutlass = which CUTLASS kernels the plan takes: 90 (sm_90a) on Hopper, 80 (2.x) on Ampere/Ada."""
    for device, arch in ((H200, 90), (A100, 80), (L4, 80), ((86, 84, 1, 0, 0), 80),
                         ((90, 132, 1, 70_000, 1), 80),   # forced sm_80 kernels (checks on Hopper)
                         ((100, 148, 1, 70_000, 1), 80),  # forced: compute_80 PTX runs there too
                         ((100, 148, 1, 70_000, 0), 0),   # Blackwell: neither kernel natively
                         ((75, 40, 1, 0, 1), 0),          # Turing: no sm_80 features, even forced
                         ((90, 132, 1, 0, 0), 0)):        # sm_90a without its workspace size
        on = dict(device=device)
        assert plan(shim, 9, 4096, 8, 1376, dtype, **on)["cutlass"] == arch, device
        assert plan(shim, 4096, 4096, 8, 1376, dtype, **on)["cutlass"] == arch, device
    on = dict(device=H200)
    assert plan(shim, 8, 4096, 8, 1376, dtype, **on)["decode"] == 1  # decode keeps its GEMVs
    assert plan(shim, 8, 4096, 8, 1376, dtype, **on)["cutlass"] == 0
    assert plan(shim, 512, 4096, 8, 1376, F32, **on)["cutlass"] == 0
    for why_not in (dict(device=(90, 132, 0, 0, 0)), dict(device=(80, 108, 0, 0, 1)),  # not built / turned off
                    dict(device=H200, down_tiled=True), dict(device=A100, down_tiled=True),
                    dict(device=H200, aligned=False)):
        p = plan(shim, 512, 4096, 8, 1376, dtype, **why_not)
        assert p["cutlass"] == 0 and p["tensor_cores"] == why_not.get("aligned", True), why_not
    for device in (H200, A100):
        assert plan(shim, 512, 4100, 8, 1376, dtype, device=device)["cutlass"] == 0  # rows of 16 bytes
        assert plan(shim, 512, 4096, 8, 1372, dtype, device=device)["cutlass"] == 0


CUTLASS_REGIONS = {
    "coef": lambda N, d, n, B, e, ws: N * n * 4,
    "active": lambda N, d, n, B, e, ws: N * n,
    "pair_token": lambda N, d, n, B, e, ws: n * N * 4,
    "block_count": lambda N, d, n, B, e, ws: n * 4,
    "tile_start": lambda N, d, n, B, e, ws: (n + 1) * 4,
    "pair_row": lambda N, d, n, B, e, ws: N * n * 4,
    "xp": lambda N, d, n, B, e, ws: N * n * d * e,
    "gu": lambda N, d, n, B, e, ws: N * n * 2 * B * e,
    "gemm_args": lambda N, d, n, B, e, ws: 3 * n * GROUP_ARG_BYTES,
    "gemm_workspace": lambda N, d, n, B, e, ws: 2 * -(-ws // 256) * 256,  # 0 for the sm_80 kernels
}


@pytest.mark.parametrize("device", [H200, A100])
@pytest.mark.parametrize("shape", [(9, 4096, 8, 1376), (4096, 4096, 8, 1376), (77, 64, 3, 8), (300, 576, 16, 96)])
def test_cutlass_scratch_layout_and_grids(shim, shape, device):
    N, d, n, B = shape
    p = plan(shim, N, d, n, B, F16, device=device)
    assert p["cutlass"] == device[0] and p["tile_m"] == 1 and p["finalize_x"] == 0
    assert p["acc"] == -1 and p["h"] == -1 and p["h_decode"] == -1  # no float accumulator: combine writes Y
    spans = []
    for name, size in CUTLASS_REGIONS.items():
        assert p[name] >= 0 and p[name] % 256 == 0, name
        spans.append((p[name], p[name] + size(N, d, n, B, 2, device[3]), name))
    spans.sort()
    for (a0, a1, an), (b0, _, bn) in zip(spans, spans[1:]):
        assert a1 <= b0, f"{an} overlaps {bn}"
    assert spans[-1][1] == p["bytes"]
    assert p["sort_x"] == n and p["router_x"] == N
    assert p["permute_x"] == p["activate_x"] == math.ceil(N * n / GROUPED_ROWS_PER_CTA)
    assert (p["combine_x"], p["combine_y"]) == (N, math.ceil(d / COMBINE_COLS_PER_CTA))


@pytest.mark.parametrize("value,expected", [(None, 1), (b"", 1), (b"0", 0), (b"sm80", 2),
                                            (b"1", None), (b"off", None), (b"SM80", None), (b"sm90", None)])
def test_cutlass_choice_from_the_environment(shim, value, expected):
    """DSMOE_CUDA_CUTLASS: unset / 0 / sm80; any other value is refused with the variable's name,
    the value and what is accepted (the op then fails its calls instead of guessing)."""
    choice, err = ctypes.c_int(-1), ctypes.create_string_buffer(256)
    ok = shim.shim_parse_cutlass_choice(value, ctypes.byref(choice), err, 256)
    if expected is None:
        assert ok == 0
        message = err.value.decode()
        assert "DSMOE_CUDA_CUTLASS" in message and value.decode() in message and "sm80" in message
    else:
        assert ok == 1 and choice.value == expected and err.value == b""


def test_zero_tokens_and_limits(shim):
    assert plan(shim, 0, 16, 4, 8)["bytes"] == 0
    with pytest.raises(ValueError, match="2\\^30"):
        plan(shim, 2**31, 16, 4, 8)
    with pytest.raises(ValueError, match="65535"):
        plan(shim, 64, 16, 4, 64 * 70000)
    with pytest.raises(ValueError, match="n <= 12288"):
        plan(shim, 4, 16, 12289, 8)
    plan(shim, 4, 16, 12288, 8)


def test_max_m_tiles_is_a_bound(shim, rng):
    for _ in range(200):
        N, n, tm = int(rng.integers(1, 600)), int(rng.integers(1, 20)), int(rng.choice([64, 128]))
        counts = rng.integers(0, N + 1, n)
        assert sum(math.ceil(c / tm) for c in counts) <= shim.shim_max_m_tiles(N, n, tm)
    assert shim.shim_max_m_tiles(300, 8, 128) == 8 * 3  # every token in every block


def test_tile_map(shim, rng):
    for _ in range(100):
        n, tm = int(rng.integers(1, 12)), int(rng.choice([1, 3, 64]))
        counts = [int(c) if rng.random() > 0.3 else 0 for c in rng.integers(0, 200, n)]
        ts = align_tiles(shim, counts, tm)
        assert ts[0] == 0 and ts[-1] == sum(math.ceil(c / tm) for c in counts)
        covered = []
        for tile in range(ts[-1] + 3):  # the grid is larger than the tiles in use
            found = find_tile(shim, ts, tile, tm)
            if tile >= ts[-1]:
                assert found is None
                continue
            block, first = found
            assert 0 <= first < counts[block] and first % tm == 0
            covered += [(block, s) for s in range(first, min(first + tm, counts[block]))]
        assert covered == [(i, s) for i in range(n) for s in range(counts[i])]  # each pair once, in order


def emulate_gemm_path(shim, case, tile_m):
    """The grouped-GEMM path's data flow in numpy (float64), with the shim's tile map."""
    x, attrs, active, coef, pair_token, counts = _route(shim, case)
    N, d = x.shape
    n, B, _ = case.gate.shape
    ts = align_tiles(shim, [int(v) for v in counts], tile_m)
    max_tiles = shim.shim_max_m_tiles(N, n, tile_m)
    h_ld = -(-B // 8) * 8
    h = np.full((max_tiles * tile_m, h_ld), np.nan)
    # gate/up GEMM: grid (max_tiles); idle tiles return; padding rows and columns written as 0
    for tile in range(max_tiles):
        found = find_tile(shim, ts, tile, tile_m)
        if found is None:
            continue
        i, first = found
        rows = pair_token[i, first:first + tile_m]
        rows = np.concatenate([rows, np.full(tile_m - len(rows), -1)])
        a = np.where(rows[:, None] >= 0, x[rows], 0.0)
        g, u = a @ case.gate[i].astype(np.float64).T, a @ case.up[i].astype(np.float64).T
        h[tile * tile_m:(tile + 1) * tile_m] = 0.0
        h[tile * tile_m:(tile + 1) * tile_m, :B] = _activation(attrs["activation"], g) * u
    # down GEMM: coef in the epilogue, added into the token rows
    y = np.zeros((N, d))
    for tile in range(max_tiles):
        found = find_tile(shim, ts, tile, tile_m)
        if found is None:
            continue
        i, first = found
        r = h[tile * tile_m:(tile + 1) * tile_m, :B] @ case.down[i].astype(np.float64)
        for j, t in enumerate(pair_token[i, first:first + tile_m]):
            if t >= 0:
                y[t] += coef[t, i] * r[j]
    return y.reshape(case.x.shape), active.reshape(*case.x.shape[:-1], n)


@pytest.mark.parametrize("tokens,n,B,tile_m", [(9, 8, 12, 4), (70, 5, 13, 16), (33, 16, 7, 64), (200, 3, 9, 128)])
def test_gemm_path_emulation(shim, rng, tokens, n, B, tile_m):
    case = make_case(rng, (tokens,), d=24, n=n, B=B, bias=True, threshold=float(rng.uniform(0.3, 0.7)),
                     activation=str(rng.choice(["silu", "gelu_tanh"])))
    y, active = emulate_gemm_path(shim, case, tile_m)
    y_ref, active_ref = case.reference()
    np.testing.assert_array_equal(active, active_ref)
    np.testing.assert_allclose(y, y_ref, rtol=1e-9, atol=1e-9)
    assert (y[~active_ref.any(-1)] == 0).all()


def _route(shim, case):
    """Router and counting sort as the kernels do them (float64): active, coef, pair_token, counts."""
    x = case.x.reshape(-1, case.x.shape[-1]).astype(np.float64)
    n = case.gate.shape[0]
    attrs = {"threshold": 0.5, "rescale": True, "weighting": "score", "activation": "silu", **case.attrs}
    logits = x @ case.router_weight.astype(np.float64).T + (0 if case.router_bias is None else case.router_bias)
    s = 1 / (1 + np.exp(-logits))
    active = s > attrs["threshold"]
    k = active.sum(-1)
    c = np.where(attrs["rescale"] & (k > 0), n / np.maximum(k, 1), 1.0)
    coef = np.where(active, s if attrs["weighting"] == "score" else 1.0, 0.0) * c[:, None]
    pair_token = np.full((n, x.shape[0]), -1)
    counts = active.sum(0)
    for i in range(n):
        pair_token[i, :counts[i]] = np.nonzero(active[:, i])[0]
    return x, attrs, active, coef, pair_token, counts


def _at(offset, rows, cols, ld_row, ld_col=1):
    """Flat indices of a rows x cols matrix at `offset` with the given strides."""
    return offset + np.arange(rows)[:, None] * ld_row + np.arange(cols)[None, :] * ld_col


def emulate_cutlass_path(shim, case):
    """The CUTLASS path on flat buffers, every address from the shim's group map."""
    x, attrs, active, coef, pair_token, counts = _route(shim, case)
    N, d = x.shape
    n, B, _ = case.gate.shape
    row_start = align_tiles(shim, [int(v) for v in counts], 1)  # the align kernel with tile_m = 1
    assert row_start[-1] == active.sum()
    xp = np.full(N * n * d, np.nan)          # scratch: never-written rows stay NaN
    gu = np.full(N * n * 2 * B, np.nan)
    pair_row = np.full((N, n), -7)
    for r in range(N * n + GROUPED_ROWS_PER_CTA):  # the permute grid, sized for every pair
        found = permuted_row(shim, row_start, pair_token, r)
        if r >= row_start[-1]:
            assert found is None
            continue
        i, t = found
        xp[r * d:(r + 1) * d] = x[t]
        pair_row[t, i] = r
    gate, up, down = (w.astype(np.float64).ravel() for w in (case.gate, case.up, case.down))
    for g in range(2 * n):  # gate/up: A row-major, B [n, k] K-major, D row-major
        s = group_gemm(shim, "gate_up", row_start, g, d, B)
        assert s["up"] == g % 2 and s["m"] == counts[g // 2] and (s["n"], s["k"]) == (B, d)
        a = xp[_at(s["a"], s["m"], s["k"], s["lda"])]
        w = (up if s["up"] else gate)[_at(s["b"], s["n"], s["k"], s["ldb"])]
        gu[_at(s["d"], s["m"], s["n"], s["ldd"])] = a @ w.T
    rows = _at(0, row_start[-1], B, 2 * B)  # activate: h into the gate half, in place
    gu[rows] = _activation(attrs["activation"], gu[rows]) * gu[rows + B]
    for i in range(n):  # down: A = gu's gate half, B [k, n] N-major, D over xp
        s = group_gemm(shim, "down", row_start, i, d, B)
        assert s["m"] == counts[i] and (s["n"], s["k"]) == (d, B)
        a = gu[_at(s["a"], s["m"], s["k"], s["lda"])]
        w = down[_at(s["b"], s["k"], s["n"], s["ldb"])]
        xp[_at(s["d"], s["m"], s["n"], s["ldd"])] = a @ w
    y = np.zeros((N, d))
    for t in range(N):  # combine: the token's active blocks in ascending order
        for i in range(n):
            if active[t, i]:
                y[t] += coef[t, i] * xp[pair_row[t, i] * d:(pair_row[t, i] + 1) * d]
    return y.reshape(case.x.shape), active.reshape(*case.x.shape[:-1], n)


@pytest.mark.parametrize("tokens,n,B,d", [(9, 8, 16, 24), (70, 5, 8, 40), (33, 16, 24, 16), (200, 3, 8, 8)])
def test_cutlass_path_emulation(shim, rng, tokens, n, B, d):
    case = make_case(rng, (tokens,), d=d, n=n, B=B, bias=True, threshold=float(rng.uniform(0.3, 0.7)),
                     activation=str(rng.choice(["silu", "gelu", "gelu_tanh"])))
    y, active = emulate_cutlass_path(shim, case)
    y_ref, active_ref = case.reference()
    np.testing.assert_array_equal(active, active_ref)
    np.testing.assert_allclose(y, y_ref, rtol=1e-9, atol=1e-9)
    assert (y[~active_ref.any(-1)] == 0).all()


@pytest.mark.parametrize("fill", ["none", "all"])
def test_cutlass_path_emulation_edges(shim, rng, fill):
    """No block active anywhere (every group empty, Y = 0) and every block active (N * n rows)."""
    case = make_case(rng, (17,), d=16, n=4, B=8, bias=True)
    case.router_bias = np.full(4, -60.0 if fill == "none" else 60.0, np.float32)
    y, active = emulate_cutlass_path(shim, case)
    y_ref, active_ref = case.reference()
    assert active_ref.all() if fill == "all" else not active_ref.any()
    np.testing.assert_array_equal(active, active_ref)
    np.testing.assert_allclose(y, y_ref, rtol=1e-9, atol=1e-9)
