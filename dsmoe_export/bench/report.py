"""The benchmark's outputs: ``results.json`` (everything), ``results.md`` (tables) and
``results.png`` (plots; needs matplotlib, the ``bench`` extra: without it the PNG is skipped
with a note and the JSON and markdown are still written)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np


def write_json(path: Path, results: dict) -> None:
    path.write_text(json.dumps(results, indent=1, default=_json_default) + "\n")


def _json_default(value):
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# --------------------------------------------------------------------------- markdown

def _f(value, digits=2, suffix=""):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}{suffix}"


def _pct(value):
    return "-" if value is None else f"{value:.0f}%"


def _routing_label(row) -> str:
    return f"k={row['k']}" if row["mode"] == "exact" else "natural"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + \
        ["| " + " | ".join(r) + " |" for r in rows]


def op_tables(rows: list[dict]) -> list[str]:
    lines = []
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    for shape in shapes:
        mine = [r for r in rows if r["shape"] == shape]
        lines += [f"### Op level, {shape}", ""]
        dense = {r["tokens"]: r for r in mine if r["kind"] == "dense"}
        lines += ["Dense FFN (three MatMuls), per token count: "
                  + "; ".join(f"T={t}: {_f(r['ms_min'], 2)} ms, {_f(r.get('gb_s'), 1)} GB/s "
                              f"({_pct(r.get('gb_s_pct'))} of bw), {_f(r.get('gflop_s'), 0)} GFLOP/s "
                              f"({_pct(r.get('gflop_s_pct'))} of GEMM)" for t, r in dense.items()), ""]
        moe = {(r["tokens"], r["mode"], r["k"]): r for r in mine if r["kind"] == "moe"}
        # --compare-layouts: the same op with down_weight in the other layout (older runs: tiled was the
        # only default and rows the other).
        other_kinds = {"sparse_rows": "rows", "sparse_tiled": "tiled"}
        rows_layout = {(r["tokens"], r["mode"], r["k"]): r for r in mine if r["kind"] in other_kinds}
        other = next((other_kinds[r["kind"]] for r in mine if r["kind"] in other_kinds), None)
        default = next((r.get("layout", "tiled") for r in mine if r["kind"] == "sparse"), "tiled")
        table = []
        for r in (r for r in mine if r["kind"] == "sparse"):
            m = moe.get((r["tokens"], r["mode"], r["k"]))
            d = dense[r["tokens"]]
            lay = rows_layout.get((r["tokens"], r["mode"], r["k"]))
            table.append([
                str(r["tokens"]), _routing_label(r), _f(r["r"], 3), f"{r['union']}/{r['n']}",
                f"{_f(r['ms_min'])} / {_f(r['ms_median'])}", _f(m["ms_min"]) if m else "-", _f(d["ms_min"]),
                f"**{_f(r['ratio_min'], 3)}**", _f(r["target"], 3), _f(m["ratio_min"], 3) if m else "-",
                _f(m["ms_min"] / r["ms_min"], 2) if m else "-",
                f"{_f(r.get('gb_s'), 1)} ({_pct(r.get('gb_s_pct'))})",
                f"{_f(r.get('gflop_s'), 0)} ({_pct(r.get('gflop_s_pct'))})", _pct(100 * r["of_roofline"])
                if r.get("of_roofline") is not None else "-"])
            if rows_layout:
                table[-1] += [_f(lay["ms_min"]), _f(lay["ms_min"] / r["ms_min"], 3)] if lay else ["-", "-"]
        header = ["T", "routing", "r", "union", "sparse ms (min / med)", "MoE ms", "dense ms", "sparse/dense",
                  "target", "MoE/dense", "MoE/sparse", "sparse GB/s (% bw)", "sparse GFLOP/s (% GEMM)",
                  "sparse % of roofline"]
        lines += _table(header + ([f"{other}-layout ms", f"{other}/{default}"] if rows_layout else []), table)
        lines.append("")
    return lines


def quant_tables(rows: list[dict], checks: list[dict]) -> list[str]:
    """Weight-only quantized variants (``--precisions``): the sparse op against the dense FFN at the
    same precision (MatMulNBits), com.microsoft.QMoE, and the float32 sparse op."""
    lines = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        mine = [r for r in rows if r["shape"] == shape]
        lines += [f"### Op level, weight-only quantized, {shape} (group size {mine[0]['group_size']})", ""]
        dense = {(r["tokens"], r["kind"]): r for r in mine if r["kind"].startswith("dense")}
        lines += ["Dense FFN per precision: " + "; ".join(
            f"T={t} {k}: {_f(r['ms_min'], 2)} ms" for (t, k), r in dense.items()), ""]
        qmoe = {(r["tokens"], r["mode"], r["k"], r["precision"]): r for r in mine if r["kind"].startswith("qmoe")}
        table = []
        for r in (r for r in mine if r["kind"].startswith(("sparse-", "sparsei8-"))):
            q = qmoe.get((r["tokens"], r["mode"], r["k"], r["precision"]))
            weights = r["precision"] + (", int8 activations" if r["kind"].startswith("sparsei8-") else "")
            table.append([
                str(r["tokens"]), _routing_label(r), _f(r["r"], 3), f"{r['union']}/{r['n']}", weights,
                f"{_f(r['ms_min'])} / {_f(r['ms_median'])}", _f(r["fp32_sparse_ms_min"]),
                f"**{_f(r['speedup_vs_fp32'], 2)}x**", _f(r.get("dense_ms_min")) + f" ({r.get('dense_kind')})",
                f"**{_f(r.get('ratio_min'), 3)}**", _f(r["target"], 3), _f(r.get("densei8_ms_min")),
                _f(r.get("ratio_i8_min"), 3), _f(q["ms_min"]) if q else "-",
                _f(q["ms_min"] / r["ms_min"], 2) if q else "-",
                f"{_f(r.get('gb_s'), 1)} ({_pct(r.get('gb_s_pct'))})"])
        lines += _table(["T", "routing", "r", "union", "weights", "sparse ms (min / med)", "fp32 sparse ms",
                         "speed-up vs fp32 sparse", "dense ms (same precision)", "sparse/dense", "target",
                         "dense ms, int8 activations", "sparse/that", "QMoE ms", "QMoE/sparse", "sparse GB/s of stored weights (% bw)"], table)
        lines.append("")
    for c in checks:
        agree = "; ".join(f"{k.removeprefix('qmoe_vs_sparse_')}: {v:.2g}" for k, v in c.items()
                          if k.startswith("qmoe_vs_sparse_"))
        if agree:
            lines += [f"QMoE vs sparse op, same quantized blocks ({c['shape']}): {agree} (int8 QMoE quantizes the "
                      "activations to int8 on the CPU EP; int4 keeps them float32).", ""]
    return lines


def e2e_table(rows: list[dict]) -> list[str]:
    rows = [r for r in rows if r["phase"] != "generate" and r.get("precision", "fp32") == "fp32"]
    if not rows:
        return []
    lines = ["### End to end, sparse vs dense export (float32)", ""]
    keyed = {}
    for r in rows:
        keyed.setdefault((r["phase"], r["tokens"], r["past"]), {})[r["kind"]] = r
    table = []
    for (phase, T, past), kinds in keyed.items():
        s, d, a = kinds["sparse"], kinds["dense"], kinds["attn"]
        label = f"prefill {T}" if phase == "prefill" else f"decode (past {past})"
        table.append([label, _f(s["r"], 3), _f(s["union"], 2), f"{_f(s['ms_min'])} / {_f(s['ms_median'])}",
                      f"{_f(d['ms_min'])} / {_f(d['ms_median'])}", _f(a["ms_min"]), _f(s["ratio_min"], 3),
                      f"**{_f(s['ffn_ratio_min'], 3)}**", _f(s["ffn_ratio_median"], 3),
                      f"**{_f(s.get('ffn_node_ratio_min'), 3)}** / {_f(s.get('ffn_node_ratio_median'), 3)}",
                      f"{_f(s.get('ffn_node_ms_min'))} / {_f(d.get('ffn_node_ms_min'))}",
                      f"{_f(s.get('op_fixed_us_min'), 0)} "
                      f"({_pct(100 * s['op_fixed_share'] if 'op_fixed_share' in s else None)})",
                      _f(s["target"], 3),
                      f"{_f(s.get('ffn_gb_s'), 1)} / {_f(d.get('ffn_gb_s'), 1)}",
                      f"{_f(s.get('ffn_gflop_s'), 0)} / {_f(d.get('ffn_gflop_s'), 0)}",
                      f"{_f(s.get('projected_vs_sparse_min'), 3)} / {_f(s.get('projected_vs_sparse_median'), 3)}"])
    lines += _table(["phase", "r", "union", "sparse ms (min / med)", "dense ms (min / med)", "attn-only ms",
                     "model sparse/dense", "FFN sparse/dense (min)", "FFN (median)",
                     "FFN node time sparse/dense (min / med)", "FFN node ms sparse / dense",
                     "op fixed cost, us a call (share of the sparse FFN)", "target",
                     "FFN GB/s sparse / dense", "FFN GFLOP/s sparse / dense",
                     "--ffn-node projected export / sparse (min / med)"], table)
    return lines + ["FFN sparse/dense: (model - attn-only export) per variant; FFN node time: the FFN nodes' "
                    "kernel time in profiled calls of the same exports (bench/node_times.py); last column: "
                    "the export with ProjectedSparseFFN nodes (docs/exporting.md), timed beside them; op fixed cost: "
                    "one call of the op at this shape with no block active, times the layers as a share of "
                    "the sparse FFN's node time (bench/fixed_cost.py).", ""]


def proportional_ratio(sparse: dict | None, dense: dict | None, attn: dict | None) -> tuple[float, float] | None:
    """What the sparse export's time over our dense export's would be if its FFN took exactly r of
    the dense FFN's time (no fixed cost, no loss per block): 1 - t (1 - r), with t = (dense - attn)
    / dense the FFN's share of the dense export's time, by minima; and t. None without the
    attention-only export's row."""
    if sparse is None or dense is None or attn is None or "r" not in sparse:
        return None
    t = (dense["ms_min"] - attn["ms_min"]) / dense["ms_min"]
    return 1 - t * (1 - sparse["r"]), t


