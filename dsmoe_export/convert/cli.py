"""The command line: dense LLaMA-family model -> DSMoE model folder, with optional router calibration.

    python -m dsmoe_export.convert DENSE OUT_DIR --experts 8 [--threshold 0.5]
        [--router-init random|fit] [--regroup none|coact] [--target-active 0.5]
        [--calib-text TEXT] [--calibrate TEXT --steps N] [--eval-text TEXT] [--tradeoff 0.3,0.5,...]

DENSE is a Hugging Face folder (model_type llama, mistral or qwen2: SwiGLU FFNs; safetensors) or a
GGUF file / a folder holding one (dequantized to float32 by transformers; needs `gguf` and
`accelerate`: pip install '.[convert]'). OUT_DIR is always the project's LLaMA-format DSMoE folder
(docs/checkpoint-format.md): the dense weights as they were (FFN neurons possibly reordered, which
leaves the dense FFN unchanged), one router per layer, the "dsmoe" block, a "dsmoe_conversion" record
of how it was made, the tokenizer files, and with calibration a report (calibration.md/.json/.png).
See docs/conversion.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..errors import DSMoEError
from .pipeline import ConvertOptions, convert, dense_baseline
from .report import report_markdown
from .training import TrainConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dsmoe_export.convert",
                                description="Convert a dense LLaMA / Mistral / Qwen2 folder or GGUF file into a DSMoE "
                                            "model folder (docs/conversion.md).")
    p.add_argument("src", metavar="DENSE", help="dense model folder (config.json + *.safetensors) or .gguf file")
    p.add_argument("out", metavar="OUT_DIR", help="DSMoE folder to write")
    p.add_argument("--experts", type=int, default=8, help="n: blocks per FFN (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=0.5, help="tau (default: %(default)s)")
    p.add_argument("--weighting", choices=("binary", "score"), default="binary",
                   help="weight of an active block (default: binary: a converted model's experts expect 1)")
    p.add_argument("--rescale", action="store_true", help="multiply by n/k as the paper (default: off; see docs)")
    p.add_argument("--router-init", choices=("auto", "random", "fit"), default="auto",
                   help="random (the paper) or fit (least squares to each block's contribution norm on the "
                        "calibration text); auto = fit when there is calibration text")
    p.add_argument("--regroup", choices=("auto", "none", "coact"), default="auto",
                   help="reorder FFN neurons so that co-activated ones share a block before cutting "
                        "(coact; auto = coact when there is calibration text)")
    p.add_argument("--target-active", type=float, default=0.5,
                   help="fitted routers: active fraction per layer on the calibration text; with --calibrate "
                        "also the sparsity loss's target (default: %(default)s)")
    p.add_argument("--allocation", choices=("uniform", "global"), default="global",
                   help="fitted routers: every layer at --target-active (uniform), or per-layer fractions "
                        "averaging it, spent where dropping blocks loses most (global, the default)")
    p.add_argument("--calib-text", type=Path, help="text for fitting and regrouping (default: the --calibrate text)")
    p.add_argument("--calib-tokens", type=int, default=16384, help="tokens of it used (default: %(default)s)")
    p.add_argument("--calibrate", type=Path, metavar="TEXT_FILE", help="train the routers on this text")
    p.add_argument("--steps", type=int, default=200, help="calibration steps (default: %(default)s)")
    p.add_argument("--batch", type=int, default=4, help="sequences per step (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="router learning rate (default: %(default)g)")
    p.add_argument("--sparsity-weight", type=float, default=1.0,
                   help="weight of the sparsity loss (default: %(default)g)")
    p.add_argument("--no-target", action="store_true",
                   help="plain sparsity loss (the paper's mean gate) instead of its excess over --target-active")
    p.add_argument("--no-distill", dest="distill", action="store_false",
                   help="train on next-token cross-entropy instead of KL to the dense model's logits")
    p.add_argument("--train-experts", nargs="?", const="all", default="none", choices=("none", "gate_up", "all"),
                   help="also train FFN weights (bare flag: all of gate/up/down; gate_up: only those) at --expert-lr")
    p.add_argument("--expert-lr", type=float, default=2e-4, help="FFN weights' learning rate (default: %(default)g)")
    p.add_argument("--target-start", type=float, default=None,
                   help="anneal the calibration target from this active fraction down to --target-active "
                        "(the fitted routers start here)")
    p.add_argument("--anneal", type=float, default=0.5,
                   help="share of the steps over which --target-start is annealed (default: %(default)g)")
    p.add_argument("--control", action=argparse.BooleanOptionalAction, default=None,
                   help="after every step, shift each layer's router bias towards its (annealed, allocated) target "
                        "active fraction on the batch: holds the sparsity on schedule (default: on with fitted "
                        "routers, which it needs)")
    p.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="wall-clock cap on the calibration loop: it stops after the step that reaches it, and "
                        "--target-start's annealing follows the steps or the time, whichever is further along")
    p.add_argument("--dense-baseline", action="store_true",
                   help="instead of converting: fine-tune the dense model's FFN weights (--train-experts) on the "
                        "--calibrate text with cross-entropy, same steps, batch and --expert-lr, and report its "
                        "held-out perplexity next to the original's (OUT_DIR/baseline.json): how much of a "
                        "calibrated model's perplexity is domain adaptation")
    p.add_argument("--eval-text", type=Path, help="held-out text for perplexity (default: the calibration text's tail)")
    p.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens evaluated (default: %(default)s)")
    p.add_argument("--tradeoff", default="", help="comma-separated target active fractions for the trade-off curve, "
                                                  "e.g. 0.3,0.4,0.5,0.7,1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        tradeoff = [float(x) for x in args.tradeoff.split(",") if x.strip()]
    except ValueError:
        print(f"dsmoe-convert: error: --tradeoff: expected numbers separated by commas, got {args.tradeoff!r}",
              file=sys.stderr)
        return 1
    train = TrainConfig(steps=args.steps, batch=args.batch, lr=args.lr, sparsity_weight=args.sparsity_weight,
                        target_active=None if args.no_target else args.target_active, distill=args.distill,
                        train_experts=args.train_experts, expert_lr=args.expert_lr, seed=args.seed,
                        target_start=args.target_start, anneal=args.anneal, control=args.control,
                        time_budget=None if args.time_budget is None else 60.0 * args.time_budget)
    opts = ConvertOptions(experts=args.experts, threshold=args.threshold, weighting=args.weighting,
                          rescale=args.rescale, router_init=args.router_init, regroup=args.regroup,
                          target_active=args.target_active, allocation=args.allocation, calib_text=args.calib_text,
                          calib_tokens=args.calib_tokens, calibrate=args.calibrate, eval_text=args.eval_text,
                          eval_tokens=args.eval_tokens, seq_len=args.seq_len, tradeoff=tradeoff, seed=args.seed,
                          train=train, progress=not args.quiet)
    try:
        if args.dense_baseline:
            report = dense_baseline(args.src, args.out, opts)
            return 0
        report = convert(args.src, args.out, opts)
    except KeyboardInterrupt:
        print("dsmoe-convert: interrupted", file=sys.stderr)
        return 130
    except (DSMoEError, ValueError) as e:
        if args.debug:
            raise
        print(f"dsmoe-convert: error: {e}", file=sys.stderr)
        return 1
    if not args.quiet and "dense" in report:
        print(report_markdown(report))
    return 0
