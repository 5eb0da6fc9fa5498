"""The converter's input: a dense LLaMA / Mistral / Qwen2 folder or GGUF file read into LLaMA-format
config and tensors (DenseModel), and the PyTorch model built from them."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint import TensorReader, expected_shapes
from ..config import CONFIG_NAME, ModelConfig, parse_config
from ..errors import CheckpointError
from ..modeling import DSMoEForCausalLM

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
# Keys of the source config.json that describe things a LLaMA folder does not have (dropped).
_DROP_KEYS = ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "quantization_config",
              "_name_or_path", "_model_name_or_path", "auto_map", "_attn_implementation_autoset")


@dataclass
class DenseModel:
    config: dict                      # LLaMA-format config.json, no "dsmoe" block
    tensors: dict[str, torch.Tensor]  # LLaMA names, as stored (dtype kept)
    source: str
    notes: list[str] = field(default_factory=list)
    tokenizer: object | None = None   # a transformers tokenizer, when the source has one
    copy_files: Callable[[Path], list[str]] = lambda out: []

    @property
    def cfg(self) -> ModelConfig:
        return parse_config(self.config, Path(self.source) / CONFIG_NAME, require_dsmoe=False)


def map_config(data: dict, path: Path) -> tuple[dict, list[str], list[str]]:
    """A LLaMA-format config for a llama / mistral / qwen2 config.json.

    Returns (config, notes, zero_biases): zero_biases names the o_proj biases to add as zeros
    (Qwen2 has q/k/v biases but none on o_proj; the LLaMA format's attention_bias is all-or-nothing,
    so o_proj gets an exact zero bias)."""
    if not isinstance(data, dict):
        raise CheckpointError("expected a JSON object at the top level", file=path)
    mt = data.get("model_type", "llama")
    if mt not in SUPPORTED_TYPES:
        raise CheckpointError(f"unsupported model_type {mt!r} (expected one of {', '.join(SUPPORTED_TYPES)}: "
                              "a LLaMA-family decoder with a SwiGLU gate/up/down FFN)", file=path, field="model_type")
    if data.get("mlp_bias"):
        raise CheckpointError("FFN biases cannot be represented (the DSMoE op has none)", file=path, field="mlp_bias")
    cfg = {k: v for k, v in data.items() if k not in _DROP_KEYS}
    notes: list[str] = []
    zero_biases: list[str] = []
    window = data.get("sliding_window")
    windowed = mt == "mistral" and window or mt == "qwen2" and data.get("use_sliding_window") and window
    if windowed:
        notes.append(f"{mt}: sliding-window attention ({window} tokens) becomes full causal attention; "
                     f"outputs are identical for sequences up to {window} tokens")
    if mt == "qwen2":
        cfg["attention_bias"] = True
        layers = int(data.get("num_hidden_layers", 0))
        zero_biases = [f"model.layers.{i}.self_attn.o_proj.bias" for i in range(layers)]
        notes.append("qwen2: q/k/v biases kept; o_proj gets an exact zero bias (attention_bias is all-or-nothing)")
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    cfg.pop("dsmoe", None)
    cfg.pop("dsmoe_conversion", None)
    return cfg, notes, zero_biases


def _find_gguf(src: Path) -> Path | None:
    if src.is_file() and src.suffix == ".gguf":
        return src
    if src.is_dir() and not any(src.glob("*.safetensors")):
        found = sorted(src.glob("*.gguf"))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise CheckpointError(f"several GGUF files ({', '.join(p.name for p in found)}); pass one of them",
                                  file=src)
    return None


def _load_gguf(path: Path) -> DenseModel:
    try:
        import gguf  # noqa: F401
        import accelerate  # noqa: F401
    except ImportError:
        raise CheckpointError("loading a GGUF file needs the packages gguf and accelerate "
                              "(pip install 'dsmoe-export[convert]')", file=path) from None
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    data = model.config.to_dict()
    # to_dict() also carries transformers' generic PretrainedConfig fields: keep the model's own
    for k in ("dtype", "torch_dtype", "transformers_version", "use_cache", "output_hidden_states", "return_dict",
              "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
              "output_attentions", "pretraining_tp"):
        data.pop(k, None)
    cfg, notes, zero_biases = map_config(data, path)
    cfg["torch_dtype"] = "float32"
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    del model
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    notes.insert(0, f"GGUF {path.name}: weights dequantized to float32 by transformers")
    dense = DenseModel(config=cfg, tensors={}, source=str(path), notes=notes, tokenizer=tokenizer,
                       copy_files=lambda out: _save_tokenizer(tokenizer, out))
    dense.tensors = _select(state, dense.cfg, zero_biases, path)
    return dense


def _save_tokenizer(tokenizer, out: Path) -> list[str]:
    return sorted(Path(p).name for p in tokenizer.save_pretrained(str(out)) if Path(p).is_file()
                  and Path(p).name != CONFIG_NAME)


def _select(state: dict, cfg: ModelConfig, zero_biases: list[str], where: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name, shape in expected_shapes(cfg, with_routers=False).items():
        if name in zero_biases and name not in state:
            out[name] = torch.zeros(shape)
            continue
        if name not in state:
            raise CheckpointError(f"tensor missing (expected shape {list(shape)})", file=where, field=name)
        t = state[name]
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"expected shape {list(shape)}, got {list(t.shape)}", file=where, field=name)
        out[name] = t
    return out


def load_dense(src: str | Path) -> DenseModel:
    """Read a dense LLaMA / Mistral / Qwen2 folder or GGUF file (weights as stored)."""
    from ..exporter import TOKENIZER_FILES, copy_files

    src = Path(src)
    if not src.exists():
        raise CheckpointError("does not exist (expected a model folder or a .gguf file)", file=src)
    gguf_path = _find_gguf(src)
    if gguf_path is not None:
        return _load_gguf(gguf_path)
    if not src.is_dir():
        raise CheckpointError("expected a model folder (config.json + *.safetensors) or a .gguf file", file=src)
    cpath = src / CONFIG_NAME
    try:
        data = json.loads(cpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError("missing (expected a Hugging Face config.json)", file=cpath) from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot be read: {e}", file=cpath) from None
    cfg, notes, zero_biases = map_config(data, cpath)
    dense = DenseModel(config=cfg, tensors={}, source=str(src), notes=notes)
    reader = TensorReader(src)
    state = {}
    for name, shape in expected_shapes(dense.cfg, with_routers=False).items():
        if name in zero_biases and name not in reader:
            continue
        state[name] = reader.get(name, shape)
    dense.tensors = _select(state, dense.cfg, zero_biases, src)
    if any((src / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        import transformers
        from transformers import AutoTokenizer

        transformers.logging.set_verbosity_error()
        dense.tokenizer = AutoTokenizer.from_pretrained(str(src))
    # else: no tokenizer in the folder (tiny test models): text is read as UTF-8 bytes

    dense.copy_files = lambda out: copy_files(src, out, TOKENIZER_FILES)
    return dense


def build_model(config: dict, tensors: dict[str, torch.Tensor], *, sparse: bool = True) -> DSMoEForCausalLM:
    cfg = parse_config(config, Path("<convert>"), require_dsmoe=sparse)
    model = DSMoEForCausalLM(cfg, sparse=sparse)
    model.load_tensors({k: v.float() for k, v in tensors.items()})
    return model.eval()
