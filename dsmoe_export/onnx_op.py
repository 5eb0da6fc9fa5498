"""The ONNX side of the op ``org.dsmoe::GatedBlockSparseFFN`` (docs/op-spec.md).

- :func:`pack_block_weights` turns a SwiGLU FFN's Hugging Face weights into the
  op's packed block layout; :func:`tile_down` / :func:`untile_down` convert
  ``down_weight`` between its two layouts (attribute ``down_tile``), :func:`tile_gate_up` /
  :func:`untile_gate_up` ``gate_weight`` and ``up_weight`` (attribute ``gate_up_tile``);
- :func:`make_node` builds the op's node;
- :func:`function_proto` / :func:`add_function_to_model` give a model a
  model-local function of the same domain and name whose body uses standard
  ONNX ops only. ONNX Runtime runs that body when the op library is not
  registered (a dense FFN followed by the routing mask: slow, but the model
  stays runnable anywhere); with the library registered, its kernel wins.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

DOMAIN = "org.dsmoe"
OP_TYPE = "GatedBlockSparseFFN"
OP_VERSION = 1
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
WEIGHTINGS = ("score", "binary")

INPUTS = ("X", "router_weight", "gate_weight", "up_weight", "down_weight", "router_bias")
OUTPUTS = ("Y", "active")
# The function body compares string attributes with Equal, defined for strings from opset 19 on.
MIN_FUNCTION_OPSET = 19

# down_weight's layouts: 0 = [n, B, d] rows; DOWN_TILE = [n, ceil(d / 64), B, 64] column tiles.
DOWN_TILE = 64
DOWN_LAYOUTS = {"rows": 0, "tiled": DOWN_TILE}
# gate_weight's and up_weight's layouts: 0 = [n, B, d] rows; GATE_UP_SLAB = [n, ceil(B / 32), d, 32]
# k-major slabs of 32 rows.
GATE_UP_SLAB = 32
GATE_UP_LAYOUTS = {"rows": 0, "slabs": GATE_UP_SLAB}
# The attributes that choose the float32 op's weight layouts (the quantized ops have neither).
LAYOUT_ATTRIBUTES = ("down_tile", "gate_up_tile")

_DEFAULTS = {"threshold": 0.5, "rescale": 1, "weighting": "score", "activation": "silu", "down_tile": 0,
             "gate_up_tile": 0}


# --------------------------------------------------------------------------- weights

def pack_block_weights(gate_proj, up_proj, down_proj, num_experts: int, *, down_tile: int = 0,
                       gate_up_tile: int = 0):
    """(gate [n, B, d], up [n, B, d], down [n, B, d]) from gate/up ``[D, d]`` and down ``[d, D]``.

    Block i holds rows ``[i*B, (i+1)*B)`` of gate/up and columns of down (transposed).
    ``down_tile`` = DOWN_TILE gives down in column tiles instead (:func:`tile_down`),
    ``gate_up_tile`` = GATE_UP_SLAB gate and up in slabs (:func:`tile_gate_up`).
    The results are contiguous and of the inputs' array library (torch or numpy).
    """
    _check_down_tile(down_tile)
    _check_gate_up_tile(gate_up_tile)
    gate, up, down = _pack_rows(gate_proj, up_proj, down_proj, num_experts)
    if gate_up_tile:
        gate, up = tile_gate_up(gate), tile_gate_up(up)
    return gate, up, (tile_down(down) if down_tile else down)


def _check_gate_up_tile(gate_up_tile) -> None:
    if isinstance(gate_up_tile, bool) or gate_up_tile not in GATE_UP_LAYOUTS.values():
        raise ValueError(f"gate_up_tile must be 0 (gate_weight, up_weight [n, B, d]) or {GATE_UP_SLAB} "
                         f"([n, ceil(B / {GATE_UP_SLAB}), d, {GATE_UP_SLAB}]), got {gate_up_tile!r}")


def tile_gate_up(w):
    """``[n, B, d]`` -> ``[n, ceil(B / 32), d, 32]``: slab s of block i holds rows ``[32s, 32s + 32)``
    k-major (``[i, s, k, r]`` = row 32s + r, column k); rows past B are 0."""
    if len(w.shape) != 3:
        raise ValueError(f"gate/up must be [n, B, d], got shape {tuple(w.shape)}")
    n, B, d = w.shape
    slabs = -(-B // GATE_UP_SLAB)
    padded = _zero_pad(w, axis=1, size=slabs * GATE_UP_SLAB)
    return _contiguous(_permute(padded.reshape(n, slabs, GATE_UP_SLAB, d), (0, 1, 3, 2)))


def untile_gate_up(w, block_size: int):
    """The inverse of :func:`tile_gate_up`: ``[n, ceil(B / 32), d, 32]`` -> ``[n, B, d]``."""
    if len(w.shape) != 4 or w.shape[3] != GATE_UP_SLAB or w.shape[1] != -(-block_size // GATE_UP_SLAB):
        raise ValueError(f"gate/up must be [n, ceil(B / {GATE_UP_SLAB}), d, {GATE_UP_SLAB}] with B = {block_size}, "
                         f"got shape {tuple(w.shape)}")
    n, slabs, d, _ = w.shape
    rows = _contiguous(_permute(w, (0, 1, 3, 2))).reshape(n, slabs * GATE_UP_SLAB, d)
    return _contiguous(rows[:, :block_size])


def _check_down_tile(down_tile) -> None:
    if isinstance(down_tile, bool) or down_tile not in DOWN_LAYOUTS.values():
        raise ValueError(f"down_tile must be 0 (down_weight [n, B, d]) or {DOWN_TILE} "
                         f"([n, ceil(d / {DOWN_TILE}), B, {DOWN_TILE}]), got {down_tile!r}")


def tile_down(down):
    """``[n, B, d]`` -> ``[n, ceil(d / 64), B, 64]``: tile t of block i holds columns
    ``[64t, 64t + 64)`` of its ``[B, d]`` rows, contiguous; columns past d are 0."""
    if len(down.shape) != 3:
        raise ValueError(f"down must be [n, B, d], got shape {tuple(down.shape)}")
    n, B, d = down.shape
    tiles = -(-d // DOWN_TILE)
    padded = _zero_pad(down, axis=2, size=tiles * DOWN_TILE)
    return _contiguous(_permute(padded.reshape(n, B, tiles, DOWN_TILE), (0, 2, 1, 3)))


def untile_down(down, d: int):
    """The inverse of :func:`tile_down`: ``[n, ceil(d / 64), B, 64]`` -> ``[n, B, d]``."""
    if len(down.shape) != 4 or down.shape[3] != DOWN_TILE or down.shape[1] != -(-d // DOWN_TILE):
        raise ValueError(f"down must be [n, ceil(d / {DOWN_TILE}), B, {DOWN_TILE}] with d = {d}, "
                         f"got shape {tuple(down.shape)}")
    n, tiles, B, _ = down.shape
    rows = _contiguous(_permute(down, (0, 2, 1, 3))).reshape(n, B, tiles * DOWN_TILE)
    return _contiguous(rows[..., :d])


# The layouts' conversions for numpy arrays and torch tensors alike.
def _zero_pad(a, *, axis: int, size: int):
    """`a` with zeros appended along `axis` up to `size` (itself when it is that long)."""
    pad = size - a.shape[axis]
    if not pad:
        return a
    if isinstance(a, np.ndarray):
        return np.pad(a, [(0, pad if i == axis else 0) for i in range(a.ndim)])
    import torch
    return torch.nn.functional.pad(a, [0, 0] * (a.dim() - 1 - axis) + [0, pad])


def _permute(a, perm):
    return a.transpose(*perm) if isinstance(a, np.ndarray) else a.permute(*perm)


def _contiguous(a):
    return np.ascontiguousarray(a) if isinstance(a, np.ndarray) else a.contiguous()


def _pack_rows(gate_proj, up_proj, down_proj, num_experts: int):
    if not isinstance(num_experts, (int, np.integer)) or num_experts < 1:
        raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")
    n = int(num_experts)
    if tuple(gate_proj.shape) != tuple(up_proj.shape) or len(gate_proj.shape) != 2:
        raise ValueError(f"gate_proj and up_proj must both be [D, d], got {tuple(gate_proj.shape)} "
                         f"and {tuple(up_proj.shape)}")
    D, d = gate_proj.shape
    if tuple(down_proj.shape) != (d, D):
        raise ValueError(f"down_proj must be [d, D] = {[d, D]}, got {list(down_proj.shape)}")
    if D % n != 0:
        raise ValueError(f"the intermediate size D = {D} is not divisible by num_experts = {n}")
    B = D // n
    if isinstance(gate_proj, np.ndarray):
        return (np.ascontiguousarray(gate_proj.reshape(n, B, d)),
                np.ascontiguousarray(up_proj.reshape(n, B, d)),
                np.ascontiguousarray(down_proj.T.reshape(n, B, d)))
    return (gate_proj.reshape(n, B, d).contiguous(),
            up_proj.reshape(n, B, d).contiguous(),
            down_proj.t().reshape(n, B, d).contiguous())


# --------------------------------------------------------------------------- node

def _check_attributes(num_experts, threshold, rescale, weighting, activation, down_tile=0, gate_up_tile=0) -> None:
    if isinstance(num_experts, bool) or not isinstance(num_experts, (int, np.integer)) or num_experts < 1:
        raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")
    if not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
        raise ValueError(f"threshold must be finite and in [0, 1], got {threshold!r}")
    if rescale not in (True, False, 0, 1):
        raise ValueError(f"rescale must be a bool, got {rescale!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    _check_down_tile(down_tile)
    _check_gate_up_tile(gate_up_tile)


def _strip_trailing_empty(names: Sequence[str]) -> list[str]:
    names = list(names)
    while names and not names[-1]:
        names.pop()
    return names


def make_node(inputs: list[str], outputs: list[str], *, num_experts: int, threshold: float = 0.5,
              rescale: bool = True, weighting: str = "score", activation: str = "silu",
              down_tile: int = 0, gate_up_tile: int = 0, name: str | None = None) -> onnx.NodeProto:
    """The op's node. ``inputs``: X, router_weight, gate_weight, up_weight, down_weight[, router_bias];
    ``outputs``: Y[, active]. Empty names mark absent optional ones. ``down_tile`` (0 or
    DOWN_TILE) is down_weight's layout, ``gate_up_tile`` (0 or GATE_UP_SLAB) gate_weight's and
    up_weight's; each attribute is written only when it is not 0.

    The node always lists two outputs (``""`` when ``active`` is not wanted):
    expanding the function body needs every output slot of the function.
    """
    _check_attributes(num_experts, threshold, rescale, weighting, activation, down_tile, gate_up_tile)
    inputs = _strip_trailing_empty(inputs)
    if not 5 <= len(inputs) <= 6 or not all(inputs[:5]):
        raise ValueError(f"inputs must name {INPUTS[:5]} and optionally router_bias, got {inputs}")
    if not 1 <= len(outputs) <= 2 or not outputs[0]:
        raise ValueError(f"outputs must name Y and optionally active, got {outputs}")
    layout = {k: int(v) for k, v in (("down_tile", down_tile), ("gate_up_tile", gate_up_tile)) if v}
    return helper.make_node(
        OP_TYPE, inputs, _pad_outputs(outputs), name=name, domain=DOMAIN,
        num_experts=int(num_experts), threshold=float(threshold), rescale=int(bool(rescale)),
        weighting=weighting, activation=activation, **layout)


def _pad_outputs(outputs: Sequence[str]) -> list[str]:
    return list(outputs) + [""] * (len(OUTPUTS) - len(outputs))


# --------------------------------------------------------------------------- function body

class _Body:
    """Collects the nodes of the function body; fresh names for intermediates."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        self._count += 1
        out = f"_{op_type.lower()}{self._count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, value, dtype=TensorProto.FLOAT, dims=None) -> str:
        values = value if isinstance(value, (list, tuple)) else [value]
        return self.op("Constant", value=helper.make_tensor("v", dtype, [] if dims is None else dims, values))

    def attr(self, value_field: str, name: str) -> str:
        """A Constant holding the calling node's attribute ``name`` (via ref_attr_name)."""
        out = f"_attr_{name}"
        node = helper.make_node("Constant", [], [out])
        node.attribute.append(onnx.AttributeProto(name=value_field, ref_attr_name=name,
                                                  type=_ATTR_TYPES[value_field]))
        self.nodes.append(node)
        return out

    def select(self, key: str, choices: dict[str, str], fallback: str) -> str:
        """choices[key] for a string scalar ``key``; ``fallback`` when it matches none."""
        result = fallback
        for choice, value in reversed(list(choices.items())):
            is_choice = self.op("Equal", key, self.const(choice, TensorProto.STRING))
            result = self.op("Where", is_choice, value, result)
        return result


