"""Smoke run of the kernels' fuzz target (tests/fuzz/, scripts/fuzz.sh) with ASan + UBSan: it
compiles the kernel sources with sanitizers (about 3 minutes on 2 cores), then fuzzes for
DSMOE_FUZZ_SECONDS (default 10; 30 with --runslow). In the default suite so that the target keeps
building with the kernels it links, and reaches every op variant it is meant to drive."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_fuzz_target_smoke(tmp_path, request):
    if shutil.which("cmake") is None:
        pytest.skip("needs cmake")
    seconds = os.environ.get("DSMOE_FUZZ_SECONDS", "30" if request.config.getoption("--runslow") else "10")
    env = dict(os.environ, DSMOE_FUZZ_BUILD=str(tmp_path / "build"))
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "fuzz.sh"), seconds], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert "fuzz_ffn stats:" in proc.stderr, tail
    assert "ERROR" not in proc.stderr, tail
    # Every batch's stats line: each op variant, the slab layout and the reference check ran.
    counts = {}
    for line in proc.stderr.splitlines():
        if line.startswith("fuzz_ffn stats:"):
            for key, pattern in (("float32", r"float32 (\d+)"), ("slabs", r"slabs (\d+)"), ("int4", r"int4 (\d+)"),
                                 ("int8", r"int8 (\d+)"), ("float16", r"f16 (\d+)"),
                                 ("shapes accepted", r"shapes accepted (\d+)"),
                                 ("checked", r"checked against float64 (\d+)")):
                counts[key] = counts.get(key, 0) + int(re.search(pattern, line).group(1))
    assert counts and all(v > 0 for v in counts.values()), (counts, tail)
