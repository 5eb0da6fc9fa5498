"""``python -m dsmoe_export.bench.layers``: L FFN layers back to back, their weights from DRAM,
the sparse op (one variant per op library build) against the dense FFN, in one process.

The op-level benchmark times single calls with the caches flushed before each; a model runs its
layers one after the other, each layer's weights evicted by the others'. This tool times that
setting, and is how docs/cpu-kernel-notes.md A/Bs two builds of the kernels ("30 layers from
DRAM"): L layers of random weights (each with its own router; all read the same input X, so
the layers are independent and each output is kept), ``--sessions`` ORT sessions per variant
(created in turns: timing.creation_order) with the benchmark's thread settings
(graphs.session_options), inputs and outputs bound once, all interleaved round after round.
Ratios are min / min (and median / median) against the dense FFN of the same weights, a
variant's min being the median of its sessions' minima.

    python -m dsmoe_export.bench.layers --shape 576x1536x16 --layers 30 --tokens 1,128 \\
        --library build/a/libdsmoe_ops.so --library build/b/libdsmoe_ops.so

``--weights int4`` (or int8, float16) times the quantized ops instead (docs/quant-kernel-notes.md),
against the dense FFN as MatMulNBits at the same bits and ``--accuracy-level`` (float16: the
float32 MatMuls, as the op-level benchmark does).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from onnx import helper

from .. import onnx_op, quant
from . import graphs, op, timing

WEIGHTS = ("float32", *graphs.PRECISIONS)


@dataclass
class Layers:
    """L layers' weights: router [n, d] and Experts (the op's layout) per layer."""
    routers: list[np.ndarray]
    experts: list[graphs.Experts]

    @classmethod
    def random(cls, rng: np.random.Generator, shape: op.Shape, layers: int) -> "Layers":
        scale = np.float32(1.0 / np.sqrt(shape.d))
        return cls([rng.standard_normal((shape.n, shape.d), dtype=np.float32) * scale for _ in range(layers)],
                   [graphs.Experts.random(rng, shape.d, shape.D, shape.n) for _ in range(layers)])


def _outputs(d: int, layers: int):
    return [graphs._value_info(f"Y{i}", ["T", d]) for i in range(layers)]


def _layer(model, arrays: dict, i: int, nodes: list, weights: dict) -> None:
    """Appends a one-layer graph of graphs.py (input X, output Y) as layer i: its initializers,
    graph inputs other than X (router_weight) and intermediate values get the suffix i, Y becomes
    Y{i}; the graph inputs become initializers from `arrays` (the router's under router_weight)."""
    produced = (n for node in model.graph.node for n in node.output if n)  # "": an omitted optional output
    rename = {name: f"{name}{i}" for name in [*arrays, *produced]}
    rename["Y"] = f"Y{i}"
    for node in model.graph.node:
        node.input[:] = [rename.get(name, name) for name in node.input]
        node.output[:] = [rename.get(name, name) for name in node.output]
        nodes.append(node)
    weights.update({rename[k]: v for k, v in arrays.items()})


def sparse_model(w: Layers, *, threshold: float, layout: str, weights: str = "float32",
                 group_size: int = quant.DEFAULT_GROUP_SIZE, gate_up_layout: str | None = None,
                 accuracy_level: int = 0):
    """One GatedBlockSparseFFN node per layer, down_weight in `layout` (rows | tiled), gate/up in
    `gate_up_layout` (rows | slabs; None: the exporter's default); with
    `weights` int4 / int8 / float16 the quantized op of that format (graphs.quant_sparse_graph:
    its own layout, at `accuracy_level`) instead."""
    d = w.experts[0].d
    nodes, arrays = [], {}
    attrs = {**graphs.OP_ATTRS, "threshold": threshold}
    for i, (router, e) in enumerate(zip(w.routers, w.experts)):
        if weights == "float32":
            names = [f"router{i}", f"gate{i}", f"up{i}", f"down{i}"]
            tiles = dict(down_tile=onnx_op.DOWN_LAYOUTS[layout],
                         gate_up_tile=onnx_op.GATE_UP_LAYOUTS[gate_up_layout or graphs.default_gate_up_layout()])
            arrays.update(zip(names, (router, *e.op_weights(**tiles).values())))
            nodes.append(onnx_op.make_node(["X", *names], [f"Y{i}", ""], num_experts=e.n, **attrs, **tiles))
            continue
        level = {"accuracy_level": accuracy_level} if accuracy_level else {}
        model, layer_arrays = graphs.quant_sparse_graph(e, weights, group_size, threshold=threshold, **level)
        _layer(model, {**layer_arrays, "router_weight": router}, i, nodes, arrays)
    return graphs._model(nodes, [graphs._value_info("X", ["T", d])], _outputs(d, len(nodes)), arrays,
                         extra_opsets=[helper.make_opsetid(onnx_op.DOMAIN, onnx_op.OP_VERSION)])


def dense_model(w: Layers, *, weights: str = "float32", group_size: int = quant.DEFAULT_GROUP_SIZE,
                accuracy_level: int = 0):
    """Per layer the dense SwiGLU FFN: three MatMuls (graphs.dense_graph's), or for int4 / int8
    three MatMulNBits at those bits (graphs.nbits_dense_graph's, at `accuracy_level`)."""
    d = w.experts[0].d
    nodes, arrays = [], {}
    for i, e in enumerate(w.experts):
        if weights not in quant.BITS:
            wg, wu, wd = e.dense_layout()
            arrays.update({f"W_gate{i}": wg, f"W_up{i}": wu, f"W_down{i}": wd})
            nodes += graphs.dense_ffn_nodes("X", f"Y{i}", suffix=str(i))
            continue
        _layer(*graphs.nbits_dense_graph(e, quant.BITS[weights], group_size, accuracy_level), i, nodes, arrays)
    extra = [helper.make_opsetid(graphs.MS_DOMAIN, 1)] if weights in quant.BITS else []
    return graphs._model(nodes, [graphs._value_info("X", ["T", d])], _outputs(d, len(w.experts)), arrays,
                         extra_opsets=extra)


# Sessions per variant, created in turns (timing.creation_order), so that no variant, the dense
# baseline included, always holds the slow first places of the process.
SESSIONS = 2


def timed_call(runner: graphs.Runner, x: np.ndarray):
    """A callable that runs the session on X with inputs and outputs bound once; returns its ms."""
    binding = runner.session.io_binding()
    value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x, np.float32))
    binding.bind_ortvalue_input("X", value)
    for name in runner.output_names:
        binding.bind_output(name, "cpu")
    session = runner.session

    def call() -> float:
        t = time.perf_counter()
        session.run_with_iobinding(binding)
        return (time.perf_counter() - t) * 1e3

    call.keep = value
    return call


