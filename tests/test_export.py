"""The CLI's exports, run in plain onnxruntime, against independent float64 references.

Sparse exports (custom op, library registered) are compared with
transformers' LlamaForCausalLM in float64 whose MLPs are the numpy op
reference; dense exports with the unmodified transformers model. Both for a
whole left-padded batch and for one KV-cache step. The export's positions are
cache slots (graph/decoder.py): the reference runs with those for the cache, and
its logits with transformers' own left-padding positions must agree as well.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from model_refs import hf_reference, min_threshold_margin

from dsmoe_export import onnx_op, projected_op
from dsmoe_export.graph import interface
from dsmoe_export.cli import main
from dsmoe_export.synthetic import TinySpec, make_model_folder
from dsmoe_export.validate import make_session

REL_TOL = 1e-4

CASES = {
    "n8_gqa": dict(spec=TinySpec(), router_scale=2.0),
    "n4_tied_mha_bias_binary_norescale": dict(
        spec=TinySpec(num_key_value_heads=4, tie_word_embeddings=True,
                      dsmoe=dict(num_experts=4, threshold=0.3, router_bias=True, weighting="binary", rescale=False)),
        router_scale=3.0),
    "n16_mqa_gelu_llama3rope_attnbias": dict(
        spec=TinySpec(num_key_value_heads=1, hidden_act="gelu_pytorch_tanh", attention_bias=True,
                      rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                        original_max_position_embeddings=64),
                      dsmoe=dict(num_experts=16, threshold=0.7)),
        router_scale=4.0),
    "n1_odd_sizes": dict(
        spec=TinySpec(vocab_size=97, hidden_size=48, intermediate_size=45, num_attention_heads=3,
                      num_key_value_heads=3, num_hidden_layers=3, dsmoe=dict(num_experts=1, threshold=0.5)),
        router_scale=2.0),
}


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def _prompt(vocab: int, rng: np.random.Generator, batch: int = 3, seq: int = 9):
    ids = torch.from_numpy(rng.integers(0, vocab, (batch, seq)))
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[0, :3] = 0  # left padding
    mask[1, :1] = 0
    return ids, mask, slots(batch, 0, seq)


def slots(batch: int, past: int, seq: int) -> torch.Tensor:
    return torch.arange(past, past + seq).expand(batch, seq)


def _ort_feeds(ids, mask, past: list[np.ndarray], kv_shape) -> dict:
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    n_layers = len(past) // 2 if past else kv_shape[0]
    for j, name in enumerate(interface.past_names(n_layers)):
        feeds[name] = past[j] if past else np.zeros(kv_shape[1:], np.float32)
    return feeds


def check_against_reference(onnx_path, model_dir, *, sparse: bool, threshold: float, rng) -> None:
    """Prefill a left-padded batch, then one cached step; compare logits and presents."""
    ref = hf_reference(model_dir, sparse=sparse)
    cfg = ref.config
    session = make_session(onnx_path, custom_ops=sparse)
    out_names = interface.output_names(cfg.num_hidden_layers)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    for _attempt in range(5):
        ids, mask, pos = _prompt(cfg.vocab_size, rng)
        kv_shape = (cfg.num_hidden_layers, ids.shape[0], cfg.num_key_value_heads, 0, head_dim)
        with torch.no_grad():
            r = ref(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        # fp32 and fp64 may pick different blocks for a score within rounding of tau: redraw.
        if not sparse or min_threshold_margin(ref, threshold) > 1e-5:
            break
    got = session.run(out_names, _ort_feeds(ids, mask, [], kv_shape))
    valid = mask.bool().numpy()
    assert _rel_err(got[0][valid], r.logits.numpy()[valid]) < REL_TOL
    # Positions counted from each row's first token (transformers' convention): the same logits.
    with torch.no_grad():
        r_hf = ref(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    assert _rel_err(got[0][valid], r_hf.logits.numpy()[valid]) < REL_TOL
    for i, layer in enumerate(r.past_key_values.layers):
        assert got[1 + 2 * i].shape == tuple(layer.keys.shape)
        for g, w in ((got[1 + 2 * i], layer.keys), (got[2 + 2 * i], layer.values)):
            rows = valid[:, None, :, None].repeat(g.shape[1], 1).repeat(g.shape[3], 3)
            assert _rel_err(g[rows], w.numpy()[rows]) < REL_TOL
    # One KV-cache step with the presents as pasts.
    nxt = torch.from_numpy(r.logits[:, -1].argmax(-1).numpy()).unsqueeze(1)
    mask2 = torch.cat([mask, torch.ones_like(nxt)], 1)
    with torch.no_grad():
        r2 = ref(input_ids=nxt, attention_mask=mask2, position_ids=slots(ids.shape[0], ids.shape[1], 1),
                 past_key_values=r.past_key_values, use_cache=True)
    got2 = session.run(out_names, _ort_feeds(nxt, mask2, got[1:], kv_shape))
    assert got2[0].shape == (ids.shape[0], 1, cfg.vocab_size)
    assert got2[1].shape[2] == ids.shape[1] + 1
    assert _rel_err(got2[0], r2.logits.numpy()) < REL_TOL


@pytest.mark.parametrize("ffn_node", ["auto", "projected"])
@pytest.mark.parametrize("case", list(CASES))
def test_sparse_export_matches_float64_reference(tmp_path, case, ffn_node, rng, seed, capsys):
    """Both FFN nodes: `auto` (plain) GatedBlockSparseFFN per layer; `projected` ProjectedSparseFFN in
    every layer but the last, and an error naming why where the attention projections have biases."""
    c = CASES[case]
    folder = make_model_folder(tmp_path / "model", c["spec"], seed=seed, router_scale=c["router_scale"])
    out = tmp_path / "model.onnx"
    if ffn_node == "projected" and c["spec"].attention_bias:
        assert main([str(folder), str(out), "-q", "--ffn-node", ffn_node]) == 1
        assert "the attention projections have biases" in capsys.readouterr().err and not out.exists()
        return
    assert main([str(folder), str(out), "-q", "--ffn-node", ffn_node]) == 0
    model = onnx.load(str(out))
    ffn_nodes = [n for n in model.graph.node if n.domain == onnx_op.DOMAIN]
    layers = c["spec"].num_hidden_layers
    projected = ffn_node == "projected"
    types = [n.op_type for n in ffn_nodes]
    assert types == ([projected_op.OP_TYPE] * (layers - 1) + [onnx_op.OP_TYPE] if projected
                     else [onnx_op.OP_TYPE] * layers)
    assert {f.name for f in model.functions} == {onnx_op.OP_TYPE} | ({projected_op.OP_TYPE} if projected else set())
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["dsmoe_export.ffn_node"] == types[0]
    # The default ("auto") at these small hidden sizes: the rows layout.
    _check_down_layout(model, ffn_nodes, c["spec"], tiled=False)
    check_against_reference(out, folder, sparse=True, threshold=c["spec"].dsmoe["threshold"], rng=rng)


@pytest.mark.parametrize("ffn_node", ["plain", "projected"])
def test_active_outputs_are_the_reference_routing(tmp_path, ffn_node, rng, seed):
    """--active-outputs with either FFN node: active.{i} of every layer (those inside
    ProjectedSparseFFN nodes included) is the float64 reference's score > threshold."""
    spec = TinySpec(num_hidden_layers=3)
    folder = make_model_folder(tmp_path / "model", spec, seed=seed, router_scale=2.0)
    out = tmp_path / "model.onnx"
    assert main([str(folder), str(out), "-q", "--ffn-node", ffn_node, "--active-outputs"]) == 0
    model = onnx.load(str(out), load_external_data=False)
    assert [n.op_type for n in model.graph.node if n.domain == onnx_op.DOMAIN] == (
        [projected_op.OP_TYPE] * 2 + [onnx_op.OP_TYPE] if ffn_node == "projected" else [onnx_op.OP_TYPE] * 3)
    ref = hf_reference(folder, sparse=True)
    session = make_session(out, custom_ops=True)
    names = [o.name for o in session.get_outputs()]
    threshold = spec.dsmoe["threshold"]
    head_dim = spec.hidden_size // spec.num_attention_heads
    kv_shape = (spec.num_hidden_layers, 1, spec.num_key_value_heads, 0, head_dim)
    checked = 0
    for _ in range(8):
        ids = torch.from_numpy(rng.integers(3, spec.vocab_size, (1, 9)))
        with torch.no_grad():
            ref(input_ids=ids)
        scores = [layer.mlp.scores[-1][0] for layer in ref.model.layers]
        if min_threshold_margin(ref, threshold) < 1e-4:
            continue  # float32 may pick another block for a token this close to the threshold
        got = dict(zip(names, session.run(None, _ort_feeds(ids, torch.ones_like(ids), [], kv_shape))))
        for i, score in enumerate(scores):
            assert got[f"active.{i}"].shape == (1, 9, spec.dsmoe["num_experts"])
            assert np.array_equal(got[f"active.{i}"][0], score > threshold), f"layer {i}"
        checked += 1
    assert checked >= 4


