"""The op library as `pip install .` builds it where nvcc is missing (DSMOE_WITH_CUDA=OFF): it
loads with nothing CUDA in it, computes float32 on the CPU, and still accepts float16 graphs,
whose op nodes the CPU EP computes through the op's ONNX function (the exporter validates a
float16 export that way). Without the float16 / bfloat16 declarations that such a build makes
for the CUDA EP, ONNX Runtime rejects those graphs as invalid models before any EP is chosen.
Builds the library once (about a minute on 2 cores)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto

from dsmoe_export.cli import main
from dsmoe_export.synthetic import make_model_folder
from dsmoe_export.testing.cases import make_case
from op_graph import assert_matches_reference, make_model, run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cpu_only_library(tmp_path_factory) -> str:
    if shutil.which("cmake") is None:
        pytest.skip("cmake not installed")
    build = tmp_path_factory.mktemp("nocuda")
    for cmd in (["cmake", "-S", str(ROOT), "-B", str(build), "-DDSMOE_WITH_CUDA=OFF", "-DCMAKE_BUILD_TYPE=Release"],
                ["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return str(build / "libdsmoe_ops.so")


def test_nothing_cuda_in_it(cpu_only_library):
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf not installed")
    sections = subprocess.run([readelf, "-S", "-W", cpu_only_library], capture_output=True, text=True).stdout
    needed = subprocess.run([readelf, "-d", cpu_only_library], capture_output=True, text=True).stdout
    assert ".nv_fatbin" not in sections
    assert "cuda" not in needed.lower() and "cublas" not in needed.lower()


def test_float32_op_runs_on_the_cpu(cpu_only_library, rng):
    case = make_case(rng, (37,), d=96, n=4, B=40, bias=True)
    assert_matches_reference(case, run(case, cpu_only_library, threads=2))


def test_float16_graph_runs_on_the_cpu_ep(cpu_only_library, rng):
    """The op's float16 node on the CPU EP (no float16 CPU kernel: the ONNX function) against the
    float32 kernel on the same float16-rounded inputs."""
    case = make_case(rng, (5, 3), d=64, n=4, B=32, bias=True)
    feeds16 = {k: v.astype(np.float16) for k, v in case.feeds().items()}
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(cpu_only_library)
    s16 = ort.InferenceSession(make_model(case, elem_type=TensorProto.FLOAT16).SerializeToString(), opts,
                               providers=["CPUExecutionProvider"])
    y16, active16 = s16.run(None, feeds16)
    s32 = ort.InferenceSession(make_model(case).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    y32, active32 = s32.run(None, {k: v.astype(np.float32) for k, v in feeds16.items()})
    assert y16.dtype == np.float16
    # The routing is computed in float16 by the function: a score within its rounding of the
    # threshold may flip, so compare where both agree on the blocks.
    same = (active16 == active32).all(axis=-1)
    assert same.mean() > 0.8
    scale = max(1.0, float(np.abs(y32).max()))
    assert np.abs(y16[same].astype(np.float32) - y32[same]).max() / scale < 2e-2


def test_float16_export_is_validated(cpu_only_library, tmp_path, monkeypatch):
    monkeypatch.setenv("DSMOE_OPS_LIBRARY", cpu_only_library)
    folder = make_model_folder(tmp_path / "model")
    assert main([str(folder), str(tmp_path / "model16.onnx"), "--dtype", "float16", "-q"]) == 0
