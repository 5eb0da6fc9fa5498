"""dsmoe_runtime: DSMoESession.generate against an independent float64 reference, padding,
sampling, EOS, streaming, activation statistics, the CLI and the errors.

The reference is transformers' LlamaForCausalLM in float64 with the numpy DSMoE MLP
(tests/model_refs.py), run greedily token by token without a cache. Prompts are redrawn
when a step has a near-tie (top-2 logit gap, or a router score within rounding of the
threshold), where float32 and float64 may legitimately pick differently.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch
from dsmoe_export.synthetic import write_byte_tokenizer
from model_refs import hf_reference, min_threshold_margin
from onnx import TensorProto, helper

import dsmoe_runtime
from dsmoe_export.exporter import export
from dsmoe_export.synthetic import TinySpec, make_model_folder
from dsmoe_runtime import DSMoESession, InputError, LibraryError, LibraryNotFoundError, ModelError
from dsmoe_runtime.sampling import penalize_repeats, probabilities, sample_tokens

THRESHOLD = 0.5
MIN_GAP = 1e-4       # top-2 logit gap below which fp32 and fp64 may disagree
MIN_MARGIN = 1e-5    # |router score - threshold| below which they may pick other blocks


@pytest.fixture(scope="module")
def module_seed(request) -> int:
    value = int(os.environ.get("DSMOE_TEST_SEED", secrets.randbits(31)))
    print(f"{request.module.__name__}: DSMOE_TEST_SEED={value}")
    return value


@pytest.fixture(scope="module")
def exported(tmp_path_factory, module_seed):
    """One sparse export with active outputs, tokenizer and config beside it."""
    root = tmp_path_factory.mktemp("rt")
    folder = make_model_folder(root / "model", TinySpec(), seed=module_seed, router_scale=2.0)
    write_byte_tokenizer(folder)
    out = root / "export"
    out.mkdir()
    result = export(folder, out / "model.onnx", progress=False, active_outputs=True, hf_config=True)
    assert result.validation.max_rel_error < 1e-3
    return folder, out / "model.onnx"


@pytest.fixture(scope="module")
def session(exported):
    return DSMoESession(exported[1], threads=2)


@pytest.fixture(scope="module")
def ref(exported):
    return hf_reference(exported[0], sparse=True)


def ref_greedy(ref, prompt, steps: int):
    """(continuation, min top-2 gap, min threshold margin, logits per step) of float64 greedy
    decoding without a cache."""
    min_threshold_margin(ref, THRESHOLD)  # reset the recorded scores
    seq, gaps, step_logits = list(prompt), [], []
    with torch.no_grad():
        for _ in range(steps):
            logits = ref(input_ids=torch.tensor([seq])).logits[0, -1].numpy()
            top2 = np.sort(logits)[-2:]
            gaps.append(top2[1] - top2[0])
            step_logits.append(logits)
            seq.append(int(np.argmax(logits)))
    return seq[len(prompt):], min(gaps), min_threshold_margin(ref, THRESHOLD), step_logits


def draw_prompts(ref, rng, lengths, steps, vocab=256, tries=20):
    """Random prompts whose float64 greedy continuations have no near-tie; with those."""
    for _ in range(tries):
        prompts = [rng.integers(3, vocab, n).tolist() for n in lengths]
        refs = [ref_greedy(ref, p, steps) for p in prompts]
        if all(gap > MIN_GAP and margin > MIN_MARGIN for _, gap, margin, _ in refs):
            return prompts, [r[0] for r in refs]
    pytest.fail(f"no prompt without near-ties in {tries} draws (gaps/margins too small for this model)")


def left_pad(prompts, rng):
    """[batch, max_len] ids (padding = random ids, which the mask must hide) and the mask."""
    width = max(map(len, prompts))
    ids = rng.integers(0, 256, (len(prompts), width))
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return ids, mask


# ---------------------------------------------------------------------------- generation

def test_greedy_batch2_equals_float64_reference(session, ref, rng):
    steps = 10
    prompts, want = draw_prompts(ref, rng, [7, 7], steps)
    out = session.generate(np.array(prompts), steps)
    assert out.dtype == np.int64 and out.shape == (2, 7 + steps)
    assert (out[:, :7] == np.array(prompts)).all()
    assert out[:, 7:].tolist() == want


def test_left_padded_batch_equals_each_row_alone(session, ref, rng):
    steps = 8
    lengths = [3, 9, 5]
    prompts, want = draw_prompts(ref, rng, lengths, steps)
    ids, mask = left_pad(prompts, rng)
    out = session.generate(ids, steps, attention_mask=mask)
    assert out.shape == (3, 9 + steps)
    for i, p in enumerate(prompts):
        alone = session.generate(np.array([p]), steps)
        assert out[i, 9:].tolist() == alone[0, len(p):].tolist() == want[i], f"row {i} (prompt length {len(p)})"


def test_sampling_reproducible_with_seed_and_within_top_k(session, ref, rng):
    prompts = [rng.integers(3, 256, 6).tolist() for _ in range(2)]
    s = int(rng.integers(2**31))
    kw = dict(temperature=1.5, top_k=5, top_p=0.95)
    a = session.generate(np.array(prompts), 12, seed=s, **kw)
    b = session.generate(np.array(prompts), 12, seed=s, **kw)
    c = session.generate(np.array(prompts), 12, seed=s + 1, **kw)
    assert (a == b).all()
    assert (a != c).any()  # 24 draws from >= 2 tokens each: equal with negligible probability
    greedy = session.generate(np.array(prompts), 12)
    assert (a != greedy).any()
    # top-k = 1 is greedy whatever the seed and temperature.
    assert (session.generate(np.array(prompts), 12, seed=s, temperature=3.0, top_k=1) == greedy).all()
    # Every sampled token is among the float64 reference's top 5 at its step.
    with torch.no_grad():
        for row in a:
            for t in range(6, row.size):
                logits = ref(input_ids=torch.tensor([row[:t].tolist()])).logits[0, -1].numpy()
                order = np.sort(logits)[::-1]
                if order[4] - order[5] > MIN_GAP:
                    assert row[t] in np.argsort(logits)[-5:], f"token {row[t]} at {t} outside the top 5"


@pytest.mark.parametrize("penalty", [0.7, 1.3])
def test_repetition_penalty_matches_transformers(rng, penalty):
    """penalize_repeats against transformers' RepetitionPenaltyLogitsProcessor (the semantics
    transformers and onnxruntime-genai share), on logits of both signs and zeros."""
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = rng.standard_normal((3, 40)).astype(np.float32)
    logits[:, :3] = 0.0
    seen_ids = [rng.choice(40, size=k, replace=False) for k in (1, 7, 40)]
    seen = np.zeros(logits.shape, bool)
    for row, ids in enumerate(seen_ids):
        seen[row, ids] = True
    width = max(map(len, seen_ids))
    ids = torch.from_numpy(np.stack([np.resize(i, width) for i in seen_ids]))  # each row's ids repeated to the width
    want = RepetitionPenaltyLogitsProcessor(penalty)(ids, torch.from_numpy(logits.copy())).numpy()
    got = penalize_repeats(logits, seen, penalty)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert (got[~seen] == logits[~seen]).all()


def _ref_greedy_penalized(ref, prompt, steps, penalty):
    """float64 greedy decoding with the penalty on every token seen so far (prompt and new), by
    transformers' processor; (continuation, min top-2 gap of the penalized logits)."""
    from transformers import RepetitionPenaltyLogitsProcessor

    processor = RepetitionPenaltyLogitsProcessor(penalty)
    seq, gaps = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            logits = ref(input_ids=torch.tensor([seq])).logits[0, -1:]
            scores = processor(torch.tensor([seq]), logits.clone())[0].numpy()
            top2 = np.sort(scores)[-2:]
            gaps.append(top2[1] - top2[0])
            seq.append(int(np.argmax(scores)))
    return seq[len(prompt):], min(gaps)


