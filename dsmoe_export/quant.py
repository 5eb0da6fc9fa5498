"""Weight-only quantized FFN blocks: the ONNX side of ``org.dsmoe::GatedBlockSparseFFNInt4``,
``...Int8`` and ``...F16`` (docs/op-spec.md, "Quantized variants").

- :func:`quantize_rows` / :func:`dequantize_rows`: symmetric block-wise quantization along
  the last axis (one float32 scale per ``group_size`` values, all 2^bits levels), the same for the op's
  blocks and for ONNX Runtime's ``com.microsoft.MatMulNBits``;
- :func:`quantize_block_weights`: packed ``[n, B, d]`` blocks (``onnx_op.pack_block_weights``)
  to the op's inputs (gate/up grouped along d, down along B, int4 packed 32 weights per 16 bytes);
- :func:`make_node`, :func:`function_proto`, :func:`add_functions_to_model`: the nodes and
  their ONNX function bodies (dequantize with standard ops, then call the float32 op,
  whose own function body or kernel runs it);
- :func:`matmul_nbits_weights`: a MatMul weight ``[K, N]`` in MatMulNBits' layout.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper

from . import onnx_op

FORMATS = ("float32", "float16", "int8", "int4")
BITS = {"int4": 4, "int8": 8}
OP_TYPES = {"int4": "GatedBlockSparseFFNInt4", "int8": "GatedBlockSparseFFNInt8", "float16": "GatedBlockSparseFFNF16"}
FORMAT_OF_OP = {v: k for k, v in OP_TYPES.items()}
QUANT_INPUTS = ("X", "router_weight", "gate_weight", "gate_scales", "up_weight", "up_scales", "down_weight",
                "down_scales", "router_bias")
F16_INPUTS = onnx_op.INPUTS
DEFAULT_GROUP_SIZE = 32
# accuracy_level of the int4 / int8 ops (docs/op-spec.md): 0-3 X as given (float32), 4 X rounded to
# int8 per group of group_size columns first, as MatMulNBits' level 4.
ACCURACY_LEVELS = range(5)
INT8_ACTIVATIONS = 4


def zero_point(bits: int) -> int:
    return 1 << (bits - 1)


def check_group_size(group_size: int) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size < 32 \
            or group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two >= 32, got {group_size!r}")
    return int(group_size)


# --------------------------------------------------------------------------- numerics

def quantize_rows(w: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric quantization of ``w [..., K]`` in groups of ``group_size`` along the last axis
    (the last group may be shorter), on all 2^bits levels: returns (q [..., K] uint8 in
    [0, 2^bits - 1], scales [..., ceil(K / group_size)] float32) with zero point zp = 2^(bits-1),
    scale = v / -zp where v is the group's value of largest magnitude (its sign kept: the
    scale is negative when v is positive; 0 for an all-zero group), q = round_half_away(w *
    (1 / scale) + zp) in float32 arithmetic (as MLAS computes it, so the bytes are its), clipped
    to the levels. v itself lands on level 0, the full range, as ONNX Runtime's MLAS quantizer
    and onnxruntime-genai's model builder do: a step of |v| / zp where scale = max |w| / (zp - 1)
    would waste a level (17 % larger RMS error at int4, measured)."""
    w = np.asarray(w, np.float32)
    K = w.shape[-1]
    G = check_group_size(group_size)
    zp = zero_point(bits)
    groups = -(-K // G)
    padded = np.zeros(w.shape[:-1] + (groups * G,), np.float32)
    padded[..., :K] = w
    g = padded.reshape(w.shape[:-1] + (groups, G))
    extreme = np.take_along_axis(g, np.abs(g).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    scales = (extreme / np.float32(-zp)).astype(np.float32)
    reciprocal = np.where(scales == 0, np.float32(0), np.float32(1) / np.where(scales == 0, np.float32(1), scales))
    shifted = (g * reciprocal.astype(np.float32)[..., None]).astype(np.float32) + np.float32(zp)  # float32, as MLAS
    # roundf (half away from zero), exact in float64: floor(x + 0.5) for x >= -0.5; below, both clip to 0.
    q = np.clip(np.floor(shifted.astype(np.float64) + 0.5), 0, 2 * zp - 1)
    q = q.reshape(w.shape[:-1] + (groups * G,))[..., :K].astype(np.uint8)
    return q, scales


def dequantize_rows(q: np.ndarray, scales: np.ndarray, bits: int, group_size: int) -> np.ndarray:
    """Inverse of :func:`quantize_rows` (float32): scale * (q - zp)."""
    K = q.shape[-1]
    s = np.repeat(scales, group_size, axis=-1)[..., :K]
    return (s * (q.astype(np.float32) - np.float32(zero_point(bits)))).astype(np.float32)


def fake_quantize_rows(w: np.ndarray, fmt: str, group_size: int) -> np.ndarray:
    """The values a ``fmt`` weight holds after storage: quantize then dequantize along the last axis."""
    if fmt == "float32":
        return np.asarray(w, np.float32)
    if fmt == "float16":
        return np.asarray(w, np.float32).astype(np.float16).astype(np.float32)
    bits = BITS[fmt]
    return dequantize_rows(*quantize_rows(w, bits, group_size), bits, group_size)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """q [..., K] (values < 16, K a multiple of 32) -> [..., K / 2] bytes: in every 32 values,
    byte m holds value m (low nibble) and value m + 16 (high nibble)."""
    K = q.shape[-1]
    if K % 32:
        raise ValueError(f"int4 packing needs the row length to be a multiple of 32, got {K}")
    c = q.reshape(q.shape[:-1] + (K // 32, 2, 16)).astype(np.uint8)
    return (c[..., 0, :] | (c[..., 1, :] << 4)).reshape(q.shape[:-1] + (K // 2,))


def unpack_int4(b: np.ndarray) -> np.ndarray:
    c = b.reshape(b.shape[:-1] + (b.shape[-1] // 16, 16))
    return np.stack([c & 15, c >> 4], axis=-2).reshape(b.shape[:-1] + (b.shape[-1] * 2,))


def quantize_block_weights(gate: np.ndarray, up: np.ndarray, down: np.ndarray, fmt: str,
                           group_size: int = DEFAULT_GROUP_SIZE) -> dict[str, np.ndarray]:
    """Packed float blocks ``[n, B, d]`` (down transposed, op-spec) -> the ``fmt`` op's weight inputs
    by name. gate/up: groups along d ([n, B, ceil(d/G)] scales); down: groups along B, the block's
    input dimension ([n, ceil(B/G), d] scales)."""
    gate, up, down = (np.asarray(a, np.float32) for a in (gate, up, down))
    if gate.ndim != 3 or gate.shape != up.shape or gate.shape != down.shape:
        raise ValueError(f"gate, up and down must all be [n, B, d], got {gate.shape}, {up.shape}, {down.shape}")
    if fmt == "float16":
        return {"gate_weight": gate.astype(np.float16), "up_weight": up.astype(np.float16),
                "down_weight": down.astype(np.float16)}
    if fmt not in BITS:
        raise ValueError(f"fmt must be one of float16, int8, int4, got {fmt!r}")
    bits = BITS[fmt]
    d = gate.shape[-1]
    if bits == 4 and d % 32:
        raise ValueError(f"int4 blocks need d (hidden size) to be a multiple of 32, got {d}")
    out = {}
    for name, w in (("gate", gate), ("up", up)):
        q, s = quantize_rows(w, bits, group_size)
        out[f"{name}_weight"], out[f"{name}_scales"] = (pack_int4(q) if bits == 4 else q), s
    q, s = quantize_rows(down.transpose(0, 2, 1), bits, group_size)      # [n, d, B], groups along B
    q = np.ascontiguousarray(q.transpose(0, 2, 1))                       # [n, B, d]
    out["down_weight"] = pack_int4(q) if bits == 4 else q
    out["down_scales"] = np.ascontiguousarray(s.transpose(0, 2, 1))     # [n, ceil(B/G), d]
    return out


def pack_matmul_nbits(q: np.ndarray, bits: int, group_size: int) -> np.ndarray:
    """Quantized values q [N, K] (from :func:`quantize_rows` of a weight [N, K]) in MatMulNBits' B
    layout [N, ceil(K/G), G * bits / 8] uint8: K padded to whole groups with the zero point, int4
    packed two consecutive values per byte (low nibble first)."""
    N, K = q.shape
    blocks = -(-K // group_size)
    padded = np.full((N, blocks * group_size), zero_point(bits), np.uint8)
    padded[:, :K] = q
    if bits == 4:
        p = padded.reshape(N, -1, 2)
        padded = (p[..., 0] | (p[..., 1] << 4)).astype(np.uint8)
    return padded.reshape(N, blocks, group_size * bits // 8)


def dequantize_block_weights(weights: dict[str, np.ndarray], fmt: str,
                             group_size: int = DEFAULT_GROUP_SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The inverse of :func:`quantize_block_weights`: the float32 blocks gate, up, down [n, B, d]
    that the ``fmt`` op computes with."""
    if fmt == "float16":
        return tuple(np.asarray(weights[k], np.float32) for k in ("gate_weight", "up_weight", "down_weight"))
    bits = BITS[fmt]

    def values(q):
        return unpack_int4(q) if bits == 4 else q

    gate, up = (dequantize_rows(values(weights[f"{k}_weight"]), weights[f"{k}_scales"], bits, group_size)
                for k in ("gate", "up"))
    down = dequantize_rows(values(weights["down_weight"]).transpose(0, 2, 1),
                           weights["down_scales"].transpose(0, 2, 1), bits, group_size)
    return gate, up, np.ascontiguousarray(down.transpose(0, 2, 1))


def matmul_nbits_weights(w_kn: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A MatMul weight ``[K, N]`` as MatMulNBits' (B [N, ceil(K/G), G * bits / 8] uint8,
    scales [N * ceil(K/G)] float32) with the default zero point 2^(bits-1); padding is zp."""
    q, s = quantize_rows(np.asarray(w_kn, np.float32).T, bits, group_size)   # [N, K]: groups along K
    return pack_matmul_nbits(q, bits, group_size), s.reshape(-1)


# --------------------------------------------------------------------------- nodes

def make_node(fmt: str, inputs: list[str], outputs: list[str], *, num_experts: int, group_size: int | None = None,
              threshold: float = 0.5, rescale: bool = True, weighting: str = "score", activation: str = "silu",
              accuracy_level: int = 0, name: str | None = None) -> onnx.NodeProto:
    """The ``fmt`` op's node; ``inputs`` in the order of QUANT_INPUTS (int4/int8) or F16_INPUTS;
    ``accuracy_level`` (int4/int8) written when not 0."""
    onnx_op._check_attributes(num_experts, threshold, rescale, weighting, activation)
    if fmt not in OP_TYPES:
        raise ValueError(f"fmt must be one of {tuple(OP_TYPES)}, got {fmt!r}")
    names = QUANT_INPUTS if fmt in BITS else F16_INPUTS
    inputs = onnx_op._strip_trailing_empty(inputs)
    if not len(names) - 1 <= len(inputs) <= len(names) or not all(inputs[:len(names) - 1]):
        raise ValueError(f"inputs must name {names[:-1]} and optionally router_bias, got {inputs}")
    attrs = dict(num_experts=int(num_experts), threshold=float(threshold), rescale=int(bool(rescale)),
                 weighting=weighting, activation=activation)
    if fmt in BITS:
        attrs["group_size"] = check_group_size(group_size)
    if isinstance(accuracy_level, bool) or accuracy_level not in ACCURACY_LEVELS or \
            (accuracy_level and fmt not in BITS):
        raise ValueError(f"accuracy_level must be 0 to 4 (int4 / int8 ops; float16: 0), got {accuracy_level!r}")
    if accuracy_level:
        attrs["accuracy_level"] = int(accuracy_level)
    return helper.make_node(OP_TYPES[fmt], inputs, onnx_op._pad_outputs(outputs), name=name, domain=onnx_op.DOMAIN,
                            **attrs)


def function_proto(fmt: str, opset: int) -> onnx.FunctionProto:
    """The ``fmt`` op as a model-local function: dequantize the three weights with standard ops
    (float32, full size: a fallback), then one node of the float32 op ``GatedBlockSparseFFN``
    (its kernel when the library is registered, else its own function body); at accuracy_level 4
    on widened inputs that route on X and compute gate/up on X rounded (_route_on_x)."""
    b = onnx_op._Body()
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    names = QUANT_INPUTS if fmt in BITS else F16_INPUTS
    if fmt == "float16":
        gate, up, down = (b.op("Cast", w, to=f32) for w in ("gate_weight", "up_weight", "down_weight"))
    else:
        bits = BITS[fmt]
        group = b.attr("value_int", "group_size")
        n = b.op("Shape", "gate_weight", start=0, end=1)
        block = b.op("Shape", "gate_weight", start=1, end=2)
        d = b.op("Shape", "router_weight", start=1, end=2)
        zero_i, one_i = b.const(0, i64), b.const(1, i64)
        zp = b.const(float(zero_point(bits)))

        def values(q: str) -> str:  # [n, B, d] float32: q - zp
            if bits == 8:
                return b.op("Sub", b.op("Cast", q, to=f32), zp)
            qi = b.op("Cast", q, to=TensorProto.INT32)
            chunks = b.op("Reshape", qi, b.op("Concat", n, block, b.const(-1, i64, [1]), b.const(16, i64, [1]), axis=0))
            sixteen = b.const(16, TensorProto.INT32)
            high = b.op("Div", chunks, sixteen)
            low = b.op("Sub", chunks, b.op("Mul", high, sixteen))
            full = b.op("Reshape", b.op("Concat", low, high, axis=-1), b.op("Concat", n, block, d, axis=0))
            return b.op("Sub", b.op("Cast", full, to=f32), zp)

        def group_index(length: str) -> str:  # [length] int64: position // group_size
            return b.op("Div", b.op("Range", zero_i, b.op("Squeeze", length), one_i), group)

        col_groups, row_groups = group_index(d), group_index(block)
        gate = b.op("Mul", values("gate_weight"), b.op("Gather", "gate_scales", col_groups, axis=2))
        up = b.op("Mul", values("up_weight"), b.op("Gather", "up_scales", col_groups, axis=2))
        down = b.op("Mul", values("down_weight"), b.op("Gather", "down_scales", row_groups, axis=1))
        x, router, gate, up, down = _route_on_x(b, gate, up, down, n, block, d, group)
    inner = helper.make_node(onnx_op.OP_TYPE, ["X" if fmt == "float16" else x,
                                               "router_weight" if fmt == "float16" else router, gate, up, down,
                                               "router_bias"],
                             ["Y" if fmt == "float16" else "_y_wide", "active"], domain=onnx_op.DOMAIN)
    for attr, kind in (("num_experts", onnx.AttributeProto.INT), ("threshold", onnx.AttributeProto.FLOAT),
                       ("rescale", onnx.AttributeProto.INT), ("weighting", onnx.AttributeProto.STRING),
                       ("activation", onnx.AttributeProto.STRING)):
        inner.attribute.append(onnx.AttributeProto(name=attr, ref_attr_name=attr, type=kind))
    b.nodes.append(inner)
    if fmt in BITS:  # the columns the widened weights add are zeros in Y: dropped
        b.nodes.append(helper.make_node("Slice", ["_y_wide", b.const(0, i64, [1]), d, b.const(-1, i64, [1])], ["Y"]))
    return helper.make_function(
        onnx_op.DOMAIN, OP_TYPES[fmt], list(names), list(onnx_op.OUTPUTS), b.nodes,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(onnx_op.DOMAIN, onnx_op.OP_VERSION)],
        attributes=["num_experts"] + (["group_size"] if fmt in BITS else []),
        attribute_protos=[helper.make_attribute(k, v) for k, v in onnx_op._DEFAULTS.items()
                          if k not in onnx_op.LAYOUT_ATTRIBUTES]
        + ([helper.make_attribute("accuracy_level", 0)] if fmt in BITS else []),
        doc_string=f"{onnx_op.DOMAIN}::{OP_TYPES[fmt]} v{onnx_op.OP_VERSION} (docs/op-spec.md): dequantize, "
                   f"then {onnx_op.OP_TYPE}.")


def _route_on_x(b, gate: str, up: str, down: str, n: str, block: str, d: str, group: str):
    """The float32 op's inputs (X, router_weight, gate, up, down) for accuracy_level 4 (op-spec):
    the router reads X as given, gate and up read X rounded to int8. The float32 op has one X, so
    at level 4 it gets [X_hat | X] (width 2 d) with the router's columns [0 | W_r] and gate, up
    and down widened by d zero columns: the router sums W_r X exactly, gate and up sum X_hat (plus
    0 X), and Y's extra columns are zeros (sliced off by the caller). X_hat's NaNs (a group of X
    holding NaN or inf) are zeroed there so that the router's zero columns cannot catch them; 0 X
    brings them back into gate and up. Below level 4 the added width is 0: the inputs as given."""
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    level4 = b.op("Equal", b.attr("value_int", "accuracy_level"), b.const(INT8_ACTIVATIONS, i64))
    extra = b.op("Mul", d, b.op("Cast", level4, to=i64))                       # d at level 4, else 0; [1]
    x_hat = _rounded_to_int8(b, "X", d, group)
    x_hat = b.op("Where", b.op("IsNaN", x_hat), b.const(0.0), x_hat)
    x = b.op("Concat", b.op("Where", level4, x_hat, "X"),
             b.op("Slice", "X", b.const(0, i64, [1]), extra, b.const(-1, i64, [1])), axis=-1)
    zero = helper.make_tensor("zero", f32, [1], [0.0])
    router = b.op("Concat", b.op("ConstantOfShape", b.op("Concat", n, extra, axis=0), value=zero), "router_weight",
                  axis=1)
    pad = b.op("ConstantOfShape", b.op("Concat", n, block, extra, axis=0), value=zero)
    return (x, router, *(b.op("Concat", w, pad, axis=2) for w in (gate, up, down)))


def _rounded_to_int8(b, x: str, d: str, group: str) -> str:
    """X [..., d] rounded to int8 per group of `group` columns (accuracy_level 4, op-spec): s = max |x|
    / 127, q = clip(round_half_even(x / s), -127, 127) (0 where s = 0), x_hat = q * s."""
    i64 = TensorProto.INT64
    one = b.const(1, i64, [1])
    groups = b.op("Div", b.op("Sub", b.op("Add", d, group), one), group)       # ceil(d / G), [1]
    padded = b.op("Mul", groups, group)
    rows = b.op("Reshape", x, b.op("Concat", b.const(-1, i64, [1]), d, axis=0))
    pads = b.op("Concat", b.const([0, 0, 0], i64, [3]), b.op("Sub", padded, d), axis=0)
    grouped = b.op("Reshape", b.op("Pad", rows, pads), b.op("Concat", b.const(-1, i64, [1]), groups,
                                                              b.op("Reshape", group, one), axis=0))
    amax = b.op("ReduceMax", b.op("Abs", grouped), b.const(-1, i64, [1]), keepdims=1)
    s = b.op("Div", amax, b.const(127.0))
    q = b.op("Clip", b.op("Round", b.op("Div", grouped, s)), b.const(-127.0), b.const(127.0))
    q = b.op("Where", b.op("Equal", s, b.const(0.0)), b.const(0.0), q)
    flat = b.op("Reshape", b.op("Mul", q, s), b.op("Concat", b.const(-1, i64, [1]), padded, axis=0))
    kept = b.op("Slice", flat, b.const(0, i64, [1]), d, b.const(1, i64, [1]))
    return b.op("Reshape", kept, b.op("Shape", x))


def add_functions_to_model(model: onnx.ModelProto) -> None:
    """Function bodies for the quantized ops the model uses, plus the float32 op's (which they call)."""
    onnx_op.add_function_to_model(model)
    opset = onnx_op._ai_onnx_opset(model)
    used = {n.op_type for n in _all_nodes(model.graph) if n.domain == onnx_op.DOMAIN and n.op_type in FORMAT_OF_OP}
    kept = [f for f in model.functions if not (f.domain == onnx_op.DOMAIN and f.name in used)]
    del model.functions[:]
    model.functions.extend(kept + [function_proto(FORMAT_OF_OP[t], opset) for t in sorted(used)])


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                yield from _all_nodes(sub)


def size_bytes(fmt: str, n: int, B: int, d: int, group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """Bytes of one FFN's three block weights and their scales in ``fmt``."""
    if fmt in ("float32", "float16"):
        return 3 * n * B * d * (4 if fmt == "float32" else 2)
    G = group_size
    return 3 * n * B * d * BITS[fmt] // 8 + 4 * n * (2 * B * math.ceil(d / G) + math.ceil(B / G) * d)
