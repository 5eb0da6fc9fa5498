"""Routers: random (the paper's start), fitted to each block's contribution, shifted to a target active
fraction (rebias), and the per-layer allocation of active fractions."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..modeling import DSMoEForCausalLM, DSMoEMLP
from .regroup import block_norms, neuron_activations


def random_routers(cfg: ModelConfig, n: int, seed: int, router_bias: bool) -> dict[str, torch.Tensor]:
    """The paper's starting point: a random router (std 1/sqrt(d), as nn.Linear's default scale)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(cfg.num_hidden_layers):
        out[f"model.layers.{i}.mlp.router.weight"] = torch.randn(n, cfg.hidden_size, generator=g) / cfg.hidden_size ** 0.5
        if router_bias:
            out[f"model.layers.{i}.mlp.router.bias"] = torch.zeros(n)
    return out


def _routers_of(model: DSMoEForCausalLM) -> dict[str, torch.Tensor]:
    """The model's current router weights (and biases), under their tensor names."""
    out = {}
    for i, m in enumerate(model.mlps):
        out[f"model.layers.{i}.mlp.router.weight"] = m.router.weight.detach().clone()
        if m.router.bias is not None:
            out[f"model.layers.{i}.mlp.router.bias"] = m.router.bias.detach().clone()
    return out


# ----------------------------------------------------------------------------- router fitting

LOGIT_SCALE = 4.0  # router logits are scaled to about this spread: sharp enough, still trainable


def fit_router(mlp: DSMoEMLP, h: torch.Tensor, n: int, target_active: float, threshold: float,
               *, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Router (weight [n, d], bias [n]) that predicts each block's contribution.

    Least squares (ridge) from the FFN input h to log ||o_i(h)|| for every block i, then one
    per-layer cut-off chosen so that a fraction `target_active` of the (token, block) pairs of the
    calibration tokens is predicted above it: a token keeps the blocks predicted to add the most to
    its residual stream. Logit = scale * (prediction - cut-off) + logit(tau), so that the block is
    active (sigmoid > tau) exactly when its prediction is above the cut-off."""
    with torch.no_grad():
        y = block_norms(mlp, h, n).double().clamp(min=1e-8).log()      # [T, n]
        X = torch.cat([h.double(), torch.ones(len(h), 1, dtype=torch.float64)], dim=1)
        A = X.T @ X
        A += ridge * A.diagonal().mean() * torch.eye(A.shape[0], dtype=torch.float64)
        W = torch.linalg.solve(A, X.T @ y)                               # [d + 1, n]
        pred = X @ W
        return _bias_for(W, pred, target_active, threshold)


def _bias_for(W: torch.Tensor, pred: torch.Tensor, target_active: float, threshold: float):
    if target_active >= 1.0:
        cut = pred.min() - 1.0
    elif target_active <= 0.0:
        cut = pred.max() + 1.0
    else:
        cut = torch.quantile(pred.flatten().float(), 1.0 - target_active).double()
    scale = LOGIT_SCALE / pred.std().clamp(min=1e-6)
    tau = min(max(threshold, 1e-6), 1 - 1e-6)
    weight = (scale * W[:-1].T).float()
    bias = (scale * (W[-1] - cut) + math.log(tau / (1 - tau))).float()
    return weight, bias


def rebias(model: DSMoEForCausalLM, inputs: list[torch.Tensor], target_active: float | list[float]) -> None:
    """Shift each layer's router bias (one offset per layer) so that the layer's active fraction on
    `inputs` is `target_active`: the per-layer threshold knob, for fitted or trained routers."""
    targets = target_active if isinstance(target_active, list) else [target_active] * len(model.mlps)
    with torch.no_grad():
        for m, h, f in zip(model.mlps, inputs, targets):
            logits = F.linear(h, m.router.weight, m.router.bias)
            tau = min(max(m.moe.threshold, 1e-6), 1 - 1e-6)
            z = math.log(tau / (1 - tau))
            if f >= 1.0:
                shift = z - logits.min().item() + 1.0
            elif f <= 0.0:
                shift = z - logits.max().item() - 1.0
            else:
                shift = z - torch.quantile(logits.flatten(), 1.0 - f).item()
            m.router.bias += shift


@torch.no_grad()
def allocate(model: DSMoEForCausalLM, inputs: list[torch.Tensor], residual_norms: list[torch.Tensor],
             target_active: float, *, grid: int = 16, tokens: int = 2048) -> list[float]:
    """Per-layer active fractions averaging `target_active` that lose the least.

    For each layer and each fraction k/grid, the routers (shifted to that fraction) drop some
    blocks; the loss is the mean of ||dropped output||^2 / ||residual stream||^2 over calibration
    tokens. Greedy marginal allocation (largest loss reduction per step first) then spends the
    budget of active blocks where dropping them would hurt most."""
    L = len(model.mlps)
    err = torch.zeros(L, grid + 1)
    for j, (m, h, r) in enumerate(zip(model.mlps, inputs, residual_norms)):
        h, r = h[:tokens], r[:tokens]
        n = m.moe.num_experts
        B = m.down_proj.weight.shape[1] // n
        a = neuron_activations(m, h)
        V = m.down_proj.weight
        o = torch.stack([a[:, i * B:(i + 1) * B] @ V[:, i * B:(i + 1) * B].T for i in range(n)], dim=1)  # [T, n, d]
        logits = F.linear(h, m.router.weight, m.router.bias)
        for k in range(grid + 1):
            f = k / grid
            if f >= 1.0:
                keep = torch.ones_like(logits, dtype=torch.bool)
            elif f <= 0.0:
                keep = torch.zeros_like(logits, dtype=torch.bool)
            else:
                keep = logits > torch.quantile(logits.flatten(), 1.0 - f)
            dropped = (o * (~keep).unsqueeze(-1).to(o.dtype)).sum(1)
            err[j, k] = (dropped.norm(dim=-1).square() / r.square().clamp(min=1e-12)).mean()
    level = [0] * L
    budget = round(target_active * grid * L)
    for _ in range(budget):
        gains = [err[j, level[j]] - err[j, level[j] + 1] if level[j] < grid else -math.inf for j in range(L)]
        best = max(range(L), key=lambda j: gains[j])
        level[best] += 1
    return [lv / grid for lv in level]
