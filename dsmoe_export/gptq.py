"""Calibration-aware rounding of the quantized weights (``--calibration-text``): GPTQ
(Frantar et al., 2022, arXiv 2210.17323) in the storage format of quant.py.

Round-to-nearest quantizes every weight on its own. GPTQ quantizes the input columns of a weight
[out, in] one at a time and spreads each column's rounding error over the columns not yet
quantized, weighted by the inverse of H = X^T X, the second moment of the weight's inputs on
calibration text: it minimizes the output error ||X W^T - X Q^T|| rather than the weight error.
Scales are chosen per group of `group_size` inputs when the group's first column is reached, on
all 2^bits levels as quant.quantize_rows does, so the result is stored exactly like round-to-nearest.

The inputs X come from the PyTorch reference (float32) on the calibration tokens, one pass
(`collect`): per layer the attention input (packed Q/K/V), o_proj's input, the FFN input and
the down projection's input; for the sparse FFN per block, over the tokens routed to the block
(its gated activations times the routing coefficient for down); the lm_head's input.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from . import quant

DAMP = 0.01       # added to H's diagonal, times its mean: keeps the inverse well conditioned
BLOCK = 32        # columns per lazy update, a whole group: the rest of the row is updated by one matmul
MIN_TOKENS = 16   # a block routed fewer calibration tokens than this uses the FFN's whole input


@dataclass
class Hessians:
    """H = X^T X (float64) per weight input, keyed by name (see `collect`), and the token counts."""

    h: dict[str, np.ndarray] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)

    def add(self, key: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        if x.shape[0] == 0:
            return
        hx = (x.T @ x).numpy()
        self.h[key] = self.h[key] + hx if key in self.h else hx
        self.tokens[key] = self.tokens.get(key, 0) + x.shape[0]

    def get(self, key: str, fallback: str | None = None) -> np.ndarray | None:
        if self.tokens.get(key, 0) >= MIN_TOKENS:
            return self.h[key]
        return self.h.get(fallback) if fallback else None


@torch.no_grad()
def collect(model, token_ids: np.ndarray, *, chunk: int = 256) -> Hessians:
    """One pass of the reference over `token_ids` (1-D) in chunks of `chunk` tokens. Keys:
    layers.{i}.attn (Q/K/V input), layers.{i}.o_proj, layers.{i}.ffn (gate/up input),
    layers.{i}.down (dense down input), layers.{i}.ffn.block{j} / layers.{i}.down.block{j}
    (sparse), lm_head."""
    hs = Hessians()
    hooks = []
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        hooks.append(attn.q_proj.register_forward_hook(lambda m, a, o, i=i: hs.add(f"layers.{i}.attn", a[0])))
        hooks.append(attn.o_proj.register_forward_hook(lambda m, a, o, i=i: hs.add(f"layers.{i}.o_proj", a[0])))
        hooks.append(mlp.register_forward_hook(lambda m, a, o, i=i: _ffn_inputs(hs, i, m, a[0])))
    norm = model.model.norm
    hooks.append(norm.register_forward_hook(lambda m, a, o: hs.add("lm_head", o)))
    try:
        ids = torch.as_tensor(np.asarray(token_ids, np.int64))
        for t0 in range(0, ids.numel(), chunk):
            part = ids[t0:t0 + chunk][None]
            model(part, torch.ones_like(part), torch.arange(part.shape[1])[None], model.empty_past(1))
    finally:
        for hook in hooks:
            hook.remove()
    return hs


def _ffn_inputs(hs: Hessians, i: int, mlp, x: torch.Tensor) -> None:
    hs.add(f"layers.{i}.ffn", x)
    h = mlp.act(mlp.gate_proj(x)) * mlp.up_proj(x)
    if mlp.moe is None:
        hs.add(f"layers.{i}.down", h)
        return
    coef, active = mlp.gates(x)
    n = mlp.moe.num_experts
    xs, hb = x.reshape(-1, x.shape[-1]), (h.unflatten(-1, (n, -1)) * coef.unsqueeze(-1)).reshape(-1, n, h.shape[-1] // n)
    act = active.reshape(-1, n)
    for j in range(n):
        rows = act[:, j]
        hs.add(f"layers.{i}.ffn.block{j}", xs[rows])
        hs.add(f"layers.{i}.down.block{j}", hb[rows, j])


def quantize(w: np.ndarray, hessian: np.ndarray | None, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(q [N, K] uint8, scales [N, ceil(K / G)] float32) of w [N, K] (out, in), groups along K, in
    quant.quantize_rows' format; round to nearest when `hessian` is None."""
    if hessian is None:
        return quant.quantize_rows(w, bits, group_size)
    q, s = quantize_batch(np.asarray(w)[None], np.asarray(hessian)[None], bits, group_size)
    return q[0], s[0]


