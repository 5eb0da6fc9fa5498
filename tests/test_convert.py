"""Dense -> DSMoE conversion (dsmoe_export.convert) on tiny random dense folders made by transformers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

from dsmoe_export import calibrate as C
from dsmoe_export.convert import ConvertOptions, convert, main
from dsmoe_export.loader import load_model

transformers.logging.set_verbosity_error()

SIZES = dict(vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)
TEXT = ("To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer "
        "The slings and arrows of outrageous fortune, Or to take arms against a sea of troubles "
        "And by opposing end them. To die: to sleep; No more; and by a sleep to say we end "
        "The heart-ache and the thousand natural shocks That flesh is heir to. ") * 12


def _dense_folder(path, kind: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES))
    elif kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**SIZES, sliding_window=64))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SIZES, tie_word_embeddings=True))
        with torch.no_grad():  # make the q/k/v biases matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    model.save_pretrained(path)
    return path, model.eval()


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is fastest, and makes runs bit-reproducible."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _ids(rng, batch=2, seq=12):
    return torch.from_numpy(rng.integers(0, SIZES["vocab_size"], (batch, seq)))


def _ours(model, ids):
    return C.forward(model, ids).detach()


def _hf(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_all_blocks_active_is_the_dense_model(tmp_path, rng, kind):
    """tau = 0, binary weighting, no rescale: every block is active with weight 1 -> the dense model."""
    src, hf = _dense_folder(tmp_path / "dense", kind)
    out = tmp_path / "moe"
    assert main([str(src), str(out), "--experts", "8", "--threshold", "0", "-q"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert cfg["dsmoe"] == dict(num_experts=8, threshold=0.0, rescale=False, weighting="binary", router_bias=False)
    assert cfg["dsmoe_conversion"]["router_init"] == "random"
    model, _ = load_model(out)
    ids = _ids(rng)
    torch.testing.assert_close(_ours(model, ids), _hf(hf, ids), rtol=1e-4, atol=1e-4)
    assert all(m.last_active.all() for m in model.mlps)
    # the dense weights are untouched (no regrouping without calibration text)
    want = load_file(str(src / "model.safetensors"))
    got = load_file(str(out / "model.safetensors"))
    for name in ("model.layers.1.mlp.gate_proj.weight", "model.layers.0.mlp.down_proj.weight",
                 "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
        assert torch.equal(got[name], want[name])


def test_regrouping_and_fitting_keep_the_dense_model(tmp_path, rng):
    src, hf = _dense_folder(tmp_path / "dense")
    (tmp_path / "text.txt").write_text(TEXT)
    out = tmp_path / "moe"
    report = convert(src, out, ConvertOptions(experts=8, calib_text=tmp_path / "text.txt", seq_len=32,
                                              target_active=0.5, progress=False))
    assert report["router_init"] == "fit" and report["regroup"] == "coact"
    before = load_file(str(src / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    gate = "model.layers.0.mlp.gate_proj.weight"
    assert not torch.equal(before[gate], after[gate]), "regrouping should reorder neurons"
    # the same rows, reordered
    assert torch.equal(before[gate].sort(dim=0).values, after[gate].sort(dim=0).values)
    dense, _ = load_model(out, sparse=False)
    ids = _ids(rng)
    torch.testing.assert_close(_ours(dense, ids), _hf(hf, ids), rtol=1e-4, atol=1e-4)
    # fitted routers hit the target active fraction on the calibration text (per layer)
    sparse, cfg = load_model(out)
    assert cfg.dsmoe.router_bias and cfg.dsmoe.weighting == "binary" and not cfg.dsmoe.rescale
    ids = C.chunk(C.tokenize_text(TEXT, None, 256), 32)
    r = C.evaluate(sparse, ids)
    for a in r.active:
        assert 0.35 < a < 0.65


def test_permuting_blocks_leaves_the_dense_ffn_unchanged(rng):
    src_t = {f"model.layers.0.mlp.{p}.weight": torch.randn(*s) for p, s in
             (("gate_proj", (24, 8)), ("up_proj", (24, 8)), ("down_proj", (8, 24)))}
    t = dict(src_t)
    perm = torch.from_numpy(rng.permutation(24))
    C.permute_ffn(t, 0, perm)
    x = torch.randn(5, 8, dtype=torch.float64)

    def ffn(w):
        g, u, d = (w[f"model.layers.0.mlp.{p}.weight"].double() for p in ("gate_proj", "up_proj", "down_proj"))
        return (torch.nn.functional.silu(x @ g.T) * (x @ u.T)) @ d.T
    torch.testing.assert_close(ffn(t), ffn(src_t), rtol=1e-12, atol=1e-12)


def _calibrate(tmp_path, src, name, seed):
    (tmp_path / "text.txt").write_text(TEXT)
    tc = C.TrainConfig(steps=12, batch=2, lr=3e-2, sparsity_weight=1.0, target_active=None, seed=seed)
    return convert(src, tmp_path / name, ConvertOptions(
        experts=8, router_init="random", regroup="none", calibrate=tmp_path / "text.txt", seq_len=32,
        seed=seed, train=tc, progress=False))


def test_calibration_lowers_the_sparsity_loss_and_is_reproducible(tmp_path, seed):
    src, _ = _dense_folder(tmp_path / "dense")
    a = _calibrate(tmp_path, src, "a", seed)
    b = _calibrate(tmp_path, src, "b", seed)
    sp = a["training"]["sparsity"]
    assert np.mean(sp[-3:]) < np.mean(sp[:3])
    assert a["calibrated"]["mean_active"] < a["converted"]["mean_active"]
    ta, tb = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert a["training"]["task_loss"] == b["training"]["task_loss"]
    for f in ("calibration.md", "calibration.json"):
        assert (tmp_path / "a" / f).is_file()


def test_converted_folder_exports_and_runs_in_onnxruntime(tmp_path, rng, op_library, monkeypatch):
    from dsmoe_export.exporter import export

    monkeypatch.setenv("DSMOE_OPS_LIBRARY", op_library)
    src, hf = _dense_folder(tmp_path / "dense", "qwen2")
    (tmp_path / "text.txt").write_text(TEXT)
    out = tmp_path / "moe"
    convert(src, out, ConvertOptions(experts=4, calib_text=tmp_path / "text.txt", seq_len=32, progress=False))
    result = export(out, tmp_path / "model.onnx", progress=False)
    assert result.sparse and result.validation.max_rel_error < 1e-3


def test_unsupported_architecture_is_one_line(tmp_path, capsys):
    src, _ = _dense_folder(tmp_path / "dense")
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (src / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert main([str(src), str(tmp_path / "out"), "--experts", "8"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model_type" in err and "gpt2" in err
    assert not (tmp_path / "out").exists()
