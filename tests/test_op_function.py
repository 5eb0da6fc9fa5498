"""The op's ONNX side (dsmoe_export/onnx_op.py): the function body that ONNX Runtime runs when the
op library is not registered, checked against the float64 reference like the kernel; the kernel
taking precedence when it is registered; the node and weight-packing helpers."""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from dsmoe_export import onnx_op
from dsmoe_export.graph.builder import OPSET
from dsmoe_export.testing.cases import make_case
from op_graph import assert_matches_reference, make_model, run

NO_LIBRARY = None


@pytest.mark.parametrize("activation", onnx_op.ACTIVATIONS)
@pytest.mark.parametrize("weighting", onnx_op.WEIGHTINGS)
@pytest.mark.parametrize("rescale", [True, False])
def test_function_body_attributes(rng, activation, weighting, rescale):
    case = make_case(rng, (11,), d=20, n=4, B=6, bias=bool(rng.integers(2)),
                     threshold=float(rng.uniform(0.1, 0.9)), rescale=rescale, weighting=weighting,
                     activation=activation)
    assert_matches_reference(case, run(case, NO_LIBRARY))


@pytest.mark.parametrize("lead", [(), (3,), (2, 5), (2, 1, 3), (0,), (2, 0, 3)])
@pytest.mark.parametrize("bias", [False, True])
def test_function_body_shapes(rng, lead, bias):
    case = make_case(rng, lead, d=9, n=8, B=3, bias=bias)
    assert_matches_reference(case, run(case, NO_LIBRARY))