def test_greedy_with_repetition_penalty_equals_float64_reference(session, ref, rng):
    """A left-padded batch with a penalty strong enough to change the greedy continuation: each
    row's padding is not among its seen tokens (the padding holds the tokens the row goes on to
    choose, so counting it would change them)."""
    steps, penalty = 12, 2.0
    for _ in range(30):  # prompts whose penalized continuation has no near-tie and differs from plain greedy
        prompts = [rng.integers(3, 64, n).tolist() for n in (4, 9)]  # ids from 64 of 256: repeats are likely
        refs = [_ref_greedy_penalized(ref, p, steps, penalty) for p in prompts]
        if all(gap > MIN_GAP for _, gap in refs) and any(
                want != ref_greedy(ref, p, steps)[0] for (want, _), p in zip(refs, prompts)):
            break
    else:
        pytest.fail("no prompts without near-ties whose continuation the penalty changes in 30 draws")
    ids, mask = left_pad(prompts, rng)
    for i, (want, _) in enumerate(refs):
        pads = int((mask[i] == 0).sum())
        ids[i, :pads] = np.resize(want, pads)
    out = session.generate(ids, steps, attention_mask=mask, repetition_penalty=penalty)
    for i, p in enumerate(prompts):
        assert out[i, ids.shape[1]:].tolist() == refs[i][0], f"row {i}"


