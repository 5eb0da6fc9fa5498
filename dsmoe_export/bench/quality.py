"""Quality of quantized exports against the float32 one, on held-out text.

    python -m dsmoe_export.bench.quality --model MODEL_DIR --text HELDOUT [--calibration-text TRAIN]
    python -m dsmoe_export.bench.quality REF.onnx CANDIDATE.onnx [MORE.onnx ...] --text FILE

With ``--model``: exports the folder's sparse model at float32 (the reference), int8 and int4
(round to nearest, and with ``--calibration-text`` GPTQ), and the dense model at float32 and int4,
plus onnxruntime-genai's model builder's int4 model when its environment is there (builder.py),
under ``--out``; then, as with explicit files: every model on the same token sequence (one
prefill of ``--tokens`` tokens of the text, tokenized with the tokenizer.json beside the
reference; random ids without ``--text``), per candidate: the max relative error of the logits
(max |cand - ref| / max |ref|), the mean per-position relative error, the top-1 agreement
(argmax equal), the perplexity on the text (next-token cross-entropy), and for exports with
``active.*`` outputs the routing agreement (share of (token, block) decisions equal to the
reference's, per layer and over all) and the active fraction; the file size.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def _session(path: Path, threads: int | None):
    from ..validate import make_session

    return make_session(path, threads=threads, custom_ops=True)


def _feeds(session, ids: np.ndarray, kv_dims: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """Prefill feeds; `kv_dims` (kv_heads, head_dim) where the graph leaves them symbolic
    (onnxruntime-genai's builder names its head dimension)."""
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for inp in session.get_inputs():
        if inp.name == "position_ids":  # exports of other tools (ours: positions are cache slots)
            feeds[inp.name] = np.arange(ids.shape[1], dtype=np.int64)[None]
        if inp.name.startswith("past_key_values"):
            _, kv, _, hd = inp.shape
            if not (isinstance(kv, int) and isinstance(hd, int)):
                kv, hd = kv_dims
            feeds[inp.name] = np.zeros((1, kv, 0, hd), np.float32)
    return feeds


def token_ids(ref: Path, text: Path | None, count: int, seed: int = 0) -> np.ndarray:
    if text is None:
        import onnx

        vocab = next(o for o in onnx.load(str(ref), load_external_data=False).graph.output if o.name == "logits")
        v = vocab.type.tensor_type.shape.dim[-1].dim_value
        return np.random.default_rng(seed).integers(0, v, (1, count), dtype=np.int64)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ref.parent / "tokenizer.json"))
    ids = tok.encode(Path(text).read_text(encoding="utf-8", errors="replace")[: 40 * count]).ids[:count]
    if len(ids) < count:
        raise SystemExit(f"{text}: only {len(ids)} tokens, wanted {count}")
    return np.asarray(ids, np.int64)[None]


def run(session, ids: np.ndarray, kv_dims=None) -> tuple[np.ndarray, list[np.ndarray]]:
    """(logits, active blocks per layer [seq, n] bool: empty without active.* outputs)."""
    names = ["logits"] + sorted((o.name for o in session.get_outputs() if o.name.startswith("active.")),
                                key=lambda n: int(n.split(".")[1]))
    out = session.run(names, _feeds(session, ids, kv_dims))
    return out[0], [a[0] for a in out[1:]]


def routing_agreement(ref: list[np.ndarray], cand: list[np.ndarray]) -> dict:
    """Share of (token, block) routing decisions equal in both, per layer and over all; active
    fractions of both."""
    per_layer = [float((a == b).mean()) for a, b in zip(ref, cand)]
    return {"routing_agreement": float(np.mean(per_layer)), "routing_agreement_per_layer": per_layer,
            "worst_layer": int(np.argmin(per_layer)), "active_fraction": float(np.mean([b.mean() for b in cand])),
            "reference_active_fraction": float(np.mean([a.mean() for a in ref]))}


def perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
    z = logits[0, :-1].astype(np.float64)
    z -= z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -logp[np.arange(z.shape[0]), ids[0, 1:]]
    return float(np.exp(nll.mean()))


