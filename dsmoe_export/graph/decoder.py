"""The whole causal LM as one lean ONNX graph of ONNX Runtime's fused contrib ops.

Per decoder layer (docs/exporting.md has the picture and the reasons):

    SkipSimplifiedLayerNormalization   residual add + RMSNorm (layer 0: SimplifiedLayerNormalization)
    MatMul (or MatMulNBits)            packed Q, K, V projection
    GroupQueryAttention                rotary inside, KV cache in and out, causal + padding mask
    MatMul (or MatMulNBits)            o_proj
    SkipSimplifiedLayerNormalization   residual add + RMSNorm
    GatedBlockSparseFFN                the sparse FFN (--dense: MatMul, Sigmoid, Mul, MatMul, Mul, MatMul)

With `projected_ffn` (sparse graphs for the CPU EP, float32 or int4 weights), one
ProjectedSparseFFN(Int4) node per layer but the last replaces the layer's o_proj, both norms around its FFN, the FFN and the next layer's
QKV projection: per layer then GroupQueryAttention + ProjectedSparseFFN.

Positions are cache slots: token j of a call with past length P sits at position P + j in every
row, padding included. Rotary embeddings depend only on position differences, so a left-padded
row gives the same logits as with positions counted from its first real token; its cached keys
are rotated by the slot position (the PyTorch reference is validated the same way).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto

from .. import __version__, gptq, onnx_op, projected_op, quant
from ..errors import ExportError
from ..modeling import rope_inv_freq
from . import interface
from .builder import MS_DOMAIN, GraphBuilder
from .ffn import add_quant_sparse_ffn_node, add_sparse_ffn_node, array, dense_ffn, set_values, sparse_ffn
from .weights import gather, matmul, store_matrix, store_table

# Added to the attention scores of padding slots. Finite, so that a row of padding only (a
# left-padded query) stays finite; large enough that exp() of it is 0 next to a real key.
PADDING_BIAS = -10000.0
ELEM_TYPES = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16}


@dataclass(frozen=True)
class GraphOptions:
    sparse: bool = True
    ffn_weights: str = "float32"     # quant.FORMATS; "float32" = the graph's element type
    matmul_weights: str = "float32"  # attention's MatMuls
    lm_head_weights: str | None = None  # lm_head and the embedding table (None: as matmul_weights)
    group_size: int = quant.DEFAULT_GROUP_SIZE
    accuracy_level: int = 4          # MatMulNBits' and the int4 sparse op's (4: int8 activations on the CPU EP)
    down_tile: int = onnx_op.DOWN_TILE
    gate_up_tile: int = 0            # the float32 sparse op's gate/up layout (onnx_op.GATE_UP_LAYOUTS)
    active_outputs: bool = False
    projected_ffn: bool = False      # ProjectedSparseFFN nodes (projected_ffn_applies says where it can)
    hessians: gptq.Hessians | None = None  # calibration inputs: GPTQ for the int8/int4 weights

    def hessian(self, key: str):
        return self.hessians.get(key) if self.hessians is not None else None

    @property
    def vocab_weights(self) -> str:
        """The format of lm_head and the embedding table."""
        return self.lm_head_weights or self.matmul_weights


def check_config(cfg, config_file) -> None:
    """What the graph's contrib ops need of the model, checked before anything is built."""
    if cfg.head_dim % 16:
        raise ExportError(f"ONNX Runtime's GroupQueryAttention (rotary inside) needs a multiple of 16, got {cfg.head_dim} "
                          f"(hidden_size / num_attention_heads)", file=config_file, field="head_dim")


