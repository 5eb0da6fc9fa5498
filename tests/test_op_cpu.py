"""The CPU kernel of org.dsmoe::GatedBlockSparseFFN against the float64 reference
(dsmoe_export/testing/reference.py) on fresh random inputs; error handling per docs/op-spec.md.

Tolerance: fp32 kernel vs float64 reference, max |Y - Y_ref| <= 1e-4 * max(1, max |Y_ref|);
`active` and the k = 0 zeros are compared exactly.
The kernel switches from its decode path (GEMV, up to 4 tokens per pass over a
block's weights) to its prefill path (per-block GEMM) above 6 tokens: token
counts below cover both sides, with margin; every instruction-set variant of
the inner loops that this CPU runs is checked too.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto

from dsmoe_export.testing.cases import make_case
from op_graph import assert_matches_reference, make_model, run, session

DECODE_TOKENS = (1, 2, 5, 6)
PREFILL_TOKENS = (7, 8, 37)
# The float32 op's weight layouts (op-spec: down_tile, gate_up_tile), each combination.
LAYOUTS = (dict(), dict(down_tile=64), dict(gate_up_tile=32), dict(down_tile=64, gate_up_tile=32))
LAYOUT_IDS = ("rows", "down-tiles", "gate-up-slabs", "both")


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 64])
@pytest.mark.parametrize("tokens", DECODE_TOKENS[::2] + PREFILL_TOKENS[::2] + (70,))
def test_block_counts(op_library, rng, n, tokens):
    B = int(rng.choice([3, 8, 20]))
    case = make_case(rng, (tokens,), d=24, n=n, B=B, bias=bool(rng.integers(2)),
                     threshold=float(rng.uniform(0.2, 0.8)))
    assert_matches_reference(case, run(case, op_library))


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("weighting", ["score", "binary"])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tokens", [3, 29])
def test_attributes(op_library, rng, activation, weighting, rescale, bias, tokens):
    case = make_case(rng, (tokens,), d=40, n=8, B=12, bias=bias, threshold=float(rng.uniform(0.05, 0.95)),
                     rescale=rescale, weighting=weighting, activation=activation)
    assert_matches_reference(case, run(case, op_library))


@pytest.mark.parametrize("threshold", [0.0, 0.01, 0.3, 0.5, 0.77, 0.99, 1.0])
@pytest.mark.parametrize("tokens", [2, 12, 33])  # 12: the routed GEMV path, also with no block active
def test_thresholds(op_library, rng, threshold, tokens):
    case = make_case(rng, (tokens,), d=16, n=8, B=5, bias=True, threshold=threshold)
    outputs = run(case, op_library)
    assert_matches_reference(case, outputs)
    k = outputs[1].sum(axis=-1)
    if threshold == 1.0:
        assert (k == 0).all() and (outputs[0] == 0).all()
    if 0.0 < threshold < 1.0:  # the forced tokens are there
        assert k[0] == 8 and k[1] == 0


@pytest.mark.parametrize("threads", [1, 2])
def test_routing_of_a_token_does_not_depend_on_the_call(op_library, rng, threads):
    """A token's active blocks are the same bits whether it comes alone (decode) or among others
    (the router's logits are computed several tokens at a time): scores right at the threshold
    included, where any difference in the logits' sums would show."""
    case = make_case(rng, (53,), d=40, n=16, B=4, threshold=0.5)
    # logits of ~1e-4: a shift of 1e-6 in them flips a few percent of the 848 decisions
    case.x = rng.standard_normal(case.x.shape).astype(np.float32) * 1e-4
    sess = session(make_model(case), op_library, threads)
    feeds = case.feeds()
    together = sess.run(None, feeds)[1]
    alone = np.concatenate([sess.run(None, {**feeds, "X": feeds["X"][t:t + 1]})[1] for t in range(53)])
    assert np.array_equal(together, alone)
    assert 0 < together.mean() < 1


@pytest.mark.parametrize("lead", [(), (1,), (6,), (2, 3), (3, 1, 4), (0,), (2, 0), (3, 0, 2), (4, 5, 3)])
def test_leading_dims(op_library, rng, lead):
    case = make_case(rng, lead, d=12, n=4, B=6, bias=True)
    assert_matches_reference(case, run(case, op_library))


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("d,n,B", [(7, 5, 3), (1, 1, 1), (17, 3, 33), (130, 2, 9), (64, 6, 65), (200, 3, 40)])
@pytest.mark.parametrize("tokens", [1, 2, 9, 70])
def test_odd_sizes(op_library, rng, d, n, B, tokens, layout):
    # d % 16 / d % 8 tails, B % 32 row tails, panels of 8 tokens partly filled; in the tiled down
    # layout: one partial tile (d < 64), whole tiles only (64), whole tiles and a partial one (130, 200).
    case = make_case(rng, (tokens,), d=d, n=n, B=B, bias=bool(rng.integers(2)),
                     threshold=float(rng.uniform(0.3, 0.7)), activation=str(rng.choice(["silu", "gelu"])),
                     **layout)
    assert_matches_reference(case, run(case, op_library))


def test_many_tokens_several_chunks(op_library, rng):
    # > 2048 active pairs with max(d, B) = 2048 (1024 per chunk): the prefill path cuts the pairs into
    # chunks of whole blocks.
    case = make_case(rng, (3, 250), d=16, n=8, B=2048, bias=True)
    outputs = run(case, op_library, threads=2)
    assert outputs[1].sum() > 2048
    assert_matches_reference(case, outputs)


def test_one_block_over_the_chunk_bound(op_library, rng):
    # n = 1: one block with more active pairs than a chunk holds (1024 with max(d, B) = 2048) is
    # cut into parts; the tokens forced to k = 0 still get exact zeros.
    case = make_case(rng, (7000,), d=16, n=1, B=2048, bias=True)
    outputs = run(case, op_library, threads=2)
    assert 2048 < outputs[1].sum() < 7000
    assert_matches_reference(case, outputs)


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("lead,B", [((70,), 40), ((2, 250), 2048)])
def test_every_output_element_is_written(op_library, rng, lead, B, layout):
    """The prefill path writes Y without zeroing it first (each token's first active block stores,
    tokens with no active block get zeros): an output buffer full of NaN, bound with I/O binding,
    must come back all finite and equal to the reference, in one chunk and in several."""
    case = make_case(rng, lead, d=72, n=8, B=B, bias=True, **layout)
    sess = session(make_model(case), op_library, threads=2)
    binding = sess.io_binding()
    for name, value in case.feeds().items():
        binding.bind_cpu_input(name, value)
    y = np.full(case.x.shape, np.nan, np.float32)
    active = np.zeros((*lead, case.num_experts), np.bool_)
    binding.bind_ortvalue_output("Y", ort.OrtValue.ortvalue_from_numpy(y))
    binding.bind_ortvalue_output("active", ort.OrtValue.ortvalue_from_numpy(active))
    for _ in range(2):  # the second call finds the first one's results in the buffer
        sess.run_with_iobinding(binding)
        assert np.isfinite(y).all()
        assert_matches_reference(case, [y, active])
        y[...] = np.nan


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("tokens", [1, 3, 50])
def test_thread_counts_agree(op_library, rng, tokens, layout):
    case = make_case(rng, (tokens,), d=72, n=8, B=40, bias=True, **layout)
    model = make_model(case)
    results = [session(model, op_library, threads).run(None, case.feeds()) for threads in (1, 2, 3)]
    assert_matches_reference(case, results[0])
    for other in results[1:]:  # every output element comes from one task in a fixed order
        np.testing.assert_array_equal(other[0], results[0][0])
        np.testing.assert_array_equal(other[1], results[0][1])


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_prefill_pass_over_several_chunks(op_library, rng, layout):
    """A prefill call runs in one pass of the pool: the routing, then each chunk's gate/up and down
    phases, the threads claiming a block's 86 row tasks in order and the last ones from the back
    of another thread's block. Three chunks here (about 1400 active pairs, 1024 a chunk at
    B = 2048): every thread count gives the reference's result and the same bits."""
    case = make_case(rng, (350,), d=72, n=8, B=2048, bias=True, **layout)
    model = make_model(case)
    results = [session(model, op_library, threads).run(None, case.feeds()) for threads in (1, 2, 3, 4)]
    assert 1024 < results[0][1].sum() < 2048
    assert_matches_reference(case, results[0])
    for other in results[1:]:
        np.testing.assert_array_equal(other[0], results[0][0])
        np.testing.assert_array_equal(other[1], results[0][1])


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("tokens", [7, 10, 12, 16, 17])
def test_few_tokens_a_block(op_library, rng, tokens, sparse, layout):
    """7-16 tokens take the GEMV path when the active blocks average few tokens (at most 12 for
    these blocks of 40 rows) and the GEMM path otherwise; 17 always the GEMM path. Sparse: tokens
    from the seventh on route to no block (at most 5 a block: GEMV); not sparse: threshold 0,
    every token in every block (7, 10 and 12 tokens: GEMV in one pass of 7-12 token tiles; 16,
    17: GEMM).
    Each against the reference, the same bits with 1 and 2 threads."""
    case = make_case(rng, (tokens,), d=72, n=8, B=40, bias=True, threshold=0.5 if sparse else 0.0,
                     **layout)
    if sparse:
        case.x[6:] = case.x[1]  # make_case's token with no block active
    model = make_model(case)
    results = [session(model, op_library, threads).run(None, case.feeds()) for threads in (1, 2)]
    assert_matches_reference(case, results[0])
    per_block = results[0][1].sum(0)
    assert per_block.max() <= 5 if sparse else (per_block == tokens).all()
    np.testing.assert_array_equal(results[1][0], results[0][0])


@pytest.mark.parametrize("n, B", [(12, 70), (16, 100), (4, 100)])
def test_decode_row_groups(op_library, rng, n, B):
    """Several tokens a block on the GEMV path cut each active block into fewer row groups (as
    many as make 16 tasks: 2 of 3 slabs, uneven, for 12 active blocks of 70 rows; 1 for 16
    blocks; all 4 slabs for 4 blocks). Against the reference; the same bits with 1, 2 and 3
    threads, and with the down weights in rows or column tiles."""
    case = make_case(rng, (6,), d=128, n=n, B=B, bias=True)
    assert case.reference()[1].reshape(6, n).any(0).all()  # token 0 turns every block on
    results = [run(case, op_library, threads=t) for t in (1, 2, 3)]
    assert_matches_reference(case, results[0])
    for other in results[1:]:
        np.testing.assert_array_equal(other[0], results[0][0])
    case.attrs["down_tile"] = 64
    tiled = run(case, op_library, threads=2)
    np.testing.assert_array_equal(tiled[0], results[0][0])


@pytest.mark.parametrize("down_tile", [0, 64])
def test_one_token_decode_runs_of_slabs(op_library, rng, down_tile):
    """One token, d = 128: slabs of 32 rows are 16 KB, so from 4 active blocks on a task reads two
    of them in turn (B = 100: four slabs, the last short, in two tasks); fewer active blocks keep a
    task per slab. Every active count against the reference, on one thread and two, the down
    weights in rows or column tiles."""
    for k in (8, 5, 4, 3, 1):
        case = make_case(rng, (1,), d=128, n=8, B=100)  # the token has every block active
        case.router_bias = np.where(np.arange(8) < k, 0.0, -40.0).astype(np.float32)
        case.attrs["down_tile"] = down_tile
        for threads in (1, 2):
            out = run(case, op_library, threads=threads)
            assert out[1].sum() == k
            assert_matches_reference(case, out)


@pytest.mark.parametrize("tokens", [2, 20])
def test_active_output_optional(op_library, rng, tokens):
    case = make_case(rng, (tokens,), d=20, n=4, B=7)
    (y,) = run(case, op_library, active_output=False)
    assert_matches_reference(case, [y])


def test_nan_router_logit_makes_block_inactive(op_library, rng):
    case = make_case(rng, (9,), d=20, n=4, B=7, bias=True, threshold=0.3)
    case.router_bias[2] = np.nan
    y, active = run(case, op_library)
    assert not active[:, 2].any()
    assert_matches_reference(case, [y, active])
    assert np.isfinite(y).all()


def test_session_reuse_and_changing_shapes(op_library, rng):
    """One session, calls of different token counts (decode and prefill) in turn."""
    base = make_case(rng, (2, 3), d=24, n=8, B=16, bias=True)
    sess = session(make_model(base, x_rank=2), op_library, threads=2)
    for tokens in (1, 40, 3, 0, 7):
        case = make_case(rng, (tokens,), d=24, n=8, B=16, bias=True)
        case.router_weight, case.gate, case.up, case.down, case.router_bias = (
            base.router_weight, base.gate, base.up, base.down, base.router_bias)
        assert_matches_reference(case, sess.run(None, case.feeds()))


# --------------------------------------------------------------------------- errors

_state = ort.capi.onnxruntime_pybind11_state
# Shape errors come back from Run as INVALID_ARGUMENT; attribute errors stop the session's
# initialisation, which ORT reports as RUNTIME_EXCEPTION carrying the kernel's message.
ORT_ERRORS = (_state.InvalidArgument, _state.Fail, _state.RuntimeException)

GOOD_ATTRS = dict(num_experts=4, threshold=0.5, rescale=1, weighting="score", activation="silu")


@pytest.mark.parametrize("change,expected", [
    (dict(num_experts=None), "num_experts"),
    (dict(num_experts=0), "num_experts"),
    (dict(num_experts=3), "num_experts"),        # n of the weights is 4: reported at run time
    (dict(num_experts=4.0), "num_experts"),
    (dict(threshold=-0.1), "threshold"),
    (dict(threshold=1.5), "threshold"),
    (dict(threshold=float("nan")), "threshold"),
    (dict(threshold=float("inf")), "threshold"),
    (dict(threshold="high"), "threshold"),
    (dict(rescale=2), "rescale"),
    (dict(rescale=1.0), "rescale"),
    (dict(weighting="softmax"), "weighting"),
    (dict(activation="relu"), "activation"),
    (dict(activation=1), "activation"),
    (dict(down_tile=32), "down_tile"),
    (dict(down_tile=-64), "down_tile"),
    (dict(down_tile=64.0), "down_tile"),
    (dict(down_tile="tiled"), "down_tile"),
    (dict(gate_up_tile=16), "gate_up_tile"),
    (dict(gate_up_tile=64), "gate_up_tile"),
    (dict(gate_up_tile=32.0), "gate_up_tile"),
])
def test_bad_attributes(op_library, rng, change, expected):
    case = make_case(rng, (3,), d=8, n=4, B=2)
    attrs = {**GOOD_ATTRS, **change}
    attrs = {k: v for k, v in attrs.items() if v is not None}
    with pytest.raises(ORT_ERRORS, match=expected):
        run(case, op_library, with_function=False, node_attrs=attrs)
    assert_matches_reference(case, run(case, op_library))  # the process is fine


def _bad_shapes():
    def mutate(name, shape):
        def apply(case):
            setattr(case, name, np.zeros(shape, np.float32))
        return apply
    n, B, d = 4, 3, 8
    return [
        pytest.param(mutate("x", ()), "'X'", id="X-scalar"),
        pytest.param(mutate("x", (5, d + 1)), "'X'", id="X-last-dim"),
        pytest.param(mutate("router_weight", (n, d + 1)), "router_weight", id="router-d"),
        pytest.param(mutate("router_weight", (n + 1, d)), "router_weight", id="router-n"),
        pytest.param(mutate("router_weight", (n * d,)), "router_weight", id="router-rank"),
        pytest.param(mutate("gate", (n * B, d)), "gate_weight", id="gate-rank"),
        pytest.param(mutate("gate", (n, 0, d)), "gate_weight", id="gate-B0"),
        pytest.param(mutate("up", (n, B + 1, d)), "up_weight", id="up-B"),
        pytest.param(mutate("down", (n, B, d - 1)), "down_weight", id="down-d"),
        pytest.param(mutate("down", (n - 1, B, d)), "down_weight", id="down-n"),
        pytest.param(mutate("router_bias", (n + 1,)), "router_bias", id="bias-n"),
        pytest.param(mutate("router_bias", (1, n)), "router_bias", id="bias-rank"),
    ]


@pytest.mark.parametrize("mutate,expected", _bad_shapes())
def test_bad_shapes(op_library, rng, mutate, expected):
    case = make_case(rng, (5,), d=8, n=4, B=3, bias=True)
    model = make_model(case, with_function=False, x_rank=0)
    mutate(case)
    sess = session(model, op_library)
    with pytest.raises(ORT_ERRORS, match=expected):
        sess.run(None, case.feeds())


@pytest.mark.parametrize("down", ["rows", "tile32", "tiles-short", "B"])
def test_bad_tiled_down_shapes(op_library, rng, down):
    """down_tile = 64 with down_weight not [n, ceil(d / 64), B, 64]: an error that names the
    input and the expected shape, not a read past the tensor."""
    n, B, d = 4, 3, 130
    case = make_case(rng, (5,), d=d, n=n, B=B, bias=True, down_tile=64)
    feeds = case.feeds()
    feeds["down_weight"] = {"rows": case.down, "tile32": np.zeros((n, 5, B, 32), np.float32),
                            "tiles-short": np.zeros((n, 2, B, 64), np.float32),
                            "B": np.zeros((n, 3, B + 1, 64), np.float32)}[down]
    model = make_model(case, with_function=False, x_rank=0)
    next(i for i in model.graph.input if i.name == "down_weight").type.tensor_type.ClearField("shape")
    sess = session(model, op_library)
    with pytest.raises(ORT_ERRORS, match=r"down_weight.*\[n, ceil\(d / 64\), B, 64\].*\[4, 3, 3, 64\]"):
        sess.run(None, feeds)


@pytest.mark.parametrize("gate", ["rows", "slab16", "slabs-short", "slabs-long", "d"])
def test_bad_gate_up_slab_shapes(op_library, rng, gate):
    """gate_up_tile = 32 with gate_weight not [n, ceil(B / 32), d, 32] (B from down_weight): an
    error that names the input and the expected shape, not a read past the tensor."""
    n, B, d = 4, 40, 24
    case = make_case(rng, (5,), d=d, n=n, B=B, bias=True, gate_up_tile=32)
    feeds = case.feeds()
    assert feeds["gate_weight"].shape == (n, 2, d, 32)
    bad = {"rows": case.gate, "slab16": np.zeros((n, 3, d, 16), np.float32),
           "slabs-short": np.zeros((n, 1, d, 32), np.float32), "slabs-long": np.zeros((n, 3, d, 32), np.float32),
           "d": np.zeros((n, 2, d + 1, 32), np.float32)}[gate]
    feeds["gate_weight"], feeds["up_weight"] = bad, bad.copy()
    model = make_model(case, with_function=False, x_rank=0)
    for i in model.graph.input:
        if i.name in ("gate_weight", "up_weight"):
            i.type.tensor_type.ClearField("shape")
    sess = session(model, op_library)
    expected = r"'gate_weight' must have shape \[n, ceil\(B / 32\), d, 32\]"
    if gate == "d":  # gate's d disagrees with down's
        expected = r"'down_weight' must have shape \[n, B, d\] = \[4, 40, 25\], got \[4, 40, 24\]"
    with pytest.raises(ORT_ERRORS, match=expected):
        sess.run(None, feeds)


def test_quantized_ops_refuse_gate_up_slabs(op_library, rng):
    """The quantized ops keep gate/up in rows: gate_up_tile = 32 is an error at session creation."""
    from dsmoe_export import quant
    case = make_case(rng, (3,), d=64, n=2, B=32)
    node = quant.make_node("int4", ["X", "r", "g", "gs", "u", "us", "dn", "ds"], ["Y"], num_experts=2,
                           group_size=32)
    node.attribute.append(__import__("onnx").helper.make_attribute("gate_up_tile", 32))
    from onnx import helper
    from dsmoe_export.graph.builder import IR_VERSION, OPSET
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT if name in ("X", "r") or name.endswith("s")
                                            else TensorProto.UINT8, None)
              for name in ("X", "r", "g", "gs", "u", "us", "dn", "ds")]
    graph = helper.make_graph([node], "q", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(
        "org.dsmoe", 1)], ir_version=IR_VERSION)
    with pytest.raises(ORT_ERRORS, match=r"gate_up_tile.*must be 0.*quantized.*got 32"):
        session(model, op_library)
    del case