def compare(ref_logits: np.ndarray, logits: np.ndarray) -> dict:
    a, b = ref_logits[0].astype(np.float64), logits[0].astype(np.float64)
    per_pos = np.abs(a - b).max(-1) / np.abs(a).max(-1)
    return {"max_rel_error": float(np.abs(a - b).max() / np.abs(a).max()),
            "mean_rel_error_per_position": float(per_pos.mean()),
            "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean())}


# --model's exports: name -> export options (the sparse float32 one is the reference).
MODEL_EXPORTS = {
    "sparse-fp32": {},
    "sparse-int8": {"ffn_weights": "int8"},
    "sparse-int4": {"ffn_weights": "int4"},
    "sparse-int4-gptq": {"ffn_weights": "int4", "calibrate": True},
    "dense-fp32": {"dense": True},
    "dense-int4": {"dense": True, "ffn_weights": "int4"},
    "dense-int4-gptq": {"dense": True, "ffn_weights": "int4", "calibrate": True},
}


def export_all(model_dir: Path, out: Path, calibration_text: Path | None, genai_python: str | None) -> list[Path]:
    """The --model exports (reference first), each validated; the builder's int4 model when available."""
    from ..exporter import export
    from . import builder

    paths = []
    for name, options in MODEL_EXPORTS.items():
        options = dict(options)
        if options.pop("calibrate", False):
            if calibration_text is None:
                continue
            options["calibration_text"] = calibration_text
        dense = options.get("dense", False)
        (out / name).mkdir(parents=True, exist_ok=True)
        print(f"exporting {name} ...", file=sys.stderr, flush=True)
        export(model_dir, out / name / "model.onnx", progress=False, active_outputs=not dense, **options)
        paths.append(out / name / "model.onnx")
    python, why = builder.find_python(genai_python)
    if python is None:
        print(f"note: {why}", file=sys.stderr)
    else:
        print("building the model builder's int4 model ...", file=sys.stderr, flush=True)
        paths.append(builder.build(python, model_dir, out / "builder-int4", "int4"))
    return paths


def table(results: dict) -> str:
    """The markdown table of a run's results (what main prints; `python -m dsmoe_export.bench.report
    FILE.json` renders a recorded run with it)."""
    ppl = results.get("reference_perplexity")
    lines = [f"reference {results['reference']} ({results['tokens']} tokens of {results['text']}"
             + (f", perplexity {ppl:.2f})" if ppl is not None else ")"),
             "| model | MiB | max rel. error | mean rel. error per position | top-1 agreement | perplexity | "
             "routing agreement (worst layer) | active fraction |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["candidates"]:
        perplexity_cell = f"{r['perplexity']:.2f}" if "perplexity" in r else "-"
        routing = (f"{100 * r['routing_agreement']:.2f}% ({r['worst_layer']}: "
                   f"{100 * min(r['routing_agreement_per_layer']):.1f}%)" if "routing_agreement" in r else "-")
        active = f"{r['active_fraction']:.3f}" if "active_fraction" in r else "-"
        lines.append(f"| {r['model']} | {r['size_bytes'] / 2**20:.0f} | {r['max_rel_error']:.3g} | "
                     f"{r['mean_rel_error_per_position']:.3g} | {100 * r['top1_agreement']:.1f}% | {perplexity_cell} | "
                     f"{routing} | {active} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsmoe_export.bench.quality", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("reference", type=Path, nargs="?", help="reference export (without --model)")
    p.add_argument("candidates", type=Path, nargs="*")
    p.add_argument("--model", type=Path, default=None, help="a DSMoE model folder: make the exports here")
    p.add_argument("--calibration-text", type=Path, default=None,
                   help="with --model: also the GPTQ int4 exports, calibrated on this text")
    p.add_argument("--out", type=Path, default=Path("quality-out"), help="with --model: export folder")
    p.add_argument("--genai-python", default=None, help="with --model: the builder's interpreter (builder.py)")
    p.add_argument("--text", type=Path, default=None, help="text file (default: random token ids)")
    p.add_argument("--tokens", type=int, default=300)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.model is not None:
        if args.reference is not None:
            p.error("give either --model or exports, not both")
        args.reference, *args.candidates = export_all(args.model, args.out, args.calibration_text, args.genai_python)
    elif args.reference is None or not args.candidates:
        p.error("give a reference export and candidates, or --model")
    ids = token_ids(args.reference, args.text, args.tokens)
    ref_s = _session(args.reference, args.threads)
    ref_feeds = _feeds(ref_s, ids)
    kv_dims = next((v.shape[1], v.shape[3]) for k, v in ref_feeds.items() if k.startswith("past_key_values"))
    ref, ref_active = run(ref_s, ids, kv_dims)
    results = {"reference": str(args.reference), "tokens": int(ids.shape[1]),
               "text": str(args.text) if args.text else "random ids",
               "reference_perplexity": perplexity(ref, ids) if args.text else None, "candidates": []}
    for path in args.candidates:
        s = _session(path, args.threads)
        logits, active = run(s, ids, kv_dims)
        size = sum(f.stat().st_size for f in path.parent.glob(path.name + "*"))  # + external data
        row = {"model": str(path), "size_bytes": size, **compare(ref, logits)}
        if ref_active and len(active) == len(ref_active):
            row.update(routing_agreement(ref_active, active))
        if args.text:
            row["perplexity"] = perplexity(logits, ids)
        results["candidates"].append(row)
        del s
    print(table(results), end="")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
