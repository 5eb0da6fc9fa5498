"""Single-node FFN graphs for the op-level benchmark, and their sessions.

Three graphs compute the same DSMoE layer (docs/op-spec.md) from the inputs
``X [T, d]`` and ``router_weight [n, d]``:

- ``sparse``: one ``org.dsmoe::GatedBlockSparseFFN`` node (the product);
- ``moe``: ONNX Runtime's contrib op ``com.microsoft.MoE`` (CPU EP, swiglu),
  fed with the onnxruntime-genai trick for sigmoid routers (below);
- ``dense``: the plain SwiGLU FFN as three MatMuls (all blocks, no router): the
  baseline the sparse op must beat. Its weights are ``[d, D]`` / ``[D, d]``
  initializers, the layout ORT's MatMul pre-packs for MLAS.

How ``com.microsoft.MoE`` (onnxruntime 1.31.1, CPU EP) is fed, checked
numerically against the sparse op and the numpy reference (tests/test_bench.py):

- ``fc1_experts_weights [n, 2B, d]``: gate and up of block e *interleaved* by
  rows, ``fc1[e, 2j] = gate[e, j]``, ``fc1[e, 2j+1] = up[e, j]`` (attribute
  ``swiglu_fusion=1``; the CPU kernel refuses 0 and 2);
- ``fc2_experts_weights [n, d, B]``: ``down_proj`` columns of block e, i.e.
  ``down[e].T`` of the op's packed layout;
- ``activation_type="swiglu"`` with ``activation_alpha=1``, ``activation_beta=0``
  and no ``swiglu_limit``: ``silu(g) * u`` (the GPT-OSS variant is alpha=1.702,
  beta=1, a limit);
- routing: MoE takes router *logits*, applies a softmax over all n experts,
  keeps the top ``k`` and (``normalize_routing_weights=0``) weights expert e by
  its softmax probability; routes whose probability is 0 are skipped. With
  logits ``log(s_e)`` for active blocks and ``-inf`` for inactive ones (the
  sentinel), the weights are ``s_e / sum_active s``; multiplying MoE's output by
  ``sum_active s`` (``weighting="score"``; ``k_t`` for ``"binary"``) and by
  ``n / k_t`` (``rescale``) gives exactly the DSMoE layer. ``k`` is the exact
  per-token count when the benchmark fixes it, else ``n`` (the sentinel makes
  the rest zero-weight, skipped). A token with k = 0 would make every logit
  -inf (softmax NaN): its expert 0 gets logit 0 and its output scale is 0 (one
  wasted expert for such a token).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from .. import onnx_op, quant
from ..graph.builder import IR_VERSION, OPSET

# onnx writes its newest IR version; onnxruntime 1.31 reads up to 13 (10 is enough here).
MS_DOMAIN = "com.microsoft"
F32 = TensorProto.FLOAT

# Attributes of the sparse op in the benchmark: the paper's defaults.
OP_ATTRS = dict(threshold=0.5, rescale=True, weighting="score", activation="silu")


@dataclass
class Experts:
    """One FFN's weights in the op's packed layout: gate, up, down ``[n, B, d]`` float32."""

    gate: np.ndarray
    up: np.ndarray
    down: np.ndarray

    @property
    def n(self) -> int:
        return self.gate.shape[0]

    @property
    def block(self) -> int:
        return self.gate.shape[1]

    @property
    def d(self) -> int:
        return self.gate.shape[2]

    @property
    def D(self) -> int:
        return self.n * self.block

    @classmethod
    def random(cls, rng: np.random.Generator, d: int, D: int, n: int) -> "Experts":
        if D % n:
            raise ValueError(f"D = {D} is not divisible by n = {n}")
        B = D // n
        # Scaled like a trained model: unit-ish activations in, unit-ish out.
        def draw(scale_dim):
            a = rng.standard_normal((n, B, d), dtype=np.float32)
            a *= np.float32(1.0 / np.sqrt(scale_dim))
            return a
        return cls(gate=draw(d), up=draw(d), down=draw(D))

    @functools.cached_property
    def down_tiled(self) -> np.ndarray:
        """down in the op's column-tile layout (down_tile = 64), made once for all sessions."""
        return onnx_op.tile_down(self.down)

    @functools.cached_property
    def gate_up_slabs(self) -> tuple[np.ndarray, np.ndarray]:
        """gate and up in the op's slab layout (gate_up_tile = 32), made once for all sessions."""
        return onnx_op.tile_gate_up(self.gate), onnx_op.tile_gate_up(self.up)

    def op_weights(self, down_tile: int, gate_up_tile: int) -> dict[str, np.ndarray]:
        """The op's gate_weight, up_weight and down_weight in those layouts."""
        gate, up = self.gate_up_slabs if gate_up_tile else (self.gate, self.up)
        return {"gate_weight": gate, "up_weight": up, "down_weight": self.down_tiled if down_tile else self.down}

    # Layouts of the other graphs (fresh contiguous copies).
    def dense_layout(self):
        """(W_gate [d, D], W_up [d, D], W_down [D, d]): x @ W, the layout ORT's MatMul pre-packs."""
        d, D = self.d, self.D
        return (np.ascontiguousarray(self.gate.reshape(D, d).T), np.ascontiguousarray(self.up.reshape(D, d).T),
                np.ascontiguousarray(self.down.reshape(D, d)))

    def moe_layout(self):
        """(fc1 [n, 2B, d] gate/up interleaved by rows, fc2 [n, d, B])."""
        n, B, d = self.gate.shape
        fc1 = np.empty((n, 2 * B, d), np.float32)
        fc1[:, 0::2] = self.gate
        fc1[:, 1::2] = self.up
        return fc1, np.ascontiguousarray(self.down.transpose(0, 2, 1))


