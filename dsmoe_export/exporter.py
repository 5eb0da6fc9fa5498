"""Model folder -> ONNX: the sparse export (one custom op per FFN) or the dense baseline."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch

from . import gptq, onnx_op, quant, weight_formats
from .graph import GraphOptions, build_model, check_config, projected_ffn_applies
from .graph.schemas import register_ort_schemas
from .errors import ExportError
from .loader import load_model
from .validate import ValidationReport, validate_export

# onnx's protobuf limit: a single-file model must stay under 2 GiB.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**24


@dataclass
class ExportResult:
    path: Path
    sparse: bool
    num_layers: int
    size_bytes: int
    external_data: bool
    seconds: float
    validation: ValidationReport | None = None
    steps: list[tuple[str, float]] = field(default_factory=list)
    extra_files: list[str] = field(default_factory=list)  # copied or written beside the model


class _Steps:
    """One line per export step with its duration (stderr), when progress is on."""

    def __init__(self, enabled: bool):
        self.enabled, self.done = enabled, []

    @contextlib.contextmanager
    def __call__(self, what: str):
        t0 = time.perf_counter()
        if self.enabled:
            print(f"[dsmoe-export] {what} ...", end="", flush=True, file=sys.stderr)
        yield
        dt = time.perf_counter() - t0
        self.done.append((what, dt))
        if self.enabled:
            print(f" {dt:.1f}s", flush=True, file=sys.stderr)


# --dtype: the element type of weights, activations, KV cache and logits in the graph.
EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16}
# Validation tolerance floor of a float16 export (float16 ORT vs float16 PyTorch on the CPU:
# both round every op to 11 bits, in different orders).
FLOAT16_TOLERANCE = 3e-2
# MatMulNBits' accuracy_level by default, per target (as onnxruntime-genai's model builder):
# int8 activations on the CPU EP (float32 graphs), none on the CUDA EP (float16 graphs).
DEFAULT_ACCURACY_LEVEL = {"float32": 4, "float16": 0}


def _set_accuracy_level(model: onnx.ModelProto, level: int) -> bool:
    """Set the accuracy_level of every MatMulNBits node and int4 / int8 sparse op to `level`;
    whether any had another one."""
    changed = False
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" and node.op_type not in quant.FORMAT_OF_OP:
            continue
        for attr in node.attribute:
            if attr.name == "accuracy_level" and attr.i != level:
                attr.i, changed = level, True
    return changed


def _payload_bytes(model: onnx.ModelProto) -> int:
    """Serialized size of the model, about. Summed per part: `model.ByteSize()` itself raises
    EncodeError above 2 GiB, the very case this must detect (each part stays below: a single
    tensor over 2 GiB cannot be held in a TensorProto at all)."""
    graph = model.graph
    return (sum(len(t.raw_data) if t.raw_data else t.ByteSize() for t in graph.initializer)
            + sum(n.ByteSize() for n in graph.node) + sum(f.ByteSize() for f in model.functions))


@contextlib.contextmanager
def staged_output(out: Path):
    """Yield a path in a temp folder beside `out`; on success move it (and its
    `.data` file) over `out`. On any error or interrupt nothing is left behind and
    an existing `out` stays untouched."""
    out = out.resolve()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        staged = tmp / out.name
        yield staged
        data = tmp / (out.name + ".data")
        if data.exists():
            os.replace(data, out.parent / data.name)
        os.replace(staged, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_model(model: onnx.ModelProto, path: Path, *, external_data: bool | None = None) -> bool:
    """Save and check; external data (`NAME.data`) when asked or above the 2 GiB protobuf limit."""
    if external_data is None:
        external_data = _payload_bytes(model) > EXTERNAL_DATA_THRESHOLD
    if external_data:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    register_ort_schemas()
    onnx.checker.check_model(str(path), full_check=False)
    return external_data


def _check_output_path(out: Path) -> None:
    parent = out.resolve().parent
    if out.is_dir():
        raise ExportError("is a directory (expected a file name such as model.onnx)", file=out)
    if not parent.is_dir():
        raise ExportError("parent folder does not exist", file=out)
    if not os.access(parent, os.W_OK):
        raise ExportError("cannot write there (permission denied)", file=out)


DOWN_LAYOUT_CHOICES = ("auto", *onnx_op.DOWN_LAYOUTS)
GATE_UP_LAYOUT_CHOICES = ("auto", *onnx_op.GATE_UP_LAYOUTS)
FFN_NODE_CHOICES = ("auto", "projected", "plain")
# "auto" stores the column tiles from this hidden size on. Below it the rows layout decodes
# faster and prefills as fast (converted SmolLM2, d = 576, end to end: decode 0.94-0.97 of the
# tiles' time, prefill 1.00-1.03). From d = 2048 the tiles' prefill gain (5-11 %) stays and
# their decode cost does not show end to end (random d = 2048 model: decode 1.00-1.04, though
# the op alone, caches flushed per call, decodes 12-17 % faster in rows on AMD). op-spec.md.
AUTO_TILED_MIN_HIDDEN = 2048


def choose_down_layout(layout: str, hidden_size: int, dtype: str = "float32") -> str:
    """The layout `layout` names: itself, or for "auto" the one that suits `hidden_size` and
    `dtype`. float16 graphs are for the CUDA EP, whose CUTLASS grouped GEMMs (Hopper) read the
    rows layout only (the tiles are a CPU cache layout): rows there at every size."""
    if layout != "auto":
        return layout
    if dtype != "float32":
        return "rows"
    return "tiled" if hidden_size >= AUTO_TILED_MIN_HIDDEN else "rows"


def choose_gate_up_layout(layout: str, dtype: str = "float32") -> str:
    """The gate/up layout `layout` names: itself, or for "auto" slabs in float32 graphs (the CPU
    kernel's prefill reads them in place: cpu-kernel-notes #40) and rows in float16 graphs (the
    CUDA EP's kernels read rows only)."""
    if layout != "auto":
        return layout
    return "slabs" if dtype == "float32" else "rows"


def export(model_dir: str | Path, out: str | Path, *, dense: bool = False, validate: bool = True,
           tolerance: float = 1e-3, external_data: bool | None = None, progress: bool = True,
           active_outputs: bool = False, copy_tokenizer: bool = True, hf_config: bool = False,
           genai: bool = False, dtype: str = "float32", ffn_weights: str = "float32",
           matmul_weights: str | None = None, group_size: int = 32, down_layout: str = "auto",
           gate_up_layout: str = "auto",
           accuracy_level: int | None = None, lm_head_weights: str | None = None,
           calibration_text: str | Path | None = None, calibration_tokens: int = 2048,
           ffn_node: str = "auto") -> ExportResult:
    """Export the folder's causal LM with a KV cache to `out` (docs/exporting.md).

    Beside `out` (only when that is not the model folder itself): the tokenizer files and
    generation_config.json found in the model folder (`copy_tokenizer`), config.json
    (`hf_config`, for optimum's ORTModelForCausalLM), genai_config.json (`genai`, for
    onnxruntime-genai; see docs/runtime.md).

    `dtype` "float16" exports weights, activations, the KV cache and logits in float16 (for
    the CUDA EP; docs/cuda.md). Validation then runs ONNX Runtime's CPU EP on the float16
    graph (the op's function body: the library has no float16 CPU kernel) against the
    float16 PyTorch model, and `tolerance` is at least FLOAT16_TOLERANCE.

    `ffn_weights` (float32, float16, int8, int4) stores the FFN weights weight-only quantized
    (sparse: the GatedBlockSparseFFN{F16,Int8,Int4} ops; dense: MatMulNBits / float16 + Cast),
    `matmul_weights` (default: as `ffn_weights`) attention's MatMuls, `lm_head_weights` (default:
    as `matmul_weights`) the lm_head and the embedding table, all block-wise with `group_size`
    (docs/op-spec.md "Quantized variants").
    Each weight is quantized once, to the nearest level, or with `calibration_text` (a text file,
    tokenized with the model folder's tokenizer; its first `calibration_tokens` tokens) by GPTQ
    (gptq.py: rounding that minimizes each weight's output error on that text). Validation runs
    against the PyTorch model holding the values the graph holds. `accuracy_level` is MatMulNBits' (default: 4 for float32 graphs, the CPU EP;
    0 for float16 graphs, the CUDA EP).

    `down_layout` is the sparse op's down_weight layout (op-spec.md, attribute down_tile):
    "tiled" ([n, ceil(d / 64), B, 64] column tiles, read in place by the CPU kernel's prefill),
    "rows" ([n, B, d]) or "auto" (:func:`choose_down_layout`). `gate_up_layout` is its gate_weight
    and up_weight layout (attribute gate_up_tile): "slabs" ([n, ceil(B / 32), d, 32], k-major slabs
    of 32 rows, read in place by the CPU kernel; the CUDA kernel refuses them), "rows" or "auto"
    (:func:`choose_gate_up_layout`). The quantized FFN ops always store rows.

    `ffn_node`: "projected" replaces each layer's o_proj, the norms around its FFN, the FFN and
    the next layer's QKV projection with one ProjectedSparseFFN node (ProjectedSparseFFNInt4 for
    int4 weights; op-spec.md; every layer but the last): a float32 sparse graph with float32 or
    int4 FFN and attention weights and no projection biases, for the CPU EP (float32: decode
    0.90-0.97 of the plain graph's step on the converted SmolLM2 with idle workers asleep, but
    0.95-1.04 with onnxruntime's default spinning; int4 0.91-0.97 and 1.10-1.21); "plain" (and
    "auto", the default) keeps GatedBlockSparseFFN between ONNX Runtime's nodes."""
    accuracy_level, matmul_weights, lm_head_weights = _checked_options(
        out, dtype, down_layout, accuracy_level, ffn_weights, matmul_weights, lm_head_weights, group_size,
        gate_up_layout)
    if ffn_node not in FFN_NODE_CHOICES:
        raise ExportError(f"ffn_node must be one of {', '.join(FFN_NODE_CHOICES)}, got {ffn_node!r}", file=out)
    if dtype == "float16":
        tolerance = max(tolerance, FLOAT16_TOLERANCE)
    t0 = time.perf_counter()
    out = Path(out)
    _check_output_path(out)
    if active_outputs and dense:
        raise ExportError("--active-outputs needs the sparse export (a dense FFN has no active blocks)", file=out)
    steps = _Steps(progress)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = lambda names: tqdm(names, desc="[dsmoe-export] loading tensors", unit="tensor", leave=False, disable=None)  # noqa: E731
    model, cfg = load_model(model_dir, sparse=not dense, progress=bar, dtype=EXPORT_DTYPES[dtype])
    check_config(cfg, Path(model_dir) / "config.json")
    weight_formats.check_shapes(cfg, ffn_weights=ffn_weights, sparse=not dense, file=model_dir)
    options = GraphOptions(sparse=not dense, ffn_weights=ffn_weights, matmul_weights=matmul_weights,
                           lm_head_weights=lm_head_weights,
                           group_size=group_size, accuracy_level=accuracy_level,
                           down_tile=onnx_op.DOWN_LAYOUTS[choose_down_layout(down_layout, cfg.hidden_size, dtype)],
                           gate_up_tile=onnx_op.GATE_UP_LAYOUTS[choose_gate_up_layout(gate_up_layout, dtype)],
                           active_outputs=active_outputs)
    why_not = projected_ffn_applies(model, options)
    if ffn_node == "projected" and why_not:
        raise ExportError(f"--ffn-node projected: not for this export: {why_not}", file=out)
    # auto is plain: the projected node decodes faster where idle workers sleep, slower with
    # onnxruntime's default spinning, which one app's session keeps on (exporting.md).
    options = dataclasses.replace(options, projected_ffn=ffn_node == "projected" and why_not is None)
    if calibration_text is not None and any(f in ("int8", "int4") for f in (ffn_weights, matmul_weights,
                                                                            lm_head_weights)):
        with steps(f"collecting calibration inputs ({calibration_tokens} tokens of {Path(calibration_text).name})"):
            hessians = gptq.collect(model, calibration_ids(model_dir, calibration_text, calibration_tokens))
        options = dataclasses.replace(options, hessians=hessians)
    what = "" if ffn_weights == matmul_weights == lm_head_weights == "float32" else \
        f" (weights: FFN {ffn_weights}, attention {matmul_weights}, lm_head {lm_head_weights}, group {group_size})"
    with steps(f"building the ONNX graph{what}"):
        graph = [build_model(model, options)]  # handed over: the graph's weights are freed once written
    used_external, report = _write_validated(graph, model, out, steps, external_data=external_data,
                                             validate=validate, tolerance=tolerance, progress=progress)
    size = out.stat().st_size + ((out.parent / (out.name + ".data")).stat().st_size if used_external else 0)
    extras = copy_side_files(model_dir, out, tokenizer=copy_tokenizer, hf_config=hf_config)
    if genai:
        from dsmoe_runtime.genai import write_genai_config

        extras += write_genai_config(out, model_dir=model_dir)
    return ExportResult(path=out, sparse=not dense, num_layers=cfg.num_hidden_layers, size_bytes=size,
                        external_data=used_external, seconds=time.perf_counter() - t0, validation=report,
                        steps=steps.done, extra_files=extras)


def _checked_options(out, dtype, down_layout, accuracy_level, ffn_weights, matmul_weights, lm_head_weights,
                     group_size, gate_up_layout="auto"):
    """Option errors before anything is loaded; the accuracy level and the weight formats resolved."""
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}", file=out)
    if down_layout not in DOWN_LAYOUT_CHOICES:
        raise ExportError(f"down_layout must be one of {', '.join(DOWN_LAYOUT_CHOICES)}, got {down_layout!r}", file=out)
    if gate_up_layout not in GATE_UP_LAYOUT_CHOICES:
        raise ExportError(f"gate_up_layout must be one of {', '.join(GATE_UP_LAYOUT_CHOICES)}, "
                          f"got {gate_up_layout!r}", file=out)
    if gate_up_layout == "slabs" and dtype != "float32":
        raise ExportError("--gate-up-layout slabs is for float32 graphs (the CPU kernel's layout); "
                          f"--dtype {dtype} graphs are for the CUDA EP, whose kernel reads rows", file=out)
    if accuracy_level is None:
        accuracy_level = DEFAULT_ACCURACY_LEVEL[dtype]
    if isinstance(accuracy_level, bool) or accuracy_level not in range(5):
        raise ExportError(f"--int4-accuracy-level must be 0, 1, 2, 3 or 4, got {accuracy_level!r}", file=out)
    matmul_weights = ffn_weights if matmul_weights in (None, "same") else matmul_weights
    lm_head_weights = matmul_weights if lm_head_weights in (None, "same") else lm_head_weights
    # Always: a bad --group-size is an error even when nothing is quantized.
    weight_formats.check_formats(ffn_weights, matmul_weights, group_size, dtype=dtype, lm_head_weights=lm_head_weights)
    return accuracy_level, matmul_weights, lm_head_weights


