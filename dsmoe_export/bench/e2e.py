"""End to end: the sparse export against the ``--dense`` export of the same model and against the
dense model onnxruntime-genai's model builder makes from the same weights (builder.py), in ONNX
Runtime: prefill of T tokens and token-by-token decode with the KV cache, per weight precision
(float32, and with ``--e2e-precisions`` int4: weight-only int4 everywhere, as the builder's ``-p int4``).

Beside the sparse export, its twin with ``--ffn-node projected`` (variants "projected",
"projected-int4": o_proj, the norms and the next layer's QKV projection inside the FFN's node,
docs/exporting.md) is timed where the option applies.

A third export isolates the FFN: the same model with a negligible FFN (D = n, one row per
block), exported dense. Its time is the attention, embedding, norms and LM head of the other
two, so ``(sparse - attn) / (dense - attn)`` is the FFN-level sparse/dense ratio. Profiled twins of
the sparse and dense exports give the same ratio from the FFN nodes' own kernel time in the same
kind of calls (node_times.py): less noisy, and free of the assumption that the rest of the model
runs alone as fast as between the FFNs.

Decode runs as an app runs it: one preallocated cache buffer per tensor, bound as both past and
present (I/O binding), the prompt's keys and values written once before the timed steps.

The model is either random (:mod:`dsmoe_export.synthetic`: LLaMA + DSMoE routers, the router's
natural mix of k per token) or a DSMoE model folder (``--model``; its attention-only twin keeps
its weights but n rows of each FFN). Every export comes from
:func:`dsmoe_export.exporter.export` with validation on (checked against the PyTorch reference
before it is timed). The prompts are random token ids, or with a folder the token ids of a
text; the active fractions r are those of the PyTorch reference on the same ids.
"""
from __future__ import annotations

import ctypes
import gc
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ..checkpoint import load_state_dict, write_folder
from ..config import CONFIG_NAME, load_config
from ..exporter import export
from ..errors import ExportError
from ..graph import interface
from ..loader import load_model
from ..synthetic import TinySpec, make_model_folder, write_byte_tokenizer
from . import builder, fixed_cost, generation, graph_stats, graphs, metrics, node_times, timing
from .op import Shape, target_ratio

# Sessions timed per variant: on the development VM sessions of one model differ by up to 25 %,
# each keeping its level over a run (docs/benchmarks.md, "How far one run's ratios move"), so a
# variant's time is the median over its sessions of each one's minimum (timing.SessionSamples).
SESSIONS = 3

# Resident bytes of an open session per byte of its model files (ONNX Runtime holds the
# initializers and prepacks some MatMul weights beside them): 0.6-1.75 for the converted
# SmolLM2's nine exports (2.55 GB of files), 1.28 over all of them (Intel Xeon, ORT 1.31); the
# run's process with 5 sessions of each plus the profiled twins grew to 20 GB (1.44 a file byte,
# the reference model and buffers included) and was killed on a 24 GiB VM. MEMORY_HEADROOM: the
# share of MemAvailable a run may plan to fill.
SESSION_BYTES_PER_FILE_BYTE = 1.5
MEMORY_HEADROOM = 0.85


class NotEnoughMemory(RuntimeError):
    """The sessions a run would hold at once do not fit in the memory available."""


def model_bytes(path: Path) -> int:
    """An export's bytes on disk: the .onnx file and its external data beside it."""
    return sum(f.stat().st_size for f in Path(path).parent.glob(Path(path).name + "*") if f.is_file())


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none: not Linux)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(paths: dict[str, Path], sessions_per_variant: int, twins: dict[str, Path],
                 available: int | None = None) -> None:
    """Raises NotEnoughMemory, naming the figures and the options that shrink them, where the
    sessions of a run (sessions_per_variant of each export plus a profiled twin of each in
    `twins`) would not fit: the kernel would kill the run mid-way, without a word."""
    available = available_memory() if available is None else available
    files = sessions_per_variant * sum(model_bytes(p) for p in paths.values()) + sum(
        model_bytes(p) for p in twins.values())
    need = SESSION_BYTES_PER_FILE_BYTE * files
    if available is not None and need > MEMORY_HEADROOM * available:
        gib = 2**30
        raise NotEnoughMemory(
            f"the end-to-end run would hold {sessions_per_variant} sessions of each of {len(paths)} exports "
            f"(+ {len(twins)} profiled): about {need / gib:.1f} GiB ({files / gib:.1f} GiB of model files x "
            f"{SESSION_BYTES_PER_FILE_BYTE}), more than {MEMORY_HEADROOM:.0%} of the {available / gib:.1f} GiB "
            f"available (/proc/meminfo MemAvailable); use fewer --e2e-sessions or --e2e-precisions")


