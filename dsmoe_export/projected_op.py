"""The ONNX side of ``org.dsmoe::ProjectedSparseFFN`` (docs/op-spec.md "ProjectedSparseFFN"):
what a LLaMA-style decoder layer computes between two attention nodes, as one node

    S  = A . in_proj_weight^T + skip          X = RMSNorm(S) * norm_weight
    S2 = GatedBlockSparseFFN(X) + S           Y = (RMSNorm(S2) * out_norm_weight) . out_proj_weight^T

(A: the attention's output, in_proj_weight its o_proj, out_proj_weight the next layer's packed
Q, K, V projection; outputs Y, skip_out = S2 and the optional `active`), and its int4 form
``ProjectedSparseFFNInt4``: the projections in MatMulNBits' int4 layout (the bytes and scales an
int4 export's MatMulNBits nodes hold), the FFN's blocks as GatedBlockSparseFFNInt4's.

- :func:`make_node` builds the node;
- :func:`function_proto` / :func:`add_function_to_model` give a model the op's model-local
  function: standard ops around a GatedBlockSparseFFN node (whose own function or kernel runs
  it), for runtimes without the op library.
"""
from __future__ import annotations

import math

import onnx
from onnx import TensorProto, helper

from . import onnx_op, quant

OP_TYPE = "ProjectedSparseFFN"
INPUTS = ("A", "skip", "in_proj_weight", "norm_weight", "router_weight", "gate_weight", "up_weight", "down_weight",
          "out_norm_weight", "out_proj_weight", "router_bias")
OUTPUTS = ("Y", "skip_out", "active")
INT4_OP_TYPE = "ProjectedSparseFFNInt4"
INT4_INPUTS = ("A", "skip", "in_proj_weight", "in_proj_scales", "norm_weight", "router_weight", "gate_weight",
               "gate_scales", "up_weight", "up_scales", "down_weight", "down_scales", "out_norm_weight",
               "out_proj_weight", "out_proj_scales", "router_bias")
_FFN_ATTRS = (("num_experts", onnx.AttributeProto.INT), ("threshold", onnx.AttributeProto.FLOAT),
              ("rescale", onnx.AttributeProto.INT), ("weighting", onnx.AttributeProto.STRING),
              ("activation", onnx.AttributeProto.STRING), ("down_tile", onnx.AttributeProto.INT),
              ("gate_up_tile", onnx.AttributeProto.INT))


def make_node(inputs: list[str], outputs: list[str], *, num_experts: int, epsilon: float, threshold: float = 0.5,
              rescale: bool = True, weighting: str = "score", activation: str = "silu", down_tile: int = 0,
              gate_up_tile: int = 0, group_size: int | None = None, name: str | None = None) -> onnx.NodeProto:
    """The op's node: ProjectedSparseFFN, or with `group_size` ProjectedSparseFFNInt4. ``inputs``:
    those of INPUTS (INT4_INPUTS) before router_bias, then optionally router_bias; ``outputs``: Y,
    skip_out, optionally active (empty names mark absent optional ones)."""
    onnx_op._check_attributes(num_experts, threshold, rescale, weighting, activation, down_tile, gate_up_tile)
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a finite number > 0, got {epsilon!r}")
    names = INPUTS if group_size is None else INT4_INPUTS
    inputs = onnx_op._strip_trailing_empty(inputs)
    if not len(names) - 1 <= len(inputs) <= len(names) or not all(inputs[:len(names) - 1]):
        raise ValueError(f"inputs must name {names[:-1]} and optionally router_bias, got {inputs}")
    outputs = list(outputs) + [""] * (len(OUTPUTS) - len(outputs))
    if len(outputs) != len(OUTPUTS) or not all(outputs[:2]):
        raise ValueError(f"outputs must name Y, skip_out and optionally active, got {outputs}")
    attrs = dict(num_experts=int(num_experts), epsilon=float(epsilon), threshold=float(threshold),
                 rescale=int(bool(rescale)), weighting=weighting, activation=activation)
    if group_size is not None:
        if down_tile or gate_up_tile:
            raise ValueError("the int4 op keeps its blocks in rows (down_tile 0, gate_up_tile 0)")
        attrs["group_size"] = quant.check_group_size(group_size)
    else:
        attrs.update({k: int(v) for k, v in (("down_tile", down_tile), ("gate_up_tile", gate_up_tile)) if v})
    return helper.make_node(OP_TYPE if group_size is None else INT4_OP_TYPE, inputs, outputs, name=name,
                            domain=onnx_op.DOMAIN, **attrs)


