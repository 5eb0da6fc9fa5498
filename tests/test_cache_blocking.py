"""The CPU kernels' cache blocking (custom_ops/cpu/cache_blocking.h): the k-slice depths of the
slab layout and of the packed panels follow the L1d the library finds (or DSMOE_CPU_L1D_BYTES),
and no depth changes a bit of the output. The size is read once per process, so each setting
runs in a process of its own."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from dsmoe_export.testing.cases import RTOL, make_case, rel_err
from op_graph import assert_matches_reference, make_model, session
from test_op_cpu import _cpu_isas
from test_op_quant import make_model as quant_model
from test_op_quant import quant_inputs
from test_op_quant import reference as quant_reference

# In a process of its own: the library's blocking, then every job's outputs ({model, feeds,
# isa, threads}) into OUT.npz.
WORKER = """
import json, os, sys
import numpy as np, onnx
sys.path.insert(0, sys.argv[3])
from op_graph import session
from dsmoe_runtime._library import cpu_cache_blocking
library, out, _, jobs = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
print(json.dumps(cpu_cache_blocking(library)))
results = {}
for i, job in enumerate(jobs):
    os.environ["DSMOE_CPU_ISA"] = job["isa"]  # read when the kernel is created
    feeds = dict(np.load(job["feeds"]))
    outputs = session(onnx.load(job["model"]), library, job["threads"]).run(None, feeds)
    results[f"{i}_y"], results[f"{i}_active"] = outputs