_ATTR_TYPES = {"value_float": onnx.AttributeProto.FLOAT, "value_int": onnx.AttributeProto.INT,
               "value_string": onnx.AttributeProto.STRING}


def _activations(b: _Body, z: str) -> dict[str, str]:
    half, one = b.const(0.5), b.const(1.0)
    silu = b.op("Mul", z, b.op("Sigmoid", z))
    gelu = b.op("Mul", b.op("Mul", half, z),
                b.op("Add", one, b.op("Erf", b.op("Mul", z, b.const(1.0 / math.sqrt(2.0))))))
    cubic = b.op("Mul", b.const(0.044715), b.op("Mul", z, b.op("Mul", z, z)))
    inner = b.op("Mul", b.const(math.sqrt(2.0 / math.pi)), b.op("Add", z, cubic))
    gelu_tanh = b.op("Mul", b.op("Mul", half, z), b.op("Add", one, b.op("Tanh", inner)))
    return {"silu": silu, "gelu": gelu, "gelu_tanh": gelu_tanh}


def function_proto(opset: int) -> onnx.FunctionProto:
    """The op as a model-local function (domain DOMAIN, name OP_TYPE) in ai.onnx ops of ``opset``.

    Dense then masked: every block is computed and inactive ones are zeroed
    (Where, so inf/NaN of an inactive block's gate/up cannot leak; a NaN/inf in
    an inactive block's *down* weights still does through the final MatMul).
    Float32 inside (inputs cast, Y cast back to X's type); the router logits
    are computed in X's type (Gemm, whose optional C input carries the
    optional bias). Attribute values outside the spec's sets make Y NaN:
    a function body cannot raise (the kernel rejects them at session creation).
    """
    if opset < MIN_FUNCTION_OPSET:
        raise ValueError(f"the {OP_TYPE} function body needs ai.onnx opset >= {MIN_FUNCTION_OPSET} "
                         f"(Equal on strings), got {opset}")
    b = _Body()
    X, router_weight, gate_weight, up_weight, down_weight, router_bias = INPUTS
    f32 = TensorProto.FLOAT
    zero, one, nan = b.const(0.0), b.const(1.0), b.const(float("nan"))
    tau = b.attr("value_float", "threshold")
    rescale = b.attr("value_int", "rescale")
    weighting = b.attr("value_string", "weighting")
    activation = b.attr("value_string", "activation")
    down_tile = b.attr("value_int", "down_tile")
    gate_up_tile = b.attr("value_int", "gate_up_tile")

    # Sizes: n, B, d from the weights (B from down_weight: gate_weight's slabs round it up);
    # tokens flattened to [N, d].
    zero_i64 = b.const(0, TensorProto.INT64)
    n = b.op("Shape", gate_weight, start=0, end=1)
    d = b.op("Shape", gate_weight, start=2, end=3)
    b_axis = b.op("Where", b.op("Equal", down_tile, zero_i64), b.const(1, TensorProto.INT64, [1]),
                  b.const(2, TensorProto.INT64, [1]))
    block = b.op("Gather", b.op("Shape", down_weight), b_axis)
    minus_one = b.const(-1, TensorProto.INT64, [1])
    x2 = b.op("Reshape", X, b.op("Concat", minus_one, d, axis=0))                     # [N, d]  T
    rows = b.op("Concat", minus_one, d, axis=0)

    # Routing. An absent router_bias reaches Gemm's optional C as an absent input.
    logits = b.op("Cast", b.op("Gemm", x2, router_weight, router_bias, transB=1), to=f32)   # [N, n]
    s = b.op("Sigmoid", logits)
    active = b.op("Greater", s, tau)                                                  # NaN -> false
    k = b.op("ReduceSum", b.op("Cast", active, to=f32), b.const(-1, TensorProto.INT64, [1]), keepdims=1)
    score = b.select(weighting, {"score": s, "binary": one}, nan)
    g = b.op("Where", active, score, zero)
    c_on = b.op("Div", b.op("Cast", n, to=f32), b.op("Max", k, one))  # k = 0: every g is 0 anyway
    one_i = b.const(1, TensorProto.INT64)
    zero_i = b.const(0, TensorProto.INT64)
    c = b.op("Where", b.op("Equal", rescale, one_i), c_on,
             b.op("Where", b.op("Equal", rescale, zero_i), one, nan))
    coef = b.op("Unsqueeze", b.op("Mul", g, c), minus_one)                             # [N, n, 1]

    # Dense FFN over all blocks, in float32.
    xf = b.op("Cast", x2, to=f32)
    gate2 = _gate_up_rows(b, gate_weight, gate_up_tile, n, block, d, rows)             # [n*B, d]
    up2 = _gate_up_rows(b, up_weight, gate_up_tile, n, block, d, rows)
    down2 = _down_rows(b, down_weight, down_tile, n, block, d, rows)                   # [n*B, d]
    z = b.op("Gemm", xf, gate2, transB=1)                                             # [N, n*B]
    h = b.op("Mul", b.select(activation, _activations(b, z), nan), b.op("Gemm", xf, up2, transB=1))
    h3 = b.op("Reshape", h, b.op("Concat", minus_one, n, block, axis=0))               # [N, n, B]
    h3 = b.op("Where", b.op("Unsqueeze", active, minus_one), b.op("Mul", h3, coef), zero)
    h2 = b.op("Reshape", h3, b.op("Shape", h), allowzero=1)
    y2 = b.op("MatMul", h2, down2)                                                    # [N, d]

    leading = b.op("Shape", X, start=0, end=-1)
    # allowzero: a 0 in a shape taken from a tensor is a zero-size dim (zero tokens), not "copy".
    y = b.op("Reshape", y2, b.op("Shape", X), allowzero=1)
    b.nodes.append(helper.make_node("CastLike", [y, X], ["Y"]))
    b.nodes.append(helper.make_node("Reshape", [active, b.op("Concat", leading, n, axis=0)], ["active"],
                                    allowzero=1))

    return helper.make_function(
        DOMAIN, OP_TYPE, list(INPUTS), list(OUTPUTS), b.nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=["num_experts"],
        attribute_protos=[helper.make_attribute(k, v) for k, v in _DEFAULTS.items()],
        doc_string=f"{DOMAIN}::{OP_TYPE} v{OP_VERSION} (docs/op-spec.md), dense-then-mask fallback body.")


