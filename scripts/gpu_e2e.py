"""Exported models under ONNX Runtime's CUDA EP (run by scripts/gpu_check.sh when
onnxruntime-gpu is there; the models come from scripts/gpu_prepare.sh, made where the
exporter's dependencies are). For each model: which EP ran each GatedBlockSparseFFN node
(ORT's profile), prefill logits of a left-padded batch on the CUDA EP against the float32
model on the CPU EP, and greedy generation through DSMoESession (KV cache on the device)
against the CPU EP. Prints one line per model; exit 1 on a mismatch.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from dsmoe_runtime import DSMoESession

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
from dsmoe_export.testing.checks import run_checks  # noqa: E402

# float16 models are compared with themselves on the CPU EP (the op's function body there): a
# router score within float16 rounding of the threshold can flip a block on one side only, so
# the float16 bound is loose; float32 must match the CPU kernel closely, greedy tokens included.
TOL = {"float32": 1e-4, "float16": 5e-2}
CUDA_OPTIONS = {"use_tf32": "0"}
EP = "CUDAExecutionProvider"  # --ep cpu: a dry run of this script on a machine without a GPU


def op_providers(path: Path) -> set[str]:
    """Providers of the op's nodes, from one profiled prefill."""
    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path("/tmp") / path.stem)
    opts.log_severity_level = 3
    s = DSMoESession(path, providers=[EP, "CPUExecutionProvider"], session_options=opts,
                     provider_options=[CUDA_OPTIONS if EP != "CPUExecutionProvider" else {}, {}],
                     allow_dense=True)
    ids, mask = prompt(s, 4)
    s.forward(ids, mask, s.new_cache(ids.shape[0], ids.shape[1]), positions(s, mask))
    profile = Path(s.session.end_profiling())
    events = json.loads(profile.read_text())
    profile.unlink()  # a scratch file: each call (and the test's dry runs) would leave one in /tmp
    return {e["args"].get("provider", "?") for e in events
            if e.get("cat") == "Node" and e["args"].get("op_name") == "GatedBlockSparseFFN"}


def prompt(s: DSMoESession, seq: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, s.vocab_size, (2, seq))
    mask = np.ones_like(ids)
    mask[0, :2] = 0  # row 0 left-padded
    return ids, mask


def positions(s: DSMoESession, mask: np.ndarray, seq: int | None = None):
    """position_ids for graphs that take them (counted from each row's first token), else None."""
    if not s.has_position_ids:
        return None
    pos = np.clip(mask.cumsum(-1) - 1, 0, None)
    return pos[:, -(seq or mask.shape[1]):]


def check(path: Path, reference: Path) -> tuple[bool, str]:
    dtype = "float16" if "fp16" in path.name else "float32"
    dense = "dense" in path.name
    # TF32 (the CUDA EP's default for float32 MatMul) would perturb the attention enough to flip
    # routing decisions near the threshold: compare float32 with float32.
    gpu = DSMoESession(path, providers=[EP, "CPUExecutionProvider"], allow_dense=dense,
                       provider_options=[CUDA_OPTIONS if EP != "CPUExecutionProvider" else {}, {}])
    cpu = DSMoESession(reference, providers=["CPUExecutionProvider"], allow_dense=dense)
    if gpu.providers[0] != EP:
        return False, f"{path.name}: {EP} was not chosen ({gpu.providers})"
    eps = op_providers(path) if not dense else {"-"}
    ids, mask = prompt(cpu, 9)
    gpu_cache, cpu_cache = gpu.new_cache(2, 10), cpu.new_cache(2, 10)
    lg, _ = gpu.forward(ids, mask, gpu_cache, positions(gpu, mask))
    lc, _ = cpu.forward(ids, mask, cpu_cache, positions(cpu, mask))
    keep = mask.astype(bool)
    err = float(np.abs(lg.astype(np.float32) - lc)[keep].max() / max(1.0, np.abs(lc[keep]).max()))
    # One cached step on the device-resident KV cache.
    nxt = lc[:, -1].argmax(-1)[:, None]
    m2 = np.concatenate([mask, np.ones_like(nxt)], 1)
    lg2, _ = gpu.forward(nxt, m2, gpu_cache, positions(gpu, m2, 1))
    lc2, _ = cpu.forward(nxt, m2, cpu_cache, positions(cpu, m2, 1))
    err2 = float(np.abs(lg2.astype(np.float32) - lc2).max() / max(1.0, np.abs(lc2).max()))
    tg = gpu.generate(ids, 12, attention_mask=mask)
    tc = cpu.generate(ids, 12, attention_mask=mask)
    same = int((np.asarray(tg) == np.asarray(tc)).all(-1).sum())
    ok = err <= TOL[dtype] and err2 <= TOL[dtype] and (dense or eps == {EP})
    if dtype == "float32":
        ok = ok and same == len(tc)
    return ok, (f"{path.name}: op nodes on {sorted(eps)}; prefill max rel err {err:.2g}, cached step {err2:.2g} "
                f"(tol {TOL[dtype]}); greedy 12 tokens equal to the CPU EP in {same}/{len(tc)} rows")


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("models", type=Path, help="folder from scripts/gpu_prepare.sh")
    p.add_argument("--ep", choices=("cuda", "cpu"), default="cuda")
    args = p.parse_args(argv)
    global EP
    EP = "CPUExecutionProvider" if args.ep == "cpu" else "CUDAExecutionProvider"
    reference = {"sparse": args.models / "sparse.onnx", "dense": args.models / "dense.onnx"}

    def check_model(path: Path) -> tuple[bool, str]:
        return check(path, path if "fp16" in path.name else reference["dense" if "dense" in path.name else "sparse"])

    return run_checks(sorted(args.models.glob("*.onnx")), check_model, name=lambda path: path.name)


if __name__ == "__main__":
    sys.exit(main())
