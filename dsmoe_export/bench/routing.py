"""Inputs that decide the routing of the benchmark's FFN calls.

- :func:`exact_k`: every token has exactly ``k`` active blocks, a per-token random
  subset. The subset is written into the sign of ``n`` dedicated coordinates of x
  (``x[t, c_i] = +1`` for an active block i, ``-1`` otherwise) and the router
  reads only those coordinates (``router_weight[i] = alpha * e_{c_i}``), so the
  logit of block i is ``+-alpha``: far from any threshold in (0.05, 0.95), in
  float32 as in float64. The other coordinates of x are standard normal.
- :func:`natural`: a random router ``N(0, 1/d)`` on standard normal x: logits
  about ``N(0, 1)``, so at threshold 0.5 each block is active with probability
  about 1/2 and k varies per token (Binomial(n, 1/2)), as a fresh router does.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ALPHA = 4.0  # logit magnitude of the exact-k router: sigmoid(4) = 0.982, sigmoid(-4) = 0.018


@dataclass
class Routing:
    x: np.ndarray              # [T, d] float32
    router_weight: np.ndarray  # [n, d] float32
    active: np.ndarray         # [T, n] bool: the blocks the op computes (threshold 0.5)
    mode: str                  # "exact" or "natural"
    k: int | None = None       # the exact k, when mode == "exact"

    @property
    def tokens(self) -> int:
        return self.x.shape[0]

    @property
    def n(self) -> int:
        return self.active.shape[1]

    @property
    def pairs(self) -> int:
        """Active (token, block) pairs: each costs 6 * B * d FLOPs."""
        return int(self.active.sum())

    @property
    def mean_k(self) -> float:
        return float(self.active.sum(axis=1).mean()) if self.tokens else 0.0

    @property
    def union(self) -> int:
        """Blocks active for at least one token: the weights a call must read."""
        return int(self.active.any(axis=0).sum())

    @property
    def r(self) -> float:
        """Active fraction: mean k / n."""
        return self.mean_k / self.n

    def stats(self) -> dict:
        return {"mode": self.mode, "k": self.k, "mean_k": round(self.mean_k, 4), "r": round(self.r, 4),
                "union": self.union, "pairs": self.pairs,
                "distinct_subsets": int(len({row.tobytes() for row in self.active}))}


def _scores_active(x: np.ndarray, router: np.ndarray, threshold: float) -> np.ndarray:
    logits = x.astype(np.float64) @ router.astype(np.float64).T
    return 1.0 / (1.0 + np.exp(-logits)) > threshold


def exact_k(rng: np.random.Generator, tokens: int, d: int, n: int, k: int, *, threshold: float = 0.5) -> Routing:
    """Exactly k of n blocks active for every token, the subsets drawn uniformly per token."""
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    if d < n:
        raise ValueError(f"exact-k routing needs d >= n (n dedicated coordinates), got d={d}, n={n}")
    coords = rng.choice(d, size=n, replace=False)
    router = np.zeros((n, d), np.float32)
    router[np.arange(n), coords] = ALPHA
    order = np.argsort(rng.random((tokens, n)), axis=1)     # a random permutation per token
    chosen = np.zeros((tokens, n), bool)
    np.put_along_axis(chosen, order[:, :k], True, axis=1)
    x = rng.standard_normal((tokens, d), dtype=np.float32)
    x[:, coords] = np.where(chosen, 1.0, -1.0)
    active = _scores_active(x, router, threshold)
    assert (active == chosen).all(), "exact-k routing: margin too small for this threshold"
    return Routing(x=x, router_weight=router, active=active, mode="exact", k=k)


def natural(rng: np.random.Generator, tokens: int, d: int, n: int, *, threshold: float = 0.5) -> Routing:
    """A random router: k varies per token (mean about n/2 at threshold 0.5)."""
    router = (rng.standard_normal((n, d)) / np.sqrt(d)).astype(np.float32)
    x = rng.standard_normal((tokens, d), dtype=np.float32)
    return Routing(x=x, router_weight=router, active=_scores_active(x, router, threshold), mode="natural")
