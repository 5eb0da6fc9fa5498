"""The benchmark tool (dsmoe_export.bench): its routing construction, that its three graphs
compute the same function as the numpy reference, and a --quick smoke run. Speed is never
asserted here."""
from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from dsmoe_export.bench import graphs, metrics, routing
from dsmoe_export.testing.reference import ffn_reference, router_scores
from dsmoe_export.testing.cases import rel_err

RTOL = 1e-4



@pytest.mark.parametrize("n,k", [(8, 1), (8, 3), (8, 8), (4, 2), (16, 5), (8, 0)])
def test_exact_k_routing_gives_k_blocks_with_varied_subsets(op_library, rng, n, k):
    T, d = 160, 48  # k = 1 of 8: some block unused with probability 8 (7/8)^T (1.5e-3 at 64 tokens, 4e-9 here)
    rt = routing.exact_k(rng, T, d, n, k)
    assert rt.x.dtype == np.float32 and rt.x.shape == (T, d) and rt.router_weight.shape == (n, d)
    # The reference's routing (float64) and the kernel's `active` output (float32) agree: exactly k per token.
    assert ((router_scores(rt.x, rt.router_weight) > 0.5).sum(axis=1) == k).all()
    e = graphs.Experts.random(rng, d, n * 3, n)
    sparse = graphs.Runner(*graphs.sparse_graph(e, active_output=True), threads=1, library=op_library)
    active = sparse(rt.x, rt.router_weight)[1]
    np.testing.assert_array_equal(active, rt.active)
    assert (active.sum(axis=1) == k).all()
    if 0 < k < n:  # per-token random subsets: many distinct ones, every block used somewhere
        assert rt.stats()["distinct_subsets"] >= min(math.comb(n, k), T) // 4
        assert active.any(axis=0).all()
    assert rt.mean_k == k and rt.r == k / n and rt.pairs == k * T


def test_natural_routing_varies_k(rng):
    rt = routing.natural(rng, 256, 64, 8)
    ks = rt.active.sum(axis=1)
    assert len(set(ks.tolist())) >= 4 and 0.3 < rt.r < 0.7  # Binomial(8, ~1/2)
    assert rt.union == 8


def _case(rng, mode, T, d=40, n=8, B=6, k=3, scale=1.0):
    e = graphs.Experts.random(rng, d, n * B, n)
    rt = routing.exact_k(rng, T, d, n, k) if mode == "exact" else routing.natural(rng, T, d, n)
    return e, rt, (rt.x * np.float32(scale))


@pytest.mark.parametrize("weighting", ["score", "binary"])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("mode,T", [("exact", 1), ("exact", 9), ("natural", 1), ("natural", 33)])
def test_moe_graph_computes_the_reference(rng, weighting, rescale, mode, T):
    e, rt, x = _case(rng, mode, T)
    k = rt.k if mode == "exact" else None  # exact: MoE's top-k = k; natural: k = n plus the -inf sentinel
    moe = graphs.Runner(*graphs.moe_graph(e, k=k, weighting=weighting, rescale=rescale), threads=1)
    y = moe(x, rt.router_weight)[0]
    y_ref, _ = ffn_reference(x, rt.router_weight, e.gate, e.up, e.down, weighting=weighting, rescale=rescale)
    assert rel_err(y, y_ref) <= RTOL


def test_moe_graph_no_swiglu_clamp_and_idle_tokens(rng):
    """Large pre-activations (no swiglu_limit clamp), and tokens with k = 0 give zeros."""
    e, rt, x = _case(rng, "natural", 16, scale=1.0)
    e.gate *= 30.0
    e.up *= 30.0
    router = rt.router_weight.copy()
    x[:3] = -np.sign(router.sum(0)) * np.abs(x[:3])  # push some tokens towards k = 0
    y_ref, active = ffn_reference(x, router, e.gate, e.up, e.down)
    assert np.abs(y_ref).max() > 100
    y = graphs.Runner(*graphs.moe_graph(e), threads=1)(x, router)[0]
    assert rel_err(y, y_ref) <= RTOL
    idle = ~active.any(axis=1)
    assert (y[idle] == 0).all()


@pytest.mark.parametrize("T", [1, 17])
def test_dense_graph_computes_the_full_ffn(rng, T):
    e, rt, x = _case(rng, "natural", T)
    y = graphs.Runner(*graphs.dense_graph(e), threads=1)(x, rt.router_weight)[0]
    # Every block active, weight 1, no rescale = the dense FFN.
    all_on = np.zeros_like(rt.router_weight)
    y_ref, active = ffn_reference(x, all_on, e.gate, e.up, e.down, np.full(e.n, 10.0, np.float32),
                                  weighting="binary", rescale=False)
    assert active.all()
    assert rel_err(y, y_ref) <= RTOL


@pytest.mark.parametrize("mode,T", [("exact", 1), ("natural", 40)])
def test_sparse_op_and_moe_agree(op_library, rng, mode, T):
    e, rt, x = _case(rng, mode, T)
    y_sparse = graphs.runner("sparse", e, threads=2, library=op_library)(x, rt.router_weight)[0]
    y_moe = graphs.runner("moe", e, threads=2)(x, rt.router_weight)[0]
    y_ref, _ = ffn_reference(x, rt.router_weight, e.gate, e.up, e.down)
    assert rel_err(y_sparse, y_ref) <= RTOL and rel_err(y_moe, y_ref) <= RTOL


def test_layouts(rng):
    e = graphs.Experts.random(rng, 8, 12, 4)
    fc1, fc2 = e.moe_layout()
    assert fc1.shape == (4, 6, 8) and fc2.shape == (4, 8, 3)
    np.testing.assert_array_equal(fc1[2, 0::2], e.gate[2])
    np.testing.assert_array_equal(fc1[2, 1::2], e.up[2])
    np.testing.assert_array_equal(fc2[1], e.down[1].T)
    wg, wu, wd = e.dense_layout()
    np.testing.assert_array_equal(wg[:, 3:6], e.gate[1].T)
    np.testing.assert_array_equal(wd[3:6], e.down[1])


def test_call_cost():
    d, n, B, T = 16, 8, 4, 3
    assert metrics.call_cost("dense", d=d, n=n, B=B, tokens=T, union=n, pairs=n * T) == \
        (3 * n * B * d * 4, 6 * B * d * n * T)
    assert metrics.call_cost("moe", d=d, n=n, B=B, tokens=T, union=5, pairs=7) == (5 * 3 * B * d * 4, 7 * 6 * B * d)
    assert metrics.call_cost("sparse", d=d, n=n, B=B, tokens=T, union=5, pairs=7)[0] == 5 * 3 * B * d * 4 + n * d * 4
    r = metrics.rates(10**9, 2 * 10**9, 0.5, {"bandwidth_gb_s": 4.0, "gemm_gflop_s": 8.0})
    assert r["gb_s"] == 2.0 and r["gflop_s"] == 4.0 and r["gb_s_pct"] == 50.0 and r["of_roofline"] == 0.5


# --max-wait 0: a test must not wait for other processes to leave the CPUs idle.
QUICK_OP = ["op", "--quick", "--no-progress", "--max-wait", "0", "--rounds", "1", "--tokens", "1,5", "--ks", "1,8",
            "--shapes", "64x96x8"]


def _check_outputs(out, level):
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["threads"] >= 1 and results["meta"]["cpu"]
    blocking = results["meta"]["cpu_cache_blocking"]  # the library's own report of its k-slices
    assert blocking["l1d_bytes"] > 0 and 32 <= blocking["slab_slice_steps"] <= 256
    assert f"KiB L1d (slab layout's k-slices of {blocking['slab_slice_steps']} steps" in (out / "results.md").read_text()
    assert results["ceilings"]["bandwidth_gb_s"] > 0 and results["ceilings"]["gemm_gflop_s"] > 0
    rows = results[level]
    assert rows and all(r["ms_min"] > 0 and r["ms_median"] >= r["ms_min"] for r in rows)
    text = (out / "results.md").read_text()
    assert "| T | routing |" in text or "| phase |" in text
    return results


