"""Small random DSMoE model folders: the demo's built-in default and the tests' models."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .checkpoint import expected_shapes, split_expert_names, write_folder
from .config import parse_config


@dataclass
class TinySpec:
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 192
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attention_bias: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    dsmoe: dict | None = field(default_factory=lambda: {"num_experts": 8, "threshold": 0.5})

    def config_json(self) -> dict:
        cfg = {k: v for k, v in asdict(self).items() if k not in ("rope_scaling", "dsmoe")}
        cfg.update(model_type="llama", architectures=["LlamaForCausalLM"], torch_dtype="float32",
                   bos_token_id=1, eos_token_id=2)
        if self.rope_scaling:
            cfg["rope_scaling"] = self.rope_scaling
        if self.dsmoe is not None:
            cfg["dsmoe"] = dict(self.dsmoe)
        return cfg


def random_tensors(spec: TinySpec, seed: int = 0, router_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Random weights at roughly the scale of a trained model (unit-ish activations)."""
    cfg = parse_config(spec.config_json(), Path("<spec>"), require_dsmoe=spec.dsmoe is not None)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in expected_shapes(cfg, with_routers=cfg.dsmoe is not None).items():
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith(".bias"):
            t = 0.1 * torch.randn(shape, generator=g)
        elif "embed_tokens" in name:
            t = torch.randn(shape, generator=g)
        else:
            # router_scale spreads the router logits: large -> sharp, per-token varied k.
            gain = router_scale if ".router." in name else 1.0
            t = gain * torch.randn(shape, generator=g) / shape[-1] ** 0.5
        out[name] = t
    return out


def split_experts(tensors: dict[str, torch.Tensor], num_layers: int, num_experts: int) -> dict[str, torch.Tensor]:
    """The same tensors in the split-per-expert layout (docs/checkpoint-format.md)."""
    out = dict(tensors)
    for i in range(num_layers):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            merged = out.pop(f"model.layers.{i}.mlp.{proj}.weight")
            dim = 1 if proj == "down_proj" else 0
            for j, part in enumerate(merged.chunk(num_experts, dim=dim)):
                out[split_expert_names(i, j)[proj]] = part.contiguous()
    return out


def make_model_folder(path: str | Path, spec: TinySpec | None = None, *, seed: int = 0, router_scale: float = 1.0,
                      split: bool = False, max_shard_bytes: int | None = None) -> Path:
    spec = spec or TinySpec()
    tensors = random_tensors(spec, seed=seed, router_scale=router_scale)
    if split:
        tensors = split_experts(tensors, spec.num_hidden_layers, spec.dsmoe["num_experts"])
    write_folder(path, spec.config_json(), tensors, max_shard_bytes=max_shard_bytes)
    return Path(path)


def write_byte_tokenizer(folder: str | Path) -> None:
    """A byte-level tokenizer (one token per byte, ids 0..255) and generation_config.json, for
    random model folders: what tools that insist on a tokenizer (onnxruntime-genai's model builder,
    dsmoe_runtime's text I/O) need, without a hub."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    folder = Path(folder)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=ord)
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