def test_numpy_scalars_are_numbers(session, rng):
    """Generation options given as numpy scalars (read from configs or arrays) act as Python ones."""
    ids = np.array([rng.integers(3, 256, 5)])
    t, p, r = np.float32(0.8), np.float64(0.9), np.float32(1.3)
    got = session.generate(ids, 6, temperature=t, top_k=np.int64(5), top_p=p, repetition_penalty=r, seed=7)
    want = session.generate(ids, 6, temperature=float(t), top_k=5, top_p=float(p), repetition_penalty=float(r), seed=7)
    assert (got == want).all()


def _expected_probs(logits, temperature, top_k, top_p):
    """Independent of runtime/sampling.py: a per-row python loop over sorted tokens."""
    out = np.zeros_like(logits, dtype=np.float64)
    for r, row in enumerate(np.asarray(logits, np.float64) / temperature):
        order = sorted(range(row.size), key=lambda j: -row[j])[:top_k or row.size]
        p = np.exp(row[order] - row[order[0]])
        p /= p.sum()
        kept, total = [], 0.0
        for j, pj in zip(order, p):
            kept.append(j)
            total += pj
            if total >= top_p:
                break
        q = np.exp(row[kept] - row[kept[0]])
        out[r, kept] = q / q.sum()
    return out


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.6), (0.8, 8, 0.9)])
def test_sampling_distribution(rng, temperature, top_k, top_p):
    logits = rng.normal(0, 2, (3, 24)).astype(np.float32)
    want = _expected_probs(logits, temperature, top_k, top_p)
    assert np.allclose(probabilities(logits, temperature=temperature, top_k=top_k, top_p=top_p), want, atol=1e-9)
    g = np.random.default_rng(int(rng.integers(2**31)))
    draws = np.stack([sample_tokens(logits, g, temperature=temperature, top_k=top_k, top_p=top_p)
                      for _ in range(6000)])
    for r in range(3):
        freq = np.bincount(draws[:, r], minlength=24) / draws.shape[0]
        assert (freq[want[r] == 0] == 0).all(), "a token outside top-k / top-p was drawn"
        assert np.max(np.abs(freq - want[r])) < 0.03


def test_eos_stops_a_row(session, ref, rng):
    steps = 8
    for _ in range(20):
        prompts, want = draw_prompts(ref, rng, [6, 6], steps)
        eos = want[0][3]
        if eos not in want[0][:3] and eos not in want[1]:
            break
    else:
        pytest.skip("no greedy token of row 0 absent from row 1 in 20 draws")
    out = session.generate(np.array(prompts), steps, eos_token_id=[eos], pad_token_id=0)
    assert out.shape == (2, 6 + steps)
    assert out[0, 6:].tolist() == want[0][:4] + [0] * (steps - 4)
    assert out[1, 6:].tolist() == want[1]
    # One row: generation ends at its EOS.
    alone = session.generate(np.array(prompts[:1]), steps, eos_token_id=eos)
    assert alone[0, 6:].tolist() == want[0][:4]


def test_streaming_yields_tokens_as_they_come(session, rng, monkeypatch):
    prompts = rng.integers(3, 256, (2, 5))
    calls = []  # model calls: the prompt's through forward, the steps' through the cache's step
    run = session.session.run_with_iobinding
    monkeypatch.setattr(session.session, "run_with_iobinding", lambda *a, **k: calls.append(1) or run(*a, **k))
    it = session.stream(prompts, 6)
    first = next(it)
    assert len(calls) == 1 and first.shape == (2,) and first.dtype == np.int64
    second = next(it)
    assert len(calls) == 2
    rest = list(it)
    assert len(calls) == 6  # the last token is never fed back
    full = session.generate(prompts, 6)
    assert np.stack([first, second, *rest], axis=1).tolist() == full[:, 5:].tolist()
    seen = []
    out = session.generate(prompts, 6, streamer=lambda step, tok: seen.append((step, tok.copy(), len(calls))))
    assert [s for s, _, _ in seen] == list(range(6))
    assert np.stack([t for _, t, _ in seen], axis=1).tolist() == out[:, 5:].tolist()
    # The callback for step i came before forward call i + 2 of this run (streamed, not at the end).
    base = 6 + 6
    assert [c - base for _, _, c in seen] == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------- statistics