def paired_ratio(row: dict | None, base: dict) -> tuple[float, float, float] | None:
    """row's time over base's round by round (each variant's time in a round: the median of its
    sessions' samples of that round), as the median and quartiles of those ratios. Both were timed
    in every round, close in time, so drifts of the machine's speed that the minima catch in one
    variant and not the other cancel. None for runs recorded without their samples."""
    if row is None or "ms_session_samples" not in row or "ms_session_samples" not in base:
        return None
    a, b = (np.median(np.asarray(r["ms_session_samples"], float), axis=0) for r in (row, base))
    if a.shape != b.shape or not a.size:
        return None
    q1, med, q3 = np.percentile(a / b, [25, 50, 75])
    return float(med), float(q1), float(q3)


def paired_speed(row: dict | None, base: dict | None) -> tuple[float, float, float] | None:
    """Generation: row's tokens/s over base's, round by round (base's time over row's in the same
    round of the same process: each process of one runner ran beside the same-numbered process of
    the other, every variant once a round), as the median and quartiles over every (process, round)
    pair. None for runs recorded without their samples."""
    if row is None or base is None or "ms_process_samples" not in row or "ms_process_samples" not in base:
        return None
    a, b = (np.asarray(r["ms_process_samples"], float) for r in (row, base))
    if a.shape != b.shape or not a.size:
        return None
    q1, med, q3 = np.percentile((b / a).ravel(), [25, 50, 75])
    return float(med), float(q1), float(q3)