def test_quick_op_run_writes_json_and_markdown(op_library, tmp_path, monkeypatch, capsys):
    from dsmoe_export.bench import cli

    monkeypatch.setenv("DSMOE_OPS_LIBRARY", op_library)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # no matplotlib: JSON + markdown still written
    assert cli.main([*QUICK_OP, "--out", str(tmp_path)]) == 0
    results = _check_outputs(tmp_path, "op")
    kinds = {(r["kind"], r["mode"], r["k"], r["tokens"]) for r in results["op"]}
    for T in (1, 5):
        assert {("dense", "all", 8, T), ("sparse", "exact", 1, T), ("moe", "exact", 8, T),
                ("sparse", "natural", None, T), ("moe", "natural", None, T)} <= kinds
    sparse = [r for r in results["op"] if r["kind"] == "sparse" and r["mode"] == "exact"]
    assert all(r["union"] <= r["n"] and r["pairs"] == r["k"] * r["tokens"] and "gb_s_pct" in r for r in sparse)
    assert results["checks"][0]["moe_vs_sparse"] < RTOL
    assert not (tmp_path / "results.png").exists()
    assert any("matplotlib" in n for n in results["notes"])


def test_compare_layouts(op_library, tmp_path, monkeypatch):
    """--compare-layouts times the op with its down weights in the other layout too, in the same
    rounds (d = 64: the default is rows, the other tiled): one sparse_tiled row per sparse row, its
    numbers in two more columns, and equal outputs."""
    from dsmoe_export.bench import cli

    monkeypatch.setenv("DSMOE_OPS_LIBRARY", op_library)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main([*QUICK_OP, "--compare-layouts", "--out", str(tmp_path)]) == 0
    results = _check_outputs(tmp_path, "op")
    keys = lambda kind: {(r["mode"], r["k"], r["tokens"]) for r in results["op"] if r["kind"] == kind}  # noqa: E731
    assert keys("sparse_tiled") == keys("sparse") and len(keys("sparse")) == 6
    assert {r["layout"] for r in results["op"] if r["kind"] == "sparse"} == {"rows"}
    assert results["checks"][0]["tiled_layout_vs_sparse"] == 0.0  # same sums, same order
    table = (tmp_path / "results.md").read_text()
    assert "| tiled-layout ms | tiled/rows |" in table
    # Without the flag: no such rows, no such columns.
    assert cli.main([*QUICK_OP, "--out", str(tmp_path / "plain")]) == 0
    assert "tiled/rows" not in (tmp_path / "plain" / "results.md").read_text()


def test_sparse_graph_down_layouts(op_library, rng):
    """The bench's sparse graph stores down in the exporter's default layout for its d (rows below
    2048, column tiles from it on), or as down_tile says; every layout computes the reference."""
    e, rt, x = _case(rng, "natural", 30)
    y_ref, _ = ffn_reference(x, rt.router_weight, e.gate, e.up, e.down)
    assert graphs.default_layout(e.d) == "rows" and graphs.default_layout(2048) == "tiled"
    model, shared = graphs.sparse_graph(e)
    assert shared["down_weight"].shape == (e.n, e.block, e.d)
    assert graphs.sparse_graph(e, down_tile=64)[1]["down_weight"].shape == (e.n, -(-e.d // 64), e.block, 64)
    assert graphs.sparse_graph(e, down_tile=0)[1]["down_weight"].shape == (e.n, e.block, e.d)
    for kind in ("sparse", "sparse_rows", "sparse_tiled"):
        y = graphs.runner(kind, e, threads=2, library=op_library)(x, rt.router_weight)[0]
        assert rel_err(y, y_ref) <= RTOL


@pytest.mark.slow
def test_quick_all_run_with_plot(op_library, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from dsmoe_export.bench import cli

    monkeypatch.setenv("DSMOE_OPS_LIBRARY", op_library)
    assert cli.main(["all", "--quick", "--no-progress", "--max-wait", "0", "--rounds", "1",
                     "--out", str(tmp_path)]) == 0
    results = _check_outputs(tmp_path, "e2e")
    phases = {(r["phase"], r["kind"]) for r in results["e2e"]}
    assert {("prefill", "sparse"), ("decode", "dense"), ("decode", "attn")} <= phases
    assert (tmp_path / "results.png").stat().st_size > 0


def test_report_renders_every_recorded_run_again(tmp_path, capsys):
    """docs/results keeps older runs as data: the report tool renders each one's tables again, and
    with --png the latest op-level run's plots (docs/benchmarks.png is drawn that way)."""
    from pathlib import Path

    from dsmoe_export.bench import report

    recorded = sorted((Path(__file__).resolve().parents[1] / "docs" / "results").glob("*.json"))
    assert recorded
    for path in recorded:
        assert report.main([str(path)]) == 0, path
        out = capsys.readouterr().out
        if path.stem.endswith("quality-smollm2"):  # bench.quality's table
            want = json.loads(path.read_text())["candidates"][0]["model"]
            assert out.startswith("reference ") and f"| {want} |" in out, path
        else:
            assert out.startswith("# dsmoe-export benchmark"), path
    pytest.importorskip("matplotlib")
    latest_op = [p for p in recorded if p.stem.endswith("-op")][-1]
    assert report.main([str(latest_op), "--png", str(tmp_path / "plot.png")]) == 0
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quality_compares_exports_and_its_json_renders_again(op_library, tmp_path, monkeypatch, capsys):
    """bench.quality on a float32 export against itself and its int8 form: the table it prints,
    and the same table from its --json through the report tool."""
    from dsmoe_export.bench import quality, report
    from dsmoe_export.exporter import export
    from dsmoe_export.synthetic import TinySpec, make_model_folder

    monkeypatch.setenv("DSMOE_OPS_LIBRARY", op_library)
    folder = make_model_folder(tmp_path / "model", TinySpec(), seed=5)
    paths = []
    for name, options in (("fp32", {}), ("int8", {"ffn_weights": "int8"})):
        (tmp_path / name).mkdir()
        export(folder, tmp_path / name / "model.onnx", progress=False, active_outputs=True, **options)
        paths.append(tmp_path / name / "model.onnx")
    assert quality.main([str(paths[0]), str(paths[0]), str(paths[1]), "--tokens", "24",
                         "--json", str(tmp_path / "q.json")]) == 0
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "q.json").read_text())
    same, int8 = results["candidates"]
    assert same["max_rel_error"] == 0 and same["top1_agreement"] == 1 and same["routing_agreement"] == 1
    assert 0 < int8["max_rel_error"] < 0.1 and int8["size_bytes"] < same["size_bytes"]
    assert report.main([str(tmp_path / "q.json")]) == 0
    assert capsys.readouterr().out == printed
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "q.json"), "--png", str(tmp_path / "q.png")])
    assert "has no plots" in capsys.readouterr().err and not (tmp_path / "q.png").exists()


def _tiny_folder(path):
    from dsmoe_export.synthetic import TinySpec, make_model_folder, write_byte_tokenizer

    # split experts and tied embeddings: the layouts the attention-only copy must read
    folder = make_model_folder(path, TinySpec(tie_word_embeddings=True), seed=3, split=True)
    write_byte_tokenizer(folder)
    return folder


def test_attention_only_copy_keeps_all_but_the_ffn_rows(tmp_path):
    from dsmoe_export.bench.e2e import attention_only_folder
    from dsmoe_export.checkpoint import load_state_dict
    from dsmoe_export.config import load_config
    from dsmoe_export.loader import load_model

    src = _tiny_folder(tmp_path / "model")
    dst = attention_only_folder(src, tmp_path / "attn")
    cfg, cfg_attn = load_config(src), load_config(dst)
    n = cfg.dsmoe.num_experts
    assert cfg_attn.intermediate_size == n and cfg_attn.hidden_size == cfg.hidden_size
    assert cfg_attn.tie_word_embeddings and cfg_attn.dsmoe.num_experts == n
    full = load_state_dict(src, cfg, with_routers=True)
    attn = load_state_dict(dst, cfg_attn, with_routers=True)
    assert set(full) == set(attn)
    for name, t in full.items():
        proj = name.rsplit(".", 2)[-2]
        if proj in ("gate_proj", "up_proj"):
            assert attn[name].shape == (n, cfg.hidden_size) and attn[name].equal(t[:n])
        elif proj == "down_proj":
            assert attn[name].shape == (cfg.hidden_size, n) and attn[name].equal(t[:, :n])
        else:
            assert attn[name].equal(t), name
    load_model(dst)  # a valid DSMoE folder in its own right


