"""GPTQ (dsmoe_export/gptq.py): rounding that minimizes a weight's output error on calibration
inputs, stored in the round-to-nearest format. Checked against float64 numpy: the output error
||X (W - Q)^T|| of GPTQ is below round-to-nearest's on the inputs it was fitted to and on fresh
inputs of the same distribution; the storage format is quant.py's; exports made with it validate."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dsmoe_export import gptq, quant
from dsmoe_export.cli import main
from dsmoe_export.synthetic import TinySpec, make_model_folder, write_byte_tokenizer


def _input_source(rng, k: int):
    """Draws of inputs with correlated features and a few large channels (as hidden states have),
    all from one distribution."""
    mix = 2.0 * rng.standard_normal((k, k)) / np.sqrt(k) + np.eye(k)
    mix[:, rng.choice(k, 3, replace=False)] *= 8.0
    return lambda tokens: rng.standard_normal((tokens, k)) @ mix


def _correlated_inputs(rng, tokens: int, k: int) -> np.ndarray:
    return _input_source(rng, k)(tokens)


def _output_error(x: np.ndarray, w: np.ndarray, q: np.ndarray, s: np.ndarray, bits: int, g: int) -> float:
    deq = quant.dequantize_rows(q, s, bits, g).astype(np.float64)
    return float(np.linalg.norm(x @ (w - deq).T))


@pytest.mark.parametrize("bits,k", [(4, 96), (4, 80), (8, 64)])
def test_gptq_output_error_below_round_to_nearest(rng, bits, k):
    n, g = 64, 32
    w = rng.standard_normal((n, k)).astype(np.float32)
    draw = _input_source(rng, k)
    x_fit, x_new = draw(512), draw(512)  # fitted on one draw, checked on it and on a fresh one
    q, s = gptq.quantize(w, x_fit.T @ x_fit, bits, g)
    q0, s0 = quant.quantize_rows(w, bits, g)
    # Stored as round-to-nearest is: uint8 levels, one scale per group (the last one shorter).
    assert q.dtype == np.uint8 and q.shape == (n, k) and q.max() <= 2 ** bits - 1
    assert s.dtype == np.float32 and s.shape == (n, -(-k // g))
    # Over 1,000 seeds the ratio to round-to-nearest is 0.75 median, 0.96 at worst: 0.98 leaves no
    # room for a GPTQ that merely reproduces round-to-nearest (1.0) and does not flake.
    for x in (x_fit, x_new):
        assert _output_error(x, w, q, s, bits, g) < 0.98 * _output_error(x, w, q0, s0, bits, g)


def test_gptq_without_calibration_is_round_to_nearest(rng):
    w = rng.standard_normal((8, 64)).astype(np.float32)
    for got, want in zip(gptq.quantize(w, None, 4, 32), quant.quantize_rows(w, 4, 32)):
        assert np.array_equal(got, want)


def test_gptq_ignores_inputs_that_are_always_zero(rng):
    """A dead input column (H's diagonal 0) neither breaks the inverse nor costs accuracy elsewhere."""
    w = rng.standard_normal((8, 64)).astype(np.float32)
    x = _correlated_inputs(rng, 256, 64)
    x[:, 5] = 0.0
    q, s = gptq.quantize(w, x.T @ x, 4, 32)
    assert np.isfinite(s).all()
    q0, s0 = quant.quantize_rows(w, 4, 32)
    assert _output_error(x, w, q, s, 4, 32) < _output_error(x, w, q0, s0, 4, 32)


def test_collect_sees_each_block_on_its_own_tokens(tmp_path, seed):
    """Per sparse block, the gate/up and down inputs count exactly the tokens routed to it."""
    from dsmoe_export.loader import load_model

    folder = make_model_folder(tmp_path / "m", TinySpec(), seed=seed, router_scale=2.0)
    model, cfg = load_model(folder)
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, 300)
    hs = gptq.collect(model, ids, chunk=128)
    n = cfg.dsmoe.num_experts
    with torch.no_grad():  # the reference's own routing, chunk by chunk as collect ran it
        routed = np.zeros((cfg.num_hidden_layers, n), int)
        for t0 in range(0, 300, 128):
            part = torch.as_tensor(ids[t0:t0 + 128])[None]
            model(part, torch.ones_like(part), torch.arange(part.shape[1])[None], model.empty_past(1))
            routed += np.stack([m.last_active[0].numpy().sum(0) for m in model.mlps])
    for i in range(cfg.num_hidden_layers):
        assert hs.tokens[f"layers.{i}.ffn"] == hs.tokens[f"layers.{i}.attn"] == 300
        assert hs.h[f"layers.{i}.attn"].shape == (cfg.hidden_size, cfg.hidden_size)
        for j in range(n):
            assert hs.tokens.get(f"layers.{i}.ffn.block{j}", 0) == routed[i, j]
            if routed[i, j]:
                assert hs.h[f"layers.{i}.down.block{j}"].shape == (cfg.block_size, cfg.block_size)
    assert hs.tokens["lm_head"] == 300


@pytest.mark.parametrize("dense", [False, True])
def test_export_with_calibration_text_validates_and_differs(tmp_path, seed, dense):
    folder = make_model_folder(tmp_path / "m", TinySpec(), seed=seed, router_scale=2.0)
    write_byte_tokenizer(folder)
    text = tmp_path / "calib.txt"
    text.write_text("Now is the winter of our discontent made glorious summer by this sun of York. " * 8)
    args = [str(folder), "-q", "--ffn-weights", "int4", "--int4-accuracy-level", "0"] + (["--dense"] if dense else [])
    # The export's own validation (relative 1e-3 against the PyTorch model holding the stored values).
    assert main([args[0], str(tmp_path / "gptq.onnx"), *args[1:], "--calibration-text", str(text)]) == 0
    assert main([args[0], str(tmp_path / "rtn.onnx"), *args[1:]]) == 0
    import onnx
    from onnx import numpy_helper

    a, b = (onnx.load(str(tmp_path / f)) for f in ("gptq.onnx", "rtn.onnx"))
    wa = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    wb = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    assert wa.keys() == wb.keys()
    changed = [k for k in wa if wa[k].dtype == np.uint8 and not np.array_equal(wa[k], wb[k])]
    assert changed, "GPTQ stored the same levels as round-to-nearest"


def test_calibration_text_errors(tmp_path, capsys):
    folder = make_model_folder(tmp_path / "m", TinySpec())
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    assert main([str(folder), str(tmp_path / "x.onnx"), "-q", "--ffn-weights", "int4",
                 "--calibration-text", str(short)]) == 1
    assert "no tokenizer files" in capsys.readouterr().err
    write_byte_tokenizer(folder)
    assert main([str(folder), str(tmp_path / "x.onnx"), "-q", "--ffn-weights", "int4",
                 "--calibration-text", str(short)]) == 1
    err = capsys.readouterr().err
    assert "short.txt" in err and "too short for calibration" in err
    assert not (tmp_path / "x.onnx").exists()
