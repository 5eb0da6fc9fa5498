"""The FFN of one decoder layer: the gated block-sparse op, or the dense SwiGLU baseline.

Both write the values their weights hold back into the PyTorch module (the reference the
export is validated against).
"""
from __future__ import annotations

import numpy as np
import torch

from .. import gptq, onnx_op, quant
from .builder import GraphBuilder
from .weights import matmul, store_matrix


def array(t: torch.Tensor, dtype=None) -> np.ndarray:
    a = t.detach().cpu().numpy()
    return a if dtype is None else a.astype(dtype)


@torch.no_grad()
def set_values(param: torch.Tensor, values: np.ndarray) -> None:
    param.copy_(torch.from_numpy(np.ascontiguousarray(values)).to(param.dtype))


def _op_attrs(moe) -> dict:
    return dict(num_experts=moe.num_experts, threshold=float(moe.threshold), rescale=bool(moe.rescale),
                weighting=moe.weighting, activation=moe.activation)


def add_sparse_ffn_node(g: GraphBuilder, make, mlp, prefix: str, *, down_tile: int, gate_up_tile: int,
                        x: str = "") -> None:
    """Stores the float32 sparse FFN's weights (router, packed blocks: gate/up in `gate_up_tile`'s
    layout, down in `down_tile`'s) and appends make(inputs, attrs): inputs = [x, router_weight, gate,
    up, down, router_bias or ""], attrs = the op's attributes (with the two layouts)."""
    moe = mlp.moe
    gate, up, down = onnx_op.pack_block_weights(array(mlp.gate_proj.weight), array(mlp.up_proj.weight),
                                                array(mlp.down_proj.weight), moe.num_experts,
                                                down_tile=down_tile, gate_up_tile=gate_up_tile)
    router = g.initializer(f"{prefix}.router.weight", array(mlp.router.weight))
    bias = g.initializer(f"{prefix}.router.bias", array(mlp.router.bias)) if moe.router_bias else ""
    names = [g.initializer(f"{prefix}.{k}", w) for k, w in
             (("gate_blocks", gate), ("up_blocks", up), ("down_blocks", down))]
    g.nodes.append(make([x, router, *names, bias], {**_op_attrs(moe), "down_tile": down_tile,
                                                    "gate_up_tile": gate_up_tile}))
    g.domains.setdefault(onnx_op.DOMAIN, onnx_op.OP_VERSION)


def add_quant_sparse_ffn_node(g: GraphBuilder, make, mlp, prefix: str, *, fmt: str, group_size: int,
                              hessians: gptq.Hessians | None = None, layer: int = 0, x: str = "",
                              accuracy_level: int = 0) -> None:
    """Stores the FFN's blocks in quantized `fmt` (GPTQ with `hessians` for int8/int4), writes the
    stored values back into `mlp` (the export's reference) and appends make(inputs, attrs):
    inputs in the order of quant.QUANT_INPUTS (F16_INPUTS for float16), attrs the op's (with
    group_size for int8/int4, and accuracy_level when not 0)."""
    moe = mlp.moe
    inputs = [x, g.initializer(f"{prefix}.router.weight", array(mlp.router.weight))]
    bias = g.initializer(f"{prefix}.router.bias", array(mlp.router.bias)) if moe.router_bias else ""
    gate, up, down = onnx_op.pack_block_weights(array(mlp.gate_proj.weight), array(mlp.up_proj.weight),
                                                array(mlp.down_proj.weight), moe.num_experts)
    if hessians is not None and fmt in quant.BITS:
        stored = gptq.quantize_block_weights(gate, up, down, fmt, group_size, hessians, layer)
    else:
        stored = quant.quantize_block_weights(gate, up, down, fmt, group_size)
    gate, up, down = quant.dequantize_block_weights(stored, fmt, group_size)
    order = quant.QUANT_INPUTS if fmt in quant.BITS else quant.F16_INPUTS
    names = [g.initializer(f"{prefix}.{k}.{fmt}", stored[k]) for k in order[2:-1]]
    attrs = _op_attrs(moe) | ({"group_size": group_size} if fmt in quant.BITS else {})
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    g.nodes.append(make(inputs + names + [bias], attrs))
    g.domains.setdefault(onnx_op.DOMAIN, onnx_op.OP_VERSION)
    D, d = mlp.gate_proj.weight.shape
    set_values(mlp.gate_proj.weight, gate.reshape(D, d))
    set_values(mlp.up_proj.weight, up.reshape(D, d))
    set_values(mlp.down_proj.weight, down.reshape(D, d).T)


