"""The CPU kernels built for 64-bit ARM (their NEON baseline), run inside ONNX Runtime's own aarch64
build under qemu's user-mode emulator, against the float64 reference: the same cases and checks
as the x86 tests, on the instruction set this machine cannot run natively; and whole exports
(sparse, projected, int4, dense) against this machine's ONNX Runtime.

Needs qemu-aarch64-static, the aarch64 cross compilers, `unshare` with mount rights and PyPI (ONNX
Runtime's aarch64 wheel, the version this venv runs); skipped otherwise. `bash scripts/arm_check.sh`
installs the Debian packages and runs this file. Emulation checks results, not speed.
"""
from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from dsmoe_export import quant
from dsmoe_export.testing.cases import make_case
from op_graph import assert_matches_reference, make_model
from test_op_quant import _Ref, make_model as make_quant_model, quant_inputs, reference as quant_reference

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("qemu-aarch64-static", "aarch64-linux-gnu-gcc", "aarch64-linux-gnu-g++", "unshare", "cmake")
SYSROOT = "/usr/aarch64-linux-gnu"
# ONNX Runtime's cpuinfo reads the host's (x86) cache topology from sysfs and crashes on it under
# the emulator: each cache folder is hidden behind an empty tmpfs in a mount namespace of its own.
HIDE_CACHES = "for c in /sys/devices/system/cpu/cpu*/cache; do mount -t tmpfs none \"$c\" || exit 97; done; "


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def arm(tmp_path_factory):
    """(run(model, feeds, threads) -> (exit code, outputs, stderr)) for the aarch64 build."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"no {', '.join(missing)} (bash scripts/arm_check.sh installs them)")
    if _run(["unshare", "-m", "sh", "-c", HIDE_CACHES + "true"]).returncode != 0:
        pytest.skip("unshare -m cannot mount here (needs root or user namespaces)")
    work = tmp_path_factory.mktemp("arm")
    got = _run([sys.executable, "-m", "pip", "download", f"onnxruntime=={ort.__version__.split('+')[0]}",
                "--platform", "manylinux_2_28_aarch64", "--only-binary=:all:", "--no-deps", "-q", "-d", str(work)])
    wheels = list(work.glob("onnxruntime-*.whl"))
    if got.returncode != 0 or not wheels:
        pytest.skip(f"ONNX Runtime's aarch64 wheel is not available: {got.stderr.strip()[-300:]}")
    lib = work / "ort"
    lib.mkdir()
    with zipfile.ZipFile(wheels[0]) as wheel:
        name = next(n for n in wheel.namelist() if "/capi/libonnxruntime.so." in n)
        (lib / "libonnxruntime.so.1").write_bytes(wheel.read(name))
    (lib / "libonnxruntime.so").symlink_to("libonnxruntime.so.1")

    build = work / "build"
    configure = _run(["cmake", "-S", str(ROOT), "-B", str(build), "-DDSMOE_WITH_CUDA=OFF", "-DCMAKE_BUILD_TYPE=Release",
                      "-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64",
                      "-DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc", "-DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++"])
    assert configure.returncode == 0, configure.stdout + configure.stderr
    built = _run(["cmake", "--build", str(build), "-j2"])
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    library = build / "libdsmoe_ops.so"
    # The headers the library was built with (cmake/OrtHeaders.cmake found them) build the driver too.
    flags = (build / "CMakeFiles" / "dsmoe_ops.dir" / "flags.make").read_text()
    include = next(d for d in (p.removeprefix("-I") for p in flags.split())
                   if (Path(d) / "onnxruntime_c_api.h").is_file())
    driver = lib / "ort_run"
    compiled = _run(["aarch64-linux-gnu-g++", "-O1", "-std=c++17", "-I", include, str(ROOT / "tests/cross/ort_run.cc"),
                     "-L", str(lib), "-lonnxruntime", "-Wl,-rpath,$ORIGIN", "-o", str(driver)])
    assert compiled.returncode == 0, compiled.stderr
    counter = itertools.count()

    def run(model: onnx.ModelProto, feeds: dict, threads: int = 1):
        case_dir = work / f"case{next(counter)}"
        case_dir.mkdir()
        onnx.save(model, str(case_dir / "model.onnx"))
        for k, v in feeds.items():
            np.save(case_dir / f"in_{k}.npy", v)
        cmd = (HIDE_CACHES + f"QEMU_LD_PREFIX={SYSROOT} exec qemu-aarch64-static {driver} {library} "
               f"{case_dir / 'model.onnx'} {case_dir} {threads}")
        done = _run(["unshare", "-m", "sh", "-c", cmd], timeout=600)
        outputs = None
        if done.returncode == 0:
            outputs = [np.load(case_dir / f"out_{o.name}.npy") for o in model.graph.output]
        return done.returncode, outputs, done.stderr

    return run


# (lead, d, n, B): one token, the decode path's few tokens, prefills over several chunks and panels,
# zero tokens; B not a multiple of 32 (partial slabs), d not of 64 (partial column tiles) nor of 16.
SHAPES = [((1,), 64, 4, 64), ((5,), 96, 8, 48), ((2, 17), 72, 4, 40), ((70,), 64, 8, 96), ((0,), 64, 4, 32),
          ((20,), 320, 4, 40)]  # d = 320: the slabs' k in three slices
LAYOUTS = [dict(), dict(gate_up_tile=32), dict(down_tile=64), dict(gate_up_tile=32, down_tile=64)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda a: "-".join(f"{k}{v}" for k, v in a.items()) or "rows")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-d{s[1]}-n{s[2]}-B{s[3]}")
def test_float32_kernel_on_aarch64(arm, rng, shape, layout):
    lead, d, n, B = shape
    case = make_case(rng, lead, d, n, B, bias=bool(rng.integers(2)), **layout)
    code, out, err = arm(make_model(case, with_function=False), case.feeds(), threads=2)
    assert code == 0, err
    assert_matches_reference(case, out)


@pytest.mark.parametrize("attrs", [dict(activation="gelu", threshold=0.3), dict(weighting="binary", rescale=False)],
                         ids=["gelu", "binary"])
def test_float32_kernel_attributes_on_aarch64(arm, rng, attrs):
    case = make_case(rng, (9,), 64, 8, 32, **attrs)
    code, out, err = arm(make_model(case, with_function=False), case.feeds())
    assert code == 0, err
    assert_matches_reference(case, out)


@pytest.mark.parametrize("fmt", ["int4", "int8", "float16"])
@pytest.mark.parametrize("shape", [((1,), 64, 4, 64, 32), ((2, 3), 96, 8, 48, 64), ((19,), 128, 4, 40, 32)],
                         ids=lambda s: f"{s[0]}-d{s[1]}-n{s[2]}-B{s[3]}-g{s[4]}")
def test_quantized_kernels_on_aarch64(arm, rng, fmt, shape):
    lead, d, n, B, group = shape
    case = make_case(rng, lead, d, n, B, bias=bool(rng.integers(2)))
    feeds = quant_inputs(case, fmt, group)
    code, out, err = arm(make_quant_model(case, feeds, fmt, group, with_function=False), feeds, threads=2)
    assert code == 0, err
    assert_matches_reference(_Ref(quant_reference(case, feeds, fmt, group)), out)


def test_bad_shape_is_an_error_not_a_crash_on_aarch64(arm, rng):
    case = make_case(rng, (3,), 64, 4, 32)
    feeds = case.feeds()
    feeds["gate_weight"] = feeds["gate_weight"][:, :, :48].copy()  # d = 48, X has 64
    code, out, err = arm(make_model(case, with_function=False), feeds)
    assert code == 2 and "gate_weight" in err, err


@pytest.mark.parametrize("variant", ["sparse", "projected", "int4", "int4-projected", "dense"])
def test_exported_model_on_aarch64(arm, tmp_path, variant):
    """A whole export (GroupQueryAttention, the norms, MatMulNBits, the op) in ONNX Runtime's aarch64
    build: the logits of the exporter's own validation prompt (a left-padded batch), against this
    machine's ONNX Runtime on the same file (which the export validated against PyTorch). int4 at
    accuracy_level 0: the int8-activation kernels of the two CPUs round differently."""
    from dsmoe_export.exporter import export
    from dsmoe_export.graph import interface
    from dsmoe_export.synthetic import TinySpec, make_model_folder
    from dsmoe_export.validate import make_session, prompt_inputs

    spec = TinySpec()
    folder = make_model_folder(tmp_path / "model", spec, seed=7, router_scale=2.0)
    options = dict(dense=variant == "dense", ffn_node="projected" if variant.endswith("projected") else "auto")
    if variant.startswith("int4"):
        options.update(ffn_weights="int4", matmul_weights="int4", accuracy_level=0)
    path = tmp_path / "model.onnx"
    export(folder, path, progress=False, copy_tokenizer=False, **options)
    ids, mask, _ = prompt_inputs(spec.vocab_size, seed=0)
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    head = spec.hidden_size // spec.num_attention_heads
    for name in interface.past_names(spec.num_hidden_layers):
        feeds[name] = np.zeros((2, spec.num_key_value_heads, 0, head), np.float32)
    want = make_session(path, custom_ops=variant != "dense").run(None, feeds)
    code, got, err = arm(onnx.load(str(path)), feeds, threads=2)
    assert code == 0, err
    valid = mask.bool().numpy()
    logits, want_logits = got[0][valid], want[0][valid]
    assert np.abs(logits - want_logits).max() <= 1e-4 * max(1.0, np.abs(want_logits).max())
    for g, w in zip(got[1:], want[1:]):  # presents, at the valid positions
        g, w = g.transpose(0, 2, 1, 3)[valid], w.transpose(0, 2, 1, 3)[valid]
        assert np.abs(g - w).max() <= 1e-4 * max(1.0, np.abs(w).max())