def test_activation_stats_match_reference(session, ref, rng):
    steps = 6
    prompts, _ = draw_prompts(ref, rng, [4, 7], steps)
    ids, mask = left_pad(prompts, rng)
    session.stats.reset()
    out = session.generate(ids, steps, attention_mask=mask)
    n = 8
    want = np.zeros((2, n + 1), np.int64)
    blocks = np.zeros((2, n), np.int64)
    for i, p in enumerate(prompts):
        fed = list(p) + out[i, 7:-1].tolist()   # every token the model processed, once
        for layer in ref.model.layers:
            layer.mlp.scores = []
        with torch.no_grad():
            ref(input_ids=torch.tensor([fed]))
        for li, layer in enumerate(ref.model.layers):
            (scores,) = layer.mlp.scores
            assert np.min(np.abs(scores - THRESHOLD)) > MIN_MARGIN
            active = scores[0] > THRESHOLD
            want[li] += np.bincount(active.sum(-1), minlength=n + 1)
            blocks[li] += active.sum(0)
    stats = session.stats
    assert stats.tokens == sum(map(len, prompts)) + 2 * (steps - 1)
    assert np.array_equal(np.stack(stats.k_hist), want)
    assert np.array_equal(np.stack(stats.block_counts), blocks)
    assert np.allclose(stats.mean_active(), (want * np.arange(n + 1)).sum(1) / want.sum(1))
    table = stats.table()
    assert f"{stats.tokens} tokens" in table
    for li in range(2):
        assert f"{stats.mean_active()[li]:.2f}" in table.splitlines()[2 + li]
    assert json.loads(json.dumps(stats.to_dict()))["k_histogram"] == want.tolist()


def test_stats_plot(session, tmp_path):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="matplotlib"):
            session.stats.plot(tmp_path / "w.png")
        return
    session.stats.plot(tmp_path / "w.png")
    assert (tmp_path / "w.png").stat().st_size > 1000


# ---------------------------------------------------------------------------- exporter side

def test_load_tokenizer_is_public_and_reads_an_export_folder(tmp_path):
    assert dsmoe_runtime.load_tokenizer(tmp_path) is None  # no tokenizer files: None, not an error
    write_byte_tokenizer(tmp_path)
    tok = dsmoe_runtime.load_tokenizer(str(tmp_path))
    ids = tok.encode("To be, or not")
    assert len(ids) == len("To be, or not") and all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == "To be, or not"


def test_export_exposes_active_outputs_and_copies_tokenizer(exported, session):
    folder, path = exported
    model = onnx.load(str(path), load_external_data=False)
    outs = [o.name for o in model.graph.output]
    assert outs[-2:] == ["active.0", "active.1"]
    dims = [d.dim_param or d.dim_value for d in model.graph.output[-1].type.tensor_type.shape.dim]
    assert dims == ["batch_size", "sequence_length", 8]
    assert session.has_active_outputs and session.num_experts == [8, 8]
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json"):
        assert (path.parent / name).read_bytes() == (folder / name).read_bytes()


# ---------------------------------------------------------------------------- CLI

def _cli(*args, timeout=120):
    """Bytes decoded as UTF-8 without newline translation: random tokens include \r."""
    proc = subprocess.run([sys.executable, "-m", "dsmoe_runtime", *map(str, args)], capture_output=True,
                          timeout=timeout, env=dict(os.environ, PYTHONIOENCODING="utf-8"))
    proc.stdout, proc.stderr = proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")
    return proc


def test_cli_text_prompt_streams_the_greedy_continuation(exported, session):
    from transformers import AutoTokenizer

    _, path = exported
    tok = AutoTokenizer.from_pretrained(str(path.parent))
    prompt = "The DSMoE layer"
    ids = tok.encode(prompt)
    assert len(ids) == len(prompt.encode())
    want = session.generate(np.array([ids]), 12)[0, len(ids):]
    proc = _cli(path, "--prompt", prompt, "-n", 12, "--ignore-eos", "--stats")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == prompt + tok.decode(want.tolist(), skip_special_tokens=True) + "\n"
    assert "activation statistics" in proc.stderr and "mean k/n" in proc.stderr