def sparse_ffn(g: GraphBuilder, x: str, mlp, prefix: str, *, fmt: str, group_size: int, down_tile: int,
               gate_up_tile: int = 0, active: str = "", hessians: gptq.Hessians | None = None, layer: int = 0,
               accuracy_level: int = 0) -> str:
    """One `org.dsmoe::GatedBlockSparseFFN*` node (docs/op-spec.md); `active`: the name of its
    optional active-blocks output, or "" for none; `hessians`: GPTQ for int8/int4 blocks;
    `accuracy_level`: the int4 op's (as MatMulNBits': 4 rounds X to int8 per group; the int8 op
    keeps 0, it has no int8 x int8 kernel to gain from it)."""
    outputs = [f"{prefix}/Y", active] if active else [f"{prefix}/Y"]
    name = f"/{prefix.replace('.', '/')}/{onnx_op.OP_TYPE}"
    if fmt == "float32":  # the graph's element type: values unchanged
        add_sparse_ffn_node(g, lambda inputs, attrs: onnx_op.make_node(inputs, outputs, name=g.fresh(name), **attrs),
                            mlp, prefix, down_tile=down_tile, gate_up_tile=gate_up_tile, x=x)
    else:
        add_quant_sparse_ffn_node(g, lambda inputs, attrs: quant.make_node(
            fmt, inputs, outputs, name=g.fresh(f"{name}{fmt.title()}"), **attrs), mlp, prefix, fmt=fmt,
            group_size=group_size, hessians=hessians, layer=layer, x=x,
            accuracy_level=accuracy_level if fmt == "int4" else 0)
    return outputs[0]


def dense_ffn(g: GraphBuilder, x: str, mlp, prefix: str, *, activation: str, fmt: str, group_size: int,
              accuracy_level: int, hessians: gptq.Hessians | None = None, layer: int = 0) -> str:
    """down(act(gate(x)) * up(x)) as three MatMuls (or MatMulNBits), as the model builder lays it out."""
    out = {}
    inputs = {"gate_proj": f"layers.{layer}.ffn", "up_proj": f"layers.{layer}.ffn", "down_proj": f"layers.{layer}.down"}
    for proj in ("gate_proj", "up_proj", "down_proj"):
        lin = getattr(mlp, proj)
        m = store_matrix(g, array(lin.weight) if fmt == "float32" else array(lin.weight, np.float32), fmt,
                         f"{prefix}.{proj}", group_size=group_size,
                         hessian=hessians.get(inputs[proj]) if hessians is not None else None)
        set_values(lin.weight, m.values)
        out[proj] = m
    base = "/" + prefix.replace(".", "/")
    z = matmul(g, x, out["gate_proj"], f"{base}/gate_proj", accuracy_level=accuracy_level)
    if activation == "silu":
        act = g.op("Mul", [z, g.op("Sigmoid", [z], name=f"{base}/act/Sigmoid")], name=f"{base}/act/Mul")
    else:
        act = g.op("Gelu", [z], name=f"{base}/act/Gelu", approximate="tanh" if activation == "gelu_tanh" else "none")
    h = g.op("Mul", [act, matmul(g, x, out["up_proj"], f"{base}/up_proj", accuracy_level=accuracy_level)],
             name=f"{base}/Mul")
    return matmul(g, h, out["down_proj"], f"{base}/down_proj", accuracy_level=accuracy_level)