def _value_info(name, shape, elem=F32):
    return helper.make_tensor_value_info(name, elem, shape)


def _placeholder(name: str, array: np.ndarray) -> TensorProto:
    """An initializer that only declares name, type and shape; its data is marked external and
    is supplied in memory at session creation (SessionOptions.add_external_initializers)."""
    t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=list(array.shape))
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "supplied-in-memory.bin"), ("offset", "0"), ("length", str(array.nbytes))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def _model(nodes, inputs, outputs, weights: dict[str, np.ndarray], *, consts=(), extra_opsets=()):
    """(model, weights): the weights are placeholder initializers that the Runner supplies from
    the caller's numpy buffers at session creation: the model proto stays small (no 0.5 GB
    serialisation per session) and all graphs read the very same arrays."""
    graph = helper.make_graph(nodes, "bench", inputs, outputs,
                              list(consts) + [_placeholder(k, v) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), *extra_opsets],
                              ir_version=IR_VERSION)
    return model, weights


def _xy(d):
    return [_value_info("X", ["T", d]), _value_info("router_weight", [None, d])], [_value_info("Y", ["T", d])]


def default_layout(d: int) -> str:
    """The down_weight layout the exporter writes by default at hidden size d."""
    from ..exporter import choose_down_layout

    return choose_down_layout("auto", d)


def default_gate_up_layout() -> str:
    """The gate/up layout the exporter writes by default in float32 graphs."""
    from ..exporter import choose_gate_up_layout

    return choose_gate_up_layout("auto")


def sparse_graph(e: Experts, *, active_output: bool = False, **attrs):
    """The product: one GatedBlockSparseFFN node (attributes: OP_ATTRS unless given; weights in
    the layouts the exporter writes for this hidden size unless down_tile / gate_up_tile are given)."""
    attrs = {**OP_ATTRS, "down_tile": onnx_op.DOWN_LAYOUTS[default_layout(e.d)],
             "gate_up_tile": onnx_op.GATE_UP_LAYOUTS[default_gate_up_layout()], **attrs}
    weights = e.op_weights(attrs["down_tile"], attrs["gate_up_tile"])
    inputs, outputs = _xy(e.d)
    if active_output:
        outputs.append(_value_info("active", ["T", e.n], TensorProto.BOOL))
    node = onnx_op.make_node(["X", "router_weight", *weights], ["Y", "active" if active_output else ""],
                             num_experts=e.n, **attrs)
    return _model([node], inputs, outputs, weights,
                  extra_opsets=[helper.make_opsetid(onnx_op.DOMAIN, onnx_op.OP_VERSION)])