def test_cli_ids_without_tokenizer(exported, session, tmp_path, rng):
    _, path = exported
    shutil.copy(path, tmp_path / "m.onnx")
    ids = rng.integers(3, 256, 5).tolist()
    want = session.generate(np.array([ids]), 7)[0, 5:].tolist()
    proc = _cli(tmp_path / "m.onnx", "--ids", ",".join(map(str, ids)), "-n", 7)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [*map(str, ids), "|", *map(str, want)]
    want = session.generate(np.array([ids]), 7, repetition_penalty=1.5)[0, 5:].tolist()
    proc = _cli(tmp_path / "m.onnx", "--ids", ",".join(map(str, ids)), "-n", 7, "--repetition-penalty", 1.5)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [*map(str, ids), "|", *map(str, want)]
    proc = _cli(tmp_path / "m.onnx", "--prompt", "hello", "-n", 3)
    assert proc.returncode == 1 and "no tokenizer" in proc.stderr and "--ids" in proc.stderr


def test_cli_runs_a_dense_export_only_when_allowed(tmp_path):
    path = _plain_lm(tmp_path / "plain.onnx")  # logits = one-hot of the ids: greedy repeats the last id
    proc = _cli(path, "--ids", "3,5", "-n", 2)
    assert proc.returncode == 1 and "no org.dsmoe::GatedBlockSparseFFN node" in proc.stderr
    assert "--allow-dense" in proc.stderr
    proc = _cli(path, "--ids", "3,5", "-n", 2, "--allow-dense")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["3", "5", "|", "5", "5"]


# ---------------------------------------------------------------------------- errors

def _plain_lm(path, *, with_op: bool = False):
    """A tiny graph with the export's interface but no DSMoE op (logits = one-hot of the ids)."""
    vocab = 16
    nodes = [helper.make_node("OneHot", ["input_ids", "depth", "values"], ["logits"], axis=-1)]
    for kv in ("key", "value"):
        nodes.append(helper.make_node("Identity", [f"past_key_values.0.{kv}"], [f"present.0.{kv}"]))
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["b", "s"])
              for n in ("input_ids", "attention_mask", "position_ids")]
    inputs += [helper.make_tensor_value_info(f"past_key_values.0.{kv}", TensorProto.FLOAT, ["b", 2, "p", 4])
               for kv in ("key", "value")]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", vocab])]
    outputs += [helper.make_tensor_value_info(f"present.0.{kv}", TensorProto.FLOAT, ["b", 2, "p", 4])
                for kv in ("key", "value")]
    inits = [helper.make_tensor("depth", TensorProto.INT64, [], [vocab]),
             helper.make_tensor("values", TensorProto.FLOAT, [2], [0.0, 1.0])]
    graph = helper.make_graph(nodes, "plain", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.save(model, str(path))
    return path


def test_error_model_without_the_op(tmp_path):
    path = _plain_lm(tmp_path / "plain.onnx")
    with pytest.raises(ModelError, match=r"no org\.dsmoe::GatedBlockSparseFFN node.*allow_dense"):
        DSMoESession(path)
    s = DSMoESession(path, allow_dense=True)  # the baseline still runs
    assert s.generate(np.array([[3, 5]]), 2).tolist() == [[3, 5, 5, 5]]
    with pytest.raises(ModelError, match="--active-outputs"):
        s.stats
    not_lm = tmp_path / "id.onnx"
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), str(not_lm))
    with pytest.raises(ModelError, match="not a causal LM export.*input_ids"):
        DSMoESession(not_lm)
    with pytest.raises(ModelError, match="no such file"):
        DSMoESession(tmp_path / "missing.onnx")


def test_error_session_without_the_library(exported, session, rng):
    _, path = exported
    with pytest.raises(ModelError, match="without the op library.*allow_fallback"):
        DSMoESession(path, library=False)
    # Accepted on request: onnxruntime runs the op's function body, same tokens.
    fallback = DSMoESession(path, library=False, allow_fallback=True)
    assert fallback.library_path is None
    ids = rng.integers(3, 256, (1, 5))
    assert (fallback.generate(ids, 4) == session.generate(ids, 4)).all()
    with pytest.raises(LibraryNotFoundError, match="no such file"):
        DSMoESession(path, library=str(path.parent / "nope.so"))


def _fake_library(tmp_path, level: int):
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None or sys.platform != "linux":
        pytest.skip("needs a C compiler on Linux to build a stand-in library")
    src = tmp_path / f"fake{level}.c"
    src.write_text(textwrap.dedent(f"""
        int DsmoeOpsApiVersion(void) {{ return {level}; }}
        void* RegisterCustomOps(void* options, const void* api) {{ (void)options; (void)api; return 0; }}
    """))
    lib = tmp_path / f"libfake{level}.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    return lib


