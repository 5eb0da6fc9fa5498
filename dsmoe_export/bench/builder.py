"""onnxruntime-genai's model builder: the dense model users run today, built from the same weights.

The builder and onnxruntime-genai's generator live in a side environment (they pull the CPU
`onnxruntime` package, which clashes with onnxruntime-gpu, and the builder needs `onnx_ir`):
`bash scripts/setup-ecosystem.sh genai` makes `.venv-genai`. The builder's models are plain ONNX
that this process's onnxruntime runs side by side with ours; only the building and the genai
generator run in the side interpreter (the generator as a worker process: workers.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ENV_VAR = "DSMOE_GENAI_PYTHON"
DEFAULT_VENV = Path(".venv-genai")
PRECISIONS = {"fp32": "fp32", "int4": "int4"}
_PROBE = "import onnxruntime_genai, onnx_ir, onnxruntime_genai.models.builder"


def find_python(explicit: str | None = None) -> tuple[str | None, str]:
    """(interpreter, "") where the builder and the generator import, else (None, why not)."""
    exe = "Scripts/python.exe" if os.name == "nt" else "bin/python"
    # The side venv in the working directory, or beside this interpreter's venv (the repository
    # root when both venvs live there, as scripts/setup-ecosystem.sh makes them).
    candidates = [explicit] if explicit else list(dict.fromkeys(filter(None, [
        os.environ.get(ENV_VAR), str(DEFAULT_VENV / exe), str(Path(sys.prefix).parent / DEFAULT_VENV / exe)])))
    tried = []
    for python in candidates:
        if not Path(python).is_file():
            tried.append(f"{python}: no such file")
            continue
        probe = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=300)
        if probe.returncode == 0:
            return str(Path(python).absolute()), ""
        tried.append(f"{python}: {(probe.stderr.strip().splitlines() or ['import failed'])[-1]}")
    return None, ("onnxruntime-genai's model builder is not available (run `bash scripts/setup-ecosystem.sh genai` "
                  f"or set {ENV_VAR}): " + "; ".join(tried or ["no interpreter given"]))


def build(python: str, model_dir: Path, out: Path, precision: str, *, threads: int | None = None) -> Path:
    """The builder's model of `model_dir` at `precision` (fp32 or int4, CPU EP, its defaults: int4 is
    asymmetric, block 32, accuracy_level 4) in folder `out`; returns its model.onnx. The model folder
    needs a tokenizer (the builder copies it). `threads` goes into its genai_config.json."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    out.mkdir(parents=True, exist_ok=True)
    cmd = [python, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(out),
           "-p", PRECISIONS[precision], "-e", "cpu", "-c", str(out / "cache")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env)
    model = out / "model.onnx"
    if proc.returncode != 0 or not model.is_file():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"the model builder failed on {model_dir} ({precision}): {tail}")
    if threads:
        set_threads(out, threads)
    return model


def set_threads(folder: Path, threads: int) -> None:
    """genai_config.json's session options: `threads` intra-op threads (spinning as ORT's default)."""
    path = folder / "genai_config.json"
    config = json.loads(path.read_text())
    config["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = int(threads)
    path.write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":  # python -m dsmoe_export.bench.builder: is the builder available here?
    found, why = find_python(sys.argv[1] if len(sys.argv) > 1 else None)
    print(found or why)
    sys.exit(0 if found else 1)