KINDS = ("sparse", "dense", "attn", "projected")
# Export options per precision: "int4" = int4 FFN blocks / MatMulNBits and int4 attention, lm_head and
# embedding, MatMulNBits at accuracy_level 4 (the builder's -p int4 -e cpu).
PRECISION_OPTIONS = {"fp32": {}, "int4": {"ffn_weights": "int4", "matmul_weights": "int4"}}


def variant_name(kind: str, precision: str) -> str:
    """"sparse", "dense", "builder" for float32; "sparse-int4", ... for the others."""
    return kind if precision == "fp32" else f"{kind}-{precision}"


@dataclass
class ModelShape:
    ffn: Shape
    layers: int = 2
    heads: int = 32
    kv_heads: int = 4
    vocab: int = 2048
    head_dim: int | None = None     # None: d / heads
    folder: Path | None = None      # a DSMoE model folder instead of a random model

    @classmethod
    def of_folder(cls, model_dir: str | Path) -> "ModelShape":
        """The shape of a DSMoE model folder (config.json checked as the exporter checks it)."""
        cfg = load_config(model_dir)
        return cls(ffn=Shape(cfg.hidden_size, cfg.intermediate_size, cfg.dsmoe.num_experts),
                   layers=cfg.num_hidden_layers, heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
                   vocab=cfg.vocab_size, head_dim=cfg.head_dim, folder=Path(model_dir))

    def spec(self, *, ffn: bool = True) -> TinySpec:
        return TinySpec(vocab_size=self.vocab, hidden_size=self.ffn.d,
                        intermediate_size=self.ffn.D if ffn else self.ffn.n, num_hidden_layers=self.layers,
                        num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                        dsmoe={"num_experts": self.ffn.n, "threshold": 0.5})

    @property
    def head_size(self) -> int:
        return self.head_dim or self.ffn.d // self.heads

    @property
    def label(self) -> str:
        name = f"{self.folder.resolve().name}: " if self.folder is not None else ""
        return (f"{name}{self.layers} layers, {self.ffn.label}, {self.heads} heads / {self.kv_heads} KV heads, "
                f"vocab {self.vocab}")


def attention_only_folder(model_dir: Path, out: Path) -> Path:
    """A copy of a DSMoE folder whose FFNs keep n of their D rows (one per block): the same
    attention, embeddings, norms and LM head, a negligible FFN."""
    cfg = load_config(model_dir)
    n = cfg.dsmoe.num_experts
    tensors = load_state_dict(model_dir, cfg, with_routers=True)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}.mlp."
        for proj in ("gate_proj", "up_proj"):
            tensors[p + proj + ".weight"] = tensors[p + proj + ".weight"][:n].clone()
        tensors[p + "down_proj.weight"] = tensors[p + "down_proj.weight"][:, :n].clone()
    config = json.loads((Path(model_dir) / CONFIG_NAME).read_text(encoding="utf-8"))
    config["intermediate_size"] = n
    write_folder(out, config, tensors)
    return out


