"""Weight storage in the graph: each matrix is quantized here once, and the values the graph
holds come back to the caller (the reference model is validated with exactly those).

Formats of a MatMul weight ``[N, K]`` (PyTorch's ``[out, in]``):

- ``float32``: the graph's own element type (float32, or float16 for ``--dtype float16``), a
  plain ``MatMul`` with the transposed weight;
- ``float16``: float16 storage for float32 activations (``MatMul`` behind a ``Cast`` that ONNX
  Runtime folds at load: only the file shrinks);
- ``int8`` / ``int4``: ``com.microsoft.MatMulNBits``, symmetric groups of ``group_size`` along K
  with the default zero point 2^(bits-1), ``accuracy_level`` as given.

The embedding table is looked up with ``Gather``, or with ``com.microsoft.GatherBlockQuantized``
when its storage is int8/int4; a tied table shares the lm_head's quantized bytes (as
onnxruntime-genai's model builder does).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import gptq, quant
from .builder import MS_DOMAIN, GraphBuilder

FLOAT_FORMATS = ("float32", "float16")


@dataclass
class StoredMatrix:
    """A ``[N, K]`` weight as stored: `values` are what the graph computes with (float32)."""

    fmt: str
    N: int
    K: int
    values: np.ndarray
    weight: str                 # initializer: [K, N] float, or MatMulNBits' B [N, k_blocks, G * bits / 8]
    scales: str = ""            # MatMulNBits: [N, k_blocks] float32
    group_size: int = 0
    kn: bool = True             # a float `weight` is stored [K, N] (for MatMul), else [N, K] (a table)

    @property
    def bits(self) -> int:
        return quant.BITS[self.fmt]


def store_matrix(g: GraphBuilder, w_nk: np.ndarray, fmt: str, name: str, *, group_size: int,
                 hessian: np.ndarray | None = None) -> StoredMatrix:
    """Add the initializers of weight `w_nk` ([out, in]) in format `fmt`; int8/int4 with GPTQ
    when the weight's input `hessian` (X^T X on calibration text) is given (gptq.py)."""
    N, K = w_nk.shape
    if fmt == "float32":  # the graph's element type, whatever the array's is
        return StoredMatrix(fmt, N, K, w_nk, g.initializer(f"{name}.weight", np.ascontiguousarray(w_nk.T)))
    if fmt == "float16":
        w16 = np.ascontiguousarray(w_nk.T.astype(np.float16))
        return StoredMatrix(fmt, N, K, w16.T.astype(np.float32), g.initializer(f"{name}.weight.float16", w16))
    bits = quant.BITS[fmt]
    q, scales = gptq.quantize(w_nk, hessian, bits, group_size)
    values = quant.dequantize_rows(q, scales, bits, group_size)
    packed = quant.pack_matmul_nbits(q, bits, group_size)
    return StoredMatrix(fmt, N, K, values, g.initializer(f"{name}.weight.q{bits}", packed),
                        g.initializer(f"{name}.weight.scales", scales), group_size)


def matmul(g: GraphBuilder, x: str, m: StoredMatrix, name: str, *, accuracy_level: int,
           bias: str = "", output: str = "") -> str:
    """x @ W.T (+ bias) with the stored weight; `output` names the result (default: a fresh name)."""
    out = [output] if output else 1
    if m.fmt in quant.BITS:
        return g.op("MatMulNBits", [x, m.weight, m.scales, "", "", bias] if bias else [x, m.weight, m.scales],
                    name=f"{name}/MatMulNBits", outputs=out, domain=MS_DOMAIN, K=m.K, N=m.N, bits=m.bits,
                    block_size=m.group_size, accuracy_level=accuracy_level)
    w = m.weight
    if m.fmt == "float16":
        w = g.op("Cast", [w], name=f"{name}/weight_cast", to=1)
    if not bias:
        return g.op("MatMul", [x, w], name=f"{name}/MatMul", outputs=out)
    return g.op("Add", [g.op("MatMul", [x, w], name=f"{name}/MatMul"), bias], name=f"{name}/Add", outputs=out)


def gather(g: GraphBuilder, ids: str, m: StoredMatrix, name: str) -> str:
    """Rows `ids` of the [V, d] table `m`: an embedding table (`store_table`) or a tied lm_head's
    weight (`store_matrix`; ONNX Runtime folds the Transpose / Reshape at load)."""
    if m.fmt in quant.BITS:
        k_blocks = -(-m.K // m.group_size)
        width = k_blocks * m.group_size * m.bits // 8
        data = g.op("Reshape", [m.weight, g.const([m.N, width])], name=f"{name}/Reshape")
        out = g.op("GatherBlockQuantized", [data, ids, m.scales], name=f"{name}/GatherBlockQuantized",
                   domain=MS_DOMAIN, bits=m.bits, block_size=m.group_size, gather_axis=0, quantize_axis=1)
        if k_blocks * m.group_size != m.K:  # rows are padded to whole groups
            out = g.op("Slice", [out, g.const([0]), g.const([m.K]), g.const([-1])], name=f"{name}/Slice")
        return out
    table = m.weight
    if m.fmt == "float16":
        table = g.op("Cast", [table], name=f"{name}/table_cast", to=1)
    if m.kn:
        table = g.op("Transpose", [table], name=f"{name}/Transpose", perm=[1, 0])
    return g.op("Gather", [table, ids], name=f"{name}/Gather")


def store_table(g: GraphBuilder, table: np.ndarray, fmt: str, name: str, *, group_size: int) -> StoredMatrix:
    """An embedding table [V, d] that is only looked up (not shared with a MatMul)."""
    if fmt in quant.BITS:
        return store_matrix(g, table, fmt, name, group_size=group_size)
    V, d = table.shape
    if fmt == "float16":
        t16 = table.astype(np.float16)
        return StoredMatrix(fmt, V, d, t16.astype(np.float32), g.initializer(f"{name}.weight.float16", t16), kn=False)
    return StoredMatrix(fmt, V, d, table, g.initializer(f"{name}.weight", table), kn=False)