def test_quick_e2e_run_on_a_model_folder(op_library, tmp_path, monkeypatch):
    from dsmoe_export.bench import cli

    monkeypatch.setenv("DSMOE_OPS_LIBRARY", op_library)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    folder = _tiny_folder(tmp_path / "my-model")
    before = sorted(p.name for p in folder.iterdir())
    out = tmp_path / "out"
    text = tmp_path / "prompt.txt"
    text.write_text("To be, or not to be: " * 2)  # 42 byte tokens; the run needs 16 + 4 (decode)
    assert cli.main(["e2e", "--quick", "--no-progress", "--max-wait", "0", "--rounds", "1", "--tokens", "1,7",
                     "--model", str(folder), "--text", str(text), "--out", str(out), "--no-builder",
                     "--gen-tokens", "0"]) == 0
    results = _check_outputs(out, "e2e")
    assert results["e2e_info"]["model"].startswith("my-model: 2 layers, d=64 D=192 n=8")
    assert results["e2e_info"]["prompt"] == "the text of prompt.txt, 42 tokens"
    rows = {(r["phase"], r["kind"]): r for r in results["e2e"]}
    # The --ffn-node projected export is timed beside the sparse one.
    assert set(rows) == {(p, k) for p in ("prefill", "decode") for k in ("sparse", "dense", "attn", "projected")}
    assert rows[("prefill", "sparse")]["tokens"] == 7 and 0 <= rows[("prefill", "sparse")]["r"] <= 1
    # every variant timed in e2e.SESSIONS sessions, each in every round
    from dsmoe_export.bench import e2e
    assert {(r["sessions"], r["rounds"], r["samples"]) for r in results["e2e"]} == {(e2e.SESSIONS, 1, e2e.SESSIONS)}
    for r in results["e2e"]:
        assert r["ms_min"] == pytest.approx(float(np.median(r["ms_session_mins"])))
    for phase in ("prefill", "decode"):
        s, projected = rows[(phase, "sparse")], rows[(phase, "projected")]
        assert s["projected_vs_sparse_min"] == pytest.approx(projected["ms_min"] / s["ms_min"])
        assert projected["r"] == s["r"]
    assert "my-model: " in (out / "results.md").read_text()
    # The FFN's node time from the profiled twins: every sparse and dense row has it, the ratio
    # is the sparse row's over its dense twin's, and the other nodes took time too.
    for phase in ("prefill", "decode"):
        s, d = rows[(phase, "sparse")], rows[(phase, "dense")]
        assert s["ffn_node_ms_min"] > 0 and d["ffn_node_ms_min"] > 0 and s["other_node_ms_min"] > 0
        assert s["ffn_node_ratio_min"] == pytest.approx(s["ffn_node_ms_min"] / d["ffn_node_ms_min"])
        assert "ffn_node_ms_min" not in rows[(phase, "attn")]
        # the op's fixed cost at this shape: per call, and times the layers against the FFN's node time
        assert 0 < s["op_fixed_us_min"] <= s["op_fixed_us_median"]
        assert s["op_fixed_share"] == pytest.approx(2 * s["op_fixed_us_min"] / 1e3 / s["ffn_node_ms_min"])
        assert "op_fixed_us_min" not in d
    assert "FFN node time sparse/dense" in (out / "results.md").read_text()
    assert "op fixed cost" in (out / "results.md").read_text()
    assert sorted(p.name for p in folder.iterdir()) == before   # the user's folder is left as it was
    assert not (out / "e2e").exists()                          # exports removed without --keep-exports


def test_runtime_worker_generates_as_dsmoe_session(op_library, tmp_path, rng):
    """The generation benchmark's DSMoESession runner, a process of its own: the tokens of
    DSMoESession.generate in this process, its own timings, errors named and survived."""
    from dsmoe_export.bench.workers import RuntimeWorker
    from dsmoe_export.exporter import export
    from dsmoe_runtime import DSMoESession

    folder = _tiny_folder(tmp_path / "model")
    path = tmp_path / "export" / "model.onnx"
    path.parent.mkdir()
    export(folder, path, progress=False, validate=False)
    prompt = rng.integers(3, 256, 9).tolist()
    want = DSMoESession(path, threads=2, library=op_library).generate([prompt], 6)[0, 9:].tolist()
    with RuntimeWorker() as worker:
        reply = worker.generate(path, prompt, 6, threads=2, library=op_library, dense=False)
        assert reply["new"] == want and reply["prefill_ms"] > 0 and reply["decode_ms"] > 0
        with pytest.raises(RuntimeError, match=r"DSMoESession worker on .*nowhere\.onnx: ModelError"):
            worker.generate(tmp_path / "nowhere.onnx", prompt, 2, threads=2, library=op_library, dense=False)
        assert worker.generate(path, prompt, 1, threads=2, library=op_library, dense=False)["new"] == want[:1]


def test_quick_e2e_against_the_model_builder(op_library, tmp_path, monkeypatch):
    """With onnxruntime-genai's builder available (scripts/setup-ecosystem.sh genai), its models of the
    same weights join the run, at both precisions: prefill, decode, generation in genai's generator
    and in DSMoESession, node counts."""
    from dsmoe_export.bench import builder, cli

    python, why = builder.find_python()
    if python is None:
        pytest.skip(why)
    monkeypatch.setenv("DSMOE_OPS_LIBRARY", op_library)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "out"
    assert cli.main(["e2e", "--quick", "--no-progress", "--max-wait", "0", "--rounds", "1", "--tokens", "1,7",
                     "--e2e-precisions", "fp32,int4", "--gen-tokens", "4", "--e2e-sessions", "2",
                     "--out", str(out)]) == 0
    results = _check_outputs(out, "e2e")
    info = results["e2e_info"]
    assert {(r["sessions"], len(r["ms_session_mins"])) for r in results["e2e"] if r["phase"] != "generate"} == {(2, 2)}
    assert info["builder"] == ["builder", "builder-int4"]
    timed = {(r["phase"], r["variant"]) for r in results["e2e"] if r["phase"] != "generate"}
    variants = {"attn", "sparse", "dense", "builder", "sparse-int4", "dense-int4", "builder-int4"}
    assert timed == {(p, v) for p in ("prefill", "decode") for v in variants}
    assert all(0 < r["vs_builder_min"] < 100 for r in results["e2e"]
               if r["kind"] in ("sparse", "dense") and r["phase"] != "generate")
    gen = {(r["variant"], r["runner"]) for r in results["e2e"] if r["phase"] == "generate"}
    # each runner in --e2e-sessions processes, every variant timed in each
    assert {(r["processes"], len(r["ms_process_mins"]), r["rounds"]) for r in results["e2e"]
            if r["phase"] == "generate"} == {(2, 2, 1)}
    assert gen == {(v, "dsmoe_runtime") for v in ("sparse", "dense", "sparse-int4", "dense-int4")} | \
        {(v, "genai") for v in ("sparse", "sparse-int4", "builder", "builder-int4")}
    nodes = info["nodes"]
    assert nodes["sparse"]["per_layer"] == 6 and nodes["dense"]["per_layer"] == nodes["builder"]["per_layer"] == 10
    table = (out / "results.md").read_text()
    assert "against onnxruntime-genai's model builder" in table and "| int4 | decode (past 16) |" in table
    # the generation table's decode step against the builder's: 1.000 on the builder's own rows
    assert "decode step / builder's" in table and "| builder | genai |" in table
    builder_row = next(line for line in table.splitlines() if line.startswith("| builder | genai |"))
    assert builder_row.split("|")[11].strip() == "1.000"
    # DSMoESession against genai's generator on the same export, by best and by paired rounds
    ours = next(line for line in table.splitlines() if line.startswith("| sparse | dsmoe_runtime |")).split("|")
    assert float(ours[7]) > 0 and ours[8].strip().count("[") == 1
    # where the decode step goes, per part, in the profiled twins; the weights each part streams
    assert "Where a decode step's node time goes" in table and "| attention projections |" in table
    decode = {r["variant"]: r for r in results["e2e"] if r["phase"] == "decode" and r.get("node_ms_parts_median")}
    assert set(decode) == {"sparse", "dense", "sparse-int4", "dense-int4"}
    assert all(sum(r["node_ms_parts_median"].values()) > 0 for r in decode.values())
    assert set(info["weight_bytes_parts"]) == set(decode)
    assert info["weight_bytes_parts"]["dense-int4"]["ffn"] < info["weight_bytes_parts"]["dense"]["ffn"] / 4


