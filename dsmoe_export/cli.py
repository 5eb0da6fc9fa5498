"""`python -m dsmoe_export MODEL_DIR OUT.onnx`: a thin shell over `exporter.export`."""
from __future__ import annotations

import argparse
import signal
import sys
import threading

from .errors import DSMoEError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dsmoe_export",
        description="Export a DSMoE model folder (Hugging Face LLaMA + routers) to ONNX with a KV cache. "
                    "FFNs become one org.dsmoe::GatedBlockSparseFFN node each; --dense exports the plain "
                    "dense FFN instead (the baseline).")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="model folder: config.json + *.safetensors")
    p.add_argument("output", metavar="OUT.onnx", help="ONNX file to write (OUT.onnx.data too for external data)")
    p.add_argument("--dense", action="store_true", help="export the dense FFN (routers ignored)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="element type of weights and activations in the graph; float16 is for ONNX Runtime's "
                        "CUDA EP (the op's CUDA kernel; on the CPU EP the op falls back to its ONNX function). "
                        "Validation tolerance is then at least 3e-2 (default: %(default)s)")
    p.add_argument("--ffn-weights", choices=("float32", "float16", "int8", "int4"), default="float32",
                   help="storage of the FFN weights, float32 activations: weight-only int8/int4 (symmetric, "
                        "block-wise scales) or float16; sparse: the op's GatedBlockSparseFFN{Int8,Int4,F16} "
                        "variants, dense: com.microsoft.MatMulNBits (docs/op-spec.md). Validated against "
                        "PyTorch with the same quantize-dequantized weights (default: %(default)s)")
    p.add_argument("--matmul-weights", choices=("same", "float32", "float16", "int8", "int4"), default="same",
                   help="storage of attention's MatMul weights (packed QKV, o_proj): MatMulNBits for int8/int4, "
                        "float16 + Cast (smaller file only); 'same' follows --ffn-weights (default: %(default)s)")
    p.add_argument("--lm-head-weights", choices=("same", "float32", "float16", "int8", "int4"), default="same",
                   help="storage of the lm_head and the embedding table (one matrix when tied): MatMulNBits and "
                        "GatherBlockQuantized for int8/int4; 'same' follows --matmul-weights (default: %(default)s)")
    p.add_argument("--int4-accuracy-level", type=int, choices=range(5), default=None, metavar="{0,1,2,3,4}",
                   help="accuracy_level of the MatMulNBits nodes (int4/int8 MatMuls): 4 = int8 activations, 0/1 = "
                        "float32 (default: 4 for float32 graphs, the CPU EP, as onnxruntime-genai's model builder)")
    p.add_argument("--calibration-text", metavar="FILE", default=None,
                   help="quantize the int8/int4 weights with GPTQ on this text (tokenized with the model folder's "
                        "tokenizer): rounding that minimizes each weight's output error on it, instead of rounding "
                        "to the nearest level (same file format, same speed)")
    p.add_argument("--calibration-tokens", type=int, default=2048,
                   help="tokens of --calibration-text used (default: %(default)s)")
    p.add_argument("--group-size", type=int, default=32,
                   help="quantization group along each weight's input dimension, a power of two >= 32 "
                        "(default: %(default)s)")
    p.add_argument("--down-layout", choices=("auto", "tiled", "rows"), default="auto",
                   help="layout of the sparse op's down weights (docs/op-spec.md, attribute down_tile): 'tiled' "
                        "stores [B, 64] column tiles the CPU kernel's prefill reads in place, 'rows' the plain "
                        "[n, B, d]; 'auto' picks tiled from hidden size 2048 on, rows below it, where rows decodes "
                        "6-20 %% faster at equal prefill speed, and rows for --dtype float16 (the CUDA EP's "
                        "CUTLASS GEMMs read rows) (default: %(default)s)")
    p.add_argument("--gate-up-layout", choices=("auto", "slabs", "rows"), default="auto",
                   help="layout of the sparse op's gate and up weights (docs/op-spec.md, attribute gate_up_tile): "
                        "'slabs' stores each block's rows in k-major slabs of 32 that the CPU kernel reads in place "
                        "(no packing of the tokens, no padding), 'rows' the plain [n, B, d]; 'auto' picks slabs "
                        "for float32 graphs and rows for --dtype float16 (the CUDA EP's kernels read rows) "
                        "(default: %(default)s)")
    p.add_argument("--ffn-node", choices=("auto", "projected", "plain"), default="auto",
                   help="'projected': one ProjectedSparseFFN node per layer (but the last) for o_proj, the norms "
                        "around the FFN, the FFN and the next layer's QKV projection (float32 graphs for the CPU "
                        "EP with float32 or int4 FFN and attention weights, no projection biases; "
                        "docs/exporting.md): faster decode where idle workers sleep (session.intra_op."
                        "allow_spinning=0), slower with onnxruntime's default spinning; 'plain' (= 'auto'): "
                        "GatedBlockSparseFFN between ONNX Runtime's nodes (default: %(default)s)")
    p.add_argument("--no-validate", dest="validate", action="store_false",
                   help="skip the ONNX Runtime vs PyTorch check after export")
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="max relative error of the validation (default: %(default)g)")
    p.add_argument("--external-data", choices=("auto", "always", "never"), default="auto",
                   help="store weights in OUT.onnx.data (auto: only above the 2 GiB protobuf limit)")
    p.add_argument("--active-outputs", action="store_true",
                   help="also output active.{i} [batch, seq, n] bool per layer: which blocks each token used "
                        "(for dsmoe_runtime's activation statistics)")
    p.add_argument("--no-tokenizer", dest="copy_tokenizer", action="store_false",
                   help="do not copy the model folder's tokenizer files and generation_config.json beside OUT.onnx")
    p.add_argument("--hf-config", action="store_true",
                   help="copy config.json beside OUT.onnx (what optimum's ORTModelForCausalLM reads)")
    p.add_argument("--genai", action="store_true",
                   help="write genai_config.json beside OUT.onnx for onnxruntime-genai, naming this machine's "
                        "op library (python -m dsmoe_runtime.genai re-points it elsewhere)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


# Signals received during this run. Code deep in torch.export may catch the KeyboardInterrupt
# and fail with an unrelated error instead (seen: "torch._dynamo has no attribute 'exc'" from a
# half-done import): any failure after a signal is reported as the interruption it is.
_signals: list[int] = []


def _interrupt(signum, frame):
    _signals.append(signum)
    raise KeyboardInterrupt  # SIGTERM cleans up as Ctrl-C does (temp files, an existing OUT)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _signals.clear()
    handled = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    previous = {sig: signal.signal(sig, _interrupt) for sig in handled}
    try:
        return _run(args)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(args) -> int:
    try:
        from .exporter import export

        ext = {"auto": None, "always": True, "never": False}[args.external_data]
        result = export(args.model_dir, args.output, dense=args.dense, validate=args.validate,
                        tolerance=args.tolerance, external_data=ext, progress=not args.quiet,
                        active_outputs=args.active_outputs, copy_tokenizer=args.copy_tokenizer,
                        hf_config=args.hf_config, genai=args.genai, dtype=args.dtype,
                        ffn_weights=args.ffn_weights, matmul_weights=args.matmul_weights,
                        group_size=args.group_size, down_layout=args.down_layout,
                        gate_up_layout=args.gate_up_layout,
                        accuracy_level=args.int4_accuracy_level, lm_head_weights=args.lm_head_weights,
                        calibration_text=args.calibration_text, calibration_tokens=args.calibration_tokens,
                        ffn_node=args.ffn_node)
    except KeyboardInterrupt:
        print("dsmoe-export: interrupted; nothing written", file=sys.stderr)
        return 130
    except DSMoEError as e:
        if _signals:
            print("dsmoe-export: interrupted; nothing written", file=sys.stderr)
            return 130
        if args.debug:
            raise
        print(f"dsmoe-export: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # an unexpected failure: still one line unless --debug
        if _signals:
            print("dsmoe-export: interrupted; nothing written", file=sys.stderr)
            return 130
        if args.debug:
            raise
        print(f"dsmoe-export: error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
    if not args.quiet:
        kind = "sparse" if result.sparse else "dense"
        print(f"dsmoe-export: wrote {result.path} ({kind}, {result.num_layers} layers, "
              f"{result.size_bytes / 2**20:.1f} MiB{', external data' if result.external_data else ''}) "
              f"in {result.seconds:.1f}s")
        if result.extra_files:
            print(f"dsmoe-export: beside it: {', '.join(result.extra_files)}")
    return 0
