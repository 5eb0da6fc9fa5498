"""Optional: the export in Hugging Face optimum's ORTModelForCausalLM and in onnxruntime-genai.

Neither installs next to this project's pins (optimum-onnx 0.1.0 needs transformers < 4.58 and
optimum ~= 2.1; onnxruntime-genai needs the CPU `onnxruntime` package, which clashes with
onnxruntime-gpu), so each runs in a side venv made by `bash scripts/setup-ecosystem.sh`
(or named by DSMOE_OPTIMUM_PYTHON / DSMOE_GENAI_PYTHON, or this interpreter when it imports
them). Missing: the test skips and says so. Their tokens must equal DSMoESession.generate's.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dsmoe_runtime
from dsmoe_export.exporter import export
from dsmoe_export.synthetic import TinySpec, make_model_folder
from dsmoe_runtime import DSMoESession

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "ecosystem"


def _side_python(module: str, env_var: str, venv: str, why: str) -> str:
    if importlib.util.find_spec(module.split(".")[0]) is not None:
        try:
            if importlib.util.find_spec(module) is not None:
                return sys.executable
        except ImportError:
            pass
    candidate = os.environ.get(env_var) or str(ROOT / venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))
    if not Path(candidate).is_file():
        pytest.skip(f"{module} is not importable here ({why}) and there is no side venv at {candidate}: "
                    f"run `bash scripts/setup-ecosystem.sh` or set {env_var}")
    probe = subprocess.run([candidate, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"{candidate} cannot import {module}: {probe.stderr.strip().splitlines()[-1:]}")
    return candidate


@pytest.fixture(scope="module")
def optimum_python():
    return _side_python("optimum.onnxruntime", "DSMOE_OPTIMUM_PYTHON", ".venv-optimum",
                        "optimum-onnx 0.1.0 pins transformers<4.58 and optimum~=2.1")


@pytest.fixture(scope="module")
def genai_python():
    return _side_python("onnxruntime_genai", "DSMOE_GENAI_PYTHON", ".venv-genai",
                        "it depends on the CPU onnxruntime package, which clashes with onnxruntime-gpu")


@pytest.fixture(scope="module")
def eco_export(tmp_path_factory):
    seed = int(os.environ.get("DSMOE_TEST_SEED", secrets.randbits(31)))
    print(f"eco_export: DSMOE_TEST_SEED={seed}")
    root = tmp_path_factory.mktemp("eco")
    folder = make_model_folder(root / "model", TinySpec(), seed=seed, router_scale=2.0)
    out = root / "export"
    out.mkdir()
    export(folder, out / "model.onnx", progress=False, hf_config=True, genai=True)
    return out / "model.onnx", DSMoESession(out / "model.onnx", threads=2)


EOS = 2  # TinySpec's eos_token_id: optimum and genai stop a row there, DSMoESession.generate (no eos given) does not


def _until_eos(rows, start: int) -> list[list[int]]:
    """Each row cut after its first EOS at or after position `start` (the generated part)."""
    out = []
    for row in rows:
        row = list(row)
        cut = next((i + 1 for i in range(start, len(row)) if row[i] == EOS), len(row))
        out.append(row[:cut])
    return out


def _run(python, script, *args, cwd=None):
    proc = subprocess.run([python, str(SCRIPTS / script), *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)
    return proc


def test_optimum_ort_model_for_causal_lm_generates_the_same_tokens(optimum_python, eco_export, rng):
    path, session = eco_export
    ids = rng.integers(3, 256, (2, 7))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    prompt = json.dumps({"input_ids": ids.tolist(), "attention_mask": mask.tolist()})
    proc = _run(optimum_python, "optimum_generate.py", path.parent, path.name, dsmoe_runtime.get_library_path(),
                prompt, 10)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    want = session.generate(ids, 10, attention_mask=mask)
    assert _until_eos(got["ids"], ids.shape[1]) == _until_eos(want.tolist(), ids.shape[1])


def test_onnxruntime_genai_generates_the_same_tokens(genai_python, eco_export, rng, tmp_path):
    path, session = eco_export
    config = json.loads((path.parent / "genai_config.json").read_text())
    lib = Path(dsmoe_runtime.get_library_path())
    # The library travels with the model, named relatively: genai 0.18 loads it from any working
    # directory that way (an absolute path only while the working directory contains it).
    assert config["model"]["decoder"]["session_options"]["custom_ops_library"] == lib.name
    assert (path.parent / lib.name).read_bytes() == lib.read_bytes()
    assert "position_ids" not in config["model"]["decoder"]["inputs"]
    assert config["search"]["past_present_share_buffer"] is True
    elsewhere = tmp_path / "cwd"  # outside the repository and the model folder
    elsewhere.mkdir()
    ids = rng.integers(3, 256, (2, 6))
    proc = _run(genai_python, "genai_generate.py", path.parent, json.dumps(ids.tolist()), 9, cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert _until_eos(got["new"], 0) == _until_eos(session.generate(ids, 9)[:, 6:].tolist(), 0)
    # genai really loads the library the config names: a wrong one fails.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / path.name).write_bytes(path.read_bytes())
    config["model"]["decoder"]["session_options"]["custom_ops_library"] = "missing.so"
    (bad / "genai_config.json").write_text(json.dumps(config))
    proc = _run(genai_python, "genai_generate.py", bad, json.dumps(ids.tolist()), 2, cwd=elsewhere)
    assert proc.returncode != 0 and "missing.so" in proc.stderr
    # set_library copies this machine's library in and points the config at it (what an app
    # does on another machine, or after upgrading dsmoe-export).
    from dsmoe_runtime.genai import set_library

    set_library(bad)
    assert (bad / lib.name).is_file()
    proc = _run(genai_python, "genai_generate.py", bad, json.dumps(ids.tolist()), 2, cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _genai_intra_op_pool(genai_python, folder: Path, session_options: dict, cwd: Path) -> str:
    """onnxruntime's intra-op pool size as onnxruntime-genai's session reports it (verbose log)."""
    config = json.loads((folder / "genai_config.json").read_text())
    config["model"]["decoder"]["session_options"] = {**session_options, "log_severity_level": 0}
    (folder / "genai_config.json").write_text(json.dumps(config))
    proc = _run(genai_python, "genai_generate.py", folder, "[[5, 6, 7]]", 1, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pools = re.findall(r"intra_op_param:OrtThreadPoolParams \{ thread_pool_size: (-?\d+)", proc.stdout + proc.stderr)
    assert pools, "no session options in genai's verbose log: " + (proc.stderr[-2000:] or proc.stdout[-2000:])
    return pools[0]


def test_genai_config_gives_onnxruntime_genai_every_core(genai_python, eco_export, tmp_path):
    """Without intra_op_num_threads genai 0.18 runs the model on one thread (half the decode
    speed on 2 cores); the written config asks for onnxruntime's default (0: one per core)."""
    path, _ = eco_export
    folder = tmp_path / "threads"
    shutil.copytree(path.parent, folder)
    written = json.loads((path.parent / "genai_config.json").read_text())["model"]["decoder"]["session_options"]
    assert written["intra_op_num_threads"] == 0
    assert _genai_intra_op_pool(genai_python, folder, written, tmp_path) == "0"
    without = {k: v for k, v in written.items() if k != "intra_op_num_threads"}
    assert _genai_intra_op_pool(genai_python, folder, without, tmp_path) == "1"
