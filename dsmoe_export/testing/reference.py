"""Float64 numpy references of org.dsmoe::GatedBlockSparseFFN and ProjectedSparseFFN,
written from docs/op-spec.md alone (it imports nothing else of dsmoe_export, on purpose): the
kernels and the ONNX function bodies are all checked against them.
"""
from __future__ import annotations

import math

import numpy as np

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_erf = np.vectorize(math.erf, otypes=[np.float64])


def _sigmoid(z):
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-z))


def _activation(name: str, z: np.ndarray) -> np.ndarray:
    if name == "silu":
        return z * _sigmoid(z)
    if name == "gelu":
        return 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * z * (1.0 + np.tanh(_SQRT_2_OVER_PI * (z + 0.044715 * z**3)))
    raise ValueError(f"unknown activation {name!r}")


def router_scores(x, router_weight, router_bias=None):
    """sigmoid scores s [..., n] in float64."""
    logits = np.asarray(x, np.float64) @ np.asarray(router_weight, np.float64).T
    if router_bias is not None:
        logits = logits + np.asarray(router_bias, np.float64)
    return _sigmoid(logits)


def ffn_reference(x, router_weight, gate, up, down, router_bias=None, *, threshold=0.5, rescale=True,
                  weighting="score", activation="silu", route_x=None):
    """(Y [..., d] float64, active [..., n] bool) for the packed layouts of the spec:
    router_weight [n, d], gate/up/down [n, B, d], router_bias [n] or None. `route_x` (default x):
    what the router reads, where it differs from the gate/up input (the quantized ops at
    accuracy_level 4 route on X as given and compute on X rounded to int8)."""
    if weighting not in ("score", "binary"):
        raise ValueError(f"unknown weighting {weighting!r}")
    x = np.asarray(x, np.float64)
    gate, up, down = (np.asarray(a, np.float64) for a in (gate, up, down))
    n, _, d = gate.shape
    lead = x.shape[:-1]
    xf = x.reshape(-1, d)

    rf = xf if route_x is None else np.asarray(route_x, np.float64).reshape(-1, d)
    s = router_scores(rf, router_weight, router_bias)             # [N, n]
    active = s > threshold                                         # NaN -> False
    k = active.sum(axis=-1)                                        # [N]
    g = np.where(active, s if weighting == "score" else 1.0, 0.0)
    c = np.where((k > 0) & bool(rescale), n / np.maximum(k, 1), 1.0)

    y = np.zeros_like(xf)
    for t, i in zip(*np.nonzero(active)):                          # only active (token, block) pairs
        h = _activation(activation, gate[i] @ xf[t]) * (up[i] @ xf[t])   # [B]
        y[t] += g[t, i] * (down[i].T @ h)
    y *= c[:, None]
    return y.reshape(*lead, d), active.reshape(*lead, n)


def rms_norm(s, weight, epsilon):
    """s / sqrt(mean(s^2) + epsilon) * weight over the last dim, float64."""
    s = np.asarray(s, np.float64)
    return s / np.sqrt(np.mean(s * s, axis=-1, keepdims=True) + epsilon) * np.asarray(weight, np.float64)


def projected_reference(a, skip, in_proj, norm_weight, router_weight, gate, up, down, out_norm_weight, out_proj,
                        router_bias=None, *, epsilon, **ffn_attrs):
    """(Y [..., p], skip_out [..., d], active [..., n]) of ProjectedSparseFFN in float64:
    in_proj [d, k] and out_proj [p, d] in nn.Linear layout, the FFN's weights as ffn_reference's."""
    s = np.asarray(a, np.float64) @ np.asarray(in_proj, np.float64).T + np.asarray(skip, np.float64)
    f, active = ffn_reference(rms_norm(s, norm_weight, epsilon), router_weight, gate, up, down, router_bias,
                              **ffn_attrs)
    s2 = f + s
    y = rms_norm(s2, out_norm_weight, epsilon) @ np.asarray(out_proj, np.float64).T
    return y, s2, active
