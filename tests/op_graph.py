"""Single-node ONNX models of org.dsmoe::GatedBlockSparseFFN and the random inputs the op tests
feed them (shared by test_op_cpu.py and test_op_function.py)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from reference import ffn_reference, router_scores

from dsmoe_export import onnx_op
from dsmoe_export.graph.builder import IR_VERSION, OPSET

# onnx writes its newest IR version by default; onnxruntime accepts up to its own.
# fp32 kernel vs float64 reference: max |Y - Y_ref| <= RTOL * max(1, max |Y_ref|).
RTOL = 1e-4
# Routing decisions within this distance of the threshold (in sigmoid space)
# could legitimately differ between float32 and float64: inputs avoid them.
ROUTING_MARGIN = 1e-4

INPUT_NAMES = ("X", "router_weight", "gate_weight", "up_weight", "down_weight", "router_bias")


@dataclass
class Case:
    x: np.ndarray
    router_weight: np.ndarray
    gate: np.ndarray
    up: np.ndarray
    down: np.ndarray
    router_bias: np.ndarray | None = None
    attrs: dict = field(default_factory=dict)

    @property
    def num_experts(self) -> int:
        return self.gate.shape[0]

    def feeds(self) -> dict[str, np.ndarray]:
        """The op's inputs: down in the layout attribute down_tile names (self.down is [n, B, d])."""
        down = self.down
        if self.attrs.get("down_tile") and self.down.shape == self.gate.shape:
            down = onnx_op.tile_down(self.down)
        arrays = (self.x, self.router_weight, self.gate, self.up, down, self.router_bias)
        return {k: v for k, v in zip(INPUT_NAMES, arrays) if v is not None}

    def reference(self):
        attrs = {k: v for k, v in self.attrs.items() if k != "down_tile"}  # a layout, not semantics
        return ffn_reference(self.x, self.router_weight, self.gate, self.up, self.down, self.router_bias,
                             **attrs)


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def make_case(rng: np.random.Generator, lead: tuple[int, ...], d: int, n: int, B: int, *, bias: bool = False,
              forced: bool = True, **attrs) -> Case:
    """Random inputs whose routing is unambiguous, with a spread of k per token.

    The router is r_i = alpha * u + (noise orthogonal to u) for a unit vector u,
    so a token x = s * u gets the logit alpha * s + b_i from every block: the
    first tokens are forced to k = n and (when possible) k = 0. Other tokens are
    centred on the threshold so that k varies; rows with a logit too close to it
    are redrawn.
    """
    tau = attrs.get("threshold", 0.5)
    tau_logit = _logit(min(max(tau, 1e-3), 1 - 1e-3))
    centre = _logit(min(max(tau, 0.05), 0.95))
    u = rng.standard_normal(d)
    u /= np.linalg.norm(u)
    alpha = 2.0
    noise = rng.standard_normal((n, d)) / math.sqrt(d)
    router = alpha * u + noise - np.outer(noise @ u, u)
    b = rng.uniform(-0.5, 0.5, n) if bias else None

    N = math.prod(lead)
    x = rng.standard_normal((N, d)) + (centre / alpha) * u

    def ambiguous(rows):
        s = router_scores(rows, router, b)
        return (np.abs(s - tau) < ROUTING_MARGIN).any(axis=-1)

    for _ in range(100):
        bad = ambiguous(x)
        if not bad.any():
            break
        x[bad] = rng.standard_normal((int(bad.sum()), d)) + (centre / alpha) * u
    else:
        raise AssertionError("could not draw unambiguous routing inputs")

    if forced and N >= 1:  # all blocks active; for tau = 1, scores of exactly 1.0 that the strict > rejects
        x[0] = (tau_logit + 8.0 if tau < 1.0 else 40.0) / alpha * u
    if forced and N >= 2 and tau > 0.0:  # no block active (impossible in float32 for tau = 0)
        x[1] = (tau_logit - 8.0) / alpha * u

    f32 = np.float32
    return Case(
        x=x.reshape(*lead, d).astype(f32),
        router_weight=router.astype(f32),
        gate=(rng.standard_normal((n, B, d)) / math.sqrt(d)).astype(f32),
        up=(rng.standard_normal((n, B, d)) / math.sqrt(d)).astype(f32),
        down=(rng.standard_normal((n, B, d)) / math.sqrt(B)).astype(f32),
        router_bias=None if b is None else b.astype(f32),
        attrs=attrs,
    )


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
    scale = max(1.0, float(np.abs(y_ref).max(initial=0.0)))
    err = float(np.abs(y - y_ref).max(initial=0.0)) / scale
    assert err <= RTOL, f"max |Y - Y_ref| / {scale:.3g} = {err:.3g} > {RTOL}"
    idle = ~active_ref.any(axis=-1)
    assert (y[idle] == 0).all(), "tokens with k = 0 must give exact zeros"
    if len(outputs) > 1:
        active = outputs[1]
        assert active.dtype == np.bool_ and active.shape == active_ref.shape
        np.testing.assert_array_equal(active, active_ref)
    return err