def test_error_library_older_than_the_runtime_supports(exported, tmp_path, monkeypatch):
    _, path = exported
    old = _fake_library(tmp_path, dsmoe_runtime.MIN_LIBRARY_API - 1)
    assert dsmoe_runtime.library_api_version(old) == dsmoe_runtime.MIN_LIBRARY_API - 1
    with pytest.raises(LibraryError, match="older than this dsmoe_runtime supports"):
        DSMoESession(path, library=old)
    monkeypatch.setenv(dsmoe_runtime.ENV_VAR, str(old))
    with pytest.raises(LibraryError, match="API level 0"):
        DSMoESession(path)
    # The real library states its level through the symbol (not the unversioned fallback), one
    # this runtime supports.
    monkeypatch.undo()
    from dsmoe_runtime._library import LIBRARY_API_SYMBOL, _int_symbol

    real = dsmoe_runtime.get_library_path()
    stated = _int_symbol(real, LIBRARY_API_SYMBOL)
    assert stated is not None, f"{real} does not export {LIBRARY_API_SYMBOL}"
    assert dsmoe_runtime.MIN_LIBRARY_API <= stated == dsmoe_runtime.library_api_version(real) <= \
        dsmoe_runtime.MAX_LIBRARY_API


@pytest.mark.parametrize("kwargs,match", [
    (dict(input_ids=np.zeros((1, 2, 3), np.int64)), "input_ids: expected \\[batch, seq\\]"),
    (dict(input_ids=np.array([[1.0, 2.0]])), "integer token ids"),
    (dict(input_ids=np.array([[1, 256]])), r"\[0, 256\)"),
    (dict(input_ids=np.array([[1, -1]])), r"\[0, 256\)"),
    (dict(input_ids=np.array([[1, 2, 3]]), attention_mask=np.array([[1, 1]])), "shape of input_ids"),
    (dict(input_ids=np.array([[1, 2, 3]]), attention_mask=np.array([[1, 1, 0]])), "padding must be on the left"),
    (dict(input_ids=np.array([[1, 2]]), attention_mask=np.array([[0, 0]])), "have no token"),
    (dict(input_ids=np.array([[1, 2]]), attention_mask=np.array([[2, 1]])), "0 \\(padding\\) and 1"),
    (dict(input_ids=np.array([[1, 2]]), temperature=0.0), "temperature"),
    (dict(input_ids=np.array([[1, 2]]), top_p=1.5), "top_p"),
    (dict(input_ids=np.array([[1, 2]]), top_k=-1), "top_k"),
    (dict(input_ids=np.array([[1, 2]]), repetition_penalty=0.0), "repetition_penalty"),
    (dict(input_ids=np.array([[1, 2]]), repetition_penalty=True), "repetition_penalty"),
    (dict(input_ids=np.array([[1, 2]]), temperature=True), "temperature"),
    (dict(input_ids=np.array([[1, 2]]), repetition_penalty=float("nan")), "repetition_penalty"),
    (dict(input_ids=np.array([[1, 2]]), eos_token_id=300), "eos_token_id"),
    (dict(input_ids=np.array([[1, 2]]), max_new_tokens=-1), "max_new_tokens"),
])
def test_error_mismatched_generate_inputs(session, kwargs, match):
    kwargs.setdefault("max_new_tokens", 2)
    with pytest.raises(InputError, match=match):
        session.generate(**kwargs)