def build_model(model, opts: GraphOptions) -> onnx.ModelProto:
    """The ONNX model of `model` (a DSMoEForCausalLM). Quantized formats change `model`'s weights in
    place to the values the graph holds, so that it stays the export's reference."""
    cfg = model.cfg
    dtype = next(model.parameters()).dtype
    elem = ELEM_TYPES[dtype]
    g = GraphBuilder()
    n = cfg.num_hidden_layers
    ids = g.input("input_ids", TensorProto.INT64, [interface.BATCH, interface.SEQ])
    mask = g.input("attention_mask", TensorProto.INT64, [interface.BATCH, interface.TOTAL])
    kv_shape = [interface.BATCH, cfg.num_key_value_heads, interface.PAST, cfg.head_dim]
    pasts = [g.input(name, elem, kv_shape) for name in interface.past_names(n)]

    lm_head = _store_lm_head(g, model, opts)
    x = gather(g, ids, _embedding_table(g, model, opts, lm_head), "/model/embed_tokens")
    attn_inputs = _attention_inputs(g, model, ids, mask, elem)
    residual, ffn_out, packed = x, None, None
    layers = model.model.layers
    for i, layer in enumerate(layers):
        prefix = f"model.layers.{i}"
        base = f"/{prefix.replace('.', '/')}"
        if packed is None:  # else the previous layer's ProjectedSparseFFN computed it
            h, residual = _norm(g, ffn_out, residual, layer.input_layernorm, f"{base}/input_layernorm",
                                cfg.rms_norm_eps)
            packed = _qkv_projection(g, h, layer.self_attn, f"{prefix}.self_attn", opts, i)
        a = _group_query_attention(g, packed, layer.self_attn, f"{prefix}.self_attn", attn_inputs, pasts[2 * i],
                                   pasts[2 * i + 1], interface.present_names(n)[2 * i:2 * i + 2])
        active = interface.active_names(n)[i] if opts.sparse and opts.active_outputs else ""
        if opts.projected_ffn and i + 1 < n:
            packed, residual = projected_sparse_ffn(g, a, residual, layer, layers[i + 1], i, eps=cfg.rms_norm_eps,
                                                    opts=opts, active=active)
            continue
        packed = None
        a = _o_projection(g, a, layer.self_attn, f"{prefix}.self_attn", opts, i)
        h, residual = _norm(g, a, residual, layer.post_attention_layernorm, f"{base}/post_attention_layernorm",
                            cfg.rms_norm_eps)
        if opts.sparse:
            ffn_out = sparse_ffn(g, h, layer.mlp, f"{prefix}.mlp", fmt=opts.ffn_weights, group_size=opts.group_size,
                                 down_tile=opts.down_tile, gate_up_tile=opts.gate_up_tile, active=active,
                                 hessians=opts.hessians, layer=i, accuracy_level=opts.accuracy_level)
        else:
            ffn_out = dense_ffn(g, h, layer.mlp, f"{prefix}.mlp", activation=_activation(cfg), fmt=opts.ffn_weights,
                                group_size=opts.group_size, accuracy_level=opts.accuracy_level,
                                hessians=opts.hessians, layer=i)
    h, _ = _norm(g, ffn_out, residual, model.model.norm, "/model/norm", cfg.rms_norm_eps)
    matmul(g, _last_positions(g, h), lm_head, "/lm_head", accuracy_level=opts.accuracy_level, output="logits")
    _declare_outputs(g, cfg, elem, opts)
    proto = g.model("dsmoe", producer="dsmoe-export", metadata=_metadata(model, opts, dtype))
    if opts.sparse:
        quant.add_functions_to_model(proto)
        projected_op.add_function_to_model(proto)
    return proto


def projected_ffn_applies(model, opts: GraphOptions) -> str | None:
    """None when ProjectedSparseFFN(Int4) can replace the layers' projections, norms and FFN, else
    why not: its kernels are float32 with float32 or int4 weights (CPU EP), its projections have
    no bias, and the int4 form needs whole blocks of the group size."""
    if not opts.sparse:
        return "the dense export has no sparse FFN"
    if next(model.parameters()).dtype != torch.float32:
        return "the graph is float16 (the op's kernel is float32, for the CPU EP)"
    if (opts.ffn_weights, opts.matmul_weights) not in (("float32", "float32"), ("int4", "int4")):
        return "the FFN and attention weights are not both float32 or both int4 (the op's two forms)"
    if model.cfg.num_hidden_layers < 2:
        return "the model has one layer (the op spans two)"
    attn = model.model.layers[0].self_attn
    if any(p.bias is not None for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)):
        return "the attention projections have biases (the op's projections have none)"
    if opts.ffn_weights == "int4":
        widths = {"hidden_size": model.cfg.hidden_size, "the attention output": attn.o_proj.weight.shape[1]}
        for what, width in widths.items():
            if width % opts.group_size:
                return f"{what} ({width}) is not a multiple of the group size {opts.group_size} (whole int4 blocks)"
    return None


def _activation(cfg) -> str:
    from ..config import HF_ACTIVATIONS
    return cfg.dsmoe.activation if cfg.dsmoe else HF_ACTIVATIONS[cfg.hidden_act]


