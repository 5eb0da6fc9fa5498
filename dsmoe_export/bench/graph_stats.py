"""Node counts of a model as ONNX Runtime runs it: after its graph optimizations (ORT_ENABLE_ALL,
the CPU EP), written out and counted per decoder layer (node names carry `layers.{i}/` or
`layers/{i}/`, as both this exporter and onnxruntime-genai's model builder name them)."""
from __future__ import annotations

import re
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

_LAYER = re.compile(r"layers[./](\d+)/")


def node_counts(path: Path, num_layers: int, library: str | None = None) -> dict:
    """{"total": nodes after optimization, "per_layer": median over the decoder layers,
    "op_types_per_layer": the op types of layer 1 (the first with a residual from a previous layer)}."""
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if library:
            opts.register_custom_ops_library(library)
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        graph = onnx.load(opts.optimized_model_filepath, load_external_data=False).graph
    layers: dict[int, list[str]] = {}
    for node in graph.node:
        m = _LAYER.search(node.name)
        if m and int(m.group(1)) < num_layers:
            layers.setdefault(int(m.group(1)), []).append(node.op_type)
    counts = [len(layers.get(i, [])) for i in range(num_layers)]
    return {"total": len(graph.node), "per_layer": statistics.median(counts) if counts else 0,
            "op_types_per_layer": layers.get(min(1, num_layers - 1), [])}


# Nodes that read a row of a table, not all of it, a step: the embedding lookup (and the transpose
# or reshape of its table, which ONNX Runtime folds into a constant at load time), and attention's
# rotary cos/sin caches (a row per position).
_LOOKUPS = {"Gather", "GatherBlockQuantized", "Transpose", "Reshape", "GroupQueryAttention"}


def weight_bytes_by_part(path: Path, part_of) -> dict[str, int]:
    """{part: bytes of the initializers its nodes read whole}, parts by part_of(node name)
    (node_times.node_part): what a one-token step streams, per part. An initializer read by
    several parts counts in each; lookups (the embedding) count nothing."""
    graph = onnx.load(str(path), load_external_data=False).graph
    size = {t.name: int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            for t in graph.initializer}
    seen: dict[str, set[str]] = {}
    for node in graph.node:
        if node.op_type in _LOOKUPS:
            continue
        seen.setdefault(part_of(node.name), set()).update(i for i in node.input if i in size)
    return {part: sum(size[i] for i in names) for part, names in seen.items()}