def quantize_batch(w: np.ndarray, hessian: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ of a batch of weights w [b, N, K], each with its own hessian [b, K, K] (one column loop
    for all: the sparse FFN's blocks). Returns q [b, N, K] uint8 and scales [b, N, ceil(K / G)]."""
    G = quant.check_group_size(group_size)
    zp = quant.zero_point(bits)
    W = np.array(w, np.float32)  # float32 updates, float64 inverse: as GPTQ's reference implementation
    nb, N, K = W.shape
    H = np.array(hessian, np.float64)
    diag = np.diagonal(H, axis1=1, axis2=2)
    dead = diag == 0                           # inputs that were always 0: their weights do not matter
    W[np.broadcast_to(dead[:, None, :], W.shape)] = 0.0
    idx = np.arange(K)
    H[:, idx, idx] = np.where(dead, 1.0, diag) + DAMP * diag.mean(axis=1, keepdims=True)
    hinv = np.transpose(np.linalg.cholesky(np.linalg.inv(H)), (0, 2, 1)).astype(np.float32)  # H^-1 = hinv^T hinv
    q = np.zeros((nb, N, K), np.uint8)
    scales = np.zeros((nb, N, -(-K // G)), np.float32)
    step = max(G, BLOCK // G * G)
    for b0 in range(0, K, step):
        b1 = min(K, b0 + step)
        w1, err = W[:, :, b0:b1].copy(), np.zeros((nb, N, b1 - b0), np.float32)
        h1 = hinv[:, b0:b1, b0:b1]
        for j in range(b1 - b0):
            col = b0 + j
            if col % G == 0:  # the group's scale, from its columns as they stand now
                grp = w1[:, :, j:j + G]
                extreme = np.take_along_axis(grp, np.abs(grp).argmax(axis=2)[..., None], axis=2)[..., 0]
                scales[:, :, col // G] = (extreme / -zp).astype(np.float32)
            s = scales[:, :, col // G]
            qc = np.clip(np.rint(w1[:, :, j] / np.where(s == 0, np.float32(1), s)) + zp, 0, 2 * zp - 1)
            q[:, :, col] = qc
            e = (w1[:, :, j] - (qc - zp).astype(np.float32) * s) / h1[:, j, j][:, None]
            w1[:, :, j:] -= e[:, :, None] * h1[:, None, j, j:]
            err[:, :, j] = e
        W[:, :, b1:] -= err @ hinv[:, b0:b1, b1:]
    return q, scales


def _block_hessians(hessians: Hessians, layer: int, n: int, kind: str, fallback: str | None, dim: int):
    out = []
    for j in range(n):
        h = hessians.get(f"layers.{layer}.{kind}.block{j}", fallback)
        out.append(h if h is not None else np.eye(dim))  # a block never routed: plain rounding's target
    return np.stack(out)


def quantize_block_weights(gate: np.ndarray, up: np.ndarray, down: np.ndarray, fmt: str, group_size: int,
                           hessians: Hessians, layer: int) -> dict[str, np.ndarray]:
    """quant.quantize_block_weights with GPTQ per block: gate/up on the tokens routed to the block,
    down (grouped along the block's rows B) on its gated activations."""
    bits = quant.BITS[fmt]
    n, B, d = gate.shape
    h_in = _block_hessians(hessians, layer, n, "ffn", f"layers.{layer}.ffn", d)
    q, s = quantize_batch(np.concatenate([gate, up], axis=1), h_in, bits, group_size)  # [n, 2B, d]
    out = {}
    for name, rows in (("gate", slice(0, B)), ("up", slice(B, 2 * B))):
        out[f"{name}_weight"] = quant.pack_int4(q[:, rows]) if bits == 4 else np.ascontiguousarray(q[:, rows])
        out[f"{name}_scales"] = np.ascontiguousarray(s[:, rows])
    h_down = _block_hessians(hessians, layer, n, "down", None, B)
    q, s = quantize_batch(down.transpose(0, 2, 1), h_down, bits, group_size)  # [n, d, B]: groups along B
    q = np.ascontiguousarray(q.transpose(0, 2, 1))
    out["down_weight"] = quant.pack_int4(q) if bits == 4 else q
    out["down_scales"] = np.ascontiguousarray(s.transpose(0, 2, 1))
    return out
