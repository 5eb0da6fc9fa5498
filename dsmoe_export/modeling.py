"""The PyTorch reference: a LLaMA decoder whose FFNs are DSMoE layers.

`DSMoEMLP` is the op's PyTorch reference (docs/op-spec.md). The decoder takes
and returns the KV cache as explicit tensors, in the layout of the ONNX
export, so that the export (dsmoe_export/graph/) can be validated against it
call for call.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import HF_ACTIVATIONS, DSMoEConfig, ModelConfig

_HALF = (torch.float16, torch.bfloat16)

ACT_FNS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # At least float32 for a float16 model, as Hugging Face's LlamaRMSNorm (float64 stays float64).
        xf = x.float() if x.dtype in _HALF else x
        var = xf.pow(2).mean(-1, keepdim=True)
        return self.weight * (xf * torch.rsqrt(var + self.eps)).to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies of RoPE in float64 (default, linear and llama3 scaling)."""
    r = cfg.rope
    dim = cfg.head_dim
    inv = 1.0 / (r.theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if r.type == "linear":
        inv = inv / r.factor
    elif r.type == "llama3":
        low_wavelen = r.original_max_position_embeddings / r.low_freq_factor
        high_wavelen = r.original_max_position_embeddings / r.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / r.factor, inv)
        smooth = (r.original_max_position_embeddings / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
        smoothed = (1 - smooth) * scaled / r.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(d, self.heads * hd, bias=bias)
        self.k_proj = nn.Linear(d, self.kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(d, self.kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.heads * hd, d, bias=bias)

    def forward(self, x, cos, sin, mask, past_k, past_v):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k = torch.cat([past_k, k], dim=2)
        v = torch.cat([past_v, v], dim=2)
        rep = self.heads // self.kv_heads
        kx = k.repeat_interleave(rep, dim=1) if rep > 1 else k
        vx = v.repeat_interleave(rep, dim=1) if rep > 1 else v
        scores = torch.matmul(q, kx.transpose(2, 3)) / math.sqrt(self.head_dim) + mask
        # at least float32, as in HF LLaMA
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32 if q.dtype in _HALF else None).to(q.dtype)
        out = torch.matmul(probs, vx).transpose(1, 2).reshape(b, s, self.heads * self.head_dim)
        return self.o_proj(out), k, v


class DSMoEMLP(nn.Module):
    """SwiGLU FFN cut into n blocks with a sigmoid threshold router (docs/op-spec.md).

    `sparse=False` computes the plain dense FFN (the router is ignored): the
    baseline export. In training mode the gates use the straight-through
    estimator: the forward pass uses the thresholded gate g, the backward pass
    the plain sigmoid score, so every router column gets gradient while the
    experts of inactive blocks get none.
    """

    def __init__(self, cfg: ModelConfig, *, sparse: bool = True):
        super().__init__()
        d, D = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(d, D, bias=False)
        self.up_proj = nn.Linear(d, D, bias=False)
        self.down_proj = nn.Linear(D, d, bias=False)
        self.act = ACT_FNS[cfg.dsmoe.activation if cfg.dsmoe else HF_ACTIVATIONS[cfg.hidden_act]]
        self.moe: DSMoEConfig | None = cfg.dsmoe if sparse else None
        if self.moe is not None:
            self.router = nn.Linear(d, self.moe.num_experts, bias=self.moe.router_bias)
        self.last_gates: torch.Tensor | None = None  # [..., n], for the sparsity loss
        self.last_active: torch.Tensor | None = None  # [..., n] bool, for statistics

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token block weights c * g_i (0 for inactive blocks) and the active mask."""
        moe = self.moe
        s = torch.sigmoid(self.router(x))
        active = s > moe.threshold
        hard = s * active if moe.weighting == "score" else active.to(s.dtype)
        g = s + (hard - s).detach() if self.training else hard
        self.last_gates = g
        self.last_active = active
        if moe.rescale:
            k = active.sum(-1, keepdim=True)
            g = g * (moe.num_experts / k.clamp(min=1).to(s.dtype))
        return g, active

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.moe is None:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        g, _ = self.gates(x)
        n = self.moe.num_experts
        h = self.act(self.gate_proj(x)) * self.up_proj(x)
        h = (h.unflatten(-1, (n, -1)) * g.unsqueeze(-1)).flatten(-2)
        return self.down_proj(h)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, *, sparse: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = DSMoEMLP(cfg, sparse=sparse)

    def forward(self, x, cos, sin, mask, past_k, past_v):
        a, k, v = self.self_attn(self.input_layernorm(x), cos, sin, mask, past_k, past_v)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k, v


class _Inner(nn.Module):
    """Holds the `model.*` tensors under Hugging Face's names."""

    def __init__(self, cfg: ModelConfig, *, sparse: bool):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, sparse=sparse) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DSMoEForCausalLM(nn.Module):
    """LLaMA causal LM with DSMoE FFNs (or dense FFNs with `sparse=False`).

    forward(input_ids [b, s], attention_mask [b, past + s], position_ids [b, s],
    past: list of (key, value) [b, kv_heads, past, head_dim]) -> (logits, presents).
    """

    def __init__(self, cfg: ModelConfig, *, sparse: bool = True):
        super().__init__()
        if sparse and cfg.dsmoe is None:
            raise ValueError("a sparse model needs a config with a dsmoe block")
        self.cfg = cfg
        self.sparse = sparse
        self.model = _Inner(cfg, sparse=sparse)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg).float(), persistent=False)

    @property
    def mlps(self) -> list[DSMoEMLP]:
        return [layer.mlp for layer in self.model.layers]

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        own = dict(self.named_parameters())
        missing = [k for k in own if k not in tensors]
        for name, param in own.items():
            if name in tensors:
                with torch.no_grad():
                    param.copy_(tensors[name])
        if missing:
            raise KeyError(f"tensors missing: {missing[:5]}")

    def empty_past(self, batch: int, dtype=torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
        shape = (batch, self.cfg.num_key_value_heads, 0, self.cfg.head_dim)
        return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in self.model.layers]

    def forward(self, input_ids, attention_mask, position_ids, past):
        x = self.model.embed_tokens(input_ids)
        past_len = past[0][0].shape[2]
        seq = input_ids.shape[1]
        # Causal over cache slots (cache order = time order), plus padding from attention_mask.
        q_pos = torch.arange(seq, device=x.device) + past_len
        k_pos = torch.arange(attention_mask.shape[1], device=x.device)
        allowed = (k_pos[None, :] <= q_pos[:, None])[None] & (attention_mask[:, None, :] > 0)
        # A finite minimum keeps fully padded rows NaN-free (they get uniform attention, unused).
        zero = torch.zeros((), dtype=x.dtype)
        mask = torch.where(allowed, zero, torch.full((), torch.finfo(x.dtype).min, dtype=x.dtype)).unsqueeze(1)
        freqs = position_ids[..., None].to(self.inv_freq.dtype) * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        presents = []
        for layer, (pk, pv) in zip(self.model.layers, past):
            x, k, v = layer(x, cos, sin, mask, pk, pv)
            presents.append((k, v))
        x = self.model.norm(x)
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, weight), presents

    def sparsity_loss(self) -> torch.Tensor:
        """Mean over layers, tokens and blocks of the gates of the last forward pass."""
        gates = [m.last_gates for m in self.mlps if m.last_gates is not None]
        if not gates:
            raise RuntimeError("run a forward pass of a sparse model first")
        return torch.stack([g.mean() for g in gates]).mean()
