"""Reading and writing the tensors of a DSMoE model folder (safetensors only).

Loading never unpickles: `pytorch_model.bin` folders are refused. Every
expected tensor is checked for presence, shape and dtype against the config;
the FFN experts may be stored merged (the standard LLaMA names) or split per
expert (docs/checkpoint-format.md), and come out merged either way.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import CONFIG_NAME, ModelConfig
from .errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def expected_shapes(cfg: ModelConfig, *, with_routers: bool) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor the model needs (experts merged)."""
    d, D, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d),
            p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d),
            p + "self_attn.o_proj.weight": (d, q),
            p + "mlp.gate_proj.weight": (D, d),
            p + "mlp.up_proj.weight": (D, d),
            p + "mlp.down_proj.weight": (d, D),
        })
        if cfg.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,), p + "self_attn.o_proj.bias": (d,)})
        if with_routers:
            assert cfg.dsmoe is not None
            shapes[p + "mlp.router.weight"] = (cfg.dsmoe.num_experts, d)
            if cfg.dsmoe.router_bias:
                shapes[p + "mlp.router.bias"] = (cfg.dsmoe.num_experts,)
    return shapes


def split_expert_names(layer: int, expert: int) -> dict[str, str]:
    """Per-expert tensor names of the split layout, keyed by projection."""
    p = f"model.layers.{layer}.mlp.experts.{expert}."
    return {proj: p + f"{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj")}


def _tensor_files(model_dir: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file that holds it."""
    index = model_dir / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"expected a JSON object with a 'weight_map' ({e})", file=index, field="weight_map") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError("expected an object of tensor name -> file", file=index, field="weight_map")
        files = {}
        for name, fname in weight_map.items():
            path = model_dir / str(fname)
            if Path(str(fname)).name != str(fname) or not path.is_file():
                raise CheckpointError(f"names shard {fname!r}, which is missing", file=index, field=f"weight_map.{name}")
            files[name] = path
        return files
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        pickled = [p.name for p in model_dir.glob("*.bin")] + [p.name for p in model_dir.glob("*.pt")]
        hint = f" (found {', '.join(pickled)}: pickled checkpoints are never loaded; convert them to safetensors)" if pickled else ""
        raise CheckpointError(f"no *.safetensors file{hint}", file=model_dir)
    files = {}
    for shard in shards:
        for name in _open(shard).keys():
            files[name] = shard
    return files


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"not a readable safetensors file ({e})", file=path) from None


class TensorReader:
    """Lazy, validated access to the tensors of a folder."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self.files = _tensor_files(self.model_dir)
        self._handles: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        path = self.files.get(name)
        if path is None:
            raise CheckpointError(f"tensor missing (expected shape {list(shape)})", file=self.model_dir, field=name)
        handle = self._handles.get(path) or self._handles.setdefault(path, _open(path))
        try:
            t = handle.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot be read ({e})", file=path, field=name) from None
        if t.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"expected a floating-point tensor, got {t.dtype}", file=path, field=name)
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"expected shape {list(shape)}, got {list(t.shape)}", file=path, field=name)
        return t


def _merged_expert(reader: TensorReader, cfg: ModelConfig, layer: int, proj: str) -> torch.Tensor:
    n, d = cfg.dsmoe.num_experts, cfg.hidden_size
    B = cfg.intermediate_size // n
    shape = (d, B) if proj == "down_proj" else (B, d)
    parts = [reader.get(split_expert_names(layer, j)[proj], shape) for j in range(n)]
    return torch.cat(parts, dim=1 if proj == "down_proj" else 0)


def load_state_dict(model_dir: str | Path, cfg: ModelConfig, *, with_routers: bool,
                    dtype: torch.dtype = torch.float32, progress: Iterable | None = None) -> dict[str, torch.Tensor]:
    """Every tensor the model needs, validated, in `dtype`, experts merged."""
    reader = TensorReader(model_dir)
    shapes = expected_shapes(cfg, with_routers=with_routers)
    names = list(shapes)
    out: dict[str, torch.Tensor] = {}
    for name in progress(names) if progress else names:
        proj = name.rsplit(".", 2)[-2]
        if name not in reader and proj in ("gate_proj", "up_proj", "down_proj") and cfg.dsmoe is not None:
            layer = int(name.split(".")[2])
            if split_expert_names(layer, 0)[proj] in reader:
                out[name] = _merged_expert(reader, cfg, layer, proj).to(dtype)
                continue
        out[name] = reader.get(name, shapes[name]).to(dtype)
    return out


def write_folder(model_dir: str | Path, config: dict, tensors: dict[str, torch.Tensor], *,
                 max_shard_bytes: int | None = None) -> None:
    """Write config.json and safetensors (sharded with an index when over `max_shard_bytes`)."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        _atomic_save(shards[0], model_dir / SINGLE_NAME)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _atomic_save(shard, model_dir / fname)
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        _atomic_write_text(model_dir / INDEX_NAME, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    _atomic_write_text(model_dir / CONFIG_NAME, json.dumps(config, indent=2) + "\n")


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