@pytest.mark.parametrize("d", [1, 9, 64, 150])
@pytest.mark.parametrize("tokens", [0, 1, 12])
def test_function_body_tiled_down(rng, d, tokens):
    """down_tile = 64: the body undoes the column tiles (and their zero padding past d)."""
    case = make_case(rng, (tokens,), d=d, n=3, B=5, bias=True, down_tile=64)
    assert case.feeds()["down_weight"].shape == (3, -(-d // 64), 5, 64)
    assert_matches_reference(case, run(case, NO_LIBRARY))


@pytest.mark.parametrize("down_tile", [0, 64])
@pytest.mark.parametrize("B", [1, 5, 32, 40, 70])
@pytest.mark.parametrize("tokens", [0, 1, 12])
def test_function_body_gate_up_slabs(rng, B, tokens, down_tile):
    """gate_up_tile = 32: the body undoes the slabs (and their zero rows past B, with B taken from
    down_weight in either of its layouts)."""
    case = make_case(rng, (tokens,), d=9, n=3, B=B, bias=True, gate_up_tile=32, down_tile=down_tile)
    assert case.feeds()["gate_weight"].shape == (3, -(-B // 32), 9, 32)
    assert_matches_reference(case, run(case, NO_LIBRARY))


@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0])
def test_function_body_thresholds(rng, threshold):
    case = make_case(rng, (13,), d=12, n=16, B=2, threshold=threshold)
    assert_matches_reference(case, run(case, NO_LIBRARY))


def test_function_body_without_active_output(rng):
    case = make_case(rng, (7,), d=12, n=4, B=5, bias=True)
    assert_matches_reference(case, run(case, NO_LIBRARY, active_output=False))


def test_function_body_attribute_defaults(rng):
    """Attributes left off the node take the function's defaults (= the spec's)."""
    case = make_case(rng, (6,), d=12, n=4, B=5)
    assert_matches_reference(case, run(case, NO_LIBRARY, node_attrs={"num_experts": 4}))


def test_function_body_nan_for_unknown_attribute_values(rng):
    """A body cannot raise: values outside the spec's sets make Y NaN (the kernel refuses them)."""
    case = make_case(rng, (6,), d=12, n=4, B=5, forced=False, threshold=0.0)
    y, active = run(case, NO_LIBRARY, node_attrs={"num_experts": 4, "threshold": 0.0, "activation": "relu"})
    assert active.all() and np.isnan(y).all()


def _altered_function() -> onnx.FunctionProto:
    """The real body with Y shifted by 1000: tells which implementation ran."""
    function = onnx.FunctionProto()
    function.CopyFrom(onnx_op.function_proto(OPSET))
    for node in function.node:
        for i, name in enumerate(node.output):
            if name == "Y":
                node.output[i] = "_y_true"
    function.node.extend([
        helper.make_node("Constant", [], ["_shift"], value=helper.make_tensor("v", onnx.TensorProto.FLOAT, [], [1000.0])),
        helper.make_node("Add", ["_y_true", "_shift"], ["Y"]),
    ])
    return function


@pytest.mark.parametrize("tokens", [2, 20])
def test_registered_kernel_takes_precedence(op_library, rng, tokens):
    case = make_case(rng, (tokens,), d=16, n=4, B=8, bias=True)
    function = _altered_function()
    y_lib, active_lib = run(case, op_library, function=function)
    assert_matches_reference(case, [y_lib, active_lib])
    y_fn, active_fn = run(case, NO_LIBRARY, function=function)  # the altered body does run without it
    np.testing.assert_allclose(y_fn, y_lib + 1000.0, rtol=0, atol=1e-3)
    np.testing.assert_array_equal(active_fn, active_lib)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("active_output", [False, True])
def test_model_passes_full_check(rng, bias, active_output):
    case = make_case(rng, (2, 3), d=8, n=4, B=2, bias=bias)
    model = make_model(case, active_output=active_output)
    onnx.checker.check_model(model, full_check=True)


def test_add_function_to_model_is_idempotent_and_fixes_single_output_nodes(rng):
    case = make_case(rng, (4,), d=8, n=4, B=2)
    model = make_model(case, active_output=False, with_function=False)
    del model.opset_import[1:]  # as an exporter leaves it: no DSMoE domain yet
    del model.graph.node[0].output[1:]  # a node listing Y only (torch.onnx.ops.symbolic)
    onnx_op.add_function_to_model(model)
    onnx_op.add_function_to_model(model)
    assert [(f.domain, f.name) for f in model.functions] == [(onnx_op.DOMAIN, onnx_op.OP_TYPE)]
    assert sorted((i.domain, i.version) for i in model.opset_import) == [("", OPSET), (onnx_op.DOMAIN, 1)]
    assert list(model.graph.node[0].output) == ["Y", ""]
    onnx.checker.check_model(model, full_check=True)


def test_function_proto_needs_opset_19():
    assert onnx_op.function_proto(19).opset_import[0].version == 19
    with pytest.raises(ValueError, match="opset"):
        onnx_op.function_proto(18)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_experts=0), "num_experts"),
    (dict(num_experts=4, threshold=1.5), "threshold"),
    (dict(num_experts=4, threshold=math.nan), "threshold"),
    (dict(num_experts=4, weighting="softmax"), "weighting"),
    (dict(num_experts=4, activation="relu"), "activation"),
    (dict(num_experts=4, down_tile=32), "down_tile"),
    (dict(num_experts=4, down_tile=True), "down_tile"),
    (dict(num_experts=4, gate_up_tile=64), "gate_up_tile"),
    (dict(num_experts=4, gate_up_tile=True), "gate_up_tile"),
])
def test_make_node_rejects_bad_attributes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        onnx_op.make_node(["x", "r", "g", "u", "v"], ["y"], **kwargs)


def test_make_node_inputs_outputs():
    node = onnx_op.make_node(["x", "r", "g", "u", "v", ""], ["y"], num_experts=2, rescale=False)
    assert list(node.input) == ["x", "r", "g", "u", "v"] and list(node.output) == ["y", ""]
    assert (node.domain, node.op_type) == (onnx_op.DOMAIN, onnx_op.OP_TYPE)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == dict(num_experts=2, threshold=0.5, rescale=0, weighting=b"score", activation=b"silu")
    tiled = onnx_op.make_node(["x", "r", "g", "u", "v"], ["y"], num_experts=2, down_tile=64)
    assert {a.name: helper.get_attribute_value(a) for a in tiled.attribute}["down_tile"] == 64
    with pytest.raises(ValueError, match="inputs"):
        onnx_op.make_node(["x", "r", "g", "u"], ["y"], num_experts=2)