def _paired(value) -> str:
    return "-" if value is None else f"{value[0]:.3f} [{value[1]:.3f}, {value[2]:.3f}]"


def builder_tables(rows: list[dict], info: dict | None) -> list[str]:
    """Our exports against onnxruntime-genai's model builder's model of the same weights, per precision."""
    info = info or {}
    if not info.get("builder"):
        return []
    lines = ["### End to end, against onnxruntime-genai's model builder (same weights)", ""]
    timed = [r for r in rows if r["phase"] != "generate" and r["kind"] in ("builder", "dense", "sparse", "attn")]
    keyed: dict = {}
    for r in timed:
        keyed.setdefault((r["precision"], r["phase"], r["tokens"], r["past"]), {})[r["kind"]] = r
    share = info.get("ffn_byte_share", {})
    table = []
    for (precision, phase, T, past), kinds in keyed.items():
        b, d, s = kinds.get("builder"), kinds.get("dense"), kinds.get("sparse")
        if b is None:
            continue
        bound = None  # the issue's: float32 1 - s (1 - r) + 0.05, int4 under the builder's
        if s is not None and phase == "decode" and precision in share:
            bound = 1 - share[precision] * (1 - s["r"]) + 0.05 if precision == "fp32" else 1.0
        ideal = proportional_ratio(s, d, kinds.get("attn"))
        label = f"prefill {T}" if phase == "prefill" else f"decode (past {past})"
        table.append([precision, label, f"{_f(b['ms_min'])} / {_f(b['ms_median'])}",
                      f"{_f(d['ms_min'])} / {_f(d['ms_median'])}" if d else "-",
                      f"**{_f(d['vs_builder_min'], 3)}**" if d else "-", _paired(paired_ratio(d, b)),
                      f"{_f(s['ms_min'])} / {_f(s['ms_median'])}" if s else "-",
                      f"**{_f(s['vs_builder_min'], 3)}**" if s else "-", _f(s["vs_builder_median"], 3) if s else "-",
                      _paired(paired_ratio(s, b)),
                      _f(s.get("r"), 3) if s else "-", _f(bound, 3),
                      f"{_f(ideal[0], 3)} ({_f(ideal[1], 3)})" if ideal else "-",
                      _f(s.get("projected_vs_builder_min"), 3) if s else "-"])
    lines += _table(["weights", "phase", "builder ms (min / med)", "our dense ms", "dense/builder", "(paired)",
                     "our sparse ms", "sparse/builder (min)", "(median)", "(paired rounds: median [quartiles])", "r",
                     "decode bound (fp32 1 - s(1 - r) + 0.05, int4 1)",
                     "proportional op / our dense (t)", "--ffn-node projected / builder"], table)
    lines += ["", "s, the FFN's share of the weight bytes a decode step reads: "
              + ", ".join(f"{p} {v:.3f}" for p, v in share.items()) + ". Proportional op: the sparse "
              "export's time over our dense export's if its FFN took exactly r of the dense FFN's time, "
              "1 - t (1 - r), with t = (dense - attn) / dense the FFN's share of our dense export's time by "
              "minima, from the attention-only export (float32 only); the bound assumes t = s and our dense = "
              "the builder's. Paired rounds: the ratio of the two "
              "variants' times in each round (the median of each one's sessions there), median and quartiles "
              "over the rounds.", ""]
    gen = [r for r in rows if r["phase"] == "generate"]
    if gen:
        base = {(r["precision"]): r for r in gen if r["kind"] == "builder" and r["runner"] == "genai"}
        in_genai = {r["variant"]: r for r in gen if r["runner"] == "genai"}
        table = []
        for r in gen:
            ref = base.get(r["precision"])
            # DSMoESession against onnxruntime-genai's generator on the same export
            twin = in_genai.get(r["variant"]) if r["runner"] != "genai" else None
            # The decode step against the builder's with the workers spinning (the timed rows'
            # workers sleep): its tokens/s over ours.
            step = (ref["decode_tokens_s"] / r["decode_tokens_s"]
                    if ref and ref.get("decode_tokens_s") and r.get("decode_tokens_s") else None)
            table.append([r["variant"], r["runner"], f"**{_f(r['tokens_s'], 1)}**", _f(r["tokens_s_median"], 1),
                          _f(r["tokens_s"] / ref["tokens_s"], 3) if ref else "-",
                          _paired(paired_speed(r, ref)) if ref is not None and ref is not r else "-",
                          _f(r["tokens_s"] / twin["tokens_s"], 3) if twin else "-",
                          _paired(paired_speed(r, twin)) if twin else "-", _f(r["prefill_ms_min"], 1),
                          _f(r.get("decode_tokens_s"), 1), _f(step, 3) if step else "-",
                          f"{r['rounds']} x {r.get('processes', 1)}"])
        lines += [f"Greedy generation of {gen[0]['tokens']} tokens after a prompt of {gen[0]['past']} "
                  "(whole call: the prompt's prefill included), batch 1; each runner in processes of its own, "
                  "best: the median over the processes of each one's best; paired rounds: tokens/s over the "
                  "other's in the same round of the same process, median and quartiles over all of them:", ""]
        lines += _table(["variant", "runner", "tokens/s (best)", "tokens/s (median)", "vs builder in genai",
                         "(paired rounds: median [quartiles])", "vs genai's generator, same export", "(paired)",
                         "prefill ms", "decode tokens/s", "decode step / builder's", "rounds x processes"], table)
        lines.append("")
    nodes = info.get("nodes") or {}
    if nodes:
        lines += ["Nodes as ONNX Runtime runs them (after its graph optimizations): "
                  + "; ".join(f"{k}: {v['total']} ({_f(v['per_layer'], 0)} per decoder layer)"
                              for k, v in nodes.items()) + ".", ""]
    return lines