def _write_validated(graph: list, model, out: Path, steps, *, external_data, validate: bool, tolerance: float,
                     progress: bool):
    """Writes the model proto in `graph` (a one-item list, emptied here so that its weights are
    freed before validation) to `out` through a staging file that replaces `out` only once
    validation passed (staged_output); returns (external data used, the validation report or None)."""
    proto = graph.pop()
    report = None
    with staged_output(out) as staged:
        with steps(f"writing {out}"):
            used_external = save_model(proto, staged, external_data=external_data)
        exact = None
        if validate and _set_accuracy_level(proto, 0):
            # MatMulNBits with int8 activations (accuracy_level > 0) differs from any float reference
            # by their rounding: the graph and its weights are checked exactly on a copy at level 0,
            # and the file as written is measured (reported, not a failure).
            exact = staged.parent / f"exact.{staged.name}"
            save_model(proto, exact, external_data=used_external)
        del proto
        if validate:
            with steps("validating in ONNX Runtime against the PyTorch reference"):
                report = validate_export(model, exact or staged)
                if exact is not None:
                    report.as_written = validate_export(model, staged)
            if progress:
                print(f"[dsmoe-export] {report.summary()}", file=sys.stderr)
            if not report.max_rel_error <= tolerance:
                raise ExportError(f"validation failed: {report.summary()} exceeds tolerance {tolerance:g}; "
                                  "nothing written (--no-validate skips the check)", file=out)
    return used_external, report