def dense_graph(e: Experts, weights: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None):
    """The dense SwiGLU FFN, silu(X W_g) * (X W_u) @ W_d: the baseline (the router input is unused).
    ``W_gate``, ``W_up`` ``[d, D]`` and ``W_down`` ``[D, d]`` are constant initializers, which
    ORT's MatMul pre-packs for MLAS at session creation."""
    wg, wu, wd = weights if weights is not None else e.dense_layout()
    inputs, outputs = _xy(e.d)
    return _model(dense_ffn_nodes("X", "Y"), inputs, outputs, {"W_gate": wg, "W_up": wu, "W_down": wd})


def dense_ffn_nodes(x: str, y: str, suffix: str = "") -> list:
    """silu(x W_gate) * (x W_up) @ W_down as ONNX nodes; weight and intermediate names end in `suffix`."""
    g, u, sg, ag, h = (name + suffix for name in ("g", "u", "sg", "ag", "h"))
    return [helper.make_node("MatMul", [x, "W_gate" + suffix], [g]),
            helper.make_node("MatMul", [x, "W_up" + suffix], [u]),
            helper.make_node("Sigmoid", [g], [sg]),
            helper.make_node("Mul", [g, sg], [ag]),
            helper.make_node("Mul", [ag, u], [h]),
            helper.make_node("MatMul", [h, "W_down" + suffix], [y])]