def decode_parts_table(rows: list[dict], info: dict | None) -> list[str]:
    """Where a decode step's node time goes in the profiled twins (sparse and dense exports, each
    precision): per part of the graph its median kernel ms a step, share, and the weight bytes it
    streams over that time."""
    weights = (info or {}).get("weight_bytes_parts") or {}
    twins = [r for r in rows if r["phase"] == "decode" and r.get("node_ms_parts_median")]
    if not twins:
        return []
    parts = list(twins[0]["node_ms_parts_median"])
    table = []
    for part in parts + ["all"]:
        cells = [part]
        for r in twins:
            ms = r["node_ms_parts_median"]
            total = sum(ms.values())
            t = total if part == "all" else ms[part]
            w = dict(weights.get(r["variant"], {}))
            if r["kind"] == "sparse" and "ffn" in w:  # one token reads its active blocks: r of them
                w["ffn"] *= r.get("r", 1.0)
            b = sum(w.values()) if part == "all" else w.get(part, 0)
            rate = f", {b / (t * 1e6):.1f} GB/s" if b >= 1 << 20 and t > 0 else ""
            cells.append(f"{t:.2f} ({100 * t / total:.0f} %{rate})" if total else f"{t:.2f}")
        table.append(cells)
    lines = [f"Where a decode step's node time goes (past {twins[0]['past']}; ORT's profiler on twins of the "
             "exports, medians of the steps' kernel time by node name; GB/s: the part's weight bytes over its "
             "time, for parts that stream 1 MiB or more, the sparse op's FFN r of its blocks):", ""]
    lines += _table(["part"] + [f"{r['variant']} ms" for r in twins], table)
    return lines + [""]


