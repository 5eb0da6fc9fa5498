"""A model over 2 GiB (--runslow): exported with `--external-data auto`, external data must kick
in by itself; the export validates against PyTorch (prefill + one cached step) and runs in
DSMoESession. Needs about 5 GB of disk under the pytest temp folder and about 12 GB of RAM;
figures (time, peak RSS, sizes) in docs/reliability.md.
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import time

import numpy as np
import pytest

from dsmoe_export.synthetic import TinySpec, make_model_folder

# 1 layer, vocab 131072 x hidden 2048 (embedding and untied head: 2 x 1 GiB) + the layer:
# 588 M float32 parameters, 2.35 GB.
BIG = TinySpec(vocab_size=131072, hidden_size=2048, intermediate_size=5632, num_hidden_layers=1,
               num_attention_heads=16, num_key_value_heads=4)


@pytest.mark.slow
def test_export_over_2gib_uses_external_data_and_runs(tmp_path):
    t0 = time.perf_counter()
    folder = make_model_folder(tmp_path / "model", BIG, seed=3, router_scale=2.0, max_shard_bytes=2**30)
    t_folder = time.perf_counter() - t0
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    assert weights > 2**31

    out = tmp_path / "big.onnx"
    t0 = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run([sys.executable, "-m", "dsmoe_export", str(folder), str(out), "--no-tokenizer"],
                          capture_output=True, text=True, timeout=3600,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    t_export = time.perf_counter() - t0
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "external data" in proc.stdout, proc.stdout
    data = tmp_path / "big.onnx.data"
    assert data.stat().st_size > 2**31 and out.stat().st_size < 2**24
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data", "model"]
    validation = [line for line in proc.stderr.splitlines() if "max |ORT - PyTorch|" in line]
    assert validation, proc.stderr[-3000:]

    from dsmoe_runtime import DSMoESession

    t0 = time.perf_counter()
    s = DSMoESession(out, threads=2)
    t_load = time.perf_counter() - t0
    ids = np.random.default_rng(0).integers(3, BIG.vocab_size, (1, 6))
    t0 = time.perf_counter()
    tokens = s.generate(ids, 2, collect_stats=False)
    t_gen = time.perf_counter() - t0
    assert tokens.shape == (1, ids.shape[1] + 2) and (tokens[:, :6] == ids).all()
    print(f"big export: weights {weights / 2**30:.2f} GiB, folder {t_folder:.0f}s, export {t_export:.0f}s "
          f"(peak RSS {peak_mib / 1024:.1f} GiB{'' if before == 0 else ', an upper bound'}), "
          f"{validation[0].strip()}, onnx {out.stat().st_size / 2**20:.1f} MiB + data "
          f"{data.stat().st_size / 2**30:.2f} GiB, session load {t_load:.1f}s, 2 generated tokens {t_gen:.1f}s")
