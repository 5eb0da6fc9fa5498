"""The ONNX side of ``org.dsmoe::ProjectedSparseFFN`` (docs/op-spec.md "ProjectedSparseFFN"):
what a LLaMA-style decoder layer computes between two attention nodes, as one node

    S  = A . in_proj_weight^T + skip          X = RMSNorm(S) * norm_weight
    S2 = GatedBlockSparseFFN(X) + S           Y = (RMSNorm(S2) * out_norm_weight) . out_proj_weight^T

(A: the attention's output, in_proj_weight its o_proj, out_proj_weight the next layer's packed
Q, K, V projection; outputs Y, skip_out = S2 and the optional `active`).

- :func:`make_node` builds the node;
- :func:`function_proto` / :func:`add_function_to_model` give a model the op's model-local
  function: standard ops around a GatedBlockSparseFFN node (whose own function or kernel runs
  it), for runtimes without the op library.
"""
from __future__ import annotations

import math

import onnx
from onnx import TensorProto, helper

from . import onnx_op

OP_TYPE = "ProjectedSparseFFN"
INPUTS = ("A", "skip", "in_proj_weight", "norm_weight", "router_weight", "gate_weight", "up_weight", "down_weight",
          "out_norm_weight", "out_proj_weight", "router_bias")
OUTPUTS = ("Y", "skip_out", "active")
_FFN_ATTRS = (("num_experts", onnx.AttributeProto.INT), ("threshold", onnx.AttributeProto.FLOAT),
              ("rescale", onnx.AttributeProto.INT), ("weighting", onnx.AttributeProto.STRING),
              ("activation", onnx.AttributeProto.STRING), ("down_tile", onnx.AttributeProto.INT))


def make_node(inputs: list[str], outputs: list[str], *, num_experts: int, epsilon: float, threshold: float = 0.5,
              rescale: bool = True, weighting: str = "score", activation: str = "silu", down_tile: int = 0,
              name: str | None = None) -> onnx.NodeProto:
    """The op's node. ``inputs``: the ten of INPUTS before router_bias, then optionally router_bias;
    ``outputs``: Y, skip_out, optionally active (empty names mark absent optional ones)."""
    onnx_op._check_attributes(num_experts, threshold, rescale, weighting, activation, down_tile)
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a finite number > 0, got {epsilon!r}")
    inputs = onnx_op._strip_trailing_empty(inputs)
    if not 10 <= len(inputs) <= 11 or not all(inputs[:10]):
        raise ValueError(f"inputs must name {INPUTS[:10]} and optionally router_bias, got {inputs}")
    outputs = list(outputs) + [""] * (len(OUTPUTS) - len(outputs))
    if len(outputs) != len(OUTPUTS) or not all(outputs[:2]):
        raise ValueError(f"outputs must name Y, skip_out and optionally active, got {outputs}")
    attrs = dict(num_experts=int(num_experts), epsilon=float(epsilon), threshold=float(threshold),
                 rescale=int(bool(rescale)), weighting=weighting, activation=activation)
    if down_tile:
        attrs["down_tile"] = int(down_tile)
    return helper.make_node(OP_TYPE, inputs, outputs, name=name, domain=onnx_op.DOMAIN, **attrs)


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


def _nodes(graph: onnx.GraphProto):
    for node in graph.node:
        if node.domain == onnx_op.DOMAIN and node.op_type == OP_TYPE:
            yield node
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                yield from _nodes(sub)


def add_function_to_model(model: onnx.ModelProto) -> None:
    """When the model has the op's nodes: its function (at the model's ai.onnx opset), and
    GatedBlockSparseFFN's, which the body calls. Idempotent."""
    if not any(_nodes(model.graph)):
        return
    onnx_op.add_function_to_model(model)
    function = function_proto(onnx_op._ai_onnx_opset(model))
    kept = [f for f in model.functions if (f.domain, f.name) != (onnx_op.DOMAIN, OP_TYPE)]
    del model.functions[:]
    model.functions.extend(kept + [function])
