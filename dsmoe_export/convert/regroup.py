"""Regrouping FFN neurons into blocks: each block's contribution, co-activation clustering, and the
permutation of gate/up rows and down columns (the dense FFN is unchanged)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..modeling import DSMoEMLP


# ------------------------------------------------------------------------- block contributions

def neuron_activations(mlp: DSMoEMLP, h: torch.Tensor) -> torch.Tensor:
    """act(h W_gate) * (h W_up): [tokens, D]."""
    return mlp.act(F.linear(h, mlp.gate_proj.weight)) * F.linear(h, mlp.up_proj.weight)


def block_norms(mlp: DSMoEMLP, h: torch.Tensor, n: int, *, rows: int = 4096) -> torch.Tensor:
    """||o_i(h)|| per token and block: [tokens, n] (the output each block adds to the residual)."""
    out = []
    V = mlp.down_proj.weight  # [d, D]
    B = V.shape[1] // n
    for s in range(0, len(h), rows):
        a = neuron_activations(mlp, h[s:s + rows])
        out.append(torch.stack([(a[:, i * B:(i + 1) * B] @ V[:, i * B:(i + 1) * B].T).norm(dim=-1)
                                for i in range(n)], dim=-1))
    return torch.cat(out)


# ------------------------------------------------------------------------------- regrouping

def coactivation_groups(mlp: DSMoEMLP, h: torch.Tensor, n: int, *, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """A permutation of the D neurons that puts neurons contributing together in the same block.

    Each neuron j is described by its contribution |a_j(t)| * ||V[:, j]|| over the calibration
    tokens t, normalised to unit length; balanced spherical k-means (n clusters of exactly D/n,
    greedy capacity-constrained assignment) groups neurons with similar firing patterns, as
    MoEfication does with co-activation. Returns `perm` [D]: new neuron i is old neuron perm[i]."""
    with torch.no_grad():
        a = neuron_activations(mlp, h)
        feats = (a.abs() * mlp.down_proj.weight.norm(dim=0)).T.double()  # [D, T]
        feats = feats - feats.mean(dim=1, keepdim=True)
        feats = feats / feats.norm(dim=1, keepdim=True).clamp(min=1e-12)
        D = feats.shape[0]
        cap = D // n
        g = torch.Generator().manual_seed(seed)
        centroids = feats[torch.randperm(D, generator=g)[:n]]
        for _ in range(iters):
            sim = feats @ centroids.T                          # [D, n]
            order = torch.argsort(sim.flatten(), descending=True).tolist()
            owner = [-1] * D
            fill = [0] * n
            left = D
            for flat in order:
                j, c = divmod(flat, n)
                if owner[j] >= 0 or fill[c] >= cap:
                    continue
                owner[j] = c
                fill[c] += 1
                left -= 1
                if left == 0:
                    break
            assign = torch.tensor(owner)
            new = torch.stack([feats[assign == c].mean(0) for c in range(n)])
            new = new / new.norm(dim=1, keepdim=True).clamp(min=1e-12)
            if torch.allclose(new, centroids):
                break
            centroids = new
        return torch.cat([torch.nonzero(assign == c).flatten() for c in range(n)])


def permute_ffn(tensors: dict[str, torch.Tensor], layer: int, perm: torch.Tensor) -> None:
    """Reorder the intermediate dimension of one FFN (gate/up rows, down columns): the dense FFN is unchanged."""
    p = f"model.layers.{layer}.mlp."
    tensors[p + "gate_proj.weight"] = tensors[p + "gate_proj.weight"][perm].contiguous()
    tensors[p + "up_proj.weight"] = tensors[p + "up_proj.weight"][perm].contiguous()
    tensors[p + "down_proj.weight"] = tensors[p + "down_proj.weight"][:, perm].contiguous()