np.savez(out, **results)
"""


def _worker(library: str, tmp_path: Path, jobs: list[dict], l1d: str | None, tag: str):
    env = {k: v for k, v in os.environ.items() if k != "DSMOE_CPU_L1D_BYTES"}
    if l1d is not None:
        env["DSMOE_CPU_L1D_BYTES"] = l1d
    out = tmp_path / f"{tag}.npz"
    proc = subprocess.run([sys.executable, "-c", WORKER, library, str(out), str(Path(__file__).parent),
                           json.dumps(jobs)], env=env, capture_output=True, text=True, timeout=300)
    return proc, out


def _sysfs_l1d() -> int | None:
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(base.glob("index*")):
        try:
            if (index / "level").read_text().strip() == "1" and (index / "type").read_text().strip() in ("Data", "Unified"):
                text = (index / "size").read_text().strip()
                return int(text.rstrip("KM")) * {"K": 1024, "M": 2**20}.get(text[-1], 1)
        except OSError:
            return None
    return None


def _jobs(rng, tmp_path, isa: str):
    """(job, check) pairs: the slab layout (decode and prefill), the rows layout's packed panels,
    the int4 op's prefill over dequantized slabs; `check(outputs)` against the
    reference. d = 600 / 1088 / 640 spans several slices of every depth below."""
    jobs = []

    def add(model, feeds, threads, check):
        i = len(jobs)
        onnx.save(model, tmp_path / f"m{isa}{i}.onnx")
        np.savez(tmp_path / f"f{isa}{i}.npz", **feeds)
        jobs.append(({"model": str(tmp_path / f"m{isa}{i}.onnx"), "feeds": str(tmp_path / f"f{isa}{i}.npz"),
                      "isa": isa, "threads": threads}, check))

    for tokens, d, threads, layout in ((1, 600, 1, 32), (12, 1088, 2, 32), (45, 600, 2, 32), (300, 1088, 1, 32),
                                       (45, 600, 1, 0), (300, 1088, 2, 0)):
        case = make_case(rng, (tokens,), d=d, n=4, B=45, bias=True, threshold=0.3, gate_up_tile=layout)
        add(make_model(case), case.feeds(), threads, lambda out, case=case: assert_matches_reference(case, out))
    case = make_case(rng, (70,), d=640, n=4, B=40, bias=True, threshold=0.3)
    feeds = quant_inputs(case, "int4", 32)
    y_ref, active_ref = quant_reference(case, feeds, "int4", 32)

    def check_int4(out):
        np.testing.assert_array_equal(out[1], active_ref)
        assert rel_err(out[0], y_ref) <= RTOL
    add(quant_model(case, feeds, "int4", 32), feeds, 2, check_int4)
    return jobs


def test_slice_depths_follow_the_l1d_and_change_no_bit(op_library, rng, tmp_path, monkeypatch):
    """16 / 32 / 64 KiB and 1 MiB of L1d: slab slices of 48 / 96 / 192 / 256 (the cap) steps (3/4
    of L1 for 2 x 32 rows of gate and up) and packed-panel slices of 2560 / 5120 / 8192 / 8192
    floats (2/3 of L1, at most today's 32 KB). Every instruction set this CPU runs; the slab
    layout's decode path (1, 12 tokens) and prefill (45, 300), the rows layout's panels (45, 300),
    the int4 op's prefill (70); 1 and 2 threads: each setting's outputs equal this process's bit for
    bit (a slice cuts k without reordering any sum) and the reference."""
    jobs = [job for isa in _cpu_isas() for job in _jobs(rng, tmp_path, isa)]
    here = []  # this process's outputs, at the L1d it found
    for job, check in jobs:
        monkeypatch.setenv("DSMOE_CPU_ISA", job["isa"])
        here.append(session(onnx.load(job["model"]), op_library, job["threads"]).run(None, dict(np.load(job["feeds"]))))
        check(here[-1])
    for l1d, steps, floats in (("16K", 48, 2560), ("32768", 96, 5120), ("64K", 192, 8192), ("1M", 256, 8192)):
        proc, out = _worker(op_library, tmp_path, [job for job, _ in jobs], l1d, f"l1d{steps}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        want = {"l1d_bytes": int(l1d.rstrip("KM")) * {"K": 1024, "M": 2**20}.get(l1d[-1], 1),
                "slab_slice_steps": steps, "panel_slice_floats": floats}
        assert json.loads(proc.stdout.splitlines()[0]) == want
        got = np.load(out)
        for i, (job, _) in enumerate(jobs):
            np.testing.assert_array_equal(got[f"{i}_y"], here[i][0], err_msg=f"{l1d}: {job}")
            np.testing.assert_array_equal(got[f"{i}_active"], here[i][1])


def test_the_l1d_found_without_override(op_library, tmp_path):
    """No override: the L1d the OS reports (sysfs here), and the depth 3/4 of it in 16-step units."""
    proc, _ = _worker(op_library, tmp_path, [], None, "default")
    assert proc.returncode == 0, proc.stderr[-3000:]
    blocking = json.loads(proc.stdout.splitlines()[0])
    expected = _sysfs_l1d()
    if expected is not None:
        assert blocking["l1d_bytes"] == expected
    assert blocking["slab_slice_steps"] == min(256, max(32, blocking["l1d_bytes"] * 3 // 4 // 256 // 16 * 16))
    assert blocking["panel_slice_floats"] == min(8192, max(2048, blocking["l1d_bytes"] * 2 // 3 // 4 // 512 * 512))


@pytest.mark.parametrize("value", ["lots", "-4096", "0", "12Q", "32KB", "2048M", "99999999999999999M"])
def test_malformed_l1d_override_is_an_error(op_library, rng, tmp_path, value):
    """A malformed DSMOE_CPU_L1D_BYTES fails the session's creation with an error naming it (and
    the library's report of its blocking), in a process that goes on."""
    case = make_case(rng, (3,), d=40, n=2, B=8, gate_up_tile=32)
    model, feeds = tmp_path / "m.onnx", tmp_path / "f.npz"
    onnx.save(make_model(case), model)
    np.savez(feeds, **case.feeds())
    env = dict(os.environ, DSMOE_CPU_L1D_BYTES=value)
    script = f"""
import sys, numpy as np, onnx
sys.path.insert(0, {str(Path(__file__).parent)!r})
from op_graph import session
from dsmoe_runtime._library import cpu_cache_blocking
from dsmoe_runtime.errors import LibraryError
try:
    cpu_cache_blocking({op_library!r})
except LibraryError as e:
    print("library:", e)
try:
    session(onnx.load({str(model)!r}), {op_library!r})
except Exception as e:
    print("session:", e)
print("alive")
"""
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("library: DSMOE_CPU_L1D_BYTES=") and value in lines[0]
    assert lines[1].startswith("session:") and f"DSMOE_CPU_L1D_BYTES={value}: expected a positive" in lines[1]
    assert lines[2] == "alive"