def _gate_up_rows(b: "_Body", w, gate_up_tile, n, block, d, rows):
    """gate_weight or up_weight in either layout (attribute gate_up_tile) as float32 [n*B, d]."""
    # As [n, slabs, d, h]: h = 1, slabs = B for the rows layout (a plain view), h = 32 for slabs;
    # to [n, slabs * h, d], then the rows past B (slab padding) cut off.
    zero_i64 = b.const(0, TensorProto.INT64)
    height = b.op("Where", b.op("Equal", gate_up_tile, zero_i64), b.const(1, TensorProto.INT64), gate_up_tile)
    height1 = b.op("Unsqueeze", height, b.const(0, TensorProto.INT64, [1]))
    slabs = b.op("Div", b.op("Sub", b.op("Add", block, height1), b.const(1, TensorProto.INT64, [1])), height1)
    w4 = b.op("Reshape", b.op("Cast", w, to=TensorProto.FLOAT), b.op("Concat", n, slabs, d, height1, axis=0))
    w3 = b.op("Reshape", b.op("Transpose", w4, perm=[0, 1, 3, 2]),
              b.op("Concat", n, b.op("Mul", slabs, height1), d, axis=0))
    w3 = b.op("Slice", w3, b.const(0, TensorProto.INT64, [1]), block, b.const(1, TensorProto.INT64, [1]))
    return b.op("Reshape", w3, rows)


