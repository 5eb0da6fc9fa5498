"""config.json of a DSMoE model folder: parsing and validation.

The folder is a Hugging Face LLaMA folder plus a `"dsmoe"` block (see
docs/checkpoint-format.md). Every field is checked here, once, so that the
model, the loader and the exporter can trust a `ModelConfig`.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError

CONFIG_NAME = "config.json"

# Hugging Face `hidden_act` names -> the op's `activation` attribute.
HF_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
}
WEIGHTINGS = ("score", "binary")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    # llama3 only
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class DSMoEConfig:
    """The `"dsmoe"` block; defaults are the paper's."""

    num_experts: int
    threshold: float = 0.5
    rescale: bool = True
    weighting: str = "score"
    router_bias: bool = False
    activation: str = "silu"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    hidden_act: str
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    max_position_embeddings: int
    rope: RopeConfig = field(default_factory=RopeConfig)
    dsmoe: DSMoEConfig | None = None

    @property
    def block_size(self) -> int:
        assert self.dsmoe is not None
        return self.intermediate_size // self.dsmoe.num_experts


class _Fields:
    """Typed access to a JSON object that reports `file: field: expected ...`."""

    def __init__(self, data: dict, path: Path, prefix: str = ""):
        self.data, self.path, self.prefix = data, path, prefix

    def _err(self, key: str, msg: str) -> CheckpointError:
        return CheckpointError(msg, file=self.path, field=f"{self.prefix}{key}")

    def get(self, key: str, kind: type, default: Any = ..., *, minimum: float | None = None):
        if key not in self.data or self.data[key] is None:
            if default is ...:
                raise self._err(key, f"missing (expected {kind.__name__})")
            return default
        value = self.data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is int and isinstance(value, bool) or not isinstance(value, kind):
            raise self._err(key, f"expected {kind.__name__}, got {value!r}")
        if kind is float and not math.isfinite(value):
            raise self._err(key, f"expected a finite number, got {value!r}")
        if minimum is not None and value < minimum:
            raise self._err(key, f"expected >= {minimum}, got {value!r}")
        return value


