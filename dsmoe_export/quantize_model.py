"""Weight-only quantized exports (``--ffn-weights``, ``--matmul-weights``, ``--group-size``).

Two halves that must agree value for value:

- :func:`fake_quantize_model` replaces the PyTorch model's weights by their
  quantize-dequantize values (the reference the export is validated against, and
  the values the traced graph holds): FFN blocks per the op's layout (gate/up grouped
  along d, down along each block's B; the dense export: along D), every other
  ``nn.Linear`` (attention projections, lm_head; routers excluded) along its input
  dimension, as ``com.microsoft.MatMulNBits`` groups them. A tied lm_head is untied
  first (the embedding lookup keeps float32).
- :func:`quantize_graph` rewrites the traced ONNX model: each
  ``GatedBlockSparseFFN`` node becomes ``GatedBlockSparseFFN{Int4,Int8,F16}`` with
  quantized initializers, each ``MatMul`` with a constant 2-D weight becomes
  ``MatMulNBits`` (int4/int8) or takes a float16 initializer through a ``Cast``
  (float16: ORT folds the Cast at load, so only the file shrinks). Quantizing values
  that already lie on the grid reproduces the same integers and scales (to the last
  bit of the scale), so ONNX Runtime's results match the fake-quantized PyTorch model
  up to float32 rounding: validation keeps its float32 tolerance.
"""
from __future__ import annotations

import hashlib

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from . import onnx_op, quant
from .errors import ExportError

MS_DOMAIN = "com.microsoft"


def _fq(w: torch.Tensor, fmt: str, group: int) -> torch.Tensor:
    """Fake-quantize a 2-D+ tensor along its last axis."""
    out = quant.fake_quantize_rows(w.detach().to(torch.float32).cpu().numpy(), fmt, group)
    return torch.from_numpy(out).to(w.dtype)


def check_formats(ffn_weights: str, matmul_weights: str, group_size: int, *, dtype: str = "float32") -> None:
    if ffn_weights not in quant.FORMATS:
        raise ExportError(f"ffn_weights must be one of {', '.join(quant.FORMATS)}, got {ffn_weights!r}")
    if matmul_weights not in quant.FORMATS:
        raise ExportError(f"matmul_weights must be one of {', '.join(quant.FORMATS)}, got {matmul_weights!r}")
    try:
        quant.check_group_size(group_size)
    except ValueError as e:
        raise ExportError(f"--group-size: {e}") from None
    if dtype != "float32" and (ffn_weights != "float32" or matmul_weights != "float32"):
        raise ExportError("--ffn-weights / --matmul-weights need --dtype float32 (float32 activations)")