def _check_down_layout(model, ffn_nodes, spec, *, tiled: bool) -> None:
    inits = {t.name: t for t in model.graph.initializer}
    n = spec.dsmoe["num_experts"]
    B, d = spec.intermediate_size // n, spec.hidden_size
    for node in ffn_nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs.get("down_tile", 0) == (64 if tiled else 0)
        want = [n, -(-d // 64), B, 64] if tiled else [n, B, d]
        down = node.input[list(projected_op.INPUTS if node.op_type == projected_op.OP_TYPE
                                else onnx_op.INPUTS).index("down_weight")]
        assert list(inits[down].dims) == want


@pytest.mark.parametrize("layout", ["tiled", "rows"])
def test_explicit_down_layout(tmp_path, rng, seed, layout):
    """--down-layout tiled writes down_weight in column tiles (down_tile = 64, the last tile
    padded at odd d), rows as [n, B, d] without the attribute; the same results."""
    c = CASES["n1_odd_sizes"]
    folder = make_model_folder(tmp_path / "model", c["spec"], seed=seed, router_scale=c["router_scale"])
    out = tmp_path / "model.onnx"
    assert main([str(folder), str(out), "-q", "--down-layout", layout]) == 0
    model = onnx.load(str(out))
    _check_down_layout(model, [n for n in model.graph.node if n.domain == onnx_op.DOMAIN], c["spec"],
                       tiled=layout == "tiled")
    check_against_reference(out, folder, sparse=True, threshold=c["spec"].dsmoe["threshold"], rng=rng)


@pytest.mark.parametrize("layout", ["slabs", "rows"])
def test_explicit_gate_up_layout(tmp_path, rng, seed, layout):
    """--gate-up-layout slabs writes gate/up in k-major slabs (gate_up_tile = 32, the last slab
    padded: B is not a multiple of 32 here), rows as [n, B, d] without the attribute; both match
    the PyTorch reference."""
    c = CASES["n1_odd_sizes"]
    spec = c["spec"]
    folder = make_model_folder(tmp_path / "model", spec, seed=seed, router_scale=c["router_scale"])
    out = tmp_path / "model.onnx"
    assert main([str(folder), str(out), "-q", "--gate-up-layout", layout]) == 0
    model = onnx.load(str(out))
    inits = {t.name: t for t in model.graph.initializer}
    n = spec.dsmoe["num_experts"]
    B, d = spec.intermediate_size // n, spec.hidden_size
    assert B % 32 != 0
    nodes = [node for node in model.graph.node if node.domain == onnx_op.DOMAIN]
    assert nodes
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs.get("gate_up_tile", 0) == (32 if layout == "slabs" else 0)
        for name in ("gate_weight", "up_weight"):
            want = [n, -(-B // 32), d, 32] if layout == "slabs" else [n, B, d]
            assert list(inits[node.input[onnx_op.INPUTS.index(name)]].dims) == want
    check_against_reference(out, folder, sparse=True, threshold=spec.dsmoe["threshold"], rng=rng)


def test_auto_gate_up_layout():
    from dsmoe_export.exporter import choose_gate_up_layout

    assert choose_gate_up_layout("auto") == "slabs"
    assert choose_gate_up_layout("auto", "float16") == "rows"  # the CUDA EP's kernels read rows
    assert choose_gate_up_layout("rows") == "rows"


def test_auto_down_layout_follows_hidden_size():
    from dsmoe_export.exporter import AUTO_TILED_MIN_HIDDEN, choose_down_layout

    assert choose_down_layout("auto", 576) == "rows"
    assert choose_down_layout("auto", AUTO_TILED_MIN_HIDDEN - 1) == "rows"
    assert choose_down_layout("auto", AUTO_TILED_MIN_HIDDEN) == "tiled"
    assert choose_down_layout("auto", 4096) == "tiled"
    assert choose_down_layout("tiled", 576) == "tiled"
    assert choose_down_layout("rows", 4096) == "rows"
    assert choose_down_layout("auto", 4096, "float16") == "rows"  # the CUDA EP's CUTLASS GEMMs read rows
    assert choose_down_layout("tiled", 4096, "float16") == "tiled"


@pytest.mark.parametrize("tied", [False, True])
def test_dense_export_matches_transformers(tmp_path, tied, rng, seed):
    folder = make_model_folder(tmp_path / "model", TinySpec(tie_word_embeddings=tied), seed=seed)
    out = tmp_path / "dense.onnx"
    assert main([str(folder), str(out), "--dense", "-q"]) == 0
    model = onnx.load(str(out))
    assert not [n for n in model.graph.node if n.domain == onnx_op.DOMAIN]
    check_against_reference(out, folder, sparse=False, threshold=0.5, rng=rng)


def test_exported_interface_follows_optimum(tmp_path, seed):
    folder = make_model_folder(tmp_path / "model", TinySpec(num_hidden_layers=2), seed=seed)
    out = tmp_path / "m.onnx"
    assert main([str(folder), str(out), "-q", "--no-validate"]) == 0
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    dims = {vi.name: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
            for vi in list(model.graph.input) + list(model.graph.output)}
    # logits_to_keep: an optional input (an overridable initializer, default 0 = every position).
    assert list(dims) == interface.input_names(2) + [interface.LOGITS_TO_KEEP] + interface.output_names(2)
    assert dims[interface.LOGITS_TO_KEEP] == []
    assert dims["input_ids"] == ["batch_size", "sequence_length"]
    assert dims["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert dims["past_key_values.0.key"] == ["batch_size", 2, "past_sequence_length", 16]
    assert dims["present.1.value"] == ["batch_size", 2, "total_sequence_length", 16]
    assert dims["logits"] == ["batch_size", "logits_sequence_length", 256]
    assert model.ir_version <= 10
    names = {i.name for i in model.graph.initializer}
    assert "model.layers.0.mlp.gate_blocks" in names and "model.embed_tokens.weight" in names
    for node in model.graph.node:  # no build-machine paths leak into the file
        assert not node.metadata_props


def test_external_data_round_trip(tmp_path, seed):
    folder = make_model_folder(tmp_path / "model", TinySpec(num_hidden_layers=1), seed=seed)
    out = tmp_path / "m.onnx"
    assert main([str(folder), str(out), "-q", "--external-data", "always"]) == 0
    assert (tmp_path / "m.onnx.data").stat().st_size > out.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data", "model"]


def test_python_dash_m_entry_point(tmp_path, seed):
    folder = make_model_folder(tmp_path / "model", TinySpec(num_hidden_layers=1), seed=seed)
    out = tmp_path / "m.onnx"
    proc = subprocess.run([sys.executable, "-m", "dsmoe_export", str(folder), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "max |ORT - PyTorch|" in proc.stderr and "wrote" in proc.stdout
    assert out.is_file()


def test_validation_skips_prompts_with_routing_ties(tmp_path):
    """Regression (CI flake): with this model, validation's first prompt puts one router score
    1 ulp from the threshold, ORT and PyTorch break the tie differently, and the logits differ
    by 7.5 %. Validation must detect the tie and use the next prompt."""
    from dsmoe_export import loader, validate

    folder = make_model_folder(tmp_path / "model", TinySpec(), seed=1939089601, router_scale=2.0)
    model = loader.load_model(folder)[0]
    ties, hooks = validate._watch_routing_ties(model, validate.ROUTING_MARGIN_FP32)
    ids, mask, pos = validate.prompt_inputs(model.cfg.vocab_size, seed=0)
    assert not mask[0, 0]
    with torch.no_grad():
        model(ids, mask, pos, model.empty_past(ids.shape[0], dtype=torch.float32))
    for hook in hooks:
        hook.remove()
    assert any(ties)  # the case this test is about
    assert main([str(folder), str(tmp_path / "m.onnx"), "-q"]) == 0


def test_validation_counts_top1_agreement_of_the_logits(tmp_path):
    """The report's logits error and top-1 agreement: all positions for the model's own export, and
    for another model's export the count numpy gets from the two sets of prefill logits."""
    from dsmoe_export import loader, validate

    spec = TinySpec()
    folders = [make_model_folder(tmp_path / name, spec, seed=seed, router_scale=2.0)
               for name, seed in (("a", 11), ("b", 12))]
    assert main([str(folders[0]), str(tmp_path / "a.onnx"), "-q", "--no-validate"]) == 0
    own = validate.validate_export(loader.load_model(folders[0])[0], tmp_path / "a.onnx")
    # batch 2 of 8 tokens, row 0 left-padded by 2: 14 prefill positions, then one step per row
    assert own.top1_positions == 16 and own.top1_agreed == 16 and own.logits_rel_error < REL_TOL
    other_model = loader.load_model(folders[1])[0]
    other = validate.validate_export(other_model, tmp_path / "a.onnx")
    assert other.top1_positions == 16 and other.logits_rel_error > 0.1
    ids, mask, pos = validate.prompt_inputs(spec.vocab_size, seed=0)
    with torch.no_grad():
        want = other_model(ids, mask, pos, other_model.empty_past(2, dtype=torch.float32))[0].numpy()
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    for name in interface.past_names(spec.num_hidden_layers):
        feeds[name] = np.zeros((2, spec.num_key_value_heads, 0, spec.hidden_size // spec.num_attention_heads),
                               np.float32)
    got = make_session(tmp_path / "a.onnx").run(["logits"], feeds)[0]
    valid = mask.bool().numpy()
    prefill_agreed = int((got[valid].argmax(-1) == want[valid].argmax(-1)).sum())
    assert prefill_agreed <= other.top1_agreed <= prefill_agreed + 2 < 16


# The per-layer op sequence of the lean graph (docs/exporting.md), as ONNX Runtime's model builder
# lays out a LLaMA layer; layer 0 starts with a plain SimplifiedLayerNormalization.
LAYER_OPS = ["SkipSimplifiedLayerNormalization", "MatMul", "GroupQueryAttention", "MatMul",
             "SkipSimplifiedLayerNormalization"]
DENSE_FFN_OPS = ["MatMul", "Sigmoid", "Mul", "MatMul", "Mul", "MatMul"]


@pytest.mark.parametrize("kind", ["dense", "auto", "plain", "projected"])
def test_graph_is_the_fused_layout(tmp_path, seed, kind):
    folder = make_model_folder(tmp_path / "model", TinySpec(num_hidden_layers=3), seed=seed)
    out = tmp_path / "m.onnx"
    flags = ["--dense"] if kind == "dense" else ["--ffn-node", kind]
    assert main([str(folder), str(out), "-q", "--no-validate"] + flags) == 0
    model = onnx.load(str(out))
    dense = kind == "dense"
    by_layer: dict[int, list[str]] = {}
    for node in model.graph.node:
        parts = node.name.split("/")
        if len(parts) > 3 and parts[1:3] == ["model", "layers"]:
            by_layer.setdefault(int(parts[3]), []).append(node.op_type)
    ffn = DENSE_FFN_OPS if dense else [onnx_op.OP_TYPE]
    if kind == "projected":  # the next layer's norm and QKV projection inside each layer's node, but the last
        assert by_layer[0] == ["SimplifiedLayerNormalization", "MatMul", "GroupQueryAttention", projected_op.OP_TYPE]
        assert by_layer[1] == ["GroupQueryAttention", projected_op.OP_TYPE]
        assert by_layer[2] == ["GroupQueryAttention"] + LAYER_OPS[3:] + ffn
    else:
        assert by_layer[0] == ["SimplifiedLayerNormalization"] + LAYER_OPS[1:] + ffn
        assert by_layer[1] == by_layer[2] == LAYER_OPS + ffn
    gqa = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa.attribute}
    assert attrs["do_rotary"] == 1 and attrs["num_heads"] == 4 and attrs["kv_num_heads"] == 2
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["dsmoe_export.graph"] == interface.GRAPH_KIND and meta["dsmoe_export.sparse"] == str(int(not dense))


def test_attention_mask_values_other_than_0_and_1_fail_the_call(tmp_path, seed, rng):
    """The padding bias is looked up by the mask's value: 2 is no index of the two-entry table, so
    ONNX Runtime refuses the call instead of computing with a bias of the wrong sign."""
    folder = make_model_folder(tmp_path / "model", TinySpec(num_hidden_layers=1), seed=seed)
    out = tmp_path / "m.onnx"
    assert main([str(folder), str(out), "-q", "--no-validate"]) == 0
    session = make_session(out)
    ids, mask, _ = _prompt(256, rng, batch=2, seq=6)
    feeds = _ort_feeds(ids, mask, [], (1, 2, 2, 0, 16))
    session.run(["logits"], feeds)
    feeds["attention_mask"] = feeds["attention_mask"].copy()
    feeds["attention_mask"][1, -1] = 2
    with pytest.raises(Exception, match="out of data bounds"):
        session.run(["logits"], feeds)


def test_logits_to_keep_limits_the_lm_head_to_the_last_positions(tmp_path, seed, rng):
    """The optional input: 0 (default) every position, k the last k (at most the call's), a negative k
    all but the first |k| (transformers' h[:, -k:]), bit-equal."""
    folder = make_model_folder(tmp_path / "model", TinySpec(num_hidden_layers=1), seed=seed)
    out = tmp_path / "m.onnx"
    assert main([str(folder), str(out), "-q", "--no-validate"]) == 0
    session = make_session(out)
    assert [i.name for i in session.get_overridable_initializers()] == [interface.LOGITS_TO_KEEP]
    assert interface.LOGITS_TO_KEEP not in [i.name for i in session.get_inputs()]  # others need not know it
    ids, mask, _ = _prompt(256, rng, batch=2, seq=6)
    feeds = _ort_feeds(ids, mask, [], (1, 2, 2, 0, 16))
    full = session.run(["logits"], feeds)[0]
    assert full.shape == (2, 6, 256)
    for keep, want in ((0, 6), (1, 1), (4, 4), (6, 6), (9, 6), (-2, 4)):  # -2: h[:, 2:], as transformers slices
        part = session.run(["logits"], dict(feeds, logits_to_keep=np.array(keep, np.int64)))[0]
        assert part.shape == (2, want, 256) and np.array_equal(part, full[:, 6 - want:]), keep