def _parse_rope(f: _Fields, max_pos: int) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters`; older folders `rope_theta` + `rope_scaling`.
    params = f.data.get("rope_parameters")
    key = "rope_parameters"
    if params is None:
        params = dict(f.data.get("rope_scaling") or {})
        key = "rope_scaling"
        if "rope_theta" in f.data:
            params["rope_theta"] = f.get("rope_theta", float, minimum=1e-9)
    if not isinstance(params, dict):
        raise CheckpointError(f"expected an object, got {params!r}", file=f.path, field=key)
    p = _Fields(params, f.path, key + ".")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(
            f"unsupported RoPE type {rope_type!r} (expected one of {', '.join(ROPE_TYPES)})",
            file=f.path, field=key + ".rope_type",
        )
    theta = p.get("rope_theta", float, 10000.0, minimum=1e-9)
    if rope_type == "default":
        return RopeConfig(theta=theta)
    factor = p.get("factor", float, minimum=1e-9)
    if rope_type == "linear":
        return RopeConfig(theta=theta, type="linear", factor=factor)
    return RopeConfig(
        theta=theta, type="llama3", factor=factor,
        low_freq_factor=p.get("low_freq_factor", float, minimum=1e-9),
        high_freq_factor=p.get("high_freq_factor", float, minimum=1e-9),
        original_max_position_embeddings=p.get("original_max_position_embeddings", int, minimum=1),
    )


def _parse_dsmoe(data: Any, path: Path, hidden_act: str, intermediate_size: int) -> DSMoEConfig:
    if not isinstance(data, dict):
        raise CheckpointError(f"expected an object, got {data!r}", file=path, field="dsmoe")
    f = _Fields(data, path, "dsmoe.")
    n = f.get("num_experts", int, minimum=1)
    if intermediate_size % n:
        raise CheckpointError(
            f"intermediate_size {intermediate_size} is not divisible by num_experts {n} "
            "(expected equal blocks)", file=path, field="dsmoe.num_experts",
        )
    threshold = f.get("threshold", float, 0.5)
    if not 0.0 <= threshold <= 1.0:
        raise CheckpointError(f"expected a value in [0, 1], got {threshold}", file=path, field="dsmoe.threshold")
    weighting = f.get("weighting", str, "score")
    if weighting not in WEIGHTINGS:
        raise CheckpointError(f"expected one of {WEIGHTINGS}, got {weighting!r}", file=path, field="dsmoe.weighting")
    activation = f.get("activation", str, HF_ACTIVATIONS.get(hidden_act, hidden_act))
    if activation not in set(HF_ACTIVATIONS.values()):
        raise CheckpointError(
            f"unsupported activation {activation!r} (expected one of silu, gelu, gelu_tanh)",
            file=path, field="dsmoe.activation",
        )
    return DSMoEConfig(
        num_experts=n, threshold=threshold, rescale=f.get("rescale", bool, True), weighting=weighting,
        router_bias=f.get("router_bias", bool, False), activation=activation,
    )


def parse_config(data: Any, path: Path, *, require_dsmoe: bool = True) -> ModelConfig:
    if not isinstance(data, dict):
        raise CheckpointError("expected a JSON object at the top level", file=path)
    f = _Fields(data, path)
    model_type = data.get("model_type", "llama")
    if model_type != "llama":
        raise CheckpointError(f"expected 'llama', got {model_type!r}", file=path, field="model_type")
    hidden = f.get("hidden_size", int, minimum=1)
    heads = f.get("num_attention_heads", int, minimum=1)
    kv_heads = f.get("num_key_value_heads", int, heads, minimum=1)
    if heads % kv_heads:
        raise CheckpointError(
            f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}",
            file=path, field="num_key_value_heads",
        )
    if "head_dim" in data and data["head_dim"] is not None:
        head_dim = f.get("head_dim", int, minimum=1)
    elif hidden % heads:
        raise CheckpointError(
            f"hidden_size {hidden} is not divisible by num_attention_heads {heads} and no head_dim is given",
            file=path, field="head_dim",
        )
    else:
        head_dim = hidden // heads
    if head_dim % 2:
        raise CheckpointError(f"expected an even head_dim for RoPE, got {head_dim}", file=path, field="head_dim")
    hidden_act = f.get("hidden_act", str, "silu")
    if hidden_act not in HF_ACTIVATIONS:
        raise CheckpointError(
            f"unsupported activation {hidden_act!r} (expected one of {', '.join(HF_ACTIVATIONS)})",
            file=path, field="hidden_act",
        )
    intermediate = f.get("intermediate_size", int, minimum=1)
    max_pos = f.get("max_position_embeddings", int, 2048, minimum=1)
    if "dsmoe" not in data:
        if require_dsmoe:
            raise CheckpointError(
                'missing (expected a "dsmoe" block such as {"num_experts": 8, "threshold": 0.5}: a dense model '
                "becomes a DSMoE one with `python -m dsmoe_export.convert DENSE OUT_DIR`; --dense exports a plain "
                "LLaMA folder as it is)", file=path, field="dsmoe",
            )
        dsmoe = None
    else:
        dsmoe = _parse_dsmoe(data["dsmoe"], path, hidden_act, intermediate)
    if f.get("mlp_bias", bool, False):
        raise CheckpointError("FFN biases are not supported (expected false)", file=path, field="mlp_bias")
    return ModelConfig(
        vocab_size=f.get("vocab_size", int, minimum=1),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=f.get("num_hidden_layers", int, minimum=1),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=f.get("rms_norm_eps", float, 1e-6, minimum=0.0),
        hidden_act=hidden_act,
        tie_word_embeddings=f.get("tie_word_embeddings", bool, False),
        attention_bias=f.get("attention_bias", bool, False),
        mlp_bias=f.get("mlp_bias", bool, False),
        max_position_embeddings=max_pos,
        rope=_parse_rope(f, max_pos),
        dsmoe=dsmoe,
    )


def load_config(model_dir: str | Path, *, require_dsmoe: bool = True) -> ModelConfig:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        hint = ("; a GGUF file is converted into one with `python -m dsmoe_export.convert FILE.gguf OUT_DIR`"
                if model_dir.suffix.lower() == ".gguf" and model_dir.is_file() else "")
        raise CheckpointError(f"not a directory (expected a model folder with config.json{hint})", file=model_dir)
    path = model_dir / CONFIG_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError("missing (expected a Hugging Face config.json)", file=path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot be read: {e}", file=path) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}", file=path) from None
    return parse_config(data, path, require_dsmoe=require_dsmoe)
