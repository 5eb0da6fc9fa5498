"""Text for calibration: token ids and fixed-length windows, the forward pass, perplexity and active
fractions, and the FFN inputs collected on a text."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..modeling import DSMoEForCausalLM


def tokenize_text(text: str, tokenizer, vocab_size: int) -> torch.Tensor:
    """1-D int64 token ids of `text`: the model's tokenizer, or UTF-8 bytes when it has none
    (tiny test models without a tokenizer; needs vocab_size >= 256)."""
    if tokenizer is None:
        if vocab_size < 256:
            raise ValueError(f"the model folder has no tokenizer and vocab_size {vocab_size} < 256 "
                             "(byte-level fallback impossible)")
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def chunk(ids: torch.Tensor, seq_len: int, max_chunks: int | None = None) -> torch.Tensor:
    """Non-overlapping [num_chunks, seq_len] windows (the tail is dropped)."""
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"text too short: {ids.numel()} tokens < sequence length {seq_len}")
    if max_chunks is not None and n > max_chunks:
        # evenly spread over the text rather than only its beginning
        idx = torch.linspace(0, n - 1, max_chunks).round().long()
        return torch.stack([ids[i * seq_len:(i + 1) * seq_len] for i in idx.tolist()])
    return ids[: n * seq_len].view(n, seq_len)


def forward(model: DSMoEForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    b, s = ids.shape
    logits, _ = model(ids, torch.ones_like(ids), torch.arange(s).expand(b, s), model.empty_past(b))
    return logits


@contextlib.contextmanager
def dense_mode(model: DSMoEForCausalLM):
    """Run the same weights with dense FFNs (routers ignored): the teacher / the dense baseline."""
    saved = [m.moe for m in model.mlps]
    for m in model.mlps:
        m.moe = None
    try:
        yield model
    finally:
        for m, moe in zip(model.mlps, saved):
            m.moe = moe


@dataclass
class EvalResult:
    ppl: float
    active: list[float] = field(default_factory=list)  # per layer, mean over tokens and blocks

    @property
    def mean_active(self) -> float:
        return sum(self.active) / len(self.active) if self.active else 1.0


@torch.no_grad()
def evaluate(model: DSMoEForCausalLM, chunks: torch.Tensor, *, batch: int = 8, dense: bool = False,
             desc: str | None = None) -> EvalResult:
    """Perplexity (next-token, every position of every chunk) and per-layer FFN active fraction."""
    model.eval()
    nll, count = 0.0, 0
    sums = [0.0] * len(model.mlps)
    ctx = dense_mode(model) if dense else contextlib.nullcontext()
    with ctx:
        for i in range(0, len(chunks), batch):
            ids = chunks[i:i + batch]
            logits = forward(model, ids)
            nll += F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
            count += ids[:, 1:].numel()
            if not dense:
                for j, m in enumerate(model.mlps):
                    sums[j] += m.last_active.float().mean().item() * len(ids)
    active = [] if dense else [s / len(chunks) for s in sums]
    return EvalResult(ppl=math.exp(nll / count), active=active)


@torch.no_grad()
def collect_mlp_inputs(model: DSMoEForCausalLM, chunks: torch.Tensor, *, batch: int = 8,
                       dense: bool = True, residual_norms: list | None = None) -> list[torch.Tensor]:
    """Per layer, the FFN inputs [tokens, d] (the post-attention RMSNorm outputs) on `chunks`;
    with a list `residual_norms`, also appends per layer the residual stream's norm [tokens]."""
    store: list[list[torch.Tensor]] = [[] for _ in model.mlps]
    norms: list[list[torch.Tensor]] = [[] for _ in model.mlps]
    hooks = [m.register_forward_pre_hook(lambda mod, args, j=j: store[j].append(args[0].flatten(0, -2).clone()))
             for j, m in enumerate(model.mlps)]
    if residual_norms is not None:
        hooks += [layer.post_attention_layernorm.register_forward_pre_hook(
            lambda mod, args, j=j: norms[j].append(args[0].flatten(0, -2).norm(dim=-1)))
            for j, layer in enumerate(model.model.layers)]
    model.eval()
    try:
        with dense_mode(model) if dense else contextlib.nullcontext():
            for i in range(0, len(chunks), batch):
                forward(model, chunks[i:i + batch])
    finally:
        for h in hooks:
            h.remove()
    if residual_norms is not None:
        residual_norms.extend(torch.cat(x) for x in norms)
    return [torch.cat(s) for s in store]
