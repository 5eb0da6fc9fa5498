"""org.dsmoe::GatedBlockSparseFFNInt4 / Int8 / F16 (docs/op-spec.md, "Quantized variants"):
the CPU kernel and the ONNX function body against the float64 reference on the dequantized
weights (tests/quant_reference.py, written from the spec), fresh random inputs per run."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from dsmoe_export import onnx_op, quant
from dsmoe_export.graph.builder import IR_VERSION, OPSET
from dsmoe_export.testing.cases import RTOL, make_case
from op_graph import assert_matches_reference
from quant_reference import dequantize, round_to_int8
from dsmoe_export.testing.reference import ffn_reference

ISAS = ("avx512", "avx2", "baseline")


def quant_inputs(case, fmt: str, group: int) -> dict[str, np.ndarray]:
    feeds = {"X": case.x, "router_weight": case.router_weight}
    feeds.update(quant.quantize_block_weights(case.gate, case.up, case.down, fmt, group))
    if case.router_bias is not None:
        feeds["router_bias"] = case.router_bias
    return feeds


def reference(case, feeds, fmt: str, group: int, level: int = 0):
    """accuracy_level 4: routing on X, gate/up on X rounded to int8 per group (round_to_int8, from
    the spec)."""
    if fmt == "float16":
        gate, up, down = (feeds[k].astype(np.float64) for k in ("gate_weight", "up_weight", "down_weight"))
    else:
        gate, up, down = dequantize(feeds, quant.BITS[fmt], group)
    x = round_to_int8(case.x, group) if level == 4 else case.x
    return ffn_reference(x, case.router_weight, gate, up, down, case.router_bias, route_x=case.x, **case.attrs)


def make_model(case, feeds, fmt: str, group: int, *, with_function=True, node_attrs=None, level=0):
    names = quant.QUANT_INPUTS if fmt in quant.BITS else quant.F16_INPUTS
    inputs = [k for k in names if k in feeds]
    if node_attrs is None:
        node = quant.make_node(fmt, inputs, ["Y", "active"], num_experts=case.num_experts,
                               group_size=group if fmt in quant.BITS else None, accuracy_level=level, **case.attrs)
    else:
        node = helper.make_node(quant.OP_TYPES[fmt], inputs, ["Y", "active"], domain=onnx_op.DOMAIN, **node_attrs)
    types = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
             np.dtype(np.uint8): TensorProto.UINT8}
    graph_inputs = [helper.make_tensor_value_info(k, types[feeds[k].dtype], [None] * feeds[k].ndim) for k in inputs]
    outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None),
               helper.make_tensor_value_info("active", TensorProto.BOOL, None)]
    model = helper.make_model(helper.make_graph([node], "q", graph_inputs, outputs),
                              opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    if with_function:
        quant.add_functions_to_model(model)
    else:
        model.opset_import.append(helper.make_opsetid(onnx_op.DOMAIN, onnx_op.OP_VERSION))
    return model


def run(model, feeds, library, threads=1):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if library is not None:
        options.register_custom_ops_library(library)
    s = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


class _Ref:
    """assert_matches_reference wants an object with .reference()."""

    def __init__(self, result):
        self._result = result

    def reference(self):
        return self._result


def check(case, fmt, group, library, threads=1, level=0):
    feeds = quant_inputs(case, fmt, group)
    out = run(make_model(case, feeds, fmt, group, with_function=library is None, level=level), feeds, library,
              threads)
    return assert_matches_reference(_Ref(reference(case, feeds, fmt, group, level)), out)


# (lead, d, n, B, group): decode (<= 6 tokens) and prefill shapes, ragged last groups along d
# (int8/f16: d not a multiple of the vector width either) and along B.
SHAPES = [
    ((1,), 64, 4, 64, 32),
    ((2, 3), 96, 8, 48, 64),      # 6 tokens: decode; d % 64 and B % 64 ragged
    ((19,), 128, 4, 40, 32),      # prefill, B % 32 ragged
    ((3, 25), 64, 8, 24, 128),    # prefill over several panels; one group longer than B
    ((4,), 256, 4, 32, 128),      # decode over whole groups of several 32-weight steps
    ((5,), 64, 4, 43, 32),        # decode, B odd: down rows in passes of 4, 2 and 1 (11 = 4 + 4 + 2 + 1)
]


@pytest.mark.parametrize("fmt", ["int4", "int8", "float16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-d{s[1]}-n{s[2]}-B{s[3]}-g{s[4]}")
def test_kernel_matches_reference(op_library, rng, fmt, shape):
    lead, d, n, B, group = shape
    case = make_case(rng, lead, d, n, B, bias=bool(rng.integers(2)))
    check(case, fmt, group, op_library, threads=2)


@pytest.mark.parametrize("fmt", ["int8", "float16"])
@pytest.mark.parametrize("lead", [(2,), (11,)])
def test_hidden_size_off_the_vector_width(op_library, rng, fmt, lead):
    case = make_case(rng, lead, 37, 3, 20)  # d = 37: scalar tails in every kernel
    check(case, fmt, 32, op_library)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["int4", "int8", "float16"])
def test_every_instruction_set(op_library, rng, monkeypatch, isa, fmt):
    import subprocess  # noqa: F401 (the ISA is read at kernel creation: env var in-process is enough)
    monkeypatch.setenv("DSMOE_CPU_ISA", isa)
    for lead in [(3,), (17,)]:
        case = make_case(rng, lead, 64, 4, 40, activation=str(rng.choice(["silu", "gelu_tanh"])))
        try:
            check(case, fmt, 32, op_library)
        except Exception as e:  # this CPU may lack the ISA: the library says so
            if "not supported by this CPU" in str(e) or "not built into" in str(e):
                pytest.skip(f"{isa} not available here")
            raise


@pytest.mark.parametrize("fmt", ["int4", "int8", "float16"])
def test_all_active_none_active_and_attributes(op_library, rng, fmt):
    # make_case forces token 0 to k = n and token 1 to k = 0 (exact zeros checked).
    case = make_case(rng, (9,), 64, 4, 32, weighting="binary", rescale=False, threshold=0.3)
    check(case, fmt, 32, op_library)


@pytest.mark.parametrize("fmt", ["int4", "int8", "float16"])
@pytest.mark.parametrize("n,tokens", [(4, 1400), (1, 7000)])
def test_prefill_in_several_chunks(op_library, rng, fmt, n, tokens):
    # Over 2048 active pairs with max(d, B) = 2048: chunks of whole blocks (n = 4) or one
    # block cut into parts (n = 1); Y is zeroed once, by the first chunk.
    case = make_case(rng, (tokens,), 32, n, 2048, bias=True)
    feeds = quant_inputs(case, fmt, 32)
    y, active = run(make_model(case, feeds, fmt, 32, with_function=False), feeds, op_library, 2)
    assert active.sum() > 2048
    assert_matches_reference(_Ref(reference(case, feeds, fmt, 32)), (y, active))


@pytest.mark.parametrize("fmt", ["int4", "int8", "float16"])
def test_zero_tokens(op_library, rng, fmt):
    case = make_case(rng, (0, 3), 64, 4, 32)
    feeds = quant_inputs(case, fmt, 32)
    levels = (0, 4) if fmt in quant.BITS else (0,)
    for library, level in [(lib, lv) for lib in (op_library, None) for lv in levels]:
        y, active = run(make_model(case, feeds, fmt, 32, with_function=library is None, level=level), feeds,
                        library)
        assert y.shape == (0, 3, 64) and active.shape == (0, 3, 4)


@pytest.mark.parametrize("fmt", ["int4", "int8", "float16"])
def test_function_body_matches_reference(rng, fmt):
    """Without the library, ONNX Runtime runs the function bodies (dequantize + float32 op body)."""
    for lead in [(2,), (9,)]:
        case = make_case(rng, lead, 64, 4, 40, bias=True)
        check(case, fmt, 32, None)


def test_quantization_round_trip(rng):
    """quantize_rows: all 2^bits levels (scale = v / -zp, v the group's value of largest magnitude),
    values within half a step; the same bytes and scales as ONNX Runtime's own MLAS quantizer
    (quantize_matmul_4bits / _8bits, symmetric), which onnxruntime-genai's model builder uses."""
    from onnxruntime.capi import _pybind_state as ort_c

    w = rng.standard_normal((5, 100)).astype(np.float32)
    for bits in (4, 8):
        q, s = quant.quantize_rows(w, bits, 32)
        zp = 2 ** (bits - 1)
        assert s.shape == (5, 4) and q.dtype == np.uint8
        groups = np.zeros((5, 128), np.float32)
        groups[:, :100] = w
        np.testing.assert_allclose(np.abs(s), np.abs(groups.reshape(5, 4, 32)).max(-1) / zp, rtol=1e-6)
        assert q.min() == 0 and q.max() <= 2 * zp - 1  # the extreme value sits on level 0
        back = quant.dequantize_rows(q, s, bits, 32)
        step = np.abs(np.repeat(s, 32, axis=-1)[:, :100])
        # Half a step, but a value of the other sign than v beyond (zp - 1/2) steps is clipped to the
        # top level (one step at most; there is no level +zp); both up to float32 rounding of
        # w * (1 / scale) + zp (MLAS' arithmetic: a value a hair under k + 1/2 steps may round up).
        clipped = (q == 2 * zp - 1) & (np.abs(w) > (zp - 0.5) * step * (1 - 1e-6))
        slack = 1e-5 * (np.abs(w) + zp * step)
        assert (np.abs(back - w) <= np.where(clipped, 1.0, 0.5) * step + slack).all()
    q4 = q[:, :96] % 16
    assert (quant.unpack_int4(quant.pack_int4(q4)) == q4).all()
    K, N, G = 96, 7, 32  # MatMul weight [K, N] in MatMulNBits' layout, against MLAS
    # A fresh input, and three where rounding w / scale half to even (not MLAS' float32 steps)
    # lands one level off (int8, int4, int8).
    inputs = [rng.standard_normal((K, N)).astype(np.float32)]
    inputs += [np.random.default_rng(s).standard_normal((K, N)).astype(np.float32) for s in (75, 558, 762)]
    for w_kn in inputs:
        for bits, fn in ((4, ort_c.quantize_matmul_4bits), (8, ort_c.quantize_matmul_8bits)):
            kb = K // G
            packed = np.zeros((N, kb, G * bits // 8), np.uint8)
            scales = np.zeros(N * kb, np.float32)
            zeros = np.zeros(N * kb, np.uint8)
            fn(packed, w_kn, scales, zeros, G, N, K, True)
            ours_b, ours_s = quant.matmul_nbits_weights(w_kn, bits, G)
            assert (ours_b == packed).all() and np.array_equal(ours_s, scales), bits


def _error(op_library, case, feeds, fmt, group, node_attrs=None):
    with pytest.raises(Exception) as info:
        run(make_model(case, feeds, fmt, group, with_function=False, node_attrs=node_attrs), feeds, op_library)
    return str(info.value)


def test_bad_shapes_and_attributes_are_errors(op_library, rng):
    case = make_case(rng, (3,), 64, 4, 32)
    feeds = quant_inputs(case, "int4", 32)
    bad = dict(feeds, gate_scales=feeds["gate_scales"][:, :, :1].copy())
    msg = _error(op_library, case, bad, "int4", 32)
    assert "gate_scales" in msg and "[4, 32, 2]" in msg
    bad = dict(feeds, down_scales=feeds["down_scales"].transpose(0, 2, 1).copy())
    assert "down_scales" in _error(op_library, case, bad, "int4", 32)
    bad = dict(feeds, up_weight=np.concatenate([feeds["up_weight"]] * 2, axis=-1))
    assert "up_weight" in _error(op_library, case, bad, "int4", 32)
    bad = dict(feeds, X=np.zeros((3, 32), np.float32))
    assert "last dim d = 64" in _error(op_library, case, bad, "int4", 32)
    base = dict(num_experts=4)
    assert "group_size" in _error(op_library, case, feeds, "int4", 32, node_attrs=base)
    assert "power of two" in _error(op_library, case, feeds, "int4", 32, node_attrs=dict(base, group_size=48))
    msg = _error(op_library, case, feeds, "int4", 32, node_attrs=dict(base, group_size="32"))
    assert "'group_size' must be of type int" in msg and msg.count("GatedBlockSparseFFNInt4:") == 1
    assert "num_experts" in _error(op_library, case, feeds, "int4", 32, node_attrs=dict(num_experts=5, group_size=32))
    # The tiled down layout is the float32 op's only (op-spec "down_weight's two layouts").
    msg = _error(op_library, case, feeds, "int4", 32, node_attrs=dict(num_experts=4, group_size=32, down_tile=64))
    assert "down_tile" in msg and "must be 0" in msg
    # int4 needs d % 32 == 0: d = 48 with hand-made inputs of consistent shapes.
    odd = make_case(rng, (2,), 48, 2, 32)
    q8 = quant.quantize_block_weights(odd.gate, odd.up, odd.down, "int8", 32)
    feeds = {"X": odd.x, "router_weight": odd.router_weight,
             "gate_weight": q8["gate_weight"][..., :24].copy(), "gate_scales": q8["gate_scales"],
             "up_weight": q8["up_weight"][..., :24].copy(), "up_scales": q8["up_scales"],
             "down_weight": q8["down_weight"][..., :24].copy(), "down_scales": q8["down_scales"]}
    msg = _error(op_library, odd, feeds, "int4", 32)
    assert "multiple of 32" in msg and "GatedBlockSparseFFNInt4:" in msg  # the variant used, named
    with pytest.raises(ValueError, match="multiple of 32"):
        quant.quantize_block_weights(odd.gate, odd.up, odd.down, "int4", 32)
    # float16 op: shapes as the float32 op's.
    case16 = make_case(rng, (3,), 64, 4, 32)
    feeds = quant_inputs(case16, "float16", 32)
    bad = dict(feeds, down_weight=feeds["down_weight"][:, :16].copy())
    msg = _error(op_library, case16, bad, "float16", 32)
    assert "down_weight" in msg and "GatedBlockSparseFFNF16:" in msg
    assert "down_tile" in _error(op_library, case16, feeds, "float16", 32, node_attrs=dict(num_experts=4, down_tile=64))


@pytest.mark.parametrize("fmt", ["int4", "int8", "float16"])
@pytest.mark.parametrize("tokens,routed", [(9, 6), (16, 6), (16, 10)])
def test_few_tokens_a_block_take_the_decode_path(op_library, rng, fmt, tokens, routed):
    """Up to 16 tokens with few a block on average (tokens from routed + 1 on route to no block)
    take the GEMV path, whose gate/up rows serve up to 4 tokens a pass and down rows up to 4 at
    once: blocks of B = 48 rows (a short last scale group of down rows) up to 8 tokens, blocks of
    more than 128 rows (B = 160) up to 9: with routed = 10 every block has 9 tokens (three
    passes, the last of 1)."""
    case = make_case(rng, (tokens,), 96, 8, 48 if routed <= 6 else 160, bias=True)
    case.x[routed:] = case.x[1]  # make_case's token with no block active
    if routed > 6:  # tokens near make_case's all-active one: every block gets them
        case.x[2:routed] = case.x[0] + 0.3 * rng.standard_normal((routed - 2, 96)).astype(np.float32)
    check(case, fmt, 32, op_library, threads=2)


@pytest.mark.parametrize("level", [0, 4])
@pytest.mark.parametrize("d,B", [(128, 96), (128, 80), (1536, 96)])
def test_one_token_decode_runs_of_slabs(op_library, rng, level, d, B):
    """One token: from 4 active blocks on, a decode task reads 24 KB runs of its block's slabs of
    32 rows, one slab after the other (d = 128: the whole block, B = 80 with a short last slab;
    d = 1536: 24 KB slabs, one a task); fewer active blocks keep a task per slab. Every active
    count against the reference, on one thread and two."""
    for k in (8, 5, 4, 3, 1):
        case = make_case(rng, (1,), d, 8, B)  # the token has every block active
        case.router_bias = np.where(np.arange(8) < k, 0.0, -40.0).astype(np.float32)
        feeds = quant_inputs(case, "int4", 32)
        _, active = run(make_model(case, feeds, "int4", 32, with_function=False, level=level), feeds, op_library)
        assert active.sum() == k
        for threads in (1, 2):
            check(case, "int4", 32, op_library, threads=threads, level=level)


def test_kernel_agrees_across_thread_counts(op_library, rng):
    case = make_case(rng, (40,), 128, 8, 64)
    feeds = quant_inputs(case, "int4", 32)
    model = make_model(case, feeds, "int4", 32, with_function=False)
    one, two = run(model, feeds, op_library, 1), run(model, feeds, op_library, 2)
    np.testing.assert_array_equal(one[0], two[0])
    assert RTOL > 0


# accuracy_level 4 (op-spec "accuracy_level"): routing on X, gate/up on X rounded to int8 per group.
# The int4 decode path runs the int4 x int8 GEMV where the CPU has AVX-512 VNNI, the float path on
# x_hat elsewhere (and on every other path); all against the reference on round_to_int8(X).
def _with_zero_groups(case, group):
    """Token 2 all zeros (every group's scale 0), token 3's first group zeros, if they exist."""
    x = case.x.reshape(-1, case.x.shape[-1])
    if len(x) > 2:
        x[2] = 0.0
    if len(x) > 3:
        x[3, :group] = 0.0
    return case


@pytest.mark.parametrize("fmt", ["int4", "int8"])
@pytest.mark.parametrize("shape", SHAPES + [((2,), 2048, 4, 40, 32), ((3,), 160, 2, 24, 64), ((1,), 32, 3, 8, 32)],
                         ids=lambda s: f"{s[0]}-d{s[1]}-n{s[2]}-B{s[3]}-g{s[4]}")
def test_int8_activations_match_reference(op_library, rng, fmt, shape):
    lead, d, n, B, group = shape
    case = _with_zero_groups(make_case(rng, lead, d, n, B, bias=bool(rng.integers(2))), group)
    check(case, fmt, group, op_library, threads=2, level=4)


@pytest.mark.parametrize("tokens,routed", [(4, 4), (9, 6), (16, 10)])
def test_int8_activations_on_the_decode_path(op_library, rng, tokens, routed):
    """1-4 tokens a GEMV pass (the tile's token counts), up to 9 a block, d off the 128-column unit."""
    case = make_case(rng, (tokens,), 224, 8, 48 if routed <= 6 else 160, bias=True)
    case.x[routed:] = case.x[1]
    if routed > 6:
        case.x[2:routed] = case.x[0] + 0.3 * rng.standard_normal((routed - 2, 224)).astype(np.float32)
    for group in (32, 64, 128):
        check(case, "int4", group, op_library, threads=2, level=4)


def test_int8_activations_on_the_prefill_path(op_library, rng):
    """The prefill's gate/up slabs through the int4 x int8 GEMV (4 tokens a call, then 3, 2, 1):
    over 96 tokens a block (the slab task's batches), B = 43 (slabs of 32 and 11 rows), d off the
    128-column unit, groups of 32 to 128."""
    for tokens, group in [(130, 32), (37, 64), (21, 128)]:
        case = _with_zero_groups(make_case(rng, (tokens,), 224, 3, 43, bias=True), group)
        check(case, "int4", group, op_library, threads=2, level=4)


@pytest.mark.parametrize("isa", ISAS)
def test_int8_activations_every_instruction_set(op_library, rng, monkeypatch, isa):
    monkeypatch.setenv("DSMOE_CPU_ISA", isa)
    for lead in [(1,), (3,), (17,)]:
        case = _with_zero_groups(make_case(rng, lead, 96, 4, 40), 32)
        try:
            check(case, "int4", 32, op_library, level=4)
        except Exception as e:
            if "not supported by this CPU" in str(e) or "not built into" in str(e):
                pytest.skip(f"{isa} not available here")
            raise


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_int8_activations_function_body(rng, fmt):
    """Without the library: the function body rounds X (standard ops) before the float32 op."""
    for lead, d, group in [((2,), 64, 32), ((9,), 96, 64)]:
        case = _with_zero_groups(make_case(rng, lead, d, 4, 40, bias=True), group)
        check(case, fmt, group, None, level=4)


def test_accuracy_levels_below_4_change_nothing(op_library, rng):
    case = make_case(rng, (5,), 64, 4, 32)
    feeds = quant_inputs(case, "int4", 32)
    outs = [run(make_model(case, feeds, "int4", 32, with_function=False, level=level), feeds, op_library)[0]
            for level in range(4)]
    for y in outs[1:]:
        np.testing.assert_array_equal(y, outs[0])
    rounded = run(make_model(case, feeds, "int4", 32, with_function=False, level=4), feeds, op_library)[0]
    assert not np.array_equal(rounded, outs[0])  # level 4 is not a no-op


def test_round_to_int8_reference():
    """The reference's rounding: half to even, the group's extreme on +-127, zeros stay zero."""
    x = np.array([[127.0, 0.5, 1.5, -2.5, 63.5] + [0.0] * 27 + [0.0] * 32], np.float32)
    out = round_to_int8(x, 32)
    np.testing.assert_array_equal(out[0, :5], [127.0, 0.0, 2.0, -2.0, 64.0])
    assert (out[0, 32:] == 0).all()


def test_accuracy_level_errors(op_library, rng):
    case = make_case(rng, (3,), 64, 4, 32)
    feeds = quant_inputs(case, "int4", 32)
    msg = _error(op_library, case, feeds, "int4", 32, node_attrs=dict(num_experts=4, group_size=32, accuracy_level=5))
    assert "accuracy_level" in msg and "got 5" in msg
    msg = _error(op_library, case, feeds, "int4", 32,
                 node_attrs=dict(num_experts=4, group_size=32, accuracy_level="4"))
    assert "'accuracy_level' must be of type int" in msg
    with pytest.raises(ValueError, match="accuracy_level"):
        quant.make_node("float16", list(quant.F16_INPUTS[:5]), ["Y"], num_experts=4, accuracy_level=4)
    with pytest.raises(ValueError, match="accuracy_level"):
        quant.make_node("int4", list(quant.QUANT_INPUTS[:8]), ["Y"], num_experts=4, group_size=32, accuracy_level=7)


def _near_threshold(case, group):
    """Picks the (token, block) whose router logit the rounding moves most (router weights scaled
    up so that the move is far above float32's error in a logit) and sets that block's router bias
    so that X's logit lies 0.45 of the move on one side of the threshold and the rounded X's 0.55
    on the other: routing on the rounded X would flip it. Returns (case, token, block)."""
    case.router_weight = (case.router_weight * 10).astype(np.float32)
    x = case.x.reshape(-1, case.x.shape[-1])
    logits = x.astype(np.float64) @ case.router_weight.astype(np.float64).T
    rounded = round_to_int8(x, group).astype(np.float64) @ case.router_weight.astype(np.float64).T
    tau = np.log(case.attrs.get("threshold", 0.5) / (1 - case.attrs.get("threshold", 0.5)))
    bias = np.zeros(case.num_experts) if case.router_bias is None else case.router_bias.astype(np.float64)
    gap = rounded - logits                                           # what the rounding moves a logit by
    t, i = np.unravel_index(int(np.argmax(np.abs(gap))), gap.shape)
    assert abs(gap[t, i]) > 1e-3
    bias[i] = tau - logits[t, i] - 0.45 * gap[t, i]
    case.router_bias = bias.astype(np.float32)
    return case, int(t), int(i)


@pytest.mark.parametrize("fmt", ["int4", "int8"])
@pytest.mark.parametrize("tokens", [1, 40])
def test_int8_activations_route_on_x(op_library, rng, fmt, tokens):
    """Routing reads X as given: a score that X puts on one side of the threshold and the rounded
    X on the other follows X (kernel, decode and prefill paths, and the function body); the active
    flags equal level 0's."""
    case, t, i = _near_threshold(make_case(rng, (tokens,), 96, 4, 40, bias=True), 32)
    feeds = quant_inputs(case, fmt, 32)
    _, active0 = run(make_model(case, feeds, fmt, 32, with_function=False, level=0), feeds, op_library)
    x64, r64 = round_to_int8(case.x, 32).astype(np.float64), case.router_weight.astype(np.float64)
    tau = case.attrs.get("threshold", 0.5)
    flipped = (x64 @ r64.T + case.router_bias)[t, i] > np.log(tau / (1 - tau))
    assert active0[t, i] != flipped  # the case is what it claims: the rounded X routes otherwise
    for library in (op_library, None):
        check(case, fmt, 32, library, level=4)
        _, active4 = run(make_model(case, feeds, fmt, 32, with_function=library is None, level=4), feeds, library)
        np.testing.assert_array_equal(active4, active0)


@pytest.mark.parametrize("tokens", [3, 40])
def test_int8_activations_non_finite_x(op_library, rng, tokens):
    """A group holding NaN or inf rounds to NaN throughout (s NaN or inf); routing reads X as
    given. NaN: the token's router logits are NaN, no block is active, Y is exactly 0 (the k = 0
    rule). inf in column c: blocks whose router weight at c is positive are active (logit +inf),
    the others not, and Y is NaN (gate/up on the NaN group); the other tokens as usual."""
    case = make_case(rng, (tokens,), 64, 4, 32)
    case.x[0, 5] = np.nan
    case.x[2, 40] = np.inf
    case.router_weight[:, 40] = [0.5, -0.5, 0.25, -0.25]
    feeds = quant_inputs(case, "int4", 32)
    for library in (op_library, None):
        y, active = run(make_model(case, feeds, "int4", 32, with_function=library is None, level=4), feeds,
                        library, 2)
        assert not active[0].any() and (y[0] == 0).all()
        np.testing.assert_array_equal(active[2], [True, False, True, False])
        assert np.isnan(y[2]).all()
        rest = [t for t in range(tokens) if t not in (0, 2)]
        y_ref, active_ref = reference(case, feeds, "int4", 32, 4)
        np.testing.assert_array_equal(active[rest], active_ref[rest])
        assert np.abs(y[rest] - y_ref[rest]).max() <= RTOL * max(1.0, np.abs(y_ref[rest]).max())