def _blocking(blocking: dict | None) -> str:
    if not blocking:
        return ""
    panel = blocking.get("panel_slice_floats")
    return (f", CPU kernels blocked for a {blocking['l1d_bytes'] / 1024:g} KiB L1d (slab layout's k-slices of "
            f"{blocking['slab_slice_steps']} steps" + (f", packed panels' of {panel * 4 / 1024:g} KiB" if panel else "")
            + ")")


def markdown(results: dict) -> str:
    meta, ceil = results["meta"], results.get("ceilings") or {}
    lines = ["# dsmoe-export benchmark", "",
             f"- command: `{meta['command']}`",
             f"- date: {meta['date']}",
             f"- CPU: {meta['cpu']} ({meta['cores']} cores visible), {meta['threads']} ORT intra-op threads"
             + (f" ({meta['thread_pool']})" if meta.get("thread_pool") else ""),
             "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
             f"- op library: `{meta['library']}`" + _blocking(meta.get("cpu_cache_blocking")),
             f"- cache: {meta['cache']}", f"- rounds: {meta['rounds_note']}"]
    gate = meta.get("quiet_gate")
    if gate and gate["enabled"]:
        lines.append(f"- other load: each round waited for CPUs at most {100 * gate['max_busy']:.0f}% busy "
                     f"({gate['seconds_waited']:.0f} s waited in all); {gate['rounds_started_busy']} of "
                     f"{gate['rounds']} rounds started on a busy machine anyway")
    if "seconds" in meta:
        lines.append(f"- run time: {meta['seconds']:.0f} s")
    lines.append("")
    if ceil:
        lines += [f"Ceilings (measured by the tool in ONNX Runtime, best of the probes before and after the run): "
                  f"memory bandwidth **{_f(ceil['bandwidth_gb_s'], 1)} GB/s** ({ceil['bandwidth_probe']}), "
                  f"GEMM **{_f(ceil['gemm_gflop_s'], 0)} GFLOP/s** ({ceil['gemm_probe']}).", ""]
    lines += op_tables(results.get("op", []))
    lines += quant_tables(results.get("quant", []), results.get("quant_checks", []))
    lines += e2e_table(results.get("e2e", []))
    lines += builder_tables(results.get("e2e", []), results.get("e2e_info"))
    lines += decode_parts_table(results.get("e2e", []), results.get("e2e_info"))
    checks = results.get("checks") or []
    if checks:
        lines += ["### Agreement checks (max abs difference / max(1, max |ref|))", ""]
        lines += [f"- {c['shape']}: MoE vs sparse op {c['moe_vs_sparse']:.2g}; dense vs sparse with all blocks "
                  f"active {c['dense_vs_sparse_all_active']:.2g}" for c in checks]
        lines.append("")
    e2e_info = results.get("e2e_info")
    if e2e_info:
        prompt = f"; prompts: {e2e_info['prompt']}" if "prompt" in e2e_info else ""
        lines += [f"End-to-end model: {e2e_info['model']}{prompt}; exports validated against PyTorch: "
                  + "; ".join(f"{k}: {v}" for k, v in e2e_info["validation"].items()), ""]
    lines += LEGEND + [""]
    for note in results.get("notes", []):
        lines.append(f"Note: {note}")
    return "\n".join(lines).rstrip() + "\n"


