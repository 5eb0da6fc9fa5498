"""Post-processing of the traced ONNX model: names, axes, IR version, metadata.

The dynamo exporter leaves build-machine details in the graph (stack traces
with absolute paths in node metadata), prefixes initializer names with the
wrapper's attribute, and names derived axes after internal symbols; this
module turns its output into the published interface.
"""
from __future__ import annotations

import json
import re

import onnx

from . import onnx_io

# onnxruntime >= 1.20 loads IR 10 (opset 21); onnx >= 1.18 writes newer IRs by default.
IR_VERSION = 10
OPSET = 21

_PACKED = re.compile(r"^(model\.layers\.\d+\.mlp)\.packed\.([012])$")
_PACKED_NAMES = ("gate_blocks", "up_blocks", "down_blocks")


def _initializer_name(name: str) -> str:
    if name.startswith("m."):
        name = name[2:]
    m = _PACKED.match(name)
    return f"{m.group(1)}.{_PACKED_NAMES[int(m.group(2))]}" if m else name


def _rename_values(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    for init in graph.initializer:
        init.name = mapping.get(init.name, init.name)
    for node in graph.node:
        node.input[:] = [mapping.get(x, x) for x in node.input]
        node.output[:] = [mapping.get(x, x) for x in node.output]
    for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
        vi.name = mapping.get(vi.name, vi.name)


def _rename_dims(graph: onnx.GraphProto, num_layers: int) -> None:
    mask = next(i for i in graph.input if i.name == "attention_mask")
    old = mask.type.tensor_type.shape.dim[1].dim_param
    present = set(onnx_io.present_names(num_layers))
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        for axis, dim in enumerate(vi.type.tensor_type.shape.dim):
            if (old and dim.dim_param == old) or (vi.name in present and axis == 2):
                dim.dim_param = onnx_io.TOTAL


def _strip(model: onnx.ModelProto) -> None:
    del model.metadata_props[:]
    model.doc_string = ""
    model.graph.doc_string = ""
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for vi in model.graph.value_info:
        del vi.metadata_props[:]


def finalize(model: onnx.ModelProto, *, num_layers: int, metadata: dict[str, object]) -> onnx.ModelProto:
    """Clean names and metadata in place; the returned model is what gets saved."""
    _strip(model)
    _rename_values(model.graph, {i.name: _initializer_name(i.name) for i in model.graph.initializer})
    _rename_dims(model.graph, num_layers)
    model.ir_version = IR_VERSION
    model.producer_name = "dsmoe-export"
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value)
    return model


ACTIVE_PREFIX = "active."
_ROUTER = re.compile(r"^model\.layers\.(\d+)\.mlp\.router\.weight$")


def active_output_names(num_layers: int) -> list[str]:
    return [f"{ACTIVE_PREFIX}{i}" for i in range(num_layers)]


def expose_active_outputs(model: onnx.ModelProto, *, num_layers: int, num_experts: int) -> None:
    """Route every FFN node's optional `active` output ([batch, seq, n] bool, op-spec.md) to a
    graph output `active.{layer}`, after logits and the presents. The layer comes from the
    node's router initializer, not from node order."""
    from . import onnx_op

    seen = {}
    for node in model.graph.node:
        if node.domain != onnx_op.DOMAIN or node.op_type != onnx_op.OP_TYPE:
            continue
        m = _ROUTER.match(node.input[1]) if len(node.input) > 1 else None
        if m is None:
            raise ValueError(f"FFN node {node.name}: cannot tell its layer from input {list(node.input)[1:2]}")
        layer = int(m.group(1))
        while len(node.output) < 2:
            node.output.append("")
        node.output[1] = f"{ACTIVE_PREFIX}{layer}"
        seen[layer] = node
    if sorted(seen) != list(range(num_layers)):
        raise ValueError(f"expected one FFN node per layer 0..{num_layers - 1}, found layers {sorted(seen)}")
    for name in active_output_names(num_layers):
        model.graph.output.append(onnx.helper.make_tensor_value_info(
            name, onnx.TensorProto.BOOL, [onnx_io.BATCH, onnx_io.SEQ, num_experts]))
