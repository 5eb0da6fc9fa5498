"""genai_config.json for onnxruntime-genai: the export's interface plus the op library.

onnxruntime-genai (`og.Model(folder)`) reads the model's shape and I/O names from
genai_config.json; `model.decoder.session_options.custom_ops_library` names the op library.
onnxruntime-genai 0.18 loads a custom-op library only from an "allowed directory": an absolute
path works only while the process's working directory contains it, a path relative to the model
folder always works. So the library is copied beside the model and named by its file name.
The config also sets `intra_op_num_threads` (default 0, onnxruntime's own default of one thread
per physical core): without the entry onnxruntime-genai 0.18 runs the model on one thread
(converted SmolLM2, fp32 decode on the 2-core Intel Xeon VM: 27.9 ms a step against 15.0).
After installing another version of dsmoe-export (or on another machine) refresh the copy with

    python -m dsmoe_runtime.genai FOLDER [--library PATH]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from ._library import get_library_path

GENAI_CONFIG = "genai_config.json"


def _first(value):
    return value[0] if isinstance(value, list) and value else value


def genai_config(onnx_name: str, config: dict, *, library_path: str, generation: dict | None = None,
                 provider: str | None = None, position_ids: bool = False, share_buffer: bool = True,
                 threads: int = 0) -> dict:
    """The genai_config.json content for an export `onnx_name` of a model with HF `config`.
    `position_ids`: the graph takes them (exports without GroupQueryAttention); `share_buffer`:
    past and present may share one buffer (GroupQueryAttention graphs); `threads`: onnxruntime's
    intra-op threads (0: one per physical core)."""
    _check_threads(threads)
    generation = generation or {}
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    eos = generation.get("eos_token_id", config.get("eos_token_id"))
    eos = eos if eos is not None else 0
    pad = generation.get("pad_token_id", config.get("pad_token_id"))
    session_options = {"log_id": "onnxruntime-genai", "custom_ops_library": library_path, "provider_options": [],
                       "intra_op_num_threads": threads}
    if provider == "cuda":
        session_options["provider_options"] = [{"cuda": {}}]
    context = int(config.get("max_position_embeddings", 2048))
    return {
        "model": {
            "type": "llama",
            "bos_token_id": generation.get("bos_token_id", config.get("bos_token_id", 1)),
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else _first(eos),
            "vocab_size": config["vocab_size"],
            "context_length": context,
            "decoder": {
                "filename": onnx_name,
                "session_options": session_options,
                "head_size": head_dim,
                "hidden_size": config["hidden_size"],
                "num_attention_heads": heads,
                "num_key_value_heads": config.get("num_key_value_heads", heads),
                "num_hidden_layers": config["num_hidden_layers"],
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           **({"position_ids": "position_ids"} if position_ids else {}),
                           "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "max_length": context, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": share_buffer, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0, "early_stopping": True, "length_penalty": 1.0,
                   "no_repeat_ngram_size": 0, "diversity_penalty": 0.0},
    }


def _check_threads(threads) -> None:
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ValueError(f"threads: expected an int >= 0 (0 = one per physical core), got {threads!r}")


def write_genai_config(onnx_path: str | Path, *, model_dir: str | Path | None = None,
                       library_path: str | None = None, provider: str | None = None, threads: int = 0) -> list[str]:
    """Write genai_config.json beside `onnx_path` and copy the op library there (the installed one,
    or `library_path`); returns the names written. The model's config.json (and
    generation_config.json) come from `model_dir`, else from the export's own folder. `threads`:
    onnxruntime's intra-op threads (0: one per physical core; genai_config docstring)."""
    import onnx

    _check_threads(threads)  # before anything is written
    onnx_path = Path(onnx_path)
    src = Path(model_dir) if model_dir is not None else onnx_path.parent
    cfg_file = src / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file}: needed for genai_config.json (the model's Hugging Face config)")
    config = json.loads(cfg_file.read_text())
    gen_file = src / "generation_config.json"
    generation = json.loads(gen_file.read_text()) if gen_file.is_file() else None
    header = onnx.load(str(onnx_path), load_external_data=False)
    position_ids = any(i.name == "position_ids" for i in header.graph.input)
    meta = {p.key: p.value for p in header.metadata_props}
    lib = _copy_library(onnx_path.parent, library_path)
    content = genai_config(onnx_path.name, config, library_path=lib.name, generation=generation, provider=provider,
                           position_ids=position_ids, share_buffer="dsmoe_export.graph" in meta and not position_ids,
                           threads=threads)
    out = onnx_path.parent / GENAI_CONFIG
    out.write_text(json.dumps(content, indent=2) + "\n")
    return [out.name, lib.name]


def _copy_library(folder: Path, library_path: str | None) -> Path:
    src = Path(library_path).resolve() if library_path else Path(get_library_path())
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such file (expected the op library)")
    dst = folder / src.name
    if src != dst.resolve():
        tmp = folder / f".{src.name}.tmp"
        shutil.copyfile(src, tmp)
        tmp.replace(dst)
    return dst


def set_library(folder: str | Path, library_path: str | None = None) -> Path:
    """Copy this machine's op library (or `library_path`) into the model folder and point its
    genai_config.json at the copy; a config without `intra_op_num_threads` (written before it was
    set) gets 0, onnxruntime's one thread per physical core (module docstring), one with it keeps it."""
    path = Path(folder) / GENAI_CONFIG
    content = json.loads(path.read_text())
    lib = _copy_library(Path(folder), library_path)
    options = content["model"]["decoder"].setdefault("session_options", {})
    options["custom_ops_library"] = lib.name
    options.setdefault("intra_op_num_threads", 0)
    path.write_text(json.dumps(content, indent=2) + "\n")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsmoe_runtime.genai",
                                description="Copy the op library into a model folder and point its "
                                            "genai_config.json at it (and give a config without "
                                            "intra_op_num_threads onnxruntime's default, 0).")
    p.add_argument("folder")
    p.add_argument("--library", help="library path (default: the installed one, or $DSMOE_OPS_LIBRARY)")
    args = p.parse_args(argv)
    try:
        path = set_library(args.folder, args.library)
    except (OSError, KeyError, ValueError) as e:
        print(f"dsmoe_runtime.genai: error: {e}", file=sys.stderr)
        return 1
    options = json.loads(path.read_text())["model"]["decoder"]["session_options"]
    print(f"{path}: custom_ops_library = {options['custom_ops_library']}, "
          f"intra_op_num_threads = {options['intra_op_num_threads']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