def build(out: Path, shape: ModelShape, *, seed: int, precisions: tuple[str, ...] = ("fp32",),
          builder_python: str | None = None, threads: int | None = None, bar=None) -> dict:
    """Model folders, the validated exports ({variant: ExportResult}) and the builder's models
    ({variant: path}; with `builder_python`)."""
    out.mkdir(parents=True, exist_ok=True)
    if shape.folder is not None:
        if bar is not None:
            bar.set_description("e2e attention-only copy")
        folders = {"model": shape.folder, "attn": attention_only_folder(shape.folder, out / "model-attn")}
    else:
        folders = {"model": make_model_folder(out / "model", shape.spec(), seed=seed, router_scale=1.0),
                   "attn": make_model_folder(out / "model-attn", shape.spec(ffn=False), seed=seed,
                                             router_scale=1.0)}
        write_byte_tokenizer(folders["model"])  # the builder copies a tokenizer
    plan = [("attn", "attn", True, "fp32")]
    for p in precisions:
        plan += [(variant_name("sparse", p), "model", False, p), (variant_name("dense", p), "model", True, p)]
    plan += [(variant_name("projected", p), "model", False, p) for p in precisions]
    results = {}
    for name, folder, dense, precision in plan:
        if bar is not None:
            bar.set_description(f"e2e export {name}")
        projected = name.partition("-")[0] == "projected"
        options = dict(PRECISION_OPTIONS[precision], ffn_node="projected" if projected else "auto")
        (out / name).mkdir(exist_ok=True)
        try:
            results[name] = export(folders[folder], out / name / "model.onnx", dense=dense, validate=True,
                                   progress=False, copy_tokenizer=True, genai=builder_python is not None, **options)
        except ExportError:
            if not projected:
                raise
            continue  # --ffn-node projected does not apply to this model (the error says why)
        if builder_python is not None and threads:
            builder.set_threads(out / name, threads)
        if bar is not None:
            bar.update(1)
    built = {}
    if builder_python is not None:
        for p in precisions:
            if bar is not None:
                bar.set_description(f"e2e model builder {p}")
            built[variant_name("builder", p)] = builder.build(builder_python, folders["model"],
                                                              out / variant_name("builder", p), p, threads=threads)
    return {"folders": folders, "exports": results, "builder": built}


def uses_library(variant: str) -> bool:
    return variant.partition("-")[0] in ("sparse", "projected")


def _session(path: Path, threads: int, library: str | None) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), graphs.session_options(threads, library), providers=["CPUExecutionProvider"])


def _prefill_feeds(ids: np.ndarray, shape: ModelShape) -> dict:
    b, s = ids.shape
    feeds = {"input_ids": ids, "attention_mask": np.ones((b, s), np.int64)}
    for name in interface.past_names(shape.layers):
        feeds[name] = np.zeros((b, shape.kv_heads, 0, shape.head_size), np.float32)
    return feeds


class Decoder:
    """Token-by-token decode of one session with a shared, preallocated KV cache (what
    dsmoe_runtime and onnxruntime-genai do): `prime` writes the prompt's keys and values once,
    `__call__` runs `len(steps)` single-token calls at slots past, past + 1, ..."""

    def __init__(self, session: ort.InferenceSession, shape: ModelShape, capacity: int):
        self.s, self.L = session, shape.layers
        self.cache = [ort.OrtValue.ortvalue_from_numpy(np.zeros((1, shape.kv_heads, capacity, shape.head_size),
                                                                np.float32)) for _ in range(2 * shape.layers)]

    def _call(self, ids: np.ndarray, total: int) -> None:
        binding = self.s.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", np.ones((1, total), np.int64))
        for value, past, present in zip(self.cache, interface.past_names(self.L), interface.present_names(self.L)):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        binding.bind_output("logits", "cpu")
        self.s.run_with_iobinding(binding)

    def prime(self, prompt: np.ndarray) -> None:
        self._call(prompt, prompt.shape[1])
        self.past = prompt.shape[1]

    def __call__(self, steps: np.ndarray) -> None:
        for i, tok in enumerate(steps):
            self._call(np.array([[tok]], np.int64), self.past + i + 1)


