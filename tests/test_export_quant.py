"""Quantized exports (--ffn-weights / --matmul-weights / --group-size): the graph holds the
quantized ops, the file shrinks, ONNX Runtime matches the PyTorch model with the same
quantize-dequantized weights, and differs from the float32 export by a quantization-sized error."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest

from dsmoe_export.exporter import export
from dsmoe_export.synthetic import TinySpec, make_model_folder
from dsmoe_export.validate import make_session, prompt_inputs
from dsmoe_export import cli
from dsmoe_export.graph import interface


def _ops(path):
    m = onnx.load(str(path))
    return collections.Counter((n.domain, n.op_type) for n in m.graph.node)


def _logits(path, vocab, sparse=True):
    s = make_session(path, custom_ops=sparse)
    ids, mask, pos = prompt_inputs(vocab, batch=2, seq=12, seed=3)
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    for name in interface.past_names(2):
        feeds[name] = np.zeros((2, 2, 0, 16), np.float32)
    return s.run(["logits"], feeds)[0]


@pytest.mark.parametrize("ffn_node", ["projected", "auto", "plain"])
def test_sparse_int4_projected_export(tmp_path, seed, ffn_node):
    """--ffn-weights int4 --ffn-node projected: ProjectedSparseFFNInt4 in every layer but the last,
    reading the int4 projections as MatMulNBits would (which the plain graph keeps); `auto` keeps
    the plain graph for int4 (exporting.md). Both exact against the PyTorch model holding the
    stored values."""
    spec = TinySpec(tie_word_embeddings=True, hidden_size=64, intermediate_size=256, num_hidden_layers=3)
    folder = make_model_folder(tmp_path / "m", spec, seed=seed % 1000, router_scale=3.0)
    q4 = export(folder, tmp_path / "int4.onnx", ffn_weights="int4", group_size=32, progress=False,
                copy_tokenizer=False, ffn_node=ffn_node, accuracy_level=0)
    assert q4.validation.max_rel_error <= 1e-3
    ops = _ops(tmp_path / "int4.onnx")
    projected = ffn_node == "projected"
    assert ops[("org.dsmoe", "ProjectedSparseFFNInt4")] == (2 if projected else 0)
    assert ops[("org.dsmoe", "GatedBlockSparseFFNInt4")] == (1 if projected else 3)
    # plain: packed qkv and o_proj per layer + the lm_head; projected: layer 0's qkv, the last o_proj, the lm_head
    assert ops[("com.microsoft", "MatMulNBits")] == (3 if projected else 2 * 3 + 1)
    functions = {f.name for f in onnx.load(str(tmp_path / "int4.onnx")).functions}
    assert ("ProjectedSparseFFNInt4" in functions) == projected


def test_sparse_int4_and_dense_int8_exports(tmp_path, seed):
    spec = TinySpec(tie_word_embeddings=True, hidden_size=64, intermediate_size=256)
    folder = make_model_folder(tmp_path / "m", spec, seed=seed % 1000, router_scale=3.0)
    ref = export(folder, tmp_path / "fp32.onnx", progress=False, copy_tokenizer=False)
    q4 = export(folder, tmp_path / "int4.onnx", ffn_weights="int4", group_size=32, progress=False,
                copy_tokenizer=False, ffn_node="plain")
    # Checked exactly against the PyTorch model holding the stored values, on a copy whose
    # MatMulNBits compute with float32 activations; the file as written (int8 activations,
    # accuracy_level 4) is measured too.
    assert q4.validation.max_rel_error <= 1e-3
    assert q4.validation.as_written is not None and q4.validation.as_written.max_rel_error > 1e-5
    assert q4.validation.top1_agreed == q4.validation.top1_positions == 16
    assert 0 < q4.validation.as_written.logits_rel_error and q4.validation.as_written.top1_positions == 16
    assert "the same top-1 token at" in q4.validation.summary()
    ops = _ops(tmp_path / "int4.onnx")
    assert ops[("org.dsmoe", "GatedBlockSparseFFNInt4")] == 2 and ops[("org.dsmoe", "GatedBlockSparseFFN")] == 0
    assert ops[("com.microsoft", "MatMulNBits")] == 2 * 2 + 1  # packed qkv and o per layer + the lm_head
    # The tied embedding table is the lm_head's int4 weight, looked up in place.
    assert ops[("com.microsoft", "GatherBlockQuantized")] == 1 and ops[("", "Gather")] == 1  # + the mask's
    levels = {onnx.helper.get_attribute_value(a) for n in onnx.load(str(tmp_path / "int4.onnx")).graph.node
              if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4}
    assert _op_levels(tmp_path / "int4.onnx") == [4, 4]  # the sparse op rounds X to int8 as MatMulNBits does
    assert q4.size_bytes < 0.6 * ref.size_bytes
    a, b = _logits(tmp_path / "fp32.onnx", spec.vocab_size), _logits(tmp_path / "int4.onnx", spec.vocab_size)
    # Quantized (not equal), yet close on average. Not the largest difference: a block whose score
    # sits at the threshold can switch for one token between the two files (seed 901: max 0.64,
    # mean 0.33; 0.24-0.29 for other seeds), which the exact check above already rules out as a bug.
    rel = np.abs(a - b).mean() / np.abs(a).mean()
    assert 1e-4 < rel < 0.5, rel

    d8 = export(folder, tmp_path / "dense8.onnx", dense=True, ffn_weights="int8", group_size=64, progress=False,
                copy_tokenizer=False)
    assert d8.validation.max_rel_error <= 1e-3
    ops = _ops(tmp_path / "dense8.onnx")
    assert ops[("com.microsoft", "MatMulNBits")] == 2 * 5 + 1 and ops[("", "MatMul")] == 0
    # --int4-accuracy-level 0: float32 activations, the file itself matches exactly.
    assert cli.main([str(folder), str(tmp_path / "int4_l0.onnx"), "--ffn-weights", "int4", "-q",
                     "--int4-accuracy-level", "0"]) == 0
    levels = {onnx.helper.get_attribute_value(a) for n in onnx.load(str(tmp_path / "int4_l0.onnx")).graph.node
              if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {0}
    assert _op_levels(tmp_path / "int4_l0.onnx") == [0, 0]


def _op_levels(path) -> list[int]:
    """accuracy_level of each GatedBlockSparseFFNInt4 node (0 when the attribute is left out)."""
    return [next((a.i for a in n.attribute if a.name == "accuracy_level"), 0)
            for n in onnx.load(str(path)).graph.node if n.op_type == "GatedBlockSparseFFNInt4"]


def test_quantized_export_errors(tmp_path, capsys):
    folder = make_model_folder(tmp_path / "m", TinySpec(hidden_size=48, intermediate_size=96, num_attention_heads=3,
                                                        num_key_value_heads=3))
    assert cli.main([str(folder), str(tmp_path / "x.onnx"), "--ffn-weights", "int4", "-q"]) == 1
    assert "multiple of 32" in capsys.readouterr().err
    assert cli.main([str(folder), str(tmp_path / "x.onnx"), "--ffn-weights", "int8", "--group-size", "48", "-q"]) == 1
    assert "power of two" in capsys.readouterr().err
    # also when nothing is quantized: a bad flag is never silently ignored
    assert cli.main([str(folder), str(tmp_path / "x.onnx"), "--group-size", "48", "-q"]) == 1
    assert "power of two" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_head_dim_must_suit_group_query_attention(tmp_path, capsys):
    folder = make_model_folder(tmp_path / "m", TinySpec(hidden_size=48, num_attention_heads=4, num_key_value_heads=2))
    assert cli.main([str(folder), str(tmp_path / "x.onnx"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "config.json: head_dim: " in err and "multiple of 16, got 12" in err
    assert not (tmp_path / "x.onnx").exists()