def _weight_array(t: torch.Tensor, fmt: str) -> np.ndarray:
    return array(t) if fmt == "float32" else array(t, np.float32)


def _store_lm_head(g, model, opts):
    tied = model.lm_head is None
    weight = model.model.embed_tokens.weight if tied else model.lm_head.weight
    fmt = opts.vocab_weights
    m = store_matrix(g, _weight_array(weight, fmt), fmt,
                     "model.embed_tokens" if tied else "lm_head", group_size=opts.group_size,
                     hessian=opts.hessian("lm_head"))
    set_values(weight, m.values)
    return m


def _embedding_table(g, model, opts, lm_head):
    """A tied table is the lm_head's stored weight; an untied one is stored in the same format."""
    if model.lm_head is None:
        return lm_head
    weight = model.model.embed_tokens.weight
    fmt = opts.vocab_weights
    table = store_table(g, _weight_array(weight, fmt), fmt, "model.embed_tokens", group_size=opts.group_size)
    set_values(weight, table.values)
    return table


def _last_positions(g, h: str) -> str:
    """h[:, -logits_to_keep:] when the optional input `logits_to_keep` (default 0: all positions)
    is above 0: generation needs the last position's logits only, and the lm_head over a whole
    prompt is a fifth of a 128-token prefill of SmolLM2."""
    keep = g.optional_input(interface.LOGITS_TO_KEEP, np.array(0, np.int64))
    # h[:, -k:] as transformers slices it (k = 0: every position; a negative k drops the first |k|):
    # 0 - k broadcast to the one-element starts vector in one node.
    start = g.op("Sub", [g.const([0]), keep], name="/model/logits/Start")
    return g.op("Slice", [h, start, g.const([2**62]), g.const([1])], name="/model/logits/Slice")


def _norm(g, x, residual, norm, name, eps):
    """RMSNorm of x + residual; returns (normalized, the sum as the next residual). With x None
    (before the first layer) there is nothing to add."""
    weight = g.initializer(name.strip("/").replace("/", ".") + ".weight", array(norm.weight))
    if x is None:
        return g.op("SimplifiedLayerNormalization", [residual, weight], name=f"{name}/SimplifiedLayerNorm",
                    axis=-1, epsilon=eps, stash_type=1), residual
    base = g.fresh(f"{name}/SkipLayerNorm")
    outs = [f"{base}/out0", "", "", f"{base}/out3"]
    g.op("SkipSimplifiedLayerNormalization", [x, residual, weight], name=base, outputs=outs, domain=MS_DOMAIN,
         epsilon=eps)
    return outs[0], outs[3]


def _attention_inputs(g, model, ids, mask, elem) -> dict[str, str]:
    """What every GroupQueryAttention node shares: seqlens_k, total_sequence_length, the padding
    bias and the rotary caches.

    Left padding: every row's sequence runs to the last slot, so seqlens_k is total - 1 for
    all rows, and padding slots are masked by an additive bias [batch, 1, seq, total] built
    from attention_mask (GroupQueryAttention adds it to the scores; the causal part it applies
    itself)."""
    cfg = model.cfg
    # Few nodes: each costs a decode step a few microseconds of ONNX Runtime's executor, whatever
    # its size (ten here, the padding bias included; the builder's graph has no bias and six).
    total = g.op("Shape", [mask], name="/model/mask/Total", start=1, end=2)  # GQA takes a one-element vector
    total32 = g.op("Cast", [total], name="/model/mask/Total/Cast", to=TensorProto.INT32)
    batch = g.op("Shape", [mask], name="/model/mask/Batch", start=0, end=1)
    seqlens = g.op("Expand", [g.op("Sub", [total32, g.const(1, np.int32)], name="/model/mask/LastSlot"), batch],
                   name="/model/mask/SeqlensK")
    np_elem = np.float32 if elem == TensorProto.FLOAT else np.float16
    # The bias looked up by the mask value: [PADDING_BIAS, 0][mask], [batch, 1, 1, total]
    # (values past 1 fail the Gather's index check, -1 and -2 index from the end; the runtime
    # accepts 0 and 1 only).
    bias = g.op("Gather", [g.const([PADDING_BIAS, 0.0], np_elem),
                           g.op("Unsqueeze", [mask, g.const([1, 2])], name="/model/mask/Unsqueeze")],
                name="/model/mask/Lookup", axis=0)
    seq = g.op("Shape", [ids], name="/model/mask/Seq", start=1, end=2)
    rows = g.op("Concat", [g.const([1, 1]), seq, g.const([1])], name="/model/mask/BiasShape", axis=0)
    bias = g.op("Expand", [bias, rows], name="/model/mask/Bias")
    positions = np.arange(cfg.max_position_embeddings, dtype=np.float64)
    freqs = np.outer(positions, rope_inv_freq(cfg).numpy())
    return {"seqlens_k": seqlens, "total": total32, "bias": bias,
            "cos": g.initializer("model.rotary.cos_cache", np.cos(freqs).astype(np_elem)),
            "sin": g.initializer("model.rotary.sin_cache", np.sin(freqs).astype(np_elem))}