def test_generation_row_takes_the_median_of_each_process_best(rng):
    """A generation row from several processes: best = median over the processes of each one's
    minimum (of prefill + decode; prefill and decode steps likewise), median over all samples."""
    from dsmoe_export.bench import generation

    per_process = [[(float(p), float(d)) for p, d in rng.uniform(1, 100, (4, 2))] for _ in range(3)]
    row = generation._row("sparse-int4", "genai", per_process, 9, 128)
    totals = np.array([[p + d for p, d in times] for times in per_process])
    best = np.sort(totals.min(axis=1))[1]
    assert row["ms_process_mins"] == pytest.approx(totals.min(axis=1).tolist())
    assert row["ms_min"] == pytest.approx(best) and row["tokens_s"] == pytest.approx(9e3 / best)
    assert row["ms_median"] == pytest.approx(np.median(totals)) and row["tokens_s_median"] == pytest.approx(9e3 / np.median(totals))
    decode = np.sort([min(d for _, d in times) for times in per_process])[1]
    assert row["decode_tokens_s"] == pytest.approx(8e3 / decode)
    assert row["prefill_ms_min"] == pytest.approx(np.sort([min(p for p, _ in times) for times in per_process])[1])
    assert (row["processes"], row["rounds"], row["precision"], row["kind"], row["past"]) == (3, 4, "int4", "sparse", 128)
    assert generation._row("dense", "dsmoe_runtime", per_process[:1], 1, 5)["decode_tokens_s"] is None


