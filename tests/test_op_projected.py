"""org.dsmoe::ProjectedSparseFFN (docs/op-spec.md): the CPU kernel (its one-pass decode path up to
6 tokens, its stepwise path beyond: dot_rows projections up to 24 tokens, ORT's Gemm above) and
the ONNX function body, against the float64 reference on fresh random inputs."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from dsmoe_export import onnx_op, projected_op
from dsmoe_export.graph.builder import IR_VERSION, OPSET
from dsmoe_export.testing.cases import RTOL, rel_err
from dsmoe_export.testing.reference import projected_reference
from op_graph import session

NO_LIBRARY = None


def make_feeds(rng, lead, *, d=40, k=24, p=56, n=4, B=12, bias=True, router_scale=1.0):
    def f(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    feeds = {"A": f(*lead, k, scale=0.5), "skip": f(*lead, d), "in_proj_weight": f(d, k, scale=k ** -0.5),
             "norm_weight": 1 + f(d, scale=0.1), "router_weight": f(n, d, scale=router_scale * d ** -0.5),
             "gate_weight": f(n, B, d, scale=d ** -0.5), "up_weight": f(n, B, d, scale=d ** -0.5),
             "down_weight": f(n, B, d, scale=(n * B) ** -0.5), "out_norm_weight": 1 + f(d, scale=0.1),
             "out_proj_weight": f(p, d, scale=d ** -0.5)}
    if bias:
        feeds["router_bias"] = f(n, scale=0.5)
    return feeds


def make_model(feeds: dict, *, active: bool = True, with_function: bool = True, node_attrs: dict | None = None,
               **attrs) -> onnx.ModelProto:
    """One node; `node_attrs` are written as they are (error tests), else make_node's checked ones."""
    outputs = ["Y", "skip_out", "active"] if active else ["Y", "skip_out"]
    if node_attrs is None:
        node = projected_op.make_node(list(feeds), outputs, **attrs)
    else:
        node = helper.make_node(projected_op.OP_TYPE, list(feeds), outputs, domain=onnx_op.DOMAIN, **node_attrs)
    inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(v.dtype), None)
              for name, v in feeds.items()]
    outs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("skip_out", TensorProto.FLOAT, None)]
    if active:
        outs.append(helper.make_tensor_value_info("active", TensorProto.BOOL, None))
    model = helper.make_model(helper.make_graph([node], "projected_sparse_ffn", inputs, outs),
                              opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    if with_function:
        projected_op.add_function_to_model(model)
    else:
        model.opset_import.append(helper.make_opsetid(onnx_op.DOMAIN, onnx_op.OP_VERSION))
    return model


def check(feeds, outputs, *, epsilon, down_tile=0, gate_up_tile=0, **ffn_attrs):
    ref = dict(feeds)
    if down_tile:
        ref["down_weight"] = onnx_op.untile_down(feeds["down_weight"], feeds["gate_weight"].shape[2])
    if gate_up_tile:
        B = ref["down_weight"].shape[1]
        ref["gate_weight"], ref["up_weight"] = (onnx_op.untile_gate_up(feeds[k], B) for k in ("gate_weight", "up_weight"))
    y_ref, s2_ref, active_ref = projected_reference(*(ref[name] for name in projected_op.INPUTS if name in ref),
                                                    epsilon=epsilon, **ffn_attrs)
    y, s2 = outputs[0], outputs[1]
    assert y.shape == y_ref.shape and s2.shape == s2_ref.shape and y.dtype == s2.dtype == np.float32
    assert rel_err(y, y_ref) <= RTOL, rel_err(y, y_ref)
    assert rel_err(s2, s2_ref) <= RTOL, rel_err(s2, s2_ref)
    if len(outputs) > 2:
        np.testing.assert_array_equal(outputs[2], active_ref)
    return active_ref


# Token counts: one pass (<= 6), stepwise with dot_rows projections (<= 24), stepwise with Gemm.
@pytest.mark.parametrize("lead", [(1,), (1, 3), (2, 3), (7,), (2, 12), (25,), (2, 20)])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_matches_reference(op_library, rng, lead, threads):
    feeds = make_feeds(rng, lead)
    # block 0 leans on, block 1 off (|logit| <~ 3 otherwise), so a mix is certain whatever the draw
    feeds["router_bias"][:2] = (4.0, -4.0)
    attrs = dict(num_experts=4, epsilon=1e-5, threshold=float(rng.uniform(0.3, 0.7)))
    active = check(feeds, session(make_model(feeds, **attrs), op_library, threads).run(None, feeds),
                   epsilon=1e-5, threshold=attrs["threshold"])
    assert active[..., 0].any() and not active[..., 1].all()  # some blocks on, some off


@pytest.mark.parametrize("gate_up_tile", [0, 32])
@pytest.mark.parametrize("down_tile", [0, 64])
@pytest.mark.parametrize("tokens", [1, 5, 9, 30])
def test_attributes_and_layouts(op_library, rng, down_tile, gate_up_tile, tokens):
    """gelu, binary weighting, no rescale, no router bias, the tiled down layout, gate/up in slabs
    (B = 7: one partial slab), odd sizes."""
    feeds = make_feeds(rng, (tokens,), d=70, k=33, p=17, n=5, B=7, bias=False)
    if down_tile:
        feeds["down_weight"] = onnx_op.tile_down(feeds["down_weight"])
    if gate_up_tile:
        feeds["gate_weight"], feeds["up_weight"] = (onnx_op.tile_gate_up(feeds[k]) for k in ("gate_weight", "up_weight"))
    attrs = dict(threshold=0.45, rescale=False, weighting="binary", activation="gelu_tanh")
    layouts = dict(down_tile=down_tile, gate_up_tile=gate_up_tile)
    model = make_model(feeds, num_experts=5, epsilon=1e-6, **layouts, **attrs)
    for library in (op_library, NO_LIBRARY):
        check(feeds, session(model, library, 2).run(None, feeds), epsilon=1e-6, **layouts, **attrs)


@pytest.mark.parametrize("threshold", [0.0, 1.0])
@pytest.mark.parametrize("tokens", [1, 8])
def test_all_and_no_blocks_active(op_library, rng, threshold, tokens):
    """threshold 1: no block (the FFN adds exact zeros, skip_out = S); threshold 0: every block."""
    feeds = make_feeds(rng, (tokens,))
    outputs = session(make_model(feeds, num_experts=4, epsilon=1e-5, threshold=threshold), op_library, 2).run(
        None, feeds)
    active = check(feeds, outputs, epsilon=1e-5, threshold=threshold)
    assert active.all() if threshold == 0.0 else not active.any()
    if threshold == 1.0:
        s = feeds["A"] @ feeds["in_proj_weight"].T + feeds["skip"]
        np.testing.assert_allclose(outputs[1], s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lead", [(0,), (2, 0)])
def test_zero_tokens(op_library, rng, lead):
    feeds = make_feeds(rng, lead)
    for library in (op_library, NO_LIBRARY):
        y, s2, active = session(make_model(feeds, num_experts=4, epsilon=1e-5), library).run(None, feeds)
        assert y.shape == (*lead, 56) and s2.shape == (*lead, 40) and active.shape == (*lead, 4)


@pytest.mark.parametrize("tokens", [3, 11, 40])
def test_thread_count_does_not_change_results(op_library, rng, tokens):
    """Every sum in a fixed order: one thread and two give the same bits (the one-pass path, the
    FFN and the norms; the Gemm of longer calls is ORT's, which partitions by output as well)."""
    feeds = make_feeds(rng, (tokens,), d=96, k=64, p=80, n=8, B=16)
    model = make_model(feeds, num_experts=8, epsilon=1e-5)
    one, two = (session(model, op_library, t).run(None, feeds) for t in (1, 2))
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)


def test_without_active_output(op_library, rng):
    feeds = make_feeds(rng, (3,))
    outputs = session(make_model(feeds, active=False, num_experts=4, epsilon=1e-5), op_library, 2).run(None, feeds)
    assert len(outputs) == 2
    check(feeds, outputs, epsilon=1e-5)


@pytest.mark.parametrize("change, message", [
    (lambda f: f.update(in_proj_weight=f["in_proj_weight"][:, :-1]), "input 'in_proj_weight' must have shape [d, k]"),
    (lambda f: f.update(norm_weight=f["norm_weight"][:-1]), "input 'norm_weight' must have shape [d]"),
    (lambda f: f.update(out_norm_weight=f["out_norm_weight"][:-1]), "input 'out_norm_weight' must have shape [d]"),
    (lambda f: f.update(out_proj_weight=f["out_proj_weight"][:, :-1]), "input 'out_proj_weight' must have shape [p, d]"),
    (lambda f: f.update(skip=f["skip"][..., :-1]), "input 'skip' must have last dim d = 40"),
    (lambda f: f.update(A=f["A"][:1]), "input 'A' must have the leading dims of 'skip'"),
    (lambda f: f.update(router_weight=f["router_weight"][:, :-1]), "input 'router_weight' must have shape [n, d]"),
])
def test_bad_shapes_are_ort_errors(op_library, rng, change, message):
    feeds = make_feeds(rng, (2,))
    change(feeds)
    s = session(make_model(feeds, num_experts=4, epsilon=1e-5, with_function=False), op_library)
    with pytest.raises(Exception, match="ProjectedSparseFFN") as err:
        s.run(None, feeds)
    assert message in str(err.value)


@pytest.mark.parametrize("attrs, message", [
    (dict(num_experts=4), "attribute 'epsilon' is required"),
    (dict(num_experts=4, epsilon=0.0), "attribute 'epsilon' must be finite and > 0"),
    (dict(num_experts=3, epsilon=1e-5), "attribute 'num_experts' = 3 does not match n = 4"),
])
def test_bad_attributes_are_ort_errors(op_library, rng, attrs, message):
    feeds = make_feeds(rng, (2,))
    model = make_model(feeds, node_attrs=attrs, with_function=False)
    with pytest.raises(Exception, match=message.replace("[", r"\[")):
        session(model, op_library).run(None, feeds)


def test_make_node_checks_its_arguments():
    names = list(projected_op.INPUTS[:10])
    with pytest.raises(ValueError, match="epsilon"):
        projected_op.make_node(names, ["Y", "skip_out"], num_experts=4, epsilon=0.0)
    with pytest.raises(ValueError, match="inputs must name"):
        projected_op.make_node(names[:9], ["Y", "skip_out"], num_experts=4, epsilon=1e-5)
    with pytest.raises(ValueError, match="outputs must name"):
        projected_op.make_node(names, ["Y"], num_experts=4, epsilon=1e-5)
    node = projected_op.make_node(names + [""], ["Y", "skip_out"], num_experts=4, epsilon=1e-5)
    assert list(node.input) == names and list(node.output) == ["Y", "skip_out", ""]


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
@pytest.mark.parametrize("case", range(12))
def test_random_cases_every_instruction_set(op_library, rng, monkeypatch, isa, case):
    """Random sizes (d, k, p not multiples of the vector width), token counts across the three
    paths, attributes and thread counts, on each instruction set this CPU runs."""
    from test_op_cpu import _cpu_isas

    if isa not in _cpu_isas():
        pytest.skip(f"this CPU has no {isa}")
    monkeypatch.setenv("DSMOE_CPU_ISA", isa)
    n = int(rng.integers(1, 9))
    d, k, p, B = (int(v) for v in rng.integers(1, 100, 4))
    lead = [(int(rng.integers(0, 7)),), (int(rng.integers(7, 25)),), (2, int(rng.integers(13, 30)))][case % 3]
    feeds = make_feeds(rng, lead, d=d, k=k, p=p, n=n, B=B, bias=bool(rng.integers(2)),
                       router_scale=float(rng.uniform(0.5, 3.0)))
    attrs = dict(threshold=float(rng.uniform(0.2, 0.8)), rescale=bool(rng.integers(2)),
                 weighting=["score", "binary"][int(rng.integers(2))],
                 activation=["silu", "gelu", "gelu_tanh"][int(rng.integers(3))])
    down_tile = int(rng.integers(2)) * 64
    if down_tile:
        feeds["down_weight"] = onnx_op.tile_down(feeds["down_weight"])
    model = make_model(feeds, num_experts=n, epsilon=1e-5, down_tile=down_tile, **attrs)
    outputs = session(model, op_library, int(rng.integers(1, 3))).run(None, feeds)
    check(feeds, outputs, epsilon=1e-5, down_tile=down_tile, **attrs)


# ---------------------------------------------------------------------------- ProjectedSparseFFNInt4

def make_int4_feeds(rng, lead, *, d=64, k=128, p=160, n=4, B=24, group=32, bias=True):
    """The int4 op's inputs (projections in MatMulNBits' layout, blocks as GatedBlockSparseFFNInt4's)
    and the dequantized float weights the reference runs on."""
    from dsmoe_export import quant

    f = make_feeds(rng, lead, d=d, k=k, p=p, n=n, B=B, bias=bias)
    feeds, ref = {}, dict(f)
    for name in ("in_proj_weight", "out_proj_weight"):
        q, scales = quant.quantize_rows(f[name], 4, group)
        feeds[name] = quant.pack_matmul_nbits(q, 4, group)
        feeds[name.replace("weight", "scales")] = scales.astype(np.float32)
        ref[name] = quant.dequantize_rows(q, scales, 4, group)
    stored = quant.quantize_block_weights(f["gate_weight"], f["up_weight"], f["down_weight"], "int4", group)
    ref["gate_weight"], ref["up_weight"], ref["down_weight"] = quant.dequantize_block_weights(stored, "int4", group)
    feeds.update(stored)
    ordered = {name: (feeds[name] if name in feeds else f[name]) for name in projected_op.INT4_INPUTS if name in f
               or name in feeds}
    return ordered, ref


def check_int4(outputs, ref, *, epsilon, **ffn_attrs):
    y_ref, s2_ref, active_ref = projected_reference(*(ref[name] for name in projected_op.INPUTS if name in ref),
                                                    epsilon=epsilon, **ffn_attrs)
    assert outputs[0].shape == y_ref.shape and outputs[1].shape == s2_ref.shape
    assert rel_err(outputs[0], y_ref) <= RTOL, rel_err(outputs[0], y_ref)
    assert rel_err(outputs[1], s2_ref) <= RTOL, rel_err(outputs[1], s2_ref)
    if len(outputs) > 2:
        np.testing.assert_array_equal(outputs[2], active_ref)


# One pass (<= 6 tokens), then the stepwise path (dequantized row tiles, panels of every width).
@pytest.mark.parametrize("lead", [(1,), (2, 3), (7,), (2, 20), (45,)])
@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("threads", [1, 2])
def test_int4_kernel_and_function_match_reference(op_library, rng, lead, group, threads):
    feeds, ref = make_int4_feeds(rng, lead, group=group, bias=bool(rng.integers(2)))
    attrs = dict(threshold=float(rng.uniform(0.3, 0.7)), weighting=["score", "binary"][int(rng.integers(2))])
    model = make_model(feeds, num_experts=4, epsilon=1e-5, group_size=group, **attrs)
    for library in (op_library, NO_LIBRARY):
        check_int4(session(model, library, threads).run(None, feeds), ref, epsilon=1e-5, **attrs)


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
@pytest.mark.parametrize("tokens", [1, 5, 33])
def test_int4_every_instruction_set(op_library, rng, monkeypatch, isa, tokens):
    from test_op_cpu import _cpu_isas

    if isa not in _cpu_isas():
        pytest.skip(f"this CPU has no {isa}")
    monkeypatch.setenv("DSMOE_CPU_ISA", isa)
    feeds, ref = make_int4_feeds(rng, (tokens,), d=96, k=64, p=72, n=3, B=40)
    model = make_model(feeds, num_experts=3, epsilon=1e-6, group_size=32, activation="gelu", rescale=False)
    check_int4(session(model, op_library, 2).run(None, feeds), ref, epsilon=1e-6, activation="gelu", rescale=False)


@pytest.mark.parametrize("tokens", [4, 30])
def test_int4_thread_count_does_not_change_results(op_library, rng, tokens):
    feeds, _ = make_int4_feeds(rng, (tokens,))
    model = make_model(feeds, num_experts=4, epsilon=1e-5, group_size=32)
    one, two = (session(model, op_library, t).run(None, feeds) for t in (1, 2))
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_int4_all_and_no_blocks_and_zero_tokens(op_library, rng, threshold):
    feeds, ref = make_int4_feeds(rng, (3,))
    model = make_model(feeds, num_experts=4, epsilon=1e-5, group_size=32, threshold=threshold)
    check_int4(session(model, op_library, 2).run(None, feeds), ref, epsilon=1e-5, threshold=threshold)
    empty, _ = make_int4_feeds(rng, (2, 0))
    y, s2, active = session(make_model(empty, num_experts=4, epsilon=1e-5, group_size=32), op_library).run(None, empty)
    assert y.shape == (2, 0, 160) and s2.shape == (2, 0, 64) and active.shape == (2, 0, 4)


def test_int4_bad_shapes_are_ort_errors(op_library, rng):
    feeds, _ = make_int4_feeds(rng, (2,))
    feeds["A"] = feeds["A"][..., :80]  # k = 80: not a multiple of group_size 32
    s = session(make_model(feeds, num_experts=4, epsilon=1e-5, group_size=32, with_function=False), op_library)
    with pytest.raises(Exception, match="must be multiples of attribute 'group_size' = 32"):
        s.run(None, feeds)
    feeds, _ = make_int4_feeds(rng, (2,))
    feeds["out_proj_scales"] = feeds["out_proj_scales"][:-1]
    s = session(make_model(feeds, num_experts=4, epsilon=1e-5, group_size=32, with_function=False), op_library)
    with pytest.raises(Exception, match=r"input 'out_proj_scales' must have shape \[p, d / group_size\]"):
        s.run(None, feeds)


def test_int4_int8_activations_are_an_error(op_library, rng):
    """accuracy_level 4 is GatedBlockSparseFFNInt4's; this op has float32 activations only."""
    feeds, _ = make_int4_feeds(rng, (2,))

    def model(level):
        m = make_model(feeds, num_experts=4, epsilon=1e-5, group_size=32, with_function=False)
        m.graph.node[0].attribute.append(helper.make_attribute("accuracy_level", level))
        return m

    with pytest.raises(Exception, match="accuracy_level' = 4"):
        session(model(4), op_library).run(None, feeds)
    session(model(2), op_library).run(None, feeds)  # levels 0-3: float32 activations, accepted
