"""Random inputs of org.dsmoe::GatedBlockSparseFFN whose routing is unambiguous, and the
tolerance of a float32 kernel against the float64 reference (docs/op-spec.md)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..onnx_op import LAYOUT_ATTRIBUTES, tile_down, tile_gate_up
from .reference import ffn_reference, router_scores

# fp32 kernel vs float64 reference: max |Y - Y_ref| <= RTOL * max(1, max |Y_ref|).
RTOL = 1e-4
# Routing decisions within this distance of the threshold (in sigmoid space)
# could legitimately differ between float32 and float64: inputs avoid them.
ROUTING_MARGIN = 1e-4

INPUT_NAMES = ("X", "router_weight", "gate_weight", "up_weight", "down_weight", "router_bias")


@dataclass
class Case:
    x: np.ndarray
    router_weight: np.ndarray
    gate: np.ndarray
    up: np.ndarray
    down: np.ndarray
    router_bias: np.ndarray | None = None
    attrs: dict = field(default_factory=dict)

    @property
    def num_experts(self) -> int:
        return self.gate.shape[0]

    def feeds(self) -> dict[str, np.ndarray]:
        """The op's inputs: down in the layout attribute down_tile names, gate and up in gate_up_tile's
        (self.gate, self.up, self.down are [n, B, d])."""
        down, gate, up = self.down, self.gate, self.up
        if self.attrs.get("down_tile") and self.down.shape == self.gate.shape:
            down = tile_down(self.down)
        if self.attrs.get("gate_up_tile") and self.gate.ndim == 3:
            gate, up = tile_gate_up(self.gate), tile_gate_up(self.up)
        arrays = (self.x, self.router_weight, gate, up, down, self.router_bias)
        return {k: v for k, v in zip(INPUT_NAMES, arrays) if v is not None}

    def reference(self):
        attrs = {k: v for k, v in self.attrs.items() if k not in LAYOUT_ATTRIBUTES}  # layouts, not semantics
        return ffn_reference(self.x, self.router_weight, self.gate, self.up, self.down, self.router_bias,
                             **attrs)


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def make_case(rng: np.random.Generator, lead: tuple[int, ...], d: int, n: int, B: int, *, bias: bool = False,
              forced: bool = True, **attrs) -> Case:
    """Random inputs whose routing is unambiguous, with a spread of k per token.

    The router is r_i = alpha * u + (noise orthogonal to u) for a unit vector u,
    so a token x = s * u gets the logit alpha * s + b_i from every block: the
    first tokens are forced to k = n and (when possible) k = 0. Other tokens are
    centred on the threshold so that k varies; rows with a logit too close to it
    are redrawn.
    """
    tau = attrs.get("threshold", 0.5)
    tau_logit = _logit(min(max(tau, 1e-3), 1 - 1e-3))
    centre = _logit(min(max(tau, 0.05), 0.95))
    u = rng.standard_normal(d)
    u /= np.linalg.norm(u)
    alpha = 2.0
    noise = rng.standard_normal((n, d)) / math.sqrt(d)
    router = alpha * u + noise - np.outer(noise @ u, u)
    b = rng.uniform(-0.5, 0.5, n) if bias else None

    N = math.prod(lead)
    x = rng.standard_normal((N, d)) + (centre / alpha) * u

    def ambiguous(rows):
        s = router_scores(rows, router, b)
        return (np.abs(s - tau) < ROUTING_MARGIN).any(axis=-1)

    for _ in range(100):
        bad = ambiguous(x)
        if not bad.any():
            break
        x[bad] = rng.standard_normal((int(bad.sum()), d)) + (centre / alpha) * u
    else:
        raise AssertionError("could not draw unambiguous routing inputs")

    if forced and N >= 1:  # all blocks active; for tau = 1, scores of exactly 1.0 that the strict > rejects
        x[0] = (tau_logit + 8.0 if tau < 1.0 else 40.0) / alpha * u
    if forced and N >= 2 and tau > 0.0:  # no block active (impossible in float32 for tau = 0)
        x[1] = (tau_logit - 8.0) / alpha * u

    f32 = np.float32
    return Case(
        x=x.reshape(*lead, d).astype(f32),
        router_weight=router.astype(f32),
        gate=(rng.standard_normal((n, B, d)) / math.sqrt(d)).astype(f32),
        up=(rng.standard_normal((n, B, d)) / math.sqrt(d)).astype(f32),
        down=(rng.standard_normal((n, B, d)) / math.sqrt(B)).astype(f32),
        router_bias=None if b is None else b.astype(f32),
        attrs=attrs,
    )


def rel_err(y, y_ref) -> float:
    """max |y - y_ref| / max(1, max |y_ref|): the error measure every tolerance here applies to."""
    y, y_ref = np.asarray(y, np.float64), np.asarray(y_ref, np.float64)
    return float(np.abs(y - y_ref).max(initial=0.0)) / max(1.0, float(np.abs(y_ref).max(initial=0.0)))