def _qkv_weight(attn, fmt: str) -> np.ndarray:
    """The packed Q, K, V projection's weight [q + 2 kv, d] (nn.Linear layout)."""
    return np.concatenate([_weight_array(p.weight, fmt) for p in (attn.q_proj, attn.k_proj, attn.v_proj)])


def _qkv_projection(g, x, attn, prefix, opts, layer: int) -> str:
    fmt = opts.matmul_weights
    qkv = store_matrix(g, _qkv_weight(attn, fmt), fmt, f"{prefix}.qkv_proj", group_size=opts.group_size,
                       hessian=opts.hessian(f"layers.{layer}.attn"))
    rows = np.cumsum([0] + [p.weight.shape[0] for p in (attn.q_proj, attn.k_proj, attn.v_proj)])
    for j, p in enumerate((attn.q_proj, attn.k_proj, attn.v_proj)):
        set_values(p.weight, qkv.values[rows[j]:rows[j + 1]])
    bias = ""
    if attn.q_proj.bias is not None:
        bias = g.initializer(f"{prefix}.qkv_proj.bias", np.concatenate(
            [array(p.bias) for p in (attn.q_proj, attn.k_proj, attn.v_proj)]))
    return matmul(g, x, qkv, f"/{prefix.replace('.', '/')}/qkv_proj", accuracy_level=opts.accuracy_level, bias=bias)


def _group_query_attention(g, packed, attn, prefix, shared, past_k, past_v, presents) -> str:
    base = "/" + prefix.replace(".", "/")
    return g.op("GroupQueryAttention",
                [packed, "", "", past_k, past_v, shared["seqlens_k"], shared["total"], shared["cos"], shared["sin"],
                 "", shared["bias"]],
                name=f"{base}/GroupQueryAttention", outputs=[f"{base}/GroupQueryAttention/out0", *presents],
                domain=MS_DOMAIN, num_heads=attn.heads, kv_num_heads=attn.kv_heads, do_rotary=1, rotary_interleaved=0)


def _o_projection(g, x, attn, prefix, opts, layer: int) -> str:
    fmt = opts.matmul_weights
    o = store_matrix(g, _weight_array(attn.o_proj.weight, fmt), fmt, f"{prefix}.o_proj", group_size=opts.group_size,
                     hessian=opts.hessian(f"layers.{layer}.o_proj"))
    set_values(attn.o_proj.weight, o.values)
    o_bias = g.initializer(f"{prefix}.o_proj.bias", array(attn.o_proj.bias)) if attn.o_proj.bias is not None else ""
    return matmul(g, x, o, f"/{prefix.replace('.', '/')}/o_proj", accuracy_level=opts.accuracy_level, bias=o_bias)