def test_model_option_errors(tmp_path, op_library, monkeypatch):
    from dsmoe_export.bench import cli

    monkeypatch.setenv("DSMOE_OPS_LIBRARY", op_library)
    with pytest.raises(SystemExit, match=r"--model: .*nowhere: not a directory"):
        cli.main(["e2e", "--quick", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="not to op"):
        cli.main(["op", "--quick", "--model", str(tmp_path), "--out", str(tmp_path / "o")])
    folder = _tiny_folder(tmp_path / "m")
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    with pytest.raises(SystemExit, match=r"short\.txt: 10 tokens, the run needs 20"):
        cli.main(["e2e", "--quick", "--model", str(folder), "--text", str(short), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="--text needs --model"):
        cli.main(["e2e", "--quick", "--text", str(short), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="--e2e-sessions: expected at least 1, got 0"):
        cli.main(["e2e", "--quick", "--e2e-sessions", "0", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_plot_of_end_to_end_rows_alone(tmp_path):
    pytest.importorskip("matplotlib")
    from dsmoe_export.bench import report

    rows = []
    for phase, T, past in (("prefill", 64, 0), ("decode", 1, 32)):
        for kind, ms in (("sparse", 7.0), ("dense", 10.0), ("attn", 4.0)):
            row = {"phase": phase, "tokens": T, "past": past, "kind": kind, "ms_min": ms, "ratio_min": ms / 10.0}
            if kind == "sparse":
                row.update(ffn_ratio_min=0.5, r=0.45, target=0.57)
            rows.append(row)
    results = {"meta": {"cpu": "cpu", "threads": 2, "date": "today"}, "op": [], "e2e": rows,
               "e2e_info": {"model": "m: 2 layers"}}
    assert report.plot(tmp_path / "p.png", results) is None
    assert (tmp_path / "p.png").stat().st_size > 10_000
    assert "no op-level or end-to-end rows" in report.plot(tmp_path / "q.png", {**results, "e2e": []})
    assert not (tmp_path / "q.png").exists()


def test_e2e_memory_check(tmp_path):
    """The sessions a run would hold: sessions x every export + one twin each of `twins`, times
    SESSION_BYTES_PER_FILE_BYTE, against the memory available (external data counted)."""
    from dsmoe_export.bench import e2e

    paths = {}
    for name, size in (("sparse", 3000), ("dense", 1000)):
        (tmp_path / name).mkdir()
        paths[name] = tmp_path / name / "model.onnx"
        paths[name].write_bytes(b"x" * size)
    (tmp_path / "dense" / "model.onnx.data").write_bytes(b"x" * 1000)
    assert e2e.model_bytes(paths["dense"]) == 2000
    need = e2e.SESSION_BYTES_PER_FILE_BYTE * (3 * 5000 + 2000)
    need /= e2e.MEMORY_HEADROOM
    e2e.check_memory(paths, 3, {"dense": paths["dense"]}, available=int(need) + 1)
    with pytest.raises(e2e.NotEnoughMemory, match=r"3 sessions of each of 2 exports \(\+ 1 profiled\).*"
                                                  r"use fewer --e2e-sessions"):
        e2e.check_memory(paths, 3, {"dense": paths["dense"]}, available=int(need) - 1)
    e2e.check_memory(paths, 100, {}, available=None)  # unknown: not checked
    assert e2e.available_memory() is None or e2e.available_memory() > 0


def test_e2e_run_refuses_sessions_that_do_not_fit(op_library, tmp_path, monkeypatch):
    """A clear error before any session opens, instead of the kernel's OOM kill mid-run."""
    from dsmoe_export.bench import cli, e2e

    monkeypatch.setenv("DSMOE_OPS_LIBRARY", op_library)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(e2e, "available_memory", lambda: 1 << 20)
    opened = []
    monkeypatch.setattr(e2e, "_session", lambda *a: opened.append(a))
    with pytest.raises(SystemExit, match=r"--e2e-sessions 2: the end-to-end run would hold 2 sessions .* "
                                         r"more than 85% of the 0.0 GiB available"):
        cli.main(["e2e", "--quick", "--no-progress", "--max-wait", "0", "--rounds", "1", "--tokens", "4",
                  "--e2e-shape", "64x192x8", "--e2e-layers", "1", "--e2e-heads", "4", "--e2e-kv-heads", "2",
                  "--e2e-vocab", "64", "--out", str(tmp_path / "out"), "--no-builder", "--gen-tokens", "0",
                  "--e2e-sessions", "2"])
    assert not opened
    assert not (tmp_path / "out" / "e2e").exists()  # the exports it made are scratch: removed


def test_timed_sessions_do_not_spin():
    # Several sessions time in one process: a pool that spins after its call steals the cores
    # from the next session's timed call (graphs.THREAD_POOL).
    opts = graphs.session_options(2)
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opts.intra_op_num_threads == 2


@pytest.mark.parametrize("gate_up", ["rows", "slabs"])
@pytest.mark.parametrize("layout", ["rows", "tiled"])
def test_layer_chain_graphs_compute_each_layer(op_library, rng, layout, gate_up):
    """bench.layers' graphs: layer i's output is the FFN of layer i's own weights (sparse: the op
    with its router, in either down layout and either gate/up layout; dense: the full FFN), for
    every layer."""
    from dsmoe_export.bench import layers, op

    w = layers.Layers.random(rng, op.Shape(d=70, D=48, n=4), 3)
    x = rng.standard_normal((9, 70)).astype(np.float32)
    model, arrays = layers.sparse_model(w, threshold=0.45, layout=layout, gate_up_layout=gate_up)
    assert arrays["gate0"].ndim == (4 if gate_up == "slabs" else 3)
    sparse = graphs.Runner(model, arrays, threads=2, library=op_library)
    dense = graphs.Runner(*layers.dense_model(w), threads=1)
    ys, yd = sparse.session.run(None, {"X": x}), dense.session.run(None, {"X": x})
    for i, (router, e) in enumerate(zip(w.routers, w.experts)):
        y_ref, _ = ffn_reference(x, router, e.gate, e.up, e.down, threshold=0.45)
        assert rel_err(ys[i], y_ref) <= RTOL
        y_all, _ = ffn_reference(x, np.zeros_like(router), e.gate, e.up, e.down, np.full(e.n, 10.0, np.float32),
                                 weighting="binary", rescale=False)
        assert rel_err(yd[i], y_all) <= RTOL
    # r: the fraction of (token, block) scores over the threshold, over the layers.
    s = np.stack([router_scores(x, r) for r in w.routers])
    assert layers.active_fraction(w, x, 0.45) == pytest.approx(float((s > 0.45).mean()))


@pytest.mark.parametrize("weights", ["int4", "int8", "float16"])
def test_layer_chain_quantized_graphs_compute_each_layer(op_library, rng, weights):
    """bench.layers --weights: layer i's sparse output is the FFN of layer i's router and its blocks
    as the quantized op stores them (float64 reference over the dequantized blocks); the dense
    chain (MatMulNBits at accuracy_level 0 for int4 / int8, float32 MatMuls for float16) is the
    full FFN over the same dequantized weights (MatMulNBits groups along K = d for gate / up, along
    D for down: the blocks' own groups when B is a multiple of the group)."""
    from dsmoe_export import quant
    from dsmoe_export.bench import layers, op

    w = layers.Layers.random(rng, op.Shape(d=64, D=128, n=4), 3)
    x = rng.standard_normal((7, 64)).astype(np.float32)
    sparse = graphs.Runner(*layers.sparse_model(w, threshold=0.45, layout="rows", weights=weights),
                           threads=2, library=op_library)
    dense = graphs.Runner(*layers.dense_model(w, weights=weights), threads=1)
    ys, yd = sparse.session.run(None, {"X": x}), dense.session.run(None, {"X": x})
    for i, (router, e) in enumerate(zip(w.routers, w.experts)):
        packed = quant.quantize_block_weights(e.gate, e.up, e.down, weights, quant.DEFAULT_GROUP_SIZE)
        gate, up, down = quant.dequantize_block_weights(packed, weights)
        y_ref, _ = ffn_reference(x, router, gate, up, down, threshold=0.45)
        assert rel_err(ys[i], y_ref) <= 1e-4
        if weights == "float16":
            gate, up, down = e.gate, e.up, e.down  # the dense baseline stays float32
        y_all, _ = ffn_reference(x, np.zeros_like(router), gate, up, down, np.full(e.n, 10.0, np.float32),
                                 weighting="binary", rescale=False)
        assert rel_err(yd[i], y_all) <= 1e-4
    assert rel_err(ys[0], ys[1]) > 0.1  # the layers' weights differ


def test_layer_chain_quantized_run_reports_its_baseline(op_library, capsys):
    from dsmoe_export.bench import layers

    assert layers.main(["--shape", "64x128x4", "--layers", "2", "--tokens", "1,5", "--rounds", "1", "--weights", "int4",
                        "--accuracy-level", "4", "--library", op_library]) == 0
    out = capsys.readouterr().out
    assert "int4 weights: sparse/dense (MatMulNBits, 4 bits, accuracy_level 4)" in out
    assert out.count("| sparse0 |") == 2 and out.count("| dense |") == 2
    # --op-accuracy-level 0,4: a sparse variant per level of the op, its node at that level
    assert layers.main(["--shape", "64x128x4", "--layers", "2", "--tokens", "1", "--rounds", "1", "--weights", "int4",
                        "--op-accuracy-level", "0,4", "--library", op_library]) == 0
    out = capsys.readouterr().out
    assert out.count("| sparse0-level0 |") == 1 and out.count("| sparse0-level4 |") == 1
    w = layers.Layers.random(np.random.default_rng(0), layers.op.Shape(d=64, D=128, n=4), 1)
    model, _ = layers.sparse_model(w, threshold=0.5, layout="rows", weights="int4", accuracy_level=4)
    assert [a.i for a in model.graph.node[0].attribute if a.name == "accuracy_level"] == [4]
    for bad in (["--op-accuracy-level", "4"], ["--weights", "int4", "--op-accuracy-level", "0,0"],
                ["--weights", "int4", "--op-accuracy-level", "5"], ["--weights", "int4", "--op-accuracy-level", "x"]):
        with pytest.raises(SystemExit):
            layers.main(bad)


def test_layer_chain_run_rows_and_report(op_library, capsys):
    """A tiny A/B run (the same library twice): one dense and two sparse rows per token count,
    ratios against that count's dense row, and the table names each library."""
    from dsmoe_export.bench import layers

    assert layers.main(["--shape", "64x96x4", "--layers", "2", "--tokens", "1,20", "--rounds", "2",
                        "--library", op_library, "--library", op_library]) == 0
    out = capsys.readouterr().out
    assert out.count("| sparse0 |") == 2 and out.count("| sparse1 |") == 2 and out.count("| dense |") == 2
    assert f"sparse1: {op_library}" in out
    rows = layers.run(layers.op.Shape(d=64, D=96, n=4), layers=2, tokens=[3], libraries=[op_library], threads=1,
                      rounds=2, threshold=0.3)
    dense, sparse = (next(r for r in rows if r["variant"] == v) for v in ("dense", "sparse0"))
    assert sparse["ratio_min"] == pytest.approx(sparse["ms_min"] / dense["ms_min"])
    assert 0.5 < sparse["r"] <= 1.0  # threshold 0.3: most scores of random logits pass
    assert [r["variant"] for r in rows] == ["dense", "sparse0"] and {r["sessions"] for r in rows} == {layers.SESSIONS}
    assert "2 sessions a variant" in out
    three = layers.run(layers.op.Shape(d=64, D=96, n=4), layers=1, tokens=[1], libraries=[op_library], threads=1,
                       rounds=1, sessions_per_variant=3)
    assert {r["sessions"] for r in three} == {3}
    for bad in (["--tokens", "0"], ["--threads", "0"], ["--sessions", "0"],
                ["--shape", "64x90x4"], ["--down-layout", "rows,cols"],
                ["--down-layout", "rows,auto"],  # auto is rows at d = 576
                ["--weights", "int2"], ["--weights", "int4", "--down-layout", "tiled"],
                ["--weights", "int4", "--group-size", "48"], ["--weights", "int8", "--accuracy-level", "5"]):
        with pytest.raises(SystemExit):
            layers.main(bad)


def test_layer_chain_both_layouts(op_library, capsys):
    """--down-layout rows,tiled: a sparse variant per library and layout, each with its layout in the
    rows, each ratio against the one dense row."""
    from dsmoe_export.bench import layers

    assert layers.main(["--shape", "64x96x4", "--layers", "2", "--tokens", "5", "--rounds", "2",
                        "--library", op_library, "--down-layout", "rows,tiled"]) == 0
    out = capsys.readouterr().out
    assert out.count("| sparse0-rows |") == 1 and out.count("| sparse0-tiled |") == 1 and out.count("| dense |") == 1
    assert "down layout rows and tiled" in out
    rows = layers.run(layers.op.Shape(d=64, D=96, n=4), layers=2, tokens=[5], libraries=[op_library], threads=1,
                      rounds=2, layout=["rows", "tiled"])
    by = {r["variant"]: r for r in rows}
    assert set(by) == {"dense", "sparse0-rows", "sparse0-tiled"}
    assert by["sparse0-tiled"]["layout"] == "tiled" and by["sparse0-rows"]["layout"] == "rows"
    assert by["sparse0-tiled"]["ratio_min"] == pytest.approx(by["sparse0-tiled"]["ms_min"] / by["dense"]["ms_min"])


def test_node_times_split_each_run_into_parts():
    """run_node_times: kernel events go to the run whose span holds them, each node to its part by
    name (FFN by its /mlp/ scope); other events (fences, session events) and nodes outside a run
    are left out."""
    from dsmoe_export.bench.node_times import PARTS, run_node_times

    def node(name, ts, dur):
        return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur}

    events = [{"cat": "Session", "name": "model_run", "ts": 1000, "dur": 500},
              {"cat": "Session", "name": "model_run", "ts": 100, "dur": 300},  # out of order in the file
              node("/model/layers/0/mlp/GatedBlockSparseFFN", 150, 40),
              node("/model/layers/0/self_attn/qkv_proj/MatMul", 200, 10),
              node("/model/layers/1/mlp/down_proj/MatMul", 1100, 250), node("/lm_head/MatMul", 1400, 30),
              node("/model/layers.1/attn/GroupQueryAttention", 1110, 5),  # the model builder's names
              node("/model/layers/1/post_attention_layernorm/SkipLayerNorm_2", 1120, 3),
              node("/model/mask/Sub", 1130, 2), node("/model/layers/1/self_attn/o_proj/MatMul", 1140, 4),
              {"cat": "Node", "name": "/model/layers/1/mlp/x_fence_before", "ts": 1200, "dur": 999},
              node("/model/layers/2/mlp/y", 700, 77),  # between runs
              {"cat": "Session", "name": "SequentialExecutor::Execute", "ts": 1000, "dur": 480}]
    want = [{"ffn": 0.040, "attention projections": 0.010},
            {"ffn": 0.250, "lm_head": 0.030, "attention": 0.005, "norms": 0.003, "rest": 0.002,
             "attention projections": 0.004}]
    got = run_node_times(events)
    assert [list(run) for run in got] == [list(PARTS)] * 2
    assert got == [{p: pytest.approx(w.get(p, 0.0)) for p in PARTS} for w in want]
    assert run_node_times([]) == []


def test_node_time_samples_follow_the_segments():
    """samples_of_runs: skipped runs (priming, warm-up) are left out, a multi-run sample is the
    mean of its runs, and a profile with more or fewer runs than the calls made is an error."""
    from dsmoe_export.bench.node_times import Segment, samples_of_runs

    def run(ffn, lm_head, norms=0.0):
        return {"ffn": ffn, "attention projections": 0.0, "attention": 0.0, "norms": norms, "lm_head": lm_head,
                "rest": 0.0}

    runs = [run(100.0, 100.0), run(1.0, 2.0), run(3.0, 3.0, 1.0),        # warm-up, then 2 prefill samples
            run(100.0, 100.0), run(100.0, 100.0), run(100.0, 100.0),     # priming + a warm-up of 2 runs
            run(1.0, 1.0), run(3.0, 5.0), run(5.0, 1.0), run(7.0, 3.0)]  # 2 samples of 2 runs
    segs = [Segment(("prefill", 7), 1, 1, 2), Segment(("decode", 1), 3, 2, 2)]
    out = samples_of_runs(runs, segs)
    assert out[("prefill", 7)]["ffn"].ms == [1.0, 3.0] and out[("prefill", 7)]["other"].ms == [2.0, 4.0]
    assert out[("prefill", 7)]["parts"]["norms"].ms == [0.0, 1.0]
    assert out[("decode", 1)]["ffn"].ms == [2.0, 6.0] and out[("decode", 1)]["other"].ms == [3.0, 2.0]
    assert out[("decode", 1)]["parts"]["lm_head"].ms == [3.0, 2.0]
    with pytest.raises(RuntimeError, match="fewer than its calls"):
        samples_of_runs(runs[:-1], segs)
    with pytest.raises(RuntimeError, match="its calls made 10"):
        samples_of_runs(runs + [run(0.0, 0.0)], segs)


def test_profiled_sessions_count_runs_per_sample(op_library, tmp_path, rng):
    """ProfiledSessions on a real profile: prefill samples of one run, decode-like samples of
    several runs after a priming run, each sample's FFN and other times from its own runs."""
    from dsmoe_export.bench import e2e, node_times
    from dsmoe_export.exporter import export
    from dsmoe_export.synthetic import TinySpec, make_model_folder

    folder = make_model_folder(tmp_path / "m", TinySpec(), seed=1)
    path = tmp_path / "model.onnx"
    export(folder, path, progress=False, validate=False)
    prof = node_times.ProfiledSessions({"sparse": path}, 1, op_library)
    s = prof.sessions["sparse"]
    ids = rng.integers(0, 200, (1, 5), dtype=np.int64)
    feeds = e2e._prefill_feeds(ids, e2e.ModelShape.of_folder(folder))
    prof.measure(("prefill", 5), lambda sess: (lambda: sess.run(["logits"], feeds)), 3)

    def three_runs(sess):
        sess.run(["logits"], feeds)  # a priming run
        return lambda: [sess.run(["logits"], feeds) for _ in range(3)]

    prof.measure(("decode", 1), three_runs, 2, runs_per_call=3, prep_runs=1)
    times = prof.finish()
    assert set(times) == {("prefill", 5), ("decode", 1)}
    assert len(times[("prefill", 5)]["sparse"]["ffn"].ms) == 3 and len(times[("decode", 1)]["sparse"]["ffn"].ms) == 2
    for key in times:
        ffn, other = times[key]["sparse"]["ffn"], times[key]["sparse"]["other"]
        assert 0 < ffn.min < 1000 and 0 < other.min < 1000
    assert not prof.sessions and not prof._dir.exists()
    # leaving a `with` block early (a failed phase) drops the sessions and their profile files too
    with pytest.raises(ZeroDivisionError):
        with node_times.ProfiledSessions({"sparse": path}, 1, op_library) as failed:
            1 / 0
    assert not failed.sessions and not failed._dir.exists()


def test_profiled_sessions_map_each_sample_to_its_own_runs(op_library, tmp_path, rng):
    """On a real profile each sample holds its own call's runs: the calls alternate between 2- and
    1024-token prompts (the warm-up call small, then large, small, large), so a mapping shifted by
    one run (into the warm-up, the priming run or the next call) breaks the pattern."""
    from dsmoe_export.bench import e2e, node_times
    from dsmoe_export.exporter import export
    from dsmoe_export.synthetic import TinySpec, make_model_folder

    folder = make_model_folder(tmp_path / "m", TinySpec(), seed=2)
    path = tmp_path / "model.onnx"
    export(folder, path, progress=False, validate=False)
    shape = e2e.ModelShape.of_folder(folder)
    large = e2e._prefill_feeds(rng.integers(0, 200, (1, 1024), dtype=np.int64), shape)
    small = e2e._prefill_feeds(rng.integers(0, 200, (1, 2), dtype=np.int64), shape)

    def alternating(runs: int, prime: bool):
        def make_call(sess):
            if prime:
                sess.run(["logits"], large)
            calls = iter(range(10 ** 6))

            def call():
                feeds = large if next(calls) % 2 else small
                return [sess.run(["logits"], feeds) for _ in range(runs)]
            return call
        return make_call

    with node_times.ProfiledSessions({"sparse": path}, 1, op_library) as prof:
        prof.measure(("one run",), alternating(1, prime=False), 3)
        prof.measure(("two runs",), alternating(2, prime=True), 3, runs_per_call=2, prep_runs=1)
        times = prof.finish()
    for key in times:
        for part in ("ffn", "other"):
            big1, little, big2 = times[key]["sparse"][part].ms
            assert little * 4 < min(big1, big2), (key, part, big1, little, big2)


def test_op_fixed_cost_calls_compute_nothing(op_library):
    """The fixed-cost graph activates no block (threshold 1.0): its calls return Y = 0 and an
    all-false active mask, at one token (decode path) and at many (prefill path); one sample
    per round and token count (the op's kernel time from the profile, in microseconds)."""
    from dsmoe_export.bench import fixed_cost
    from dsmoe_export.bench.op import Shape

    shape = Shape(d=64, D=96, n=4)
    rng = np.random.default_rng(0)
    e = graphs.Experts.random(rng, shape.d, shape.D, shape.n)
    runner = graphs.Runner(*graphs.sparse_graph(e, threshold=1.0, active_output=True), threads=2, library=op_library)
    for T in (1, 40):
        y, active = runner(rng.standard_normal((T, shape.d), dtype=np.float32) * 50,
                           rng.standard_normal((shape.n, shape.d), dtype=np.float32) * 50)
        assert not active.any() and not y.any()
    res = fixed_cost.op_fixed_cost(shape, [16384, 1, 16384], threads=2, library=op_library, rounds=3)
    assert sorted(res) == [1, 16384] and all(len(s.ms) == 3 and 0 < s.min < 1e5 for s in res.values())
    # each token count's samples are its own calls (a mapping off by one run would move the
    # 16384-token warm-up call into the 1-token samples): routing 16384 tokens costs far more
    assert max(res[1].ms) * 4 < res[16384].min


def test_samples_of_several_sessions_per_variant(rng):
    """by_variant groups the sessions of each variant: min = the median over sessions of each
    one's minimum (a session on a shared VM keeps its own level), median over all samples."""
    from dsmoe_export.bench import timing

    levels = {"sparse": [20.0, 16.0, 21.0], "builder": [25.0, 30.0, 24.0]}
    res = {timing.session_key(k, i): timing.Samples(list(level + rng.uniform(0, 3, 5)))
           for k, ls in levels.items() for i, level in enumerate(ls)}
    got = timing.by_variant(res)
    assert list(got) == ["sparse", "builder"]
    for k, ls in levels.items():
        mins = sorted(min(res[timing.session_key(k, i)].ms) for i in range(3))
        assert got[k].min == mins[1]  # the middle session's minimum, not the luckiest one's
        every = [t for i in range(3) for t in res[timing.session_key(k, i)].ms]
        assert got[k].median == float(np.median(every)) and len(got[k].ms) == 15
        # the raw samples are kept, per session in the order timed, for analyses after the run
        assert got[k].summary()["ms_session_samples"] == [res[timing.session_key(k, i)].ms for i in range(3)]


@pytest.mark.parametrize("variants,sessions", [(9, 3), (3, 2), (2, 2), (4, 1), (3, 3), (1, 2)])
def test_sessions_are_created_in_turns(variants, sessions):
    """creation_order: every (variant, session) once, group by group (session i of every variant
    before any session i + 1), each group turned so that the variants take turns at the first,
    slow places of the process instead of one variant holding them in every group."""
    from dsmoe_export.bench import timing

    names = [f"v{j}" for j in range(variants)]
    order = timing.creation_order(names, sessions)
    assert sorted(order) == sorted((name, i) for name in names for i in range(sessions))
    assert [i for _, i in order] == sorted(i for _, i in order)
    firsts = [order[i * variants][0] for i in range(sessions)]
    assert len(set(firsts)) == min(variants, sessions)         # a different variant opens each group
    place = {key: pos % variants for pos, key in enumerate(order)}
    for i in range(sessions):                                    # each group keeps the cyclic order
        group = [name for name, j in order if j == i]
        start = names.index(group[0])
        assert group == names[start:] + names[:start]
    if sessions == variants:                                     # then every variant opens one group
        assert sorted(sum(place[(name, i)] for i in range(sessions)) for name in names) == \
            [sum(range(variants))] * variants


def test_create_in_turns_makes_an_untimed_session_first():
    """create_in_turns: one untimed session of the first variant, then every timed one in
    creation_order; the result holds only the timed ones, keyed in the variants' order."""
    from dsmoe_export.bench import timing

    names, made = ["attn", "sparse", "dense", "builder"], []

    def make(name):
        made.append(name)
        return (name, len(made))    # a distinct object per call

    sessions = timing.create_in_turns(names, 2, make)
    assert made == ["attn"] + [name for name, _ in timing.creation_order(names, 2)]
    assert list(sessions) == [timing.session_key(k, i) for i in range(2) for k in names]
    assert ("attn", 1) not in sessions.values()   # the untimed one is not timed
    assert all(value[0] == key.rpartition("#")[0] for key, value in sessions.items())
    assert sessions["dense#0"] == ("dense", 4) and sessions["dense#1"] == ("dense", 6)


def test_builder_table_shows_what_a_proportional_op_would_give():
    """The builder table's 'proportional op' column: 1 - t (1 - r) = (attn + r (dense - attn)) / dense
    by minima, with t = (dense - attn) / dense, on the float32 rows (the attention-only export is float32);
    the decode bound 1 - s(1 - r) + 0.05 for float32, 1 for int4."""
    from dsmoe_export.bench import report

    def row(kind, precision, ms, **extra):
        return {"phase": "decode", "tokens": 1, "past": 128, "kind": kind, "precision": precision,
                "variant": kind if precision == "fp32" else f"{kind}-{precision}", "ms_min": ms,
                "ms_median": ms + 1, **extra}

    rows = [row("attn", "fp32", 11.0), row("dense", "fp32", 23.0, vs_builder_min=23 / 21),
            row("sparse", "fp32", 17.5, r=0.5, vs_builder_min=17.5 / 21, vs_builder_median=18.5 / 22),
            row("builder", "fp32", 21.0),
            row("dense", "int4", 8.0, vs_builder_min=8 / 7.5),
            row("sparse", "int4", 6.9, r=0.5, vs_builder_min=6.9 / 7.5, vs_builder_median=0.9),
            row("builder", "int4", 7.5)]
    ideal, t = report.proportional_ratio(rows[2], rows[1], rows[0])
    assert t == pytest.approx(12 / 23) and ideal == pytest.approx((11 + 0.5 * 12) / 23)  # attn + r (dense - attn)
    assert report.proportional_ratio(rows[5], rows[4], None) is None
    lines = report.builder_tables(rows, {"builder": ["builder", "builder-int4"],
                                         "ffn_byte_share": {"fp32": 0.6, "int4": 0.6}})
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
             for line in lines if line.startswith("| fp32 |") or line.startswith("| int4 |")}
    assert cells["fp32"][12] == f"{(11 + 6) / 23:.3f} ({12 / 23:.3f})"
    assert cells["fp32"][11] == f"{1 - 0.6 * 0.5 + 0.05:.3f}"
    assert cells["int4"][12] == "-" and cells["int4"][11] == "1.000"
    assert cells["fp32"][5] == cells["fp32"][9] == "-"  # no samples recorded: no paired columns


def test_paired_ratio_takes_each_round_of_both_variants(rng):
    """Paired rounds: per round each variant's time is the median over its sessions of that round's
    sample; the ratio's median and quartiles over rounds. A drift common to both variants (every
    session slower in some rounds) cancels, where the ratio of minima would take one variant's
    luckiest round against the other's."""
    from dsmoe_export.bench import report

    rounds, sessions = 9, 3
    drift = rng.uniform(1.0, 1.6, rounds)                   # the machine's speed, round by round
    noise = lambda: rng.uniform(0.99, 1.01, (sessions, rounds))
    a = {"ms_session_samples": (10.0 * drift * noise()).tolist()}
    b = {"ms_session_samples": (20.0 * drift * noise()).tolist()}
    med, q1, q3 = report.paired_ratio(a, b)
    per_round = np.median(np.asarray(a["ms_session_samples"]), 0) / np.median(np.asarray(b["ms_session_samples"]), 0)
    assert (q1, med, q3) == pytest.approx(tuple(np.percentile(per_round, [25, 50, 75])))
    assert q1 <= med <= q3 and abs(med - 0.5) < 0.02
    assert report.paired_ratio({"ms_min": 1.0}, b) is None
    assert report.paired_ratio({"ms_session_samples": [[1.0, 2.0]]}, b) is None  # rounds differ: not paired


def test_generation_paired_rounds_pair_each_process_and_round(rng):
    """Generation's paired rounds: a runner's process i ran beside the other runner's process i, every
    variant once a round, so the speed ratio is taken per (process, round) pair: base ms / row ms. A
    slowdown of the machine in one process or one round cancels; the table shows it against the
    builder's model and, for DSMoESession, against genai's generator on the same export."""
    from dsmoe_export.bench import report

    processes, rounds = 3, 5
    drift = rng.uniform(1.0, 1.5, (processes, rounds))        # the machine's speed, per process and round
    noise = lambda: rng.uniform(0.995, 1.005, (processes, rounds))
    ms = {"builder": 400.0, "sparse-rt": 250.0, "sparse-genai": 275.0}
    samples = {k: (v * drift * noise()).tolist() for k, v in ms.items()}

    def row(variant, runner, key):
        best = float(np.median(np.min(samples[key], axis=1)))
        return {"phase": "generate", "tokens": 64, "past": 128, "kind": variant, "precision": "fp32",
                "variant": variant, "runner": runner, "tokens_s": 64e3 / best, "tokens_s_median": 64e3 / best,
                "prefill_ms_min": 50.0, "decode_tokens_s": 200.0, "rounds": rounds, "processes": processes,
                "ms_process_samples": samples[key]}

    builder, ours, genai = (row("builder", "genai", "builder"), row("sparse", "dsmoe_runtime", "sparse-rt"),
                            row("sparse", "genai", "sparse-genai"))
    med, q1, q3 = report.paired_speed(ours, builder)
    want = np.asarray(samples["builder"]) / np.asarray(samples["sparse-rt"])
    assert (q1, med, q3) == pytest.approx(tuple(np.percentile(want.ravel(), [25, 50, 75])))
    assert abs(med - 1.6) < 0.02 and q3 - q1 < 0.02           # the drift cancelled
    assert report.paired_speed(ours, {"tokens_s": 1.0}) is None  # a run recorded without samples
    assert report.paired_speed(ours, dict(builder, ms_process_samples=samples["builder"][:2])) is None
    lines = report.builder_tables([ours, genai, builder], {"builder": ["builder"]})
    cells = {tuple(c.strip() for c in line.split("|")[1:3]): [c.strip() for c in line.split("|")[1:-1]]
             for line in lines if line.startswith("| sparse |") or line.startswith("| builder |")}
    rt = cells[("sparse", "dsmoe_runtime")]
    assert rt[5] == report._paired(report.paired_speed(ours, builder))
    assert rt[6] == f"{ours['tokens_s'] / genai['tokens_s']:.3f}"
    vs_genai = report.paired_speed(ours, genai)
    assert rt[7] == report._paired(vs_genai) and abs(vs_genai[0] - 1.1) < 0.02
    assert cells[("sparse", "genai")][6] == cells[("builder", "genai")][5] == "-"


def test_weight_bytes_by_part_count_what_a_step_streams(tmp_path):
    """weight_bytes_by_part on real exports: each part's initializer bytes against the model's shapes
    (float32 dense: FFN 3 L d D, attention's MatMuls L d (q + k + v + o), LM head V d; the embedding
    lookup, the tied table's transposed read, counts nothing twice), and the profiled parts' tables."""
    from dsmoe_export.bench import e2e, graph_stats, node_times, report
    from dsmoe_export.exporter import export
    from dsmoe_export.synthetic import TinySpec, make_model_folder

    spec = TinySpec()
    folder = make_model_folder(tmp_path / "m", spec, seed=3)
    shape = e2e.ModelShape.of_folder(folder)
    d, D, L, V, hd = shape.ffn.d, shape.ffn.D, shape.layers, shape.vocab, shape.head_size
    paths = {}
    for name, dense in (("dense", True), ("sparse", False)):
        (tmp_path / name).mkdir()
        paths[name] = tmp_path / name / "model.onnx"
        export(folder, paths[name], dense=dense, progress=False, validate=False)
    dense = graph_stats.weight_bytes_by_part(paths["dense"], node_times.node_part)
    assert dense["ffn"] == 4 * 3 * L * d * D
    assert dense["attention projections"] == 4 * L * d * hd * (2 * shape.heads + 2 * shape.kv_heads)
    assert dense["lm_head"] == 4 * V * d
    assert dense.get("norms", 0) == 4 * (2 * L + 1) * d
    assert dense.get("attention", 0) == 0 and dense.get("rest", 0) < 1024  # rotary caches: a row a step
    sparse = graph_stats.weight_bytes_by_part(paths["sparse"], node_times.node_part)
    n, B = shape.ffn.n, shape.ffn.block
    padded = -(-B // 32) * 32              # gate/up in slabs of 32 rows (the float32 default), each block padded
    ffn = 4 * (2 * L * n * padded * d + L * d * D + L * n * d)  # + the routers (and their biases, if any)
    assert ffn <= sparse["ffn"] <= ffn + 4 * L * n
    assert {k: v for k, v in sparse.items() if k != "ffn"} == {k: v for k, v in dense.items() if k != "ffn"}
    (tmp_path / "int4").mkdir()
    export(folder, tmp_path / "int4" / "model.onnx", dense=True, progress=False, validate=False, ffn_weights="int4")
    int4 = graph_stats.weight_bytes_by_part(tmp_path / "int4" / "model.onnx", node_times.node_part)
    assert int4["ffn"] == 3 * L * d * D // 2 + 4 * 3 * L * d * D // 32       # nibbles + a float32 scale per 32
    assert int4["lm_head"] == V * d // 2 + 4 * V * d // 32 and int4.get("rest", 0) < 1024  # the lookup: none
    # the bound's s (e2e.ffn_byte_share, from the shapes) is the FFN's share of these parts' bytes
    for precision, parts in (("fp32", dense), ("int4", int4)):
        streamed = parts["ffn"] + parts["attention projections"] + parts["lm_head"]
        assert e2e.ffn_byte_share(shape, precision) == pytest.approx(parts["ffn"] / streamed)

    parts = dict.fromkeys(node_times.PARTS, 0.5) | {"ffn": 2.0}
    rows = [{"phase": "decode", "past": 128, "kind": "dense", "variant": "dense", "node_ms_parts_median": parts},
            {"phase": "decode", "past": 128, "kind": "sparse", "variant": "sparse", "r": 0.5,
             "node_ms_parts_median": parts | {"ffn": 1.0}}]
    big = {"dense": {"ffn": 40 << 20, "lm_head": 10 << 20, "norms": 4096},
           "sparse": {"ffn": 40 << 20, "lm_head": 10 << 20, "norms": 4096}}
    lines = report.decode_parts_table(rows, {"weight_bytes_parts": big})
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines
             if line.startswith("| ") and not line.startswith("| part")}
    assert cells["ffn"][0] == f"2.00 (44 %, {(40 << 20) / 2e6:.1f} GB/s)"   # of 2 + 5 x 0.5 ms
    assert cells["ffn"][1] == f"1.00 (29 %, {(20 << 20) / 1e6:.1f} GB/s)"   # r of the sparse op's blocks
    assert cells["norms"][0] == "0.50 (11 %)"                                 # under 1 MiB: no rate
    assert cells["all"][0] == f"4.50 (100 %, {(50 << 20) / 4.5e6:.1f} GB/s)"
    assert report.decode_parts_table([{"phase": "decode"}], None) == []


def test_matmul_chain_probe_computes_its_chain_and_accounts_its_bytes(rng):
    from dsmoe_export.bench import probes
    d, w, count = 24, 40, 4
    session, weights = probes.chain_session(d, w, count, 1, rng)
    assert [m.shape for m in weights] == [(d, w), (w, d), (d, w), (w, d)]
    x = rng.standard_normal((1, d)).astype(np.float32)
    want = x.astype(np.float64)
    for m in weights:
        want = want @ m.astype(np.float64)
    assert rel_err(session.run(None, {"x": x})[0], want) < RTOL
    rows = probes.matmul_chain(1, d=d, widths=(w, 3 * w), megabytes=1, rounds=2)
    assert [r["width"] for r in rows] == [w, 3 * w]
    for r in rows:
        assert r["nodes"] % 2 == 0 and r["nodes"] >= 2
        assert r["node_mb"] == pytest.approx(4 * d * r["width"] / 1e6)
        assert abs(r["nodes"] * r["node_mb"] * 1e6 - 2**20) <= 4 * d * r["width"]  # about 1 MB in all
        assert r["ms"] > 0 and r["gb_s"] == pytest.approx(r["nodes"] * r["node_mb"] / r["ms"])  # MB / ms = GB/s
    ref = rows[-1]  # the largest nodes: the reference rate, so no time beyond it
    for r in rows:  # ms beyond what the bytes take at the reference rate (MB / (GB/s) = ms), per node
        beyond_ms = r["ms"] - r["nodes"] * r["node_mb"] / ref["gb_s"]
        assert r["extra_us_per_node"] == pytest.approx(beyond_ms * 1e3 / r["nodes"], abs=1e-6)
    assert ref["extra_us_per_node"] == pytest.approx(0.0, abs=1e-6)


def test_probes_command_prints_the_chain_table(monkeypatch, capsys):
    from dsmoe_export.bench import probes
    monkeypatch.setattr(probes, "bandwidth", lambda threads: {"bandwidth_gb_s": 1.0, "bandwidth_probe": "stub",
                                                              "bandwidth_bytes": 2**20})
    probes.main(["--threads", "1", "--d", "16", "--widths", "16,32", "--megabytes", "1", "--rounds", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("1 threads; read bandwidth 1.0 GB/s (stub")
    assert lines[1].startswith("| nodes | MB a node |") and len(lines) == 5


@pytest.mark.parametrize("args,message", [(["--widths", "16,x"], "comma-separated integers"),
                                          (["--widths", "16,16"], "each width once"),
                                          (["--rounds", "0"], "at least 1"), (["--d", "-4"], "at least 1")])
def test_probes_command_refuses_bad_arguments(capsys, args, message):
    from dsmoe_export.bench import probes
    with pytest.raises(SystemExit) as e:
        probes.main(args)
    assert e.value.code == 2 and message in capsys.readouterr().err