def moe_graph(e: Experts, *, k: int | None = None, threshold: float = OP_ATTRS["threshold"],
              rescale: bool = OP_ATTRS["rescale"], weighting: str = OP_ATTRS["weighting"],
              moe_weights: tuple[np.ndarray, np.ndarray] | None = None, qmoe: tuple | None = None,
              bits: int | None = None, group_size: int = quant.DEFAULT_GROUP_SIZE):
    """com.microsoft.MoE computing the DSMoE layer (module docstring). ``k``: MoE's top-k
    attribute, the exact active count per token when the caller guarantees one; None = n."""
    n = e.n
    if bits is None:
        fc1, fc2 = moe_weights if moe_weights is not None else e.moe_layout()
        weights = {"fc1": fc1, "fc2": fc2}
        moe_inputs, op_type, quant_attrs = ["X", "router_probs", "fc1", "", "fc2"], "MoE", {}
    else:  # com.microsoft.QMoE over the same blocks, block-wise quantized (qmoe_layout)
        fc1, s1, fc2, s2 = qmoe if qmoe is not None else qmoe_layout(e, bits, group_size)
        weights = {"fc1": fc1, "fc1_scales": s1, "fc2": fc2, "fc2_scales": s2}
        moe_inputs = ["X", "router_probs", "fc1", "fc1_scales", "", "fc2", "fc2_scales"]
        op_type, quant_attrs = "QMoE", dict(expert_weight_bits=bits, block_size=group_size)
    c = lambda name, value, dtype=np.float32: numpy_helper.from_array(np.asarray(value, dtype), name)  # noqa: E731
    consts = [c("tau", threshold), c("zero", 0.0), c("one", 1.0), c("neg_inf", -np.inf), c("n_f", float(n)),
              c("axis_last", [-1], np.int64), c("first_col", np.arange(n) == 0, np.bool_)]
    nodes = [
        helper.make_node("Gemm", ["X", "router_weight"], ["z"], transB=1),           # [T, n] logits
        helper.make_node("Sigmoid", ["z"], ["s"]),
        helper.make_node("Greater", ["s", "tau"], ["active"]),
        helper.make_node("Cast", ["active"], ["active_f"], to=F32),
        helper.make_node("ReduceSum", ["active_f", "axis_last"], ["k"], keepdims=1),  # [T, 1]
        helper.make_node("Equal", ["k", "zero"], ["idle"]),
        # Active blocks: log(s) ("score": softmax weights s_e / sum_active s) or 0 ("binary": 1 / k);
        # the others -inf (softmax weight exactly 0: skipped).
        helper.make_node("Log", ["s"], ["log_s"]) if weighting == "score" else
        helper.make_node("Identity", ["zero"], ["log_s"]),
        helper.make_node("Where", ["active", "log_s", "neg_inf"], ["probs0"]),
        helper.make_node("And", ["idle", "first_col"], ["idle_first"]),
        helper.make_node("Where", ["idle_first", "zero", "probs0"], ["router_probs"]),
        helper.make_node(op_type, moe_inputs, ["moe_y"], domain=MS_DOMAIN,
                         k=int(n if k is None else k), activation_type="swiglu", swiglu_fusion=1,
                         activation_alpha=1.0, activation_beta=0.0, normalize_routing_weights=0,
                         use_sparse_mixer=0, **quant_attrs),
    ]
    # Output scale per token: sum_active s (score) or k (binary), times n / k (rescale); 0 when k = 0.
    if weighting == "score":
        nodes += [helper.make_node("Mul", ["s", "active_f"], ["s_on"]),
                  helper.make_node("ReduceSum", ["s_on", "axis_last"], ["wsum"], keepdims=1)]
    elif weighting == "binary":
        nodes.append(helper.make_node("Identity", ["k"], ["wsum"]))
    else:
        raise ValueError(f"unknown weighting {weighting!r}")
    if rescale:
        nodes += [helper.make_node("Max", ["k", "one"], ["k1"]),
                  helper.make_node("Div", ["n_f", "k1"], ["c"]),
                  helper.make_node("Mul", ["wsum", "c"], ["scale"])]
    else:
        nodes.append(helper.make_node("Identity", ["wsum"], ["scale"]))
    nodes.append(helper.make_node("Mul", ["moe_y", "scale"], ["Y"]))
    inputs, outputs = _xy(e.d)
    return _model(nodes, inputs, outputs, weights, consts=consts,
                  extra_opsets=[helper.make_opsetid(MS_DOMAIN, 1)])


# --------------------------------------------------------------------------- quantized variants
# Weight-only precisions (docs/op-spec.md "Quantized variants"): the sparse op's Int4/Int8/F16 ops,
# the dense FFN as com.microsoft.MatMulNBits (int4/int8; float16: none on the CPU EP) and
# com.microsoft.QMoE (int4/int8), all from the same float weights and the same group size.
PRECISIONS = ("int4", "int8", "float16")


def quant_sparse_graph(e: Experts, fmt: str, group_size: int = quant.DEFAULT_GROUP_SIZE,
                       packed: dict | None = None, **attrs):
    """One GatedBlockSparseFFN{Int4,Int8,F16} node over ``e`` quantized to ``fmt``."""
    attrs = {**OP_ATTRS, **attrs}
    packed = packed if packed is not None else quant.quantize_block_weights(e.gate, e.up, e.down, fmt, group_size)
    names = [k for k in (quant.QUANT_INPUTS if fmt in quant.BITS else quant.F16_INPUTS)[2:] if k in packed]
    inputs, outputs = _xy(e.d)
    node = quant.make_node(fmt, ["X", "router_weight", *names], ["Y", ""], num_experts=e.n,
                           group_size=group_size if fmt in quant.BITS else None, **attrs)
    return _model([node], inputs, outputs, {k: packed[k] for k in names},
                  extra_opsets=[helper.make_opsetid(onnx_op.DOMAIN, onnx_op.OP_VERSION)])