LEGEND = [
    "Legend. Times in ms, min (and median) over interleaved rounds; ratios are min / min within the same "
    "rounds; end to end, each variant runs as several sessions (rows' `sessions`), its min the median of their "
    "minima. r = mean active blocks per token / n. union = blocks active for at least one token of the call "
    "(the weights a call must read). target = the issue's bound: r + 0.05 for T = 1, 1.15 r + 0.05 for prefill. "
    "MoE = com.microsoft.MoE (CPU EP, swiglu) fed the same blocks per token; MoE/sparse > 1 means the sparse op "
    "is faster. GB/s counts the weights read (union of active blocks; all for dense); GFLOP/s counts 6 B d per "
    "(token, block) pair computed; percentages are of the probed ceilings; % of roofline = "
    "max(bytes / bandwidth, FLOPs / GEMM rate) / time. End to end: FFN sparse/dense = (sparse - attn-only) / "
    "(dense - attn-only), the attn-only export being the same model with a negligible FFN. Generation: "
    "each runner (DSMoESession, onnxruntime-genai) in a process of its own, --e2e-sessions times over with fresh "
    "processes (a variant's best: the median of the processes' bests), onnxruntime's default thread "
    "spinning; decode step / builder's = the builder's decode tokens/s in genai over the row's (< 1: a "
    "shorter step than the builder's, with the workers spinning, where the timed rows' sleep).",
]


# --------------------------------------------------------------------------- plot