def test_weights_disagree_with_num_experts(op_library, rng):
    case = make_case(rng, (5,), d=8, n=4, B=3)
    sess = session(make_model(case, with_function=False, node_attrs={**GOOD_ATTRS, "num_experts": 3}), op_library)
    with pytest.raises(ORT_ERRORS, match=r"num_experts.*3.*n = 4"):
        sess.run(None, case.feeds())


def test_unsupported_element_type(op_library, rng):
    case = make_case(rng, (5,), d=8, n=4, B=3)
    # ORT checks the registered element types when it loads the graph.
    with pytest.raises(_state.InvalidGraph, match=r"tensor\(double\).*\(X\)"):
        session(make_model(case, with_function=False, elem_type=TensorProto.DOUBLE), op_library)


def _cpu_isas() -> list[str]:
    flags = open("/proc/cpuinfo").read() if __import__("os").path.exists("/proc/cpuinfo") else ""
    isas = ["baseline"]
    if " avx2 " in flags and " fma " in flags:
        isas.append("avx2")
    if " avx512f " in flags:
        isas.append("avx512")
    return isas


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
@pytest.mark.parametrize("tokens", [1, 4, 6, 7, 12, 45])
def test_every_instruction_set(op_library, rng, monkeypatch, isa, tokens):
    """DSMOE_CPU_ISA forces a variant of the inner loops at kernel creation."""
    if isa not in _cpu_isas():
        pytest.skip(f"this CPU has no {isa}")
    monkeypatch.setenv("DSMOE_CPU_ISA", isa)
    # d and B off the register tiles (16/32-wide vectors, 3- or 6-row tiles, 32-row slabs)
    case = make_case(rng, (tokens,), d=67, n=4, B=37, bias=True, threshold=0.4)
    assert_matches_reference(case, run(case, op_library))


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
@pytest.mark.parametrize("tokens", [1, 5, 7, 45, 300])
@pytest.mark.parametrize("d", [192, 1088])
def test_down_layouts_agree(op_library, rng, monkeypatch, isa, tokens, d):
    """down_weight in column tiles (down_tile = 64) gives the same bits as in rows: the same
    products summed in the same order, read from another place (decode: all the tiles at once;
    prefill: the tile in place instead of its copy). Whole tiles; rows of at most a page (d = 192)
    and longer ones (d = 1088) take different decode loops in the rows layout. (A partial last tile
    is checked against the reference in test_odd_sizes: there the rows path's scalar tail may
    round a product and a sum separately where the tiled one fuses them.)"""
    if isa not in _cpu_isas():
        pytest.skip(f"this CPU has no {isa}")
    monkeypatch.setenv("DSMOE_CPU_ISA", isa)
    case = make_case(rng, (tokens,), d=d, n=6, B=45, bias=True, threshold=0.4)
    rows = run(case, op_library, threads=2)
    assert_matches_reference(case, rows)
    case.attrs["down_tile"] = 64
    assert case.feeds()["down_weight"].shape == (6, d // 64, 45, 64)
    tiled = run(case, op_library, threads=2)
    assert_matches_reference(case, tiled)
    np.testing.assert_array_equal(tiled[0], rows[0])
    np.testing.assert_array_equal(tiled[1], rows[1])


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
@pytest.mark.parametrize("tokens", [1, 5, 12, 13, 45, 300])
@pytest.mark.parametrize("d,B", [(67, 37), (192, 96), (600, 64), (1088, 17)])
def test_gate_up_slabs_every_instruction_set(op_library, rng, monkeypatch, isa, tokens, d, B):
    """gate/up in k-major slabs (gate_up_tile = 32) on each instruction set: the decode path's slab
    dots (1-12 tokens) and the prefill's slab tiles (6 / 3 tokens, remainders of 1-5 / 1-2, token
    groups of 18-48 and more), over k slices of 144 / 288 / 576 steps (d = 600, 1088: several, the
    last partial), a partial last slab (B = 37: 5 rows; B = 17: one slab of 17), against the
    reference and the same bits with 1 and 2 threads."""
    if isa not in _cpu_isas():
        pytest.skip(f"this CPU has no {isa}")
    monkeypatch.setenv("DSMOE_CPU_ISA", isa)
    case = make_case(rng, (tokens,), d=d, n=4, B=B, bias=True, threshold=0.3, gate_up_tile=32)
    assert case.feeds()["gate_weight"].shape == (4, -(-B // 32), d, 32)
    outputs = [run(case, op_library, threads=t) for t in (1, 2)]
    assert_matches_reference(case, outputs[0])
    np.testing.assert_array_equal(outputs[1][0], outputs[0][0])
    np.testing.assert_array_equal(outputs[1][1], outputs[0][1])


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_depth_beyond_one_k_slice(op_library, rng, monkeypatch, isa):
    """d spans several of the GEMM's k slices (256 to 2048 deep, by panel width) and ends off
    the vector width (2085 % 16 = 5); B = 13 leaves a partial register tile of rows. Down in
    column tiles: 32 whole ones and one of 37 columns."""
    if isa not in _cpu_isas():
        pytest.skip(f"this CPU has no {isa}")
    monkeypatch.setenv("DSMOE_CPU_ISA", isa)
    case = make_case(rng, (45,), d=2085, n=2, B=13, bias=True, threshold=0.3, down_tile=64)
    outputs = run(case, op_library)
    assert outputs[1].sum(axis=0).min() > 8  # both blocks take full and narrow panels
    assert_matches_reference(case, outputs)


# Tokens per block that land on every side of the prefill path's panel cuts for
# each instruction set (full panels of 8/16/32 tokens, narrow ones of 4/8/16).
PANEL_CUT_COUNTS = (0, 1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 24, 31, 32, 33, 47, 48, 49, 64, 65, 70)


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_panel_cuts(op_library, rng, monkeypatch, isa):
    """Exact token counts per block: the prefill path's full and narrow panels and their padding."""
    if isa not in _cpu_isas():
        pytest.skip(f"this CPU has no {isa}")
    monkeypatch.setenv("DSMOE_CPU_ISA", isa)
    n, d, B, N = len(PANEL_CUT_COUNTS), 40, 21, 70
    case = make_case(rng, (N,), d=d, n=n, B=B)
    # Block i reads only coordinate i of x (logit +-4): active for the tokens where it is +1.
    case.router_weight = np.zeros((n, d), np.float32)
    case.router_weight[np.arange(n), np.arange(n)] = 4.0
    active = np.zeros((N, n), bool)
    for i, count in enumerate(PANEL_CUT_COUNTS):
        active[rng.permutation(N)[:count], i] = True
    case.x[:, :n] = np.where(active, 1.0, -1.0)
    np.testing.assert_array_equal(case.reference()[1], active)
    assert_matches_reference(case, run(case, op_library))


def test_unknown_instruction_set_is_an_error(op_library, rng, monkeypatch):
    monkeypatch.setenv("DSMOE_CPU_ISA", "avx9000")
    case = make_case(rng, (3,), d=8, n=2, B=4)
    with pytest.raises(Exception, match="DSMOE_CPU_ISA=avx9000"):
        run(case, op_library)


def _thp_mode() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "none"
    return text[text.index("[") + 1:text.index("]")]


# Creates the session in a fresh interpreter and prints how much AnonHugePages grew meanwhile: in
# the test process, memory that earlier tests advised (the enabled case, DSMoESession's mover) and
# freed stays advised, and malloc may hand it to ORT's copies of the weights, which then get huge
# pages with the library's advice off (seen in CI: 9 pages).
_HUGE_PAGES_SCRIPT = """
import sys, numpy as np, onnxruntime as ort
from dsmoe_runtime._library import set_huge_page_advice
model, library, switch, x_file, y_file = sys.argv[1:]
def anon_huge_kb():
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages:"))
opts = ort.SessionOptions()
opts.register_custom_ops_library(library)
blob = open(model, "rb").read()
before = anon_huge_kb()
if switch == "library":
    assert set_huge_page_advice(library, False) is True
try:
    sess = ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])
finally:
    if switch == "library":
        set_huge_page_advice(library, True)
print(anon_huge_kb() - before)
np.save(y_file, sess.run(None, {"X": np.load(x_file)})[0])
"""


@pytest.mark.parametrize("weights", ["float32", "int4"])
@pytest.mark.parametrize("switch", ["on", "env", "library"])
def test_constant_weights_go_on_huge_pages(op_library, rng, tmp_path, switch, weights):
    """Initializer weights (and an int4 op's scales) are advised onto 2 MB pages at session creation
    (cpu/hugepages.h); DSMOE_HUGEPAGES=0 or the library's switch (DsmoeOpsSetHugePageAdvice, what
    DSMoESession turns off) leave them; the results stay those of the reference."""
    import os
    import subprocess
    import sys

    from onnx import helper, numpy_helper

    from dsmoe_export import onnx_op, quant

    if _thp_mode() != "madvise":  # "always" would give ORT's copies huge pages anyway; "never" none
        pytest.skip(f"transparent huge pages are {_thp_mode()!r} here, the test needs 'madvise'")
    enabled = switch == "on"
    # 8 MB per weight tensor: at least 3 aligned 2 MB pages each (float32; int4 at d = 2048: 4 bytes
    # of int4 and 0.5 of scales per 8 weights, the same 8 MB with B four times as large)
    d, n, B = (512, 2, 2048) if weights == "float32" else (2048, 2, 4096)
    case = make_case(rng, (9,), d=d, n=n, B=B, bias=True)
    if weights == "float32":
        arrays = {"gate_weight": case.gate, "up_weight": case.up, "down_weight": case.down}
        names = list(onnx_op.INPUTS)
        node = onnx_op.make_node(names, ["Y"], num_experts=n, **case.attrs)
    else:
        arrays = quant.quantize_block_weights(case.gate, case.up, case.down, "int4", 32)
        names = list(quant.QUANT_INPUTS)
        node = quant.make_node("int4", names, ["Y"], num_experts=n, group_size=32, **case.attrs)
    arrays.update(router_weight=case.router_weight, router_bias=case.router_bias)
    inits = [numpy_helper.from_array(np.asarray(a, np.uint8 if a.dtype == np.uint8 else np.float32), name)
             for name, a in arrays.items()]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, d])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid(onnx_op.DOMAIN, 1)])
    model.ir_version = 10
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    np.save(tmp_path / "x.npy", case.x.astype(np.float32))
    env = {k: v for k, v in os.environ.items() if k != "DSMOE_HUGEPAGES"}
    if switch == "env":
        env["DSMOE_HUGEPAGES"] = "0"
    done = subprocess.run([sys.executable, "-c", _HUGE_PAGES_SCRIPT, str(tmp_path / "m.onnx"), op_library, switch,
                           str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    grown = int(done.stdout.split()[-1])
    if enabled:
        assert grown >= 3 * 3 * 2048, f"AnonHugePages grew by {grown} kB"
    else:
        # One stray 2 MB page may come from elsewhere in the process; the weights would be 9 or more.
        assert grown <= 2048, f"AnonHugePages grew by {grown} kB with the advice off ({switch})"
    y = np.load(tmp_path / "y.npy")
    if weights == "float32":
        y_ref = case.reference()[0]
    else:  # the float64 FFN on the dequantized weights (the int4 op's spec)
        from dsmoe_export.testing.reference import ffn_reference
        from quant_reference import dequantize

        gate, up, down = dequantize(arrays, 4, 32)
        y_ref = ffn_reference(case.x, case.router_weight, gate, up, down, case.router_bias, **case.attrs)[0]
    assert np.abs(y - y_ref).max() <= 1e-4 * max(1.0, np.abs(y_ref).max())