def test_error_mismatched_run_feeds(session):
    ids = np.array([[1, 2]], np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    past = session.empty_past(1)
    feeds.update(zip(session.past_names, past))
    session.run(["logits"], feeds)  # well-formed: runs
    with pytest.raises(InputError, match="missing \\['attention_mask'\\]"):
        session.run(["logits"], {k: v for k, v in feeds.items() if k != "attention_mask"})
    with pytest.raises(InputError, match="unknown \\['position_ids'\\]"):  # positions are the cache slots
        session.run(["logits"], dict(feeds, position_ids=np.array([[0, 1]])))
    bad = dict(feeds, **{"past_key_values.1.value": np.zeros((1, 3, 0, 16), np.float32)})
    with pytest.raises(InputError, match="past_key_values.1.value: axis 1 must be 2"):
        session.run(["logits"], bad)
    with pytest.raises(InputError, match="attention_mask: expected dtype int64, got int32"):
        session.run(["logits"], dict(feeds, attention_mask=np.ones((1, 2), np.int32)))
    with pytest.raises(InputError, match="batch 2 differs"):
        session.run(["logits"], dict(feeds, attention_mask=np.ones((2, 2), np.int64)))


def test_provider_choice_on_this_machine(session):
    """CPU EP here unless a GPU is really usable; CUDA listed as available is not enough."""
    import onnxruntime as ort

    from dsmoe_runtime.session import cuda_device_count, default_providers

    if cuda_device_count() == 0:
        assert default_providers() == ["CPUExecutionProvider"]
        assert session.device == "cpu" and session.providers == ["CPUExecutionProvider"]
    else:
        assert default_providers()[0] == ("CUDAExecutionProvider" if "CUDAExecutionProvider"
                                          in ort.get_available_providers() else "CPUExecutionProvider")


def test_slab_export_on_a_default_gpu_falls_back_to_the_cpu_ep(exported, monkeypatch):
    """A float32 export stores gate/up in the CPU kernel's slabs, which the CUDA kernel refuses at
    session creation. Where DSMoESession chose the CUDA EP itself (a GPU found), it warns and runs
    on the CPU EP; where the caller asked for the CUDA EP, the error says what to export instead.
    (No GPU here: onnxruntime's session creation is replaced by one that fails as the CUDA
    kernel does whenever the CUDA EP comes first.)"""
    import onnxruntime as ort

    from dsmoe_runtime import session as session_module

    real = ort.InferenceSession
    calls = []

    def fake_session(path, opts, providers, provider_options=None):
        calls.append(list(providers))
        if providers[0] == "CUDAExecutionProvider":
            raise RuntimeError("GatedBlockSparseFFN: attribute 'gate_up_tile' must be 0 for the CUDA kernel (...)")
        return real(path, opts, providers=providers)

    monkeypatch.setattr(ort, "InferenceSession", fake_session)
    monkeypatch.setattr(session_module, "default_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.warns(UserWarning, match="slab layout.*running on the CPU EP.*--gate-up-layout rows"):
        s = DSMoESession(exported[1], threads=1)
    assert s.device == "cpu" and calls == [["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]]
    with pytest.raises(ModelError, match="slab layout.*--gate-up-layout rows.*gate_up_tile' must be 0"):
        DSMoESession(exported[1], providers=["CUDAExecutionProvider", "CPUExecutionProvider"], threads=1)


# ---------------------------------------------------------------------------- genai_config.json

def test_genai_config_names_the_library_beside_the_model(exported, tmp_path):
    """--genai: the config has the export's interface (no position_ids, a shared cache buffer) and
    names a copy of the op library beside the model by file name (genai 0.18 accepts that from
    any working directory); set_library refreshes the copy."""
    from dsmoe_runtime.genai import set_library, write_genai_config

    folder, path = exported
    out = tmp_path / "export"
    out.mkdir()
    (out / path.name).write_bytes(path.read_bytes())
    written = write_genai_config(out / path.name, model_dir=folder)
    lib = dsmoe_runtime.get_library_path()
    name = os.path.basename(lib)
    assert written == ["genai_config.json", name]
    config = json.loads((out / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    assert decoder["session_options"]["custom_ops_library"] == name
    assert (out / name).read_bytes() == open(lib, "rb").read()
    assert list(decoder["inputs"]) == ["input_ids", "attention_mask", "past_key_names", "past_value_names"]
    assert config["search"]["past_present_share_buffer"] is True
    assert decoder["num_hidden_layers"] == 2 and decoder["head_size"] == 16
    assert decoder["session_options"]["intra_op_num_threads"] == 0  # genai's own default is one thread
    write_genai_config(out / path.name, model_dir=folder, threads=3)
    assert json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["session_options"][
        "intra_op_num_threads"] == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / path.name).write_bytes(path.read_bytes())
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="threads"):
            write_genai_config(empty / path.name, model_dir=folder, threads=bad)
    assert sorted(p.name for p in empty.iterdir()) == [path.name]  # nothing written
    (out / name).write_bytes(b"stale")
    set_library(out)
    assert (out / name).read_bytes() == open(lib, "rb").read()
    # A config written before the thread entry gets it on refresh; an explicit count stays.
    config = json.loads((out / "genai_config.json").read_text())
    del config["model"]["decoder"]["session_options"]["intra_op_num_threads"]
    (out / "genai_config.json").write_text(json.dumps(config))
    set_library(out)
    options = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["session_options"]
    assert options["intra_op_num_threads"] == 0 and options["custom_ops_library"] == name
    options["intra_op_num_threads"] = 2
    config["model"]["decoder"]["session_options"] = options
    (out / "genai_config.json").write_text(json.dumps(config))
    set_library(out)
    assert json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["session_options"][
        "intra_op_num_threads"] == 2
    # The refresh command: what it set, and an error naming the file when there is no config.
    proc = subprocess.run([sys.executable, "-m", "dsmoe_runtime.genai", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0 and f"custom_ops_library = {name}, intra_op_num_threads = 2" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "dsmoe_runtime.genai", str(empty)], capture_output=True, text=True)
    assert proc.returncode == 1 and "genai_config.json" in proc.stderr


def test_forward_keeps_the_last_logits_on_request(session, rng):
    """generate asks the graph for the last position's logits only (the lm_head then runs on one
    position per row); forward returns the same values as the full logits' last position."""
    assert session.has_logits_to_keep
    ids = rng.integers(3, 256, (2, 9))
    mask = np.ones_like(ids)
    full, _ = session.forward(ids, mask, session.new_cache(2, 9))
    full = full.copy()
    last, _ = session.forward(ids, mask, session.new_cache(2, 9), logits_to_keep=1)
    assert full.shape == (2, 9, 256) and last.shape == (2, 1, 256)
    assert np.array_equal(last, full[:, -1:])
    more, _ = session.forward(ids, mask, session.new_cache(2, 9), logits_to_keep=20)  # more than the prompt: all
    assert np.array_equal(more, full)
    for bad in (-1, 2.5, True, "1"):
        with pytest.raises(InputError, match="logits_to_keep: expected an int >= 0"):
            session.forward(ids, mask, session.new_cache(2, 9), logits_to_keep=bad)


def test_cache_step_continues_like_forward(session, rng):
    """KVCache.step (generation's decode steps: the inputs stay bound) gives the logits that forward
    gives for the same token at the same slot, on a left-padded batch, also after a forward call
    in between; it refuses a cache without a prompt, a wrong token shape and a full cache."""
    ids = rng.integers(3, 256, (2, 6))
    mask = np.ones_like(ids)
    mask[1, :2] = 0                                    # row 1 left-padded
    stepped, forwarded = session.new_cache(2, 10), session.new_cache(2, 10)
    with pytest.raises(InputError, match="no forward call yet"):
        stepped.step(np.array([1, 2]))
    session.forward(ids, mask, stepped, logits_to_keep=1)
    session.forward(ids, mask, forwarded, logits_to_keep=1)
    with pytest.raises(InputError, match=r"shape \[2\]"):
        stepped.step(np.array([1, 2, 3]))
    grown = mask
    for i in range(4):
        tok = rng.integers(3, 256, 2)
        grown = np.concatenate([grown, np.ones((2, 1), np.int64)], axis=1)
        if i == 2:                                     # a forward call on the stepping cache itself
            got = session.forward(tok[:, None], grown, stepped, logits_to_keep=1)[0].copy()
        else:
            got = stepped.step(tok)[0].copy()
        want = session.forward(tok[:, None], grown, forwarded, logits_to_keep=1)[0]
        assert np.array_equal(got, want), i
    with pytest.raises(InputError, match="no slot left"):
        stepped.step(np.array([1, 2]))


def test_decode_run_call_takes_the_public_method_where_the_direct_one_would_skip_work():
    """KVCache's decode steps call onnxruntime's C-level run_with_iobinding on the C-level binding,
    unless the session has no such parts, its method has been replaced, or WebGPU graph capture
    (the public method's own bookkeeping) is on."""
    from dsmoe_runtime.kv_cache import _direct_run

    class CSession:
        def __init__(self, capture):
            self.capture, self.calls = capture, []

        def is_webgpu_graph_capture_enabled(self):
            return self.capture

        def run_with_iobinding(self, c_binding, run_options):
            self.calls.append(c_binding)

    class Session:
        def __init__(self, c_session):
            self._sess, self.calls = c_session, []

        def run_with_iobinding(self, binding):
            self.calls.append(binding)

    class Binding:
        _iobinding = "c-binding"

    binding = Binding()
    direct = Session(CSession(capture=False))
    _direct_run(direct, binding)()
    assert direct._sess.calls == ["c-binding"] and direct.calls == []
    for session in (Session(CSession(capture=True)), Session(None)):
        _direct_run(session, binding)()
        assert session.calls == [binding]
    replaced = Session(CSession(capture=False))
    counted = []
    replaced.run_with_iobinding = lambda b: counted.append(b)  # an instance attribute, as monkeypatch sets it
    _direct_run(replaced, binding)()
    assert counted == [binding] and replaced._sess.calls == []
