"""`python -m dsmoe_runtime MODEL.onnx --prompt "..."`: generate with streaming output.

Text in and out when the model's folder has a tokenizer (dsmoe_export copies the model
folder's tokenizer files beside the export); token ids otherwise (--ids).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .errors import DSMoERuntimeError
from .tokenizer import load_tokenizer

def _eos_from_folder(folder: Path, tokenizer) -> list[int] | None:
    for name in ("generation_config.json", "config.json"):
        f = folder / name
        if f.is_file():
            eos = json.loads(f.read_text()).get("eos_token_id")
            if eos is not None:
                return eos if isinstance(eos, list) else [eos]
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        return [tokenizer.eos_token_id]
    return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dsmoe_runtime",
                                description="Generate with a DSMoE ONNX export (streaming).")
    p.add_argument("model", metavar="MODEL.onnx")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs a tokenizer beside MODEL.onnx)")
    src.add_argument("--ids", help="prompt token ids, comma- or space-separated (no tokenizer needed)")
    p.add_argument("-n", "--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy (implied by the options below)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="make tokens already in the prompt or the output less likely (1 = off; 1.1-1.3 is usual)")
    p.add_argument("--eos", type=int, action="append",
                   help="end-of-sequence id (repeatable; default: generation_config.json / tokenizer)")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    p.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--library", help="op library path (default: installed, or $DSMOE_OPS_LIBRARY)")
    p.add_argument("--allow-dense", action="store_true",
                   help="run a model without the sparse op too (a --dense export: the baseline)")
    p.add_argument("--stats", action="store_true",
                   help="print per-layer activation statistics (export with --active-outputs)")
    p.add_argument("--stats-plot", metavar="PNG", help="also plot them (needs matplotlib)")
    p.add_argument("--stats-json", metavar="JSON", help="also save them as JSON")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = sys.stdout
    if hasattr(out, "reconfigure"):  # generated text may hold characters the console cannot show
        out.reconfigure(errors="replace")
    try:
        from .session import CPU_EP, CUDA_EP, DSMoESession

        model = Path(args.model)
        providers = {"auto": None, "cpu": [CPU_EP], "cuda": [CUDA_EP, CPU_EP]}[args.provider]
        session = DSMoESession(model, providers, threads=args.threads, library=args.library or True,
                               allow_dense=args.allow_dense)
        if (args.stats or args.stats_plot or args.stats_json) and not session.has_active_outputs:
            raise DSMoERuntimeError(f"{model}: no active.* outputs for statistics: export it with "
                                    "`python -m dsmoe_export MODEL_DIR OUT.onnx --active-outputs`")
        tokenizer = load_tokenizer(model.parent)
        if args.prompt is not None:
            if tokenizer is None:
                raise DSMoERuntimeError(f"{model.parent}: no tokenizer beside the model (tokenizer.json ...): "
                                        "give the prompt as --ids, or re-export from a folder with its tokenizer")
            ids = tokenizer.encode(args.prompt)
        else:
            try:
                ids = [int(t) for t in args.ids.replace(",", " ").split()]
            except ValueError:
                raise DSMoERuntimeError(f"--ids: expected integers, got {args.ids!r}") from None
        eos = None if args.ignore_eos else (args.eos or _eos_from_folder(model.parent, tokenizer))
        text_mode = tokenizer is not None and args.prompt is not None
        if text_mode:
            out.write(args.prompt)
        else:
            out.write(" ".join(map(str, ids)) + " |")
        out.flush()
        generated: list[int] = []
        shown = ""

        def on_token(step: int, tokens: np.ndarray) -> None:
            nonlocal shown
            tok = int(tokens[0])
            if eos and tok in eos:
                return
            generated.append(tok)
            if text_mode:
                text = tokenizer.decode(generated)
                if text.startswith(shown) and not text.endswith("\ufffd"):  # wait for whole characters
                    out.write(text[len(shown):])
                    shown = text
            else:
                out.write(f" {tok}")
            out.flush()

        session.generate(np.array([ids], np.int64), args.max_new_tokens, do_sample=True if args.sample else None,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                         eos_token_id=eos, repetition_penalty=args.repetition_penalty, streamer=on_token)
        if text_mode:
            rest = tokenizer.decode(generated)
            out.write(rest[len(shown):] if rest.startswith(shown) else "")
        out.write("\n")
        if session.has_active_outputs and (args.stats or args.stats_plot or args.stats_json):
            print(session.stats.table(), file=sys.stderr)
            if args.stats_json:
                session.stats.save_json(args.stats_json)
            if args.stats_plot:
                session.stats.plot(args.stats_plot)
                print(f"plot: {args.stats_plot}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    except (DSMoERuntimeError, ImportError, OSError) as e:
        print(f"\ndsmoe_runtime: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