def _dense_ffn(x, gate_proj, up_proj, down_proj):
    z = x @ gate_proj.T
    return ((z / (1 + np.exp(-z))) * (x @ up_proj.T)) @ down_proj.T


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_pack_block_weights(rng, lib):
    """Blocks are a partition of the dense FFN: their outputs sum to it."""
    d, D, n = 6, 12, 4
    gate_proj, up_proj, x = rng.standard_normal((D, d)), rng.standard_normal((D, d)), rng.standard_normal((3, d))
    down_proj = rng.standard_normal((d, D))
    args = (gate_proj, up_proj, down_proj) if lib == "numpy" else tuple(map(torch.from_numpy, (gate_proj, up_proj, down_proj)))
    packed = onnx_op.pack_block_weights(*args, n)
    for a in packed:
        assert tuple(a.shape) == (n, D // n, d)
        assert a.flags["C_CONTIGUOUS"] if lib == "numpy" else (isinstance(a, torch.Tensor) and a.is_contiguous())
    gate, up, down = (np.asarray(a) for a in packed)
    total = sum(_dense_ffn(x, gate[i], up[i], down[i].T) for i in range(n))
    np.testing.assert_allclose(total, _dense_ffn(x, gate_proj, up_proj, down_proj), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("d", [1, 63, 64, 65, 200])
def test_tile_down(rng, lib, d):
    """tile t of block i = columns [64t, 64t + 64) of its rows, zero past d; untile inverts it."""
    n, B = 3, 7
    down = rng.standard_normal((n, B, d)).astype(np.float32)
    arg = down if lib == "numpy" else torch.from_numpy(down)
    tiled = onnx_op.tile_down(arg)
    t = np.asarray(tiled)
    tiles = -(-d // 64)
    assert t.shape == (n, tiles, B, 64)
    for i, j, c in [(0, 0, 0), (n - 1, B - 1, d - 1), (1, 3, d // 2)]:
        assert t[i, c // 64, j, c % 64] == down[i, j, c]
    assert not t[:, -1, :, d - 64 * (tiles - 1):].any()
    np.testing.assert_array_equal(np.asarray(onnx_op.untile_down(tiled, d)), down)
    proj = (rng.standard_normal((n * B, d)), rng.standard_normal((n * B, d)), np.ascontiguousarray(down.reshape(n * B, d).T))
    gate, up, packed_down = onnx_op.pack_block_weights(
        *(a if lib == "numpy" else torch.from_numpy(a) for a in proj), n, down_tile=64)
    np.testing.assert_array_equal(np.asarray(packed_down), t)
    with pytest.raises(ValueError, match="ceil"):
        onnx_op.untile_down(tiled, d + 64)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("B", [1, 32, 45])
def test_gate_up_slabs_round_trip(rng, lib, B):
    """tile_gate_up puts row 32s + r of block i at [i, s, :, r] (k-major), zero rows past B;
    untile_gate_up inverts it; pack_block_weights(gate_up_tile=32) gives the same."""
    import torch
    n, d = 3, 7
    w = rng.standard_normal((n, B, d)).astype(np.float32)
    t = np.asarray(onnx_op.tile_gate_up(w if lib == "numpy" else torch.from_numpy(w)))
    slabs = -(-B // 32)
    assert t.shape == (n, slabs, d, 32)
    for i, j, k in [(0, 0, 0), (n - 1, B - 1, d - 1), (1, B // 2, 3)]:
        assert t[i, j // 32, k, j % 32] == w[i, j, k]
    assert not t[:, -1, :, B - 32 * (slabs - 1):].any()
    back = onnx_op.untile_gate_up(t if lib == "numpy" else torch.from_numpy(t), B)
    np.testing.assert_array_equal(np.asarray(back), w)
    proj = (w.reshape(n * B, d), 2 * w.reshape(n * B, d), rng.standard_normal((d, n * B)).astype(np.float32))
    gate, up, _ = onnx_op.pack_block_weights(*(a if lib == "numpy" else torch.from_numpy(a) for a in proj), n,
                                             gate_up_tile=32)
    np.testing.assert_array_equal(np.asarray(gate), t)
    np.testing.assert_array_equal(np.asarray(up), 2 * t)
    with pytest.raises(ValueError, match="ceil"):
        onnx_op.untile_gate_up(t, B + 32)
    with pytest.raises(ValueError, match="gate_up_tile"):
        onnx_op.pack_block_weights(*proj, n, gate_up_tile=16)


def test_pack_block_weights_rejects_bad_sizes(rng):
    gate = rng.standard_normal((10, 4))
    with pytest.raises(ValueError, match="divisible"):
        onnx_op.pack_block_weights(gate, gate, gate.T, 3)
    with pytest.raises(ValueError, match="down_proj"):
        onnx_op.pack_block_weights(gate, gate, gate, 2)