def _down_rows(b: "_Body", down_weight, down_tile, n, block, d, rows):
    """down_weight in either layout (attribute down_tile) as float32 [n*B, d]."""
    # As [n, tiles, B, w]: w = d, tiles = 1 for the rows layout (a plain view), w = 64 for column
    # tiles; to [n, B, tiles * w], then the columns past d (tile padding) cut off.
    zero_i64 = b.const(0, TensorProto.INT64)
    width = b.op("Where", b.op("Equal", down_tile, zero_i64), b.op("Squeeze", d), down_tile)
    width1 = b.op("Unsqueeze", width, b.const(0, TensorProto.INT64, [1]))
    tiles = b.op("Div", b.op("Sub", b.op("Add", d, width1), b.const(1, TensorProto.INT64, [1])), width1)
    down4 = b.op("Reshape", b.op("Cast", down_weight, to=TensorProto.FLOAT),
                 b.op("Concat", n, tiles, block, width1, axis=0))
    down3 = b.op("Reshape", b.op("Transpose", down4, perm=[0, 2, 1, 3]),
                 b.op("Concat", n, block, b.op("Mul", tiles, width1), axis=0))
    down3 = b.op("Slice", down3, b.const(0, TensorProto.INT64, [1]), d, b.const(2, TensorProto.INT64, [1]))
    return b.op("Reshape", down3, rows)