def _rms_norm(b: "onnx_op._Body", s: str, weight: str, epsilon: str) -> str:
    mean = b.op("ReduceMean", b.op("Mul", s, s), b.const(-1, TensorProto.INT64, [1]), keepdims=1)
    return b.op("Mul", b.op("Div", s, b.op("Sqrt", b.op("Add", mean, epsilon))), weight)


def function_proto(opset: int) -> onnx.FunctionProto:
    """The op as a model-local function in ai.onnx ops of ``opset`` (>= 18: ReduceMean's axes input)
    around a GatedBlockSparseFFN node, float32."""
    if opset < onnx_op.MIN_FUNCTION_OPSET:
        raise ValueError(f"the {OP_TYPE} function body needs ai.onnx opset >= {onnx_op.MIN_FUNCTION_OPSET}, got {opset}")
    b = onnx_op._Body()
    eps = b.attr("value_float", "epsilon")
    s = b.op("Add", b.op("MatMul", "A", b.op("Transpose", "in_proj_weight")), "skip")
    x = _rms_norm(b, s, "norm_weight", eps)
    f = "_ffn_y"
    inner = helper.make_node(onnx_op.OP_TYPE, [x, "router_weight", "gate_weight", "up_weight", "down_weight",
                                                "router_bias"], [f, "active"], domain=onnx_op.DOMAIN)
    for attr, kind in _FFN_ATTRS:
        inner.attribute.append(onnx.AttributeProto(name=attr, ref_attr_name=attr, type=kind))
    b.nodes.append(inner)
    b.nodes.append(helper.make_node("Add", [f, s], ["skip_out"]))
    normed = _rms_norm(b, "skip_out", "out_norm_weight", eps)
    b.nodes.append(helper.make_node("MatMul", [normed, b.op("Transpose", "out_proj_weight")], ["Y"]))
    return helper.make_function(
        onnx_op.DOMAIN, OP_TYPE, list(INPUTS), list(OUTPUTS), b.nodes,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(onnx_op.DOMAIN, onnx_op.OP_VERSION)],
        attributes=["num_experts", "epsilon"],
        attribute_protos=[helper.make_attribute(k, v) for k, v in onnx_op._DEFAULTS.items()],
        doc_string=f"{onnx_op.DOMAIN}::{OP_TYPE} v{onnx_op.OP_VERSION} (docs/op-spec.md): projection, residual "
                   f"add and RMSNorm around {onnx_op.OP_TYPE}.")


def _matmul_nbits_weight(b: "onnx_op._Body", q: str, scales: str) -> str:
    """MatMulNBits' int4 B [R, K / G, G / 2] bytes and scales [R, K / G] as float32 [R, K]: byte j
    of a group holds values 2j (low nibble) and 2j + 1, each scale * (value - 8)."""
    i64, i32 = TensorProto.INT64, TensorProto.INT32
    qi = b.op("Cast", q, to=i32)
    sixteen = b.const(16, i32)
    high = b.op("Div", qi, sixteen)
    low = b.op("Sub", qi, b.op("Mul", high, sixteen))
    last = b.const(-1, i64, [1])
    pairs = b.op("Concat", b.op("Unsqueeze", low, last), b.op("Unsqueeze", high, last), axis=-1)  # [R, K/G, G/2, 2]
    groups = b.op("Shape", q, start=0, end=2)
    values = b.op("Reshape", b.op("Cast", pairs, to=TensorProto.FLOAT), b.op("Concat", groups, last, axis=0))
    scaled = b.op("Mul", b.op("Sub", values, b.const(8.0)), b.op("Unsqueeze", scales, last))   # [R, K/G, G]
    return b.op("Reshape", scaled, b.op("Concat", b.op("Shape", q, start=0, end=1), last, axis=0))