def active_fraction(w: Layers, x: np.ndarray, threshold: float) -> float:
    """r: the mean fraction of blocks whose router score s = sigmoid(x . router_i) > threshold."""
    logit = np.log(threshold / (1.0 - threshold))
    return float(np.mean([(x.astype(np.float64) @ r.T.astype(np.float64)) > logit for r in w.routers]))


def run(shape: op.Shape, *, layers: int, tokens: list[int], libraries: list[str], threads: int | None,
        rounds: int, threshold: float = 0.5, layout: str | list[str] = "auto", seed: int = 0,
        weights: str = "float32", group_size: int = quant.DEFAULT_GROUP_SIZE, accuracy_level: int = 0,
        gate_up_layout: str | list[str] = "auto", op_accuracy_levels: tuple[int, ...] = (0,),
        sessions_per_variant: int = SESSIONS) -> list[dict]:
    """Rows {tokens, r, variant, library, layout, ms_min, ms_median, sessions, ratio_min, ratio_median}
    (ratios against dense; a variant's min the median of its sessions' minima, created in
    timing.creation_order): one sparse variant per library, down layout (`layout`: one or several) and
    gate/up layout (`gate_up_layout`: likewise; the layout column says "down/gate_up" then); the
    quantized `weights` have one layout of their own, and a variant per op accuracy_level in
    `op_accuracy_levels` (`accuracy_level`: the dense MatMulNBits')."""
    rng = np.random.default_rng(seed)
    w = Layers.random(rng, shape, layers)
    layouts = [graphs.default_layout(shape.d) if name == "auto" else name
               for name in ([layout] if isinstance(layout, str) else layout)]
    gate_ups = [graphs.default_gate_up_layout() if name == "auto" else name
                for name in ([gate_up_layout] if isinstance(gate_up_layout, str) else gate_up_layout)]
    if len(gate_ups) > 1:
        layouts = [f"{down}/{gu}" for down in layouts for gu in gate_ups]
    if weights != "float32":
        layouts = ["quantized"] if len(op_accuracy_levels) == 1 else [f"level{v}" for v in op_accuracy_levels]
    models = {"dense": (dense_model(w, weights=weights, group_size=group_size, accuracy_level=accuracy_level),
                        None)}
    variants = {}  # name -> (library, layout)
    for i, lib in enumerate(libraries):
        for name in layouts:
            variant = f"sparse{i}" if len(layouts) == 1 else f"sparse{i}-{name}"
            variants[variant] = (lib, name)
            down, _, gu = name.partition("/")
            level = int(name[5:]) if name.startswith("level") else op_accuracy_levels[0]
            models[variant] = (sparse_model(w, threshold=threshold, layout=down, weights=weights,
                                            group_size=group_size, gate_up_layout=gu or gate_ups[0],
                                            accuracy_level=level if weights != "float32" else 0), lib)
    sessions = timing.create_in_turns(list(models), sessions_per_variant,
                                      lambda name: graphs.Runner(*models[name][0], threads=threads,
                                                                 library=models[name][1]))
    rows = []
    for T in tokens:
        x = rng.standard_normal((T, shape.d), dtype=np.float32)
        calls = {key: timed_call(s, x) for key, s in sessions.items()}
        for call in calls.values():
            call()  # warm-up: code, ORT's allocations
        times = {key: [] for key in calls}
        for _ in range(rounds):
            for key in rng.permutation(list(calls)):
                times[key].append(calls[key]())
        r = active_fraction(w, x, threshold)
        per_variant = timing.by_variant({key: timing.Samples(t) for key, t in times.items()})
        dense = per_variant["dense"]
        for name in models:
            t = per_variant[name]
            lib, name_layout = variants.get(name, (None, None))
            rows.append({"tokens": T, "r": r, "variant": name, "library": lib, "layout": name_layout,
                         "ms_min": t.min, "ms_median": t.median, "sessions": sessions_per_variant,
                         "ratio_min": t.min / dense.min, "ratio_median": t.median / dense.median})
    return rows