def _ai_onnx_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise ValueError("the model imports no ai.onnx opset; cannot choose the function body's opset")


def _op_nodes(graph: onnx.GraphProto):
    """The op's nodes in ``graph`` and its subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        if node.domain == DOMAIN and node.op_type == OP_TYPE:
            yield node
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                yield from _op_nodes(sub)


def add_function_to_model(model: onnx.ModelProto) -> None:
    """Adds the op's FunctionProto (at the model's ai.onnx opset) and DOMAIN's opset import.

    Idempotent: an existing function of the same domain and name is replaced.
    Nodes of the op that list only Y (e.g. from ``torch.onnx.ops.symbolic``)
    get an explicit empty ``active`` output: ONNX shape inference and ONNX
    Runtime's function expansion reject a node with fewer outputs than the
    function (``Output 1 is out of bounds``).
    """
    function = function_proto(_ai_onnx_opset(model))
    kept = [f for f in model.functions if (f.domain, f.name) != (DOMAIN, OP_TYPE)]
    del model.functions[:]
    model.functions.extend(kept + [function])
    for node in _op_nodes(model.graph):
        if len(node.output) < len(OUTPUTS):
            node.output.extend(_pad_outputs(node.output)[len(node.output):])
    for imp in model.opset_import:
        if imp.domain == DOMAIN:
            if imp.version != OP_VERSION:
                raise ValueError(f"the model imports {DOMAIN} version {imp.version}, expected {OP_VERSION}")
            return
    model.opset_import.append(helper.make_opsetid(DOMAIN, OP_VERSION))