def nbits_dense_graph(e: Experts, bits: int, group_size: int = quant.DEFAULT_GROUP_SIZE, accuracy_level: int = 0):
    """The dense SwiGLU FFN with its three MatMuls as com.microsoft.MatMulNBits (``bits``,
    block-wise along K with ``group_size``, default zero point). ``accuracy_level`` 0: float32
    activations (the same arithmetic as the sparse op); 4: activations quantized to int8 per
    block (MLAS's integer dot-product kernels: faster, a different function)."""
    wg, wu, wd = e.dense_layout()
    weights, nodes = {}, []
    for name, w, x, y in (("gate", wg, "X", "g"), ("up", wu, "X", "u"), ("down", wd, "h", "Y")):
        K, N = w.shape
        b, s = quant.matmul_nbits_weights(w, bits, group_size)
        weights[f"{name}_q"], weights[f"{name}_s"] = b, s
        nodes.append(helper.make_node("MatMulNBits", [x, f"{name}_q", f"{name}_s"], [y], domain=MS_DOMAIN,
                                      K=K, N=N, bits=bits, block_size=group_size,
                                      accuracy_level=accuracy_level))
    nodes[2:2] = [helper.make_node("Sigmoid", ["g"], ["sg"]), helper.make_node("Mul", ["g", "sg"], ["ag"]),
                  helper.make_node("Mul", ["ag", "u"], ["h"])]
    inputs, outputs = _xy(e.d)
    return _model(nodes, inputs, outputs, weights, extra_opsets=[helper.make_opsetid(MS_DOMAIN, 1)])


def qmoe_layout(e: Experts, bits: int, group_size: int = quant.DEFAULT_GROUP_SIZE):
    """QMoE's raw (un-prepacked) weights: fc1 [n, 2B, d*bits/8] (gate/up rows interleaved),
    fc2 [n, d, B*bits/8], scales [n, rows, K / group_size], packed along K as MatMulNBits."""
    fc1, fc2 = e.moe_layout()
    out = []
    for w in (fc1, fc2):
        n, N, K = w.shape
        q, s = quant.quantize_rows(w, bits, group_size)
        if bits == 4:
            q = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
        out += [np.ascontiguousarray(q), s]
    return tuple(out)


# How the timed sessions get their threads: a pool per session whose idle workers sleep.
# ORT's default lets a pool's workers spin after each call; with several sessions in one
# process (sparse, MoE, dense), the idle pools' spinning competed with another session's
# timed call: on 2 cores that put medians at up to 2x the minimum and moved MoE's times by up
# to 40 %, cache flush or not. (One pool shared by all sessions avoids it too, but ORT's global
# pools are process-wide: every later session of the process, the exporter's validation
# included, would have to use them.)
THREAD_POOL = "a pool per session, idle workers sleeping (session.intra_op.allow_spinning=0)"


def session_options(threads: int | None, library: str | None = None,
                    profile_prefix: str | None = None) -> ort.SessionOptions:
    """Options of a timed session; `threads` None keeps ORT's default thread count; with
    `profile_prefix`, ORT's profiler on (session.end_profiling() writes the file)."""
    opts = ort.SessionOptions()
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    if library is not None:
        opts.register_custom_ops_library(library)
    return opts


class Runner:
    """A session over shared weights. ``bind(x, router_weight)`` gives a callable that runs one
    call with inputs and outputs pre-bound (IOBinding), for timing; ``__call__`` is a plain run.

    ``shared`` weights are handed to ORT as OrtValues over the caller's numpy buffers
    (``add_external_initializers``; ORT may still copy them into the session).
    """

    def __init__(self, model: onnx.ModelProto, shared: dict[str, np.ndarray], *, threads: int,
                 library: str | None = None, profile_prefix: str | None = None):
        opts = session_options(threads, library, profile_prefix)
        # Keep the OrtValues (and through them the numpy buffers) alive as long as the session.
        self._weights = {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in shared.items()}
        if self._weights:
            opts.add_external_initializers(list(self._weights), list(self._weights.values()))
        self.session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]

    def bind(self, x: np.ndarray, router_weight: np.ndarray):
        binding = self.session.io_binding()
        keep = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x, np.float32)),
                ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(router_weight, np.float32))]
        binding.bind_ortvalue_input("X", keep[0])
        binding.bind_ortvalue_input("router_weight", keep[1])
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        session = self.session

        def call() -> None:
            session.run_with_iobinding(binding)

        call.inputs = keep  # keeps the input buffers alive with the callable
        return call

    def __call__(self, x: np.ndarray, router_weight: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {"X": np.asarray(x, np.float32),
                                       "router_weight": np.asarray(router_weight, np.float32)})