def plot(path: Path, results: dict) -> str | None:
    """Writes the PNG; returns a note instead when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install '.[bench]'): no PNG written"
    rows = results.get("op", [])
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    e2e_rows = results.get("e2e", [])
    if not shapes and not e2e_rows:
        return "no op-level or end-to-end rows: no PNG written"
    n_rows = len(shapes) + (1 if e2e_rows else 0)
    cols = 3 if shapes else 2  # op rows: 3 panels each; end to end: 2
    fig, axes = plt.subplots(n_rows, cols, figsize=(16 if shapes else 11, 4.6 * n_rows), squeeze=False)
    if e2e_rows:
        _plot_e2e(axes[-1], e2e_rows, results.get("e2e_info", {}).get("model", ""))
    for row_axes, shape in zip(axes, shapes):
        mine = [r for r in rows if r["shape"] == shape]
        tokens = sorted({r["tokens"] for r in mine})
        colors = {t: plt.cm.viridis(i / max(1, len(tokens) - 1)) for i, t in enumerate(tokens)}
        ax_ratio, ax_ms, ax_tok = row_axes
        for T in tokens:
            for kind, style in (("sparse", "-o"), ("moe", "--x")):
                pts = sorted((r["r"], r["ratio_min"], r["ms_min"]) for r in mine
                             if r["tokens"] == T and r["kind"] == kind and r["mode"] == "exact")
                if pts:
                    rs, ratio, ms = zip(*pts)
                    label = f"{'sparse op' if kind == 'sparse' else 'ORT MoE'} T={T}"
                    ax_ratio.plot(rs, ratio, style, color=colors[T], label=label, ms=4)
                    ax_ms.plot(rs, ms, style, color=colors[T], label=label, ms=4)
        ax_ratio.plot([0, 1], [0, 1], ":", color="grey", label="ideal: ratio = r")
        ax_ratio.set(xlabel="active fraction r = k / n", ylabel="time / dense time", title=f"{shape}: ratio vs r")
        ax_ms.set(xlabel="active fraction r = k / n", ylabel="ms (min)", yscale="log", title=f"{shape}: latency vs r")
        for kind, mode, style, label in (("dense", "all", "-s", "dense"),
                                         ("sparse", "natural", "-o", "sparse op, natural router"),
                                         ("moe", "natural", "--x", "ORT MoE, natural router")):
            pts = sorted((r["tokens"], r["ms_min"]) for r in mine if r["kind"] == kind and r["mode"] == mode)
            if pts:
                ax_tok.plot(*zip(*pts), style, label=label)
        ax_tok.set(xlabel="tokens per call", ylabel="ms (min)", xscale="log", yscale="log",
                   title=f"{shape}: latency vs tokens")
        for ax in row_axes:
            ax.grid(True, alpha=0.3)
        ax_ratio.legend(fontsize=6, ncol=2)
        ax_tok.legend(fontsize=7)
    meta = results["meta"]
    fig.suptitle(f"dsmoe-export benchmark, {meta['cpu']}, {meta['threads']} threads, {meta['date']}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # a band for the title above the panels
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def _plot_e2e(row_axes, rows: list[dict], model: str) -> None:
    """Per phase: the three exports' latency, and the sparse/dense ratios next to r and the target."""
    import numpy as np

    keyed: dict = {}
    for r in rows:
        if r["phase"] != "generate" and r.get("precision", "fp32") == "fp32" and r["kind"] in ("sparse", "dense", "attn"):
            keyed.setdefault((r["phase"], r["tokens"], r["past"]), {})[r["kind"]] = r
    labels = [f"prefill {T}" if phase == "prefill" else f"decode\n(past {past})" for phase, T, past in keyed]
    x = np.arange(len(keyed))
    ax_ms, ax_ratio = row_axes[:2]
    for i, (kind, label) in enumerate((("sparse", "sparse export"), ("dense", "dense export"),
                                       ("attn", "attention-only export"))):
        ax_ms.bar(x + (i - 1) * 0.27, [k[kind]["ms_min"] for k in keyed.values()], 0.27, label=label)
    ax_ms.set(xticks=x, xticklabels=labels, ylabel="ms (min)", yscale="log", title="end to end: latency")
    sparse = [k["sparse"] for k in keyed.values()]
    ax_ratio.bar(x - 0.2, [r["ratio_min"] for r in sparse], 0.4, label="whole model sparse/dense")
    ax_ratio.bar(x + 0.2, [r["ffn_ratio_min"] for r in sparse], 0.4, label="FFN share sparse/dense")
    ax_ratio.plot(x + 0.2, [r["r"] for r in sparse], "ko", ms=5, label="r (active fraction)")
    ax_ratio.plot(x + 0.2, [r["target"] for r in sparse], "r_", ms=22, mew=2, label="target")
    top = max([1.3] + [1.1 * r[key] for r in sparse for key in ("ratio_min", "ffn_ratio_min")])
    ax_ratio.set(xticks=x, xticklabels=labels, ylabel="time / dense time", ylim=(0, top),
                 title="end to end: ratios" + (f" ({model.split(',')[0]})" if model else ""))
    for ax in (ax_ms, ax_ratio):
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in row_axes[2:]:
        ax.axis("off")


def write_all(out: Path, results: dict) -> dict[str, Path]:
    """results.json, results.md and (when matplotlib is there) results.png under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "png": out / "results.png"}
    note = plot(paths["png"], results)
    if note:
        results.setdefault("notes", []).append(note)
        del paths["png"]
    write_json(paths["json"], results)
    paths["markdown"].write_text(markdown(results))
    return paths


def main(argv: list[str] | None = None) -> int:
    """python -m dsmoe_export.bench.report RESULTS.json: render a recorded run's tables again."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m dsmoe_export.bench.report",
                                description="Print the markdown tables of a results.json (e.g. docs/results/*.json: "
                                            "the benchmark's runs, and bench.quality's --json).")
    p.add_argument("results", type=Path)
    p.add_argument("--png", type=Path, metavar="PATH", help="also draw its plots into PATH (needs matplotlib)")
    args = p.parse_args(argv)
    results = json.loads(args.results.read_text())
    if "candidates" in results:  # a run of bench.quality
        from .quality import table

        if args.png is not None:
            p.error(f"--png: {args.results} is a bench.quality run, which has no plots")
        print(table(results), end="")
        return 0
    print(markdown(results), end="")
    if args.png is not None:
        note = plot(args.png, results)
        if note:
            print(f"no plot: {note}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
