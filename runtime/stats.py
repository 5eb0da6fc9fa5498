"""Activation statistics: how many FFN blocks each token used, per layer, over a run.

Filled from the op's optional `active` output (graph outputs `active.{i}`, written by
`python -m dsmoe_export ... --active-outputs`). Per layer it keeps the histogram of k (active
blocks per token, 0..n) and how often each block was active; from those: the mean of k, its
fraction of n (the paper's layer-wise profile), a text table and an optional plot.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

_SPARK = " ▁▂▃▄▅▆▇█"


class ActivationStats:
    def __init__(self, num_experts: Sequence[int]):
        self.num_experts = [int(n) for n in num_experts]
        self.k_hist = [np.zeros(n + 1, np.int64) for n in self.num_experts]   # [layer][k]
        self.block_counts = [np.zeros(n, np.int64) for n in self.num_experts]  # [layer][block]
        self.tokens = 0
        self.calls = 0
        self.union_sum = [0 for _ in self.num_experts]  # per call: blocks any token of the call used

    @property
    def num_layers(self) -> int:
        return len(self.num_experts)

    def reset(self) -> None:
        self.__init__(self.num_experts)

    def add(self, active: Sequence[np.ndarray], valid: np.ndarray | None = None) -> None:
        """One model call: `active[i]` [batch, seq, n] bool for layer i; `valid` [batch, seq] marks
        real tokens (padding and the filler tokens of finished rows are left out)."""
        if len(active) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} active arrays, got {len(active)}")
        counted = None
        for i, a in enumerate(active):
            a = np.asarray(a, dtype=bool)
            if a.shape[-1] != self.num_experts[i]:
                raise ValueError(f"active.{i}: expected last dim {self.num_experts[i]}, got {a.shape}")
            a = a.reshape(-1, a.shape[-1])
            if valid is not None:
                a = a[np.asarray(valid, dtype=bool).reshape(-1)]
            k = a.sum(-1)
            self.k_hist[i] += np.bincount(k, minlength=self.num_experts[i] + 1)
            self.block_counts[i] += a.sum(0)
            self.union_sum[i] += int(a.any(0).sum())
            counted = a.shape[0]
        if counted:
            self.tokens += counted
            self.calls += 1

    # ------------------------------------------------------------------ derived
    def mean_active(self) -> np.ndarray:
        """Mean active blocks per token, per layer [L] (NaN before any token)."""
        return np.array([(h * np.arange(h.size)).sum() / h.sum() if h.sum() else np.nan for h in self.k_hist])

    def mean_fraction(self) -> np.ndarray:
        """mean_active / n per layer: the fraction of FFN compute each layer spent."""
        return self.mean_active() / np.array(self.num_experts, dtype=np.float64)

    def histogram(self, layer: int, *, normalized: bool = True) -> np.ndarray:
        h = self.k_hist[layer]
        return h / h.sum() if normalized and h.sum() else h.copy()

    def block_frequency(self, layer: int) -> np.ndarray:
        """How often each block of the layer was active, as a fraction of tokens."""
        return self.block_counts[layer] / max(self.k_hist[layer].sum(), 1)

    def _quantile(self, layer: int, q: float) -> int:
        h = self.k_hist[layer]
        return int(np.searchsorted(np.cumsum(h), q * h.sum())) if h.sum() else 0

    def table(self) -> str:
        """Per layer: mean k, k/n, p10/median/p90 of k, share of tokens with k = 0, and the
        histogram of k (0..n, left to right) as a sparkline."""
        mean, frac = self.mean_active(), self.mean_fraction()
        lines = [f"activation statistics: {self.tokens} tokens in {self.calls} calls",
                 f"{'layer':>5} {'n':>4} {'mean k':>7} {'k/n':>6} {'p10':>4} {'p50':>4} {'p90':>4} {'k=0':>6}  histogram of k (0..n)"]
        for i, n in enumerate(self.num_experts):
            h = self.histogram(i)
            top = h.max() if h.size and h.max() > 0 else 1.0
            spark = "".join(_SPARK[int(round(v / top * (len(_SPARK) - 1)))] for v in h)
            lines.append(f"{i:>5} {n:>4} {mean[i]:>7.2f} {frac[i]:>6.3f} {self._quantile(i, .1):>4} "
                         f"{self._quantile(i, .5):>4} {self._quantile(i, .9):>4} {h[0] if h.size else 0:>6.1%}  |{spark}|")
        overall = float(np.nanmean(frac)) if self.tokens else float("nan")
        lines.append(f"mean k/n over layers: {overall:.3f} (1.0 = dense)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "calls": self.calls, "num_experts": self.num_experts,
                "mean_active": [None if np.isnan(v) else float(v) for v in self.mean_active()],
                "k_histogram": [h.tolist() for h in self.k_hist],
                "block_counts": [c.tolist() for c in self.block_counts]}

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    def plot(self, path: str | Path | None = None):
        """Two panels: mean k/n per layer (the layer-wise profile) and the histogram of k per layer
        as a heat map. Needs matplotlib; saves to `path` when given; returns the figure."""
        try:
            import matplotlib
            if path is not None:
                matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ImportError("ActivationStats.plot needs matplotlib (pip install matplotlib); "
                              "ActivationStats.table() needs nothing") from e
        L = self.num_layers
        nmax = max(self.num_experts)
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
        ax1.plot(range(L), self.mean_fraction(), marker="o")
        ax1.set(xlabel="layer", ylabel="mean active blocks / n", ylim=(0, 1.05),
                title=f"active FFN blocks per token ({self.tokens} tokens)")
        ax1.grid(alpha=.3)
        grid = np.full((nmax + 1, L), np.nan)
        for i in range(L):
            grid[: self.num_experts[i] + 1, i] = self.histogram(i)
        im = ax2.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
        ax2.set(xlabel="layer", ylabel="k (active blocks)", title="share of tokens with k active blocks")
        fig.colorbar(im, ax=ax2)
        if path is not None:
            fig.savefig(str(path), dpi=120)
        return fig
