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
BLOCK = 128       # columns per lazy update (a multiple of the group sizes: 32, 64, 128)
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
    G = quant.check_group_size(group_size)
    zp = quant.zero_point(bits)
    W = np.array(w, np.float64)
    N, K = W.shape
    H = np.array(hessian, np.float64)
    dead = np.diag(H) == 0                      # inputs that were always 0: their weights do not matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H[np.diag_indices(K)] += DAMP * np.mean(np.diag(H))
    hinv = np.linalg.cholesky(np.linalg.inv(H)).T  # upper triangular: H^-1 = hinv^T hinv
    q = np.zeros((N, K), np.uint8)
    scales = np.zeros((N, -(-K // G)), np.float32)
    step = max(G, BLOCK // G * G)
    for b0 in range(0, K, step):
        b1 = min(K, b0 + step)
        w1, err = W[:, b0:b1].copy(), np.zeros((N, b1 - b0))
        h1 = hinv[b0:b1, b0:b1]
        for j in range(b1 - b0):
            col = b0 + j
            if col % G == 0:  # the group's scale, from its columns as they stand now
                grp = w1[:, j:j + G]
                extreme = np.take_along_axis(grp, np.abs(grp).argmax(axis=1)[:, None], axis=1)[:, 0]
                scales[:, col // G] = (extreme / -zp).astype(np.float32)
            s = scales[:, col // G].astype(np.float64)
            safe = np.where(s == 0, 1.0, s)
            qc = np.clip(np.rint(w1[:, j] / safe) + zp, 0, 2 * zp - 1)
            q[:, col] = qc
            e = (w1[:, j] - (qc - zp) * s) / h1[j, j]
            w1[:, j:] -= np.outer(e, h1[j, j:])
            err[:, j] = e
        W[:, b1:] -= err @ hinv[b0:b1, b1:]
    return q, scales


def quantize_block_weights(gate: np.ndarray, up: np.ndarray, down: np.ndarray, fmt: str, group_size: int,
                           hessians: Hessians, layer: int) -> dict[str, np.ndarray]:
    """quant.quantize_block_weights with GPTQ per block: gate/up on the tokens routed to the block,
    down (grouped along the block's rows B) on its gated activations."""
    bits = quant.BITS[fmt]
    out: dict[str, list] = {k: [] for k in ("gate_weight", "gate_scales", "up_weight", "up_scales",
                                               "down_weight", "down_scales")}
    for j in range(gate.shape[0]):
        h_in = hessians.get(f"layers.{layer}.ffn.block{j}", f"layers.{layer}.ffn")
        for name, w in (("gate", gate[j]), ("up", up[j])):
            q, s = quantize(w, h_in, bits, group_size)
            out[f"{name}_weight"].append(quant.pack_int4(q) if bits == 4 else q)
            out[f"{name}_scales"].append(s)
        q, s = quantize(down[j].T, hessians.get(f"layers.{layer}.down.block{j}"), bits, group_size)  # [d, B]
        q = np.ascontiguousarray(q.T)
        out["down_weight"].append(quant.pack_int4(q) if bits == 4 else q)
        out["down_scales"].append(np.ascontiguousarray(s.T))
    return {k: np.stack(v) for k, v in out.items()}