def reference_activity(model, prompt: np.ndarray, steps: np.ndarray) -> dict:
    """Active blocks in the PyTorch reference: per layer [T, n] for the prompt (prefill), and
    [steps, layers, n] for the decode steps that follow it."""
    ids = torch.from_numpy(prompt)
    with torch.no_grad():
        _, past = model(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None], model.empty_past(1))
        prefill = [m.last_active[0] for m in model.mlps]           # per layer [T, n]
        decode = []
        length = ids.shape[1]
        for tok in steps:
            step = torch.tensor([[int(tok)]])
            _, past = model(step, torch.ones(1, length + 1, dtype=torch.int64), torch.tensor([[length]]), past)
            decode.append(torch.stack([m.last_active[0, 0] for m in model.mlps]))  # [layers, n]
            length += 1
    n = prefill[0].shape[-1]
    return {"prefill": [a.numpy() for a in prefill],
            "decode": torch.stack(decode).numpy() if decode else np.zeros((0, len(prefill), n), bool)}


def _activity_stats(per_layer: list[np.ndarray]) -> dict:
    """mean k / r over layers and tokens; union = blocks active for any token, mean over layers."""
    n = per_layer[0].shape[-1]
    mean_k = float(np.mean([a.sum(-1).mean() for a in per_layer]))
    union = float(np.mean([a.any(0).sum() for a in per_layer]))
    return {"mean_k": mean_k, "r": mean_k / n, "union": union}


