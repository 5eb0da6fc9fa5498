"""The CPU kernels' cache blocking (custom_ops/cpu/cache_blocking.h): the slab layout's k-slice
depth follows the L1d the library finds (or DSMOE_CPU_L1D_BYTES), and no depth changes a bit of
the output. The size is read once per process, so each setting runs in a process of its own."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from dsmoe_export.testing.cases import make_case
from op_graph import assert_matches_reference, make_model, run
from test_op_cpu import _cpu_isas

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


def test_slice_depth_follows_the_l1d_and_changes_no_bit(op_library, rng, tmp_path, monkeypatch):
    """16 / 32 / 64 KiB and 1 MiB of L1d: slices of 48 / 96 / 192 / 256 (the cap) steps, 3/4 of L1
    for 2 x 32 rows of gate and up; d = 600 and 1088 take 13 / 7 / 4 / 3 and 23 / 12 / 6 / 5 slices,
    the last partial. Every instruction set this CPU runs, the decode path (1, 12 tokens) and the
    prefill's slab tiles (45, 300 tokens), 1 and 2 threads: the outputs of each setting equal this
    process's bit for bit (the slices cut k without reordering any sum) and the reference."""
    jobs, cases = [], []
    for isa in _cpu_isas():
        for tokens, d, threads in ((1, 600, 1), (12, 1088, 2), (45, 600, 2), (300, 1088, 1)):
            case = make_case(rng, (tokens,), d=d, n=4, B=45, bias=True, threshold=0.3, gate_up_tile=32)
            model, feeds = tmp_path / f"m{len(jobs)}.onnx", tmp_path / f"f{len(jobs)}.npz"
            onnx.save(make_model(case), model)
            np.savez(feeds, **case.feeds())
            jobs.append({"model": str(model), "feeds": str(feeds), "isa": isa, "threads": threads})
            cases.append(case)
    here = []  # this process's outputs, at the L1d it found
    for job, case in zip(jobs, cases):
        monkeypatch.setenv("DSMOE_CPU_ISA", job["isa"])
        here.append(run(case, op_library, threads=job["threads"]))
        assert_matches_reference(case, here[-1])
    for l1d, steps in (("16K", 48), ("32768", 96), ("64K", 192), ("1M", 256)):
        proc, out = _worker(op_library, tmp_path, jobs, l1d, f"l1d{steps}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        want = {"l1d_bytes": int(l1d.rstrip("KM")) * {"K": 1024, "M": 2**20}.get(l1d[-1], 1), "slab_slice_steps": steps}
        assert json.loads(proc.stdout.splitlines()[0]) == want
        got = np.load(out)
        for i, job in enumerate(jobs):
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


@pytest.mark.parametrize("value", ["lots", "-4096", "0", "12Q"])
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