@torch.no_grad()
def fake_quantize_model(model, *, ffn_weights: str, matmul_weights: str, group_size: int) -> None:
    """In place: the model's weights become the values the quantized export stores."""
    G = group_size
    cfg = model.cfg
    if ffn_weights == "int4" and cfg.hidden_size % 32:
        raise ExportError(f"--ffn-weights int4 needs hidden_size to be a multiple of 32, got {cfg.hidden_size}")
    if matmul_weights != "float32" and model.lm_head is None:  # untie: the embedding lookup stays float32
        emb = model.model.embed_tokens.weight
        model.lm_head = torch.nn.Linear(emb.shape[1], emb.shape[0], bias=False).to(emb.dtype)
        model.lm_head.weight.copy_(emb)
    ffn_linears = set()
    for layer in model.model.layers:
        mlp = layer.mlp
        ffn_linears.update({id(mlp.gate_proj), id(mlp.up_proj), id(mlp.down_proj)})
        if ffn_weights == "float32":
            continue
        for lin in (mlp.gate_proj, mlp.up_proj):
            lin.weight.copy_(_fq(lin.weight, ffn_weights, G))
        down = mlp.down_proj.weight  # [d, D]
        if model.sparse:  # groups along each block's B (the op's down layout)
            n = cfg.dsmoe.num_experts
            d, D = down.shape
            down.copy_(_fq(down.reshape(d, n, D // n), ffn_weights, G).reshape(d, D))
        else:  # dense: MatMulNBits groups along D
            down.copy_(_fq(down, ffn_weights, G))
    if matmul_weights == "float32":
        return
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and id(mod) not in ffn_linears and not name.endswith(".router"):
            mod.weight.copy_(_fq(mod.weight, matmul_weights, G))


def _digest(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a, np.float32).tobytes()).hexdigest()


def linear_formats(model, *, ffn_weights: str, matmul_weights: str) -> dict[str, str]:
    """Digest of every (fake-quantized) nn.Linear weight [out, in] -> its storage format, so that
    the graph's MatMul weights ([in, out], or the weight itself behind a Transpose) can be told apart
    without relying on the exporter's initializer names."""
    ffn = set()
    for layer in model.model.layers:
        ffn.update({id(layer.mlp.gate_proj), id(layer.mlp.up_proj), id(layer.mlp.down_proj)})
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and not name.endswith(".router"):
            fmt = ffn_weights if id(mod) in ffn else matmul_weights
            out[_digest(mod.weight.detach().float().cpu().numpy())] = fmt
    return out


def quantize_graph(proto: onnx.ModelProto, *, ffn_weights: str, matmul_weights: str, group_size: int,
                   formats: dict[str, str]) -> dict[str, int]:
    """Rewrite ``proto`` in place (module docstring); returns counts of rewritten nodes by kind."""
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    uses: dict[str, int] = {}
    for n in graph.node:
        for x in n.input:
            uses[x] = uses.get(x, 0) + 1
    new_inits: list[onnx.TensorProto] = []
    dropped: set[str] = set()
    counts = {"ffn": 0, "matmul_nbits": 0, "matmul_f16": 0}
    nodes: list[onnx.NodeProto] = []

    def array(name):
        return numpy_helper.to_array(inits[name])

    def drop(name):
        uses[name] -= 1
        if uses[name] == 0 and name in inits:
            dropped.add(name)

    for node in graph.node:
        if node.domain == onnx_op.DOMAIN and node.op_type == onnx_op.OP_TYPE and ffn_weights != "float32":
            names = list(node.input)
            if not all(x in inits for x in names[2:5]):
                raise ExportError(f"FFN node {node.name}: block weights are not constant initializers; cannot "
                                  "quantize them")
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            gate, up, down = (array(x) for x in names[2:5])
            if attrs.pop("down_tile", 0):  # the quantized ops take down as [n, B, d] rows
                down = onnx_op.untile_down(down, gate.shape[2])
            packed = quant.quantize_block_weights(gate, up, down, ffn_weights, group_size)
            prefix = names[2].rsplit(".", 1)[0] if "." in names[2] else node.name
            new_names = {}
            for key, value in packed.items():
                new_names[key] = f"{prefix}.{key}.{ffn_weights}"
                new_inits.append(numpy_helper.from_array(value, new_names[key]))
            for x in names[2:5]:
                drop(x)
            bias = names[5] if len(names) > 5 else ""
            order = quant.QUANT_INPUTS if ffn_weights in quant.BITS else quant.F16_INPUTS
            inputs = [names[0], names[1]] + [new_names[k] for k in order[2:-1]] + [bias]
            for k in ("weighting", "activation"):
                if isinstance(attrs.get(k), bytes):
                    attrs[k] = attrs[k].decode()
            new = quant.make_node(ffn_weights, inputs, list(node.output), name=node.name,
                                  group_size=group_size if ffn_weights in quant.BITS else None, **attrs)
            nodes.append(new)
            counts["ffn"] += 1
            continue
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
            b = node.input[1]
            w_kn = None
            if b in inits and len(inits[b].dims) == 2:
                w_kn = array(b)
                fmt = formats.get(_digest(w_kn.T))
            elif b in producers and producers[b].op_type == "Transpose" and producers[b].input[0] in inits \
                    and len(inits[producers[b].input[0]].dims) == 2:
                w_kn = array(producers[b].input[0]).T
                fmt = formats.get(_digest(w_kn.T))
            else:
                fmt = None
            if fmt is None or fmt == "float32" or w_kn.dtype != np.float32:
                nodes.append(node)
                continue
            K, N = w_kn.shape
            base = (b if b in inits else producers[b].input[0])
            if fmt == "float16":
                name16 = f"{base}.float16"
                if name16 not in {t.name for t in new_inits}:
                    new_inits.append(numpy_helper.from_array(np.ascontiguousarray(w_kn.astype(np.float16)), name16))
                cast_out = f"{name16}.as_float32.{len(nodes)}"
                nodes.append(helper.make_node("Cast", [name16], [cast_out], to=onnx.TensorProto.FLOAT,
                                              name=f"{node.name}_weight_cast"))
                nodes.append(helper.make_node("MatMul", [node.input[0], cast_out], list(node.output), name=node.name))
                counts["matmul_f16"] += 1
            else:
                bits = quant.BITS[fmt]
                qb, qs = quant.matmul_nbits_weights(w_kn, bits, group_size)
                qn, sn = f"{base}.q{bits}.{len(nodes)}", f"{base}.scales{bits}.{len(nodes)}"
                new_inits += [numpy_helper.from_array(qb, qn), numpy_helper.from_array(qs, sn)]
                nodes.append(helper.make_node("MatMulNBits", [node.input[0], qn, sn], list(node.output),
                                              name=node.name, domain=MS_DOMAIN, K=K, N=N, bits=bits,
                                              block_size=group_size, accuracy_level=0))
                counts["matmul_nbits"] += 1
            drop(b)
            continue
        nodes.append(node)
    # Transposes left without consumers (tied lm_head) and unused initializers go.
    consumed = {x for n in nodes for x in n.input} | {o.name for o in graph.output}
    kept_nodes = [n for n in nodes if n.op_type != "Transpose" or any(o in consumed for o in n.output)]
    consumed = {x for n in kept_nodes for x in n.input} | {o.name for o in graph.output}
    del graph.node[:]
    graph.node.extend(kept_nodes)
    kept = [t for t in graph.initializer if t.name in consumed] + new_inits
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if counts["matmul_nbits"] and not any(i.domain == MS_DOMAIN for i in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    if counts["ffn"]:
        quant.add_functions_to_model(proto)
    meta = {p.key: p for p in proto.metadata_props}
    for key, value in (("dsmoe_export.ffn_weights", ffn_weights), ("dsmoe_export.matmul_weights", matmul_weights),
                       ("dsmoe_export.group_size", str(group_size))):
        if key in meta:
            meta[key].value = value
        else:
            proto.metadata_props.add(key=key, value=value)
    return counts