def run(out: Path, shape: ModelShape, *, prefill_tokens: list[int], decode_past: int, decode_steps: int,
        threads: int, library: str, rounds: int, flush: timing.Flusher, seed: int,
        gate: timing.QuietGate | None = None, budget_s: float | None = None, bar=None,
        token_ids: np.ndarray | None = None, precisions: tuple[str, ...] = ("fp32",),
        builder_python: str | None = None, gen_tokens: int = 0, gen_rounds: int = 3,
        sessions_per_variant: int = SESSIONS) -> tuple[list[dict], dict]:
    """Rows and run info. ``token_ids`` (1-D, at least tokens_needed() long): real text for the
    prompts and decode steps instead of random ids. ``builder_python``: the interpreter of
    onnxruntime-genai's model builder (builder.find_python), whose models join the comparison.
    ``gen_tokens`` > 0 adds generation throughput (generation.py). ``sessions_per_variant``:
    sessions timed per variant, all held at once, and processes per generation runner, one after
    the other (SESSIONS)."""
    built = build(out, shape, seed=seed, precisions=precisions, builder_python=builder_python, threads=threads,
                  bar=bar)
    exports = built["exports"]
    paths = {k: r.path for k, r in exports.items()} | built["builder"]
    info = {"model": shape.label, "decode_past": decode_past, "decode_steps": decode_steps,
            "precisions": list(precisions),
            "validation": {k: r.validation.summary() for k, r in exports.items()},
            "export_seconds": {k: round(r.seconds, 1) for k, r in exports.items()},
            "builder": sorted(built["builder"]) or None,
            "nodes": {k: graph_stats.node_counts(p, shape.layers, library) for k, p in paths.items()},
            "ffn_byte_share": {p: ffn_byte_share(shape, p) for p in precisions}}
    # The FFN's node time in the same calls, from profiled twins of the sparse and dense exports.
    twins = {k: p for k, p in paths.items() if k.partition("-")[0] in ("sparse", "dense")}
    info["weight_bytes_parts"] = {k: graph_stats.weight_bytes_by_part(p, node_times.node_part)
                                  for k, p in twins.items()}
    check_memory(paths, sessions_per_variant, twins)
    # The untimed session is dropped before the profiled twins open, which are at least as large:
    # check_memory's count holds.
    sessions = timing.create_in_turns(list(paths), sessions_per_variant,
                                      lambda k: _session(paths[k], threads, library if uses_library(k) else None))
    with node_times.ProfiledSessions(twins, threads, library) as profiled:
        rng = np.random.default_rng(seed)
        longest = max(prefill_tokens + [decode_past])
        if token_ids is not None:
            ids = np.asarray(token_ids, np.int64)
            prompt, steps = ids[None, :longest], ids[decode_past:decode_past + decode_steps]
            info["prompt"] = "text"
        else:
            prompt = rng.integers(0, shape.vocab, (1, longest), dtype=np.int64)
            steps = rng.integers(0, shape.vocab, decode_steps, dtype=np.int64)
            info["prompt"] = "random token ids"
        reference = load_model(built["folders"]["model"])[0]
        rows = []
        on_call = (lambda: bar.update(1)) if bar is not None else None

        # Prefill: one call of T tokens on an empty cache.
        for T in prefill_tokens:
            if bar is not None:
                bar.set_description(f"e2e prefill T={T}")
            feeds = _prefill_feeds(prompt[:, :T], shape)
            calls = {k: (lambda s=s: s.run(["logits"], feeds)) for k, s in sessions.items()}
            res = timing.interleaved(calls, rounds, flush=flush, gate=gate, warmup=1, seed=seed + T,
                                     budget_s=budget_s and budget_s * sessions_per_variant, on_call=on_call)
            _skip_unused(bar, res, rounds)
            res = timing.by_variant(res)
            profiled.measure(("prefill", T), lambda s, feeds=feeds: (lambda: s.run(["logits"], feeds)), rounds,
                             flush=flush, gate=gate, seed=seed + T)
            acts = reference_activity(reference, prompt[:, :T], steps[:0])
            rows += _rows("prefill", T, 0, res, _activity_stats(acts["prefill"]), shape)

        # Decode: decode_steps single-token calls after a prompt of decode_past tokens, each variant
        # on its own cache; a sample is the mean time per step of one sequence.
        if decode_steps:
            if bar is not None:
                bar.set_description(f"e2e decode (past {decode_past})")
            decoders = {k: Decoder(s, shape, decode_past + decode_steps) for k, s in sessions.items()}
            for d in decoders.values():
                d.prime(prompt[:, :decode_past])
            calls = {k: (lambda d=d: d(steps)) for k, d in decoders.items()}
            res = timing.interleaved(calls, rounds, flush=flush, gate=gate, warmup=1, seed=seed + 1,
                                     budget_s=budget_s and budget_s * sessions_per_variant, on_call=on_call)
            _skip_unused(bar, res, rounds)
            res = timing.by_variant({k: timing.Samples([t / decode_steps for t in v.ms]) for k, v in res.items()})

            def profiled_decoder(s):
                dec = Decoder(s, shape, decode_past + decode_steps)
                dec.prime(prompt[:, :decode_past])
                return lambda: dec(steps)

            profiled.measure(("decode", 1), profiled_decoder, rounds, runs_per_call=decode_steps, prep_runs=1,
                             flush=flush, gate=gate, seed=seed + 1)
            acts = reference_activity(reference, prompt[:, :decode_past], steps)
            mean_k = float(acts["decode"].sum(-1).mean())       # [steps, layers, n]: one token per call
            stats = {"mean_k": mean_k, "r": mean_k / shape.ffn.n, "union": mean_k}
            rows += _rows("decode", 1, decode_past, res, stats, shape)
            del decoders
        node = profiled.finish()
    for row in rows:
        times = node.get((row["phase"], row["tokens"]), {})
        row.update(node_times.ffn_node_fields(row["kind"], row["precision"], times, variant_name))
    # The op's per-call fixed cost at this FFN shape (no block active), per token count timed.
    fixed = fixed_cost.op_fixed_cost(shape.ffn, sorted({r["tokens"] for r in rows}), threads=threads,
                                     library=library, rounds=rounds, seed=seed)
    for row in rows:
        if row["variant"] == "sparse" and row["tokens"] in fixed:
            f = fixed[row["tokens"]]
            row.update(op_fixed_us_min=f.min, op_fixed_us_median=f.median)
            if row.get("ffn_node_ms_min"):
                row["op_fixed_share"] = shape.layers * f.min / 1e3 / row["ffn_node_ms_min"]
    del sessions, reference
    gc.collect()
    _return_freed_memory()  # the generation workers load every model again
    if gen_tokens:
        if bar is not None:
            bar.set_description(f"e2e generation ({gen_tokens} tokens)")
        rows += generation.run(paths, prompt[0, :decode_past].tolist(), gen_tokens, threads=threads,
                               library=library, rounds=gen_rounds, builder_python=builder_python, seed=seed,
                               processes=sessions_per_variant)
    return rows, info