def int4_function_proto(opset: int) -> onnx.FunctionProto:
    """ProjectedSparseFFNInt4 as a model-local function: the projections dequantized in standard
    ops (float32, full size: a fallback), the FFN as a GatedBlockSparseFFNInt4 node."""
    if opset < onnx_op.MIN_FUNCTION_OPSET:
        raise ValueError(f"the {INT4_OP_TYPE} function body needs ai.onnx opset >= {onnx_op.MIN_FUNCTION_OPSET}, "
                         f"got {opset}")
    b = onnx_op._Body()
    eps = b.attr("value_float", "epsilon")
    w_in = _matmul_nbits_weight(b, "in_proj_weight", "in_proj_scales")
    s = b.op("Add", b.op("MatMul", "A", b.op("Transpose", w_in)), "skip")
    x = _rms_norm(b, s, "norm_weight", eps)
    f = "_ffn_y"
    inner = helper.make_node(quant.OP_TYPES["int4"], [x, "router_weight", "gate_weight", "gate_scales", "up_weight",
                                                     "up_scales", "down_weight", "down_scales", "router_bias"],
                             [f, "active"], domain=onnx_op.DOMAIN)
    for attr, kind in [a for a in _FFN_ATTRS if a[0] not in onnx_op.LAYOUT_ATTRIBUTES] + [("group_size", onnx.AttributeProto.INT)]:
        inner.attribute.append(onnx.AttributeProto(name=attr, ref_attr_name=attr, type=kind))
    b.nodes.append(inner)
    b.nodes.append(helper.make_node("Add", [f, s], ["skip_out"]))
    normed = _rms_norm(b, "skip_out", "out_norm_weight", eps)
    w_out = _matmul_nbits_weight(b, "out_proj_weight", "out_proj_scales")
    b.nodes.append(helper.make_node("MatMul", [normed, b.op("Transpose", w_out)], ["Y"]))
    return helper.make_function(
        onnx_op.DOMAIN, INT4_OP_TYPE, list(INT4_INPUTS), list(OUTPUTS), b.nodes,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(onnx_op.DOMAIN, onnx_op.OP_VERSION)],
        attributes=["num_experts", "epsilon", "group_size"],
        attribute_protos=[helper.make_attribute(k, v) for k, v in onnx_op._DEFAULTS.items()
                          if k not in onnx_op.LAYOUT_ATTRIBUTES],
        doc_string=f"{onnx_op.DOMAIN}::{INT4_OP_TYPE} v{onnx_op.OP_VERSION} (docs/op-spec.md): dequantized "
                   f"projections, residual adds and RMSNorms around {quant.OP_TYPES['int4']}.")


def _nodes(graph: onnx.GraphProto, op_type: str = OP_TYPE):
    for node in graph.node:
        if node.domain == onnx_op.DOMAIN and node.op_type == op_type:
            yield node
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                yield from _nodes(sub, op_type)


def add_function_to_model(model: onnx.ModelProto) -> None:
    """For the op types the model has: their functions (at the model's ai.onnx opset), and those of
    the FFN ops their bodies call. Idempotent."""
    used = [t for t in (OP_TYPE, INT4_OP_TYPE) if any(_nodes(model.graph, t))]
    if not used:
        return
    onnx_op.add_function_to_model(model)
    opset = onnx_op._ai_onnx_opset(model)
    functions = {OP_TYPE: function_proto, INT4_OP_TYPE: int4_function_proto}
    needed = [functions[t](opset) for t in used]
    if INT4_OP_TYPE in used:
        needed.append(quant.function_proto("int4", opset))
    names = {f.name for f in needed}
    kept = [f for f in model.functions if not (f.domain == onnx_op.DOMAIN and f.name in names)]
    del model.functions[:]
    model.functions.extend(kept + needed)
