"""The GPU check's scripts (scripts/gpu_*.py, docs/cuda.md "GPU check") run on a machine that
is lent only now and then, so their CPU-side logic is checked here, where CI runs: the
float16 conversion of the benchmark graphs against the float32 graphs, the ORT timing loop
and its table on the CPU EP, and the end-to-end script on small exports (--ep cpu)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from dsmoe_export.bench import graphs

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))
pytest.importorskip("torch")
import gpu_ort  # noqa: E402


def _run(model, weights, feeds, library=None):
    r = gpu_ort.CudaRunner(model, weights, library, device="cpu")
    return r.session.run(None, feeds)[0].astype(np.float32)


@pytest.mark.parametrize("kind", ["sparse", "sparse_rows", "dense"])
def test_float16_graphs_compute_the_float32_graphs(op_library, rng, kind):
    d, D, n, T = 40, 48, 4, 7
    e = graphs.Experts.random(rng, d, D, n)
    m, w = {"sparse": lambda: graphs.sparse_graph(e), "sparse_rows": lambda: graphs.sparse_graph(e, down_tile=0),
            "dense": lambda: graphs.dense_graph(e)}[kind]()
    x = rng.standard_normal((T, d)).astype(np.float32)
    router = np.zeros((n, d), np.float32)
    router[:, :n] = 20 * np.eye(n)  # logit_i = 20 x_i: |x_i| >> 0 keeps float16 away from the threshold
    x[:, :n] = np.where(rng.random((T, n)) < 0.5, 1.0, -1.0)
    lib = op_library if kind.startswith("sparse") else None
    y32 = _run(m, w, {"X": x, "router_weight": router}, lib)
    m16, w16 = gpu_ort.to_float16(m, w)
    assert all(v.dtype == np.float16 for v in w16.values())
    y16 = _run(m16, w16, {"X": x.astype(np.float16), "router_weight": router.astype(np.float16)}, lib)
    scale = max(1.0, float(np.abs(y32).max()))
    assert float(np.abs(y16 - y32).max()) / scale < 2e-2


def test_ort_timing_loop_and_table_on_the_cpu_ep(op_library):
    rows, notes = gpu_ort.ort_op_timing(op_library, tokens_list=(1, 9), ks=(1, 4), d=64, D=96, n=8, reps=2,
                                        device="cpu")
    assert [(r["tokens"], r["k"]) for r in rows] == [(1, 1), (1, 4), (9, 1), (9, 4)]
    for r in rows:
        assert r["sparse_ms"] > 0 and r["dense_ms"] > 0 and r["sparse_rows_ms"] > 0
        assert r["agree"]["sparse_rows"] < 1e-2  # the two down layouts compute the same op
    table = gpu_ort.table(rows)
    assert len(table) == 2 + len(rows) and table[0].startswith("| tokens | k |")


def test_harness_targets_and_table():
    import gpu_bench

    assert gpu_bench.target(1, 0.25, 2, 8) == pytest.approx(0.35)
    assert gpu_bench.target(8, 0.25, 6, 8) == pytest.approx(0.85)  # the union of the 8 tokens' blocks
    assert gpu_bench.target(9, 0.25, 8, 8) == gpu_bench.target(64, 0.5, 8, 8) == 1.0
    assert gpu_bench.target(512, 0.5, 8, 8) == pytest.approx(0.575)
    row = dict(tokens=512, k=4, r=0.5, union=8, path="gemm-cutlass", rows_ms=1.0, rows_wmma_ms=2.0, tiled_ms=2.1,
               dense_ms=2.5, ratio=0.4, rows_wmma_ratio=0.8, tiled_ratio=0.84, target=0.575, ok=True)
    table = gpu_bench.harness_table([row, {**row, "ok": False}])
    assert len(table) == 4 and table[2].count("|") == table[0].count("|")
    assert "gemm-cutlass" in table[2] and table[2].endswith("| yes |") and table[3].endswith("| no |")


def test_e2e_script_on_small_exports(op_library, tmp_path):
    from dsmoe_export.cli import main as export_main
    from dsmoe_export.synthetic import make_model_folder

    folder = make_model_folder(tmp_path / "src")
    for name, flags in (("sparse", []), ("dense", ["--dense"]), ("sparse_fp16", ["--dtype", "float16"])):
        assert export_main([str(folder), str(tmp_path / f"{name}.onnx"), "-q", "--no-tokenizer", *flags]) == 0
    env = {**os.environ, "DSMOE_OPS_LIBRARY": op_library, "PYTHONPATH": ":".join(p for p in sys.path if p)}
    out = subprocess.run([sys.executable, str(SCRIPTS / "gpu_e2e.py"), str(tmp_path), "--ep", "cpu"],
                         capture_output=True, text=True, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    assert out.returncode == 0 and len(lines) == 3, out.stdout + out.stderr
    assert all("CPUExecutionProvider" in line for line in lines if line.split()[1].startswith("sparse"))


def test_gpu_check_script_parses():
    for script in ("gpu_check.sh", "gpu_prepare.sh"):
        subprocess.run(["bash", "-n", str(SCRIPTS / script)], check=True)
    for script in ("gpu_check.sh", "gpu_prepare.sh"):
        out = subprocess.run(["bash", str(SCRIPTS / script), "nonsense"], capture_output=True, text=True)
        assert out.returncode == 2 and "unknown stage" in out.stdout


def test_ort_available_names_the_missing_provider():
    import gpu_bench

    why = gpu_bench.ort_available()
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert why is None
    else:
        assert "CUDAExecutionProvider" in why and "gpu_prepare.sh" in why