# The sparse op with its down weights in a given layout (bench op --compare-layouts).
LAYOUT_KINDS = {layout: f"sparse_{layout}" for layout in onnx_op.DOWN_LAYOUTS}


def runner(kind: str, e: Experts, *, threads: int, library: str | None = None, k: int | None = None,
           cache: dict | None = None, **attrs) -> Runner:
    """A Runner for ``kind`` in sparse / dense / moe. ``cache`` (a dict) keeps the re-laid-out
    weights of ``e`` so that several MoE sessions (one per k) share one copy."""
    cache = {} if cache is None else cache
    if kind in ("sparse", *LAYOUT_KINDS.values()):  # sparse_rows / sparse_tiled: that down_weight layout
        if library is None:
            raise ValueError("the sparse graph needs the op library (DSMOE_OPS_LIBRARY or pip install .)")
        layout = {v: k for k, v in LAYOUT_KINDS.items()}.get(kind)
        model, shared = sparse_graph(e, **({"down_tile": onnx_op.DOWN_LAYOUTS[layout]} if layout else {}), **attrs)
    elif kind == "dense":
        model, shared = dense_graph(e)
    elif kind == "moe":
        if "moe" not in cache:
            cache["moe"] = e.moe_layout()
        model, shared = moe_graph(e, k=k, moe_weights=cache["moe"], **attrs)
    elif "-" in kind and kind.split("-", 1)[1] in PRECISIONS:
        # sparse-int4, dense-int8, qmoe-int4, ...: the quantized variants (group size: attrs["group_size"]);
        # sparsei8- / densei8-: the sparse op / MatMulNBits with int8 activations (accuracy_level 4).
        base, fmt = kind.split("-", 1)
        group = attrs.pop("group_size", quant.DEFAULT_GROUP_SIZE)
        if base in ("sparse", "sparsei8"):
            if library is None:
                raise ValueError("the sparse graph needs the op library (DSMOE_OPS_LIBRARY or pip install .)")
            if base == "sparsei8" and fmt not in quant.BITS:
                raise ValueError(f"{kind}: int8 activations (accuracy_level 4) need int4 or int8 weights")
            key = ("packed", fmt, group)
            if key not in cache:
                cache[key] = quant.quantize_block_weights(e.gate, e.up, e.down, fmt, group)
            level = {"accuracy_level": 4} if base == "sparsei8" else {}
            model, shared = quant_sparse_graph(e, fmt, group, packed=cache[key], **level, **attrs)
            return Runner(model, shared, threads=threads, library=library)
        if fmt not in quant.BITS:
            raise ValueError(f"{base} has no {fmt} variant on the CPU EP (MatMulNBits and QMoE are int4/int8)")
        if base in ("dense", "densei8"):  # densei8: MatMulNBits with int8 activations (accuracy_level 4)
            model, shared = nbits_dense_graph(e, quant.BITS[fmt], group, accuracy_level=4 if base == "densei8" else 0)
        elif base == "qmoe":
            key = ("qmoe", fmt, group)
            if key not in cache:
                cache[key] = qmoe_layout(e, quant.BITS[fmt], group)
            model, shared = moe_graph(e, k=k, qmoe=cache[key], bits=quant.BITS[fmt], group_size=group, **attrs)
        else:
            raise ValueError(f"unknown graph kind {kind!r}")
    else:
        raise ValueError(f"unknown graph kind {kind!r}")
    return Runner(model, shared, threads=threads, library=library if kind in ("sparse", *LAYOUT_KINDS.values()) else None)