def _return_freed_memory() -> None:
    """Hands the heap that the closed sessions freed back to the OS (glibc keeps it otherwise:
    3 sessions of each SmolLM2 export left ~14 GB resident)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def ffn_byte_share(shape: ModelShape, precision: str) -> float:
    """s: the FFN's share of the weight bytes one decode step reads (FFN, attention, lm_head; the
    embedding lookup reads one row)."""
    d, D, L = shape.ffn.d, shape.ffn.D, shape.layers
    hd = shape.head_size
    attn = L * d * hd * (2 * shape.heads + 2 * shape.kv_heads)
    per_weight = 4.0 if precision == "fp32" else 0.5 + 4.0 / 32  # int4 with float32 scales per 32
    ffn = 3 * L * d * D
    return ffn * per_weight / ((ffn + attn + shape.vocab * d) * per_weight)


def tokens_needed(prefill_tokens: list[int], decode_past: int, decode_steps: int) -> int:
    """Token ids a text prompt must provide for run()."""
    return max(prefill_tokens + [decode_past + decode_steps])


def _skip_unused(bar, res: dict, rounds: int) -> None:
    """Advance the progress bar past the rounds the time budget cut."""
    if bar is not None:
        bar.update(len(res) * (rounds - len(next(iter(res.values())).ms)))


def _rows(phase: str, T: int, past: int, res: dict, act: dict, shape: ModelShape) -> list[dict]:
    at = res["attn"]
    L, d, n, B = shape.layers, shape.ffn.d, shape.ffn.n, shape.ffn.block
    rows = []
    for name, samples in res.items():
        kind, _, precision = name.partition("-")
        precision = precision or "fp32"
        ffn_samples = samples
        dn = res[variant_name("dense", precision)] if kind != "attn" else res["dense"]
        row = {"level": "e2e", "phase": phase, "tokens": T, "past": past, "kind": kind, "precision": precision,
               "variant": name, "model": shape.label, **samples.summary(), "sessions": len(samples.per_session),
               "rounds": len(samples.ms) // len(samples.per_session),
               "ratio_min": samples.min / dn.min, "ratio_median": samples.median / dn.median}
        ref = res.get(variant_name("builder", precision))
        if ref is not None:
            row["vs_builder_min"] = samples.min / ref.min
            row["vs_builder_median"] = samples.median / ref.median
        if kind in ("sparse", "dense") and precision == "fp32":
            ffn_ms = ffn_samples.min - at.min
            if kind == "sparse":
                row.update(act)
                row["ffn_ratio_min"] = ffn_ms / (dn.min - at.min)
                row["ffn_ratio_median"] = (ffn_samples.median - at.median) / (dn.median - at.median)
                row["target"] = target_ratio(T, act["r"])
                union, pairs = act["union"], act["mean_k"] * T
            else:
                union, pairs = n, n * T
            bytes_, flops = metrics.call_cost(kind, d=d, n=n, B=B, tokens=T, union=union, pairs=pairs)
            row.update(ffn_ms=ffn_ms, ffn_bytes=L * bytes_, ffn_flops=L * flops)
        elif kind in ("sparse", "projected"):
            row.update(act)
        projected = res.get(variant_name("projected", precision)) if kind == "sparse" else None
        if projected is not None:
            row["projected_vs_sparse_min"] = projected.min / samples.min
            row["projected_vs_sparse_median"] = projected.median / samples.median
            if ref is not None:
                row["projected_vs_builder_min"] = projected.min / ref.min
        rows.append(row)
    return rows