def projected_sparse_ffn(g, a, residual, layer, next_layer, i: int, *, eps, opts, active):
    """One ProjectedSparseFFN node (ProjectedSparseFFNInt4 for int4 weights): layer i's o_proj,
    post-attention norm and sparse FFN, layer i + 1's input norm and QKV projection. Returns (the
    next layer's packed Q, K, V; the residual stream)."""
    prefix, next_prefix = f"model.layers.{i}", f"model.layers.{i + 1}"
    fmt = opts.ffn_weights
    attn, nxt = layer.self_attn, next_layer.self_attn
    norm = g.initializer(f"{prefix}.post_attention_layernorm.weight", array(layer.post_attention_layernorm.weight))
    out_norm = g.initializer(f"{next_prefix}.input_layernorm.weight", array(next_layer.input_layernorm.weight))
    name = g.fresh(f"/{prefix.replace('.', '/')}/{projected_op.OP_TYPE}")
    outputs = [f"{name}/Y", f"{name}/skip_out", active]
    if fmt == "float32":
        in_proj = g.initializer(f"{prefix}.self_attn.o_proj.weight", array(attn.o_proj.weight))
        out_proj = g.initializer(f"{next_prefix}.self_attn.qkv_proj.weight", _qkv_weight(nxt, fmt))
        add_sparse_ffn_node(g, lambda ffn, attrs: projected_op.make_node(
            [a, residual, in_proj, norm, *ffn[1:5], out_norm, out_proj, *ffn[5:]], outputs, epsilon=float(eps),
            name=name, **attrs), layer.mlp, f"{prefix}.mlp", down_tile=opts.down_tile,
            gate_up_tile=opts.gate_up_tile)
        return outputs[0], outputs[1]
    # int4: the projections stored as the plain graph's MatMulNBits would hold them (op-spec)
    o = store_matrix(g, _weight_array(attn.o_proj.weight, fmt), fmt, f"{prefix}.self_attn.o_proj",
                     group_size=opts.group_size, hessian=opts.hessian(f"layers.{i}.o_proj"))
    set_values(attn.o_proj.weight, o.values)
    qkv = store_matrix(g, _qkv_weight(nxt, fmt), fmt, f"{next_prefix}.self_attn.qkv_proj", group_size=opts.group_size,
                       hessian=opts.hessian(f"layers.{i + 1}.attn"))
    rows = np.cumsum([0] + [p.weight.shape[0] for p in (nxt.q_proj, nxt.k_proj, nxt.v_proj)])
    for j, p in enumerate((nxt.q_proj, nxt.k_proj, nxt.v_proj)):
        set_values(p.weight, qkv.values[rows[j]:rows[j + 1]])
    add_quant_sparse_ffn_node(g, lambda ffn, attrs: projected_op.make_node(
        [a, residual, o.weight, o.scales, norm, *ffn[1:8], out_norm, qkv.weight, qkv.scales, *ffn[8:]], outputs,
        epsilon=float(eps), name=name, **attrs), layer.mlp, f"{prefix}.mlp", fmt=fmt, group_size=opts.group_size,
        hessians=opts.hessians, layer=i)
    return outputs[0], outputs[1]


def _declare_outputs(g, cfg, elem, opts) -> None:
    n = cfg.num_hidden_layers
    g.output("logits", elem, [interface.BATCH, interface.LOGITS_SEQ, cfg.vocab_size])
    kv_shape = [interface.BATCH, cfg.num_key_value_heads, interface.TOTAL, cfg.head_dim]
    for name in interface.present_names(n):
        g.output(name, elem, kv_shape)
    if opts.sparse and opts.active_outputs:
        for name in interface.active_names(n):
            g.output(name, TensorProto.BOOL, [interface.BATCH, interface.SEQ, cfg.dsmoe.num_experts])


def _metadata(model, opts, dtype) -> dict[str, str]:
    meta = {"dsmoe_export.version": __version__, "dsmoe_export.sparse": "1" if opts.sparse else "0",
            "dsmoe_export.dtype": str(dtype).removeprefix("torch."),
            "dsmoe_export.graph": interface.GRAPH_KIND,
            "dsmoe_export.max_position": str(model.cfg.max_position_embeddings),
            "dsmoe_export.ffn_weights": opts.ffn_weights, "dsmoe_export.matmul_weights": opts.matmul_weights,
            "dsmoe_export.lm_head_weights": opts.vocab_weights}
    formats = (opts.ffn_weights, opts.matmul_weights, opts.vocab_weights)
    if any(f in quant.BITS for f in formats):
        meta["dsmoe_export.group_size"] = str(opts.group_size)
    if any(f in quant.BITS for f in formats[1:]) or (not opts.sparse and opts.ffn_weights in quant.BITS):
        meta["dsmoe_export.accuracy_level"] = str(opts.accuracy_level)
    if opts.sparse:
        meta["dsmoe_export.ffn_node"] = projected_op.OP_TYPE if opts.projected_ffn else onnx_op.OP_TYPE
        meta["dsmoe_export.dsmoe"] = json.dumps(model.cfg.dsmoe.to_json())
        if opts.active_outputs:
            meta["dsmoe_export.active_outputs"] = "1"
    return meta
