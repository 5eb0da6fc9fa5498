"""Single-node ONNX models of org.dsmoe::GatedBlockSparseFFN for the op tests, run on the
cases of dsmoe_export.testing.cases and checked against its reference."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from dsmoe_export import onnx_op
from dsmoe_export.graph.builder import IR_VERSION, OPSET
from dsmoe_export.testing.cases import RTOL, Case, rel_err


def make_model(case: Case, *, active_output: bool = True, with_function: bool = True,
               node_attrs: dict | None = None, x_rank: int | None = None,
               function: onnx.FunctionProto | None = None, elem_type=TensorProto.FLOAT) -> onnx.ModelProto:
    """A model with one op node. node_attrs, when given, are written as they are (for error tests)."""
    feeds = case.feeds()
    outputs = ["Y", "active"] if active_output else ["Y"]
    if node_attrs is None:
        node = onnx_op.make_node(list(feeds), outputs, num_experts=case.num_experts, **case.attrs)
    else:
        node = helper.make_node(onnx_op.OP_TYPE, list(feeds), outputs, domain=onnx_op.DOMAIN, **node_attrs)
    rank = case.x.ndim if x_rank is None else x_rank  # x_rank 0: X's rank left unknown
    lead = [f"l{i}" for i in range(rank - 1)]
    x_shape = [*lead, "d"] if rank else None
    inputs = [helper.make_tensor_value_info(k, elem_type, x_shape if k == "X" else [None] * v.ndim)
              for k, v in feeds.items()]
    graph_outputs = [helper.make_tensor_value_info("Y", elem_type, x_shape)]
    if active_output:
        graph_outputs.append(helper.make_tensor_value_info("active", TensorProto.BOOL,
                                                           [*lead, "n"] if rank else None))
    graph = helper.make_graph([node], "gated_block_sparse_ffn", inputs, graph_outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    if with_function:
        onnx_op.add_function_to_model(model)
        if function is not None:
            del model.functions[:]
            model.functions.append(function)
    else:
        model.opset_import.append(helper.make_opsetid(onnx_op.DOMAIN, onnx_op.OP_VERSION))
    return model


def session(model: onnx.ModelProto, library: str | None, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if library is not None:
        options.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run(case: Case, library: str | None, *, threads: int = 1, active_output: bool = True, **model_kw):
    return session(make_model(case, active_output=active_output, **model_kw), library, threads).run(
        None, case.feeds())


def assert_matches_reference(case: Case, outputs) -> float:
    """Checks Y (tolerance RTOL), exact zeros for k = 0 tokens and `active` (exactly); returns the
    max abs error of Y relative to max(1, max |Y_ref|)."""
    y_ref, active_ref = case.reference()
    y = outputs[0]
    assert y.shape == y_ref.shape and y.dtype == np.float32
    err = rel_err(y, y_ref)
    assert err <= RTOL, f"max |Y - Y_ref| / max(1, max |Y_ref|) = {err:.3g} > {RTOL}"
    idle = ~active_ref.any(axis=-1)
    assert (y[idle] == 0).all(), "tokens with k = 0 must give exact zeros"
    if len(outputs) > 1:
        active = outputs[1]
        assert active.dtype == np.bool_ and active.shape == active_ref.shape
        np.testing.assert_array_equal(active, active_ref)
    return err