def bound(tokens: int, r: float) -> float:
    """The CPU issues' bound: r + 0.05 for one token, 1.15 r + 0.05 for prefills."""
    return r + 0.05 if tokens == 1 else 1.15 * r + 0.05


def markdown(rows: list[dict], shape: op.Shape, layers: int, layout: str | list[str], weights: str = "float32",
             dense: str = "three MatMuls", gate_up_layout: str | list[str] = "auto") -> str:
    layout = layout if isinstance(layout, str) else " and ".join(layout)
    gate_up = gate_up_layout if isinstance(gate_up_layout, str) else " and ".join(gate_up_layout)
    if gate_up == "auto":
        gate_up = graphs.default_gate_up_layout()
    what = f"down layout {layout}, gate/up {gate_up}" if weights == "float32" else f"{weights} weights"
    lines = [f"{layers} layers of {shape.d}x{shape.D}, n = {shape.n}, {what}: sparse/dense ({dense}), "
             f"min / median over interleaved rounds, {rows[0].get('sessions', 1) if rows else '-'} sessions "
             "a variant", "",
             "| tokens | r | variant | ms (min / median) | sparse/dense (min) | (median) | bound |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        dense = row["variant"] == "dense"
        limit = bound(row["tokens"], row["r"])
        ratio = f"{row['ratio_min']:.3f}"
        ratios = " | " if dense else f"{f'**{ratio}**' if row['ratio_min'] <= limit else ratio} | {row['ratio_median']:.3f}"
        lines.append(f"| {row['tokens']} | {row['r']:.3f} | {row['variant']} | {row['ms_min']:.2f} / "
                     f"{row['ms_median']:.2f} | {ratios} | {'' if dense else f'{limit:.3f}'} |")
    lines += ["", "bold: within the bound (r + 0.05 for one token, 1.15 r + 0.05 for more)."]
    libraries = {row["variant"]: row["library"] for row in rows if row["library"]}
    lines += [f"{variant}: {lib}" for variant, lib in libraries.items()]
    return "\n".join(lines)


def _shape(text: str) -> op.Shape:
    try:
        return op.Shape.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsmoe_export.bench.layers", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=_shape, default=op.Shape.parse("576x1536x16"), help="dxDxn (default: 576x1536x16)")
    p.add_argument("--layers", type=int, default=30, help="layers (default: %(default)s; the weights should "
                   "exceed the last-level cache)")
    p.add_argument("--tokens", default="1,128", help="tokens per call, comma-separated (default: %(default)s)")
    p.add_argument("--library", action="append", default=None,
                   help="op library build to time (repeat for an A/B; default: the installed one)")
    p.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=10, help="timed rounds (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=0.5, help="router threshold (default: %(default)s, r ~ 0.5)")
    p.add_argument("--down-layout", default="auto",
                   help="down_weight layout: auto, rows or tiled, or several comma-separated (a variant each; "
                   "default: the exporter's for this d)")
    p.add_argument("--gate-up-layout", default="auto",
                   help="gate/up layout: auto, rows or slabs, or both comma-separated (a variant each, named "
                   "down/gate_up; default: the exporter's)")
    p.add_argument("--weights", choices=WEIGHTS, default="float32",
                   help="the op's weights: float32 (default) or a quantized op's format (int4, int8, float16)")
    p.add_argument("--group-size", type=int, default=quant.DEFAULT_GROUP_SIZE,
                   help="quantization group (int4 / int8; default: %(default)s)")
    p.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4), default=0,
                   help="MatMulNBits' accuracy_level for the dense int4 / int8 FFN (default: %(default)s, "
                   "float32 activations as the op has)")
    p.add_argument("--op-accuracy-level", default="0",
                   help="the int4 / int8 op's accuracy_level (4: X rounded to int8 per group), or several "
                   "comma-separated (a variant each; default: %(default)s)")
    p.add_argument("--sessions", type=int, default=SESSIONS,
                   help="sessions per variant, created in turns, each timed in every round; a variant's min is "
                   "the median of their minima (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        op_levels = tuple(int(v) for v in args.op_accuracy_level.split(","))
    except ValueError:
        p.error(f"--op-accuracy-level: expected comma-separated integers, got {args.op_accuracy_level!r}")
    if not op_levels or any(v not in quant.ACCURACY_LEVELS for v in op_levels) or len(set(op_levels)) < len(op_levels):
        p.error(f"--op-accuracy-level: expected levels 0 to 4, each once, got {args.op_accuracy_level!r}")
    if op_levels != (0,) and args.weights not in quant.BITS:
        p.error("--op-accuracy-level applies to int4 / int8 weights")
    try:
        tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    except ValueError:
        p.error(f"--tokens: expected comma-separated integers, got {args.tokens!r}")
    if not tokens or min(tokens) < 1:
        p.error(f"--tokens: expected positive integers, got {args.tokens!r}")
    if args.layers < 1 or args.rounds < 1 or args.threads < 1 or args.sessions < 1:
        p.error("--layers, --rounds, --threads and --sessions must be at least 1")
    if not 0.0 < args.threshold < 1.0:
        p.error(f"--threshold: expected a value in (0, 1), got {args.threshold}")
    from .cli import find_library

    libraries = [find_library(lib) for lib in args.library] if args.library else [find_library(None)]
    layout = [name.strip() for name in args.down_layout.split(",") if name.strip()]
    if not layout or any(name not in ("auto", "rows", "tiled") for name in layout) or len(set(layout)) < len(layout):
        p.error(f"--down-layout: expected auto, rows or tiled, comma-separated, no repeats; got {args.down_layout!r}")
    layout = [graphs.default_layout(args.shape.d) if name == "auto" else name for name in layout]
    twice = sorted({name for name in layout if layout.count(name) > 1})
    if twice:
        p.error(f"--down-layout: {args.down_layout!r} names the layout {twice[0]} twice "
                f"(auto is {graphs.default_layout(args.shape.d)} at d = {args.shape.d})")
    if args.weights != "float32" and args.down_layout != "auto":
        p.error(f"--down-layout applies to float32 weights; the {args.weights} op has one layout")
    gate_up = [name.strip() for name in args.gate_up_layout.split(",") if name.strip()]
    gate_up = [graphs.default_gate_up_layout() if name == "auto" else name for name in gate_up]
    if not gate_up or any(name not in onnx_op.GATE_UP_LAYOUTS for name in gate_up) or len(set(gate_up)) < len(gate_up):
        p.error(f"--gate-up-layout: expected auto, rows or slabs, comma-separated, each layout once; "
                f"got {args.gate_up_layout!r}")
    if args.weights != "float32" and args.gate_up_layout != "auto":
        p.error(f"--gate-up-layout applies to float32 weights; the {args.weights} op has one layout")
    if args.weights in quant.BITS:
        try:
            quant.check_group_size(args.group_size)
        except ValueError as e:
            p.error(f"--group-size: {e}")
    rows = run(args.shape, layers=args.layers, tokens=tokens, libraries=libraries, threads=args.threads,
               rounds=args.rounds, threshold=args.threshold, layout=layout, seed=args.seed, weights=args.weights,
               group_size=args.group_size, accuracy_level=args.accuracy_level, gate_up_layout=gate_up,
               op_accuracy_levels=op_levels, sessions_per_variant=args.sessions)
    dense = (f"MatMulNBits, {quant.BITS[args.weights]} bits, accuracy_level {args.accuracy_level}"
             if args.weights in quant.BITS else "three MatMuls")
    print(markdown(rows, args.shape, args.layers, layout, args.weights, dense, gate_up))
    return 0


if __name__ == "__main__":
    sys.exit(main())