def calibration_ids(model_dir: str | Path, text: str | Path, count: int):
    """The first `count` token ids of a text file under the model folder's tokenizer."""
    import numpy as np

    from dsmoe_runtime import load_tokenizer

    path = Path(text)
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ExportError(f"cannot read it as UTF-8 text ({e})", file=path) from None
    tokenizer = load_tokenizer(model_dir)
    if tokenizer is None:
        raise ExportError("no tokenizer files (tokenizer.json or tokenizer.model), needed by --calibration-text",
                          file=model_dir)
    ids = tokenizer.encode(content[: 16 * count])
    if len(ids) < min(count, 64):
        raise ExportError(f"{len(ids)} tokens: too short for calibration (expected at least 64)", file=path)
    return np.asarray(ids[:count], np.int64)


# Files an app needs next to the model to turn text into ids and back (whichever the folder has).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


def copy_side_files(model_dir: str | Path, out: Path, *, tokenizer: bool = True, hf_config: bool = False) -> list[str]:
    """Copy the model folder's tokenizer files (and config.json with `hf_config`) beside `out`;
    returns the names copied. Nothing is copied when `out` lies in the model folder itself."""
    src, dst = Path(model_dir).resolve(), out.resolve().parent
    if src == dst:
        return []
    return copy_files(src, dst, (TOKENIZER_FILES if tokenizer else ()) + (("config.json",) if hf_config else ()))


def copy_files(src: Path, dst: Path, names) -> list[str]:
    """Copy those of `names` that exist in folder `src` into folder `dst`; returns the names copied."""
    copied = []
    for name in names:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied
