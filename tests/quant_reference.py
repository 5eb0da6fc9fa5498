"""Float64 numpy reference of the quantized ops' weight formats (docs/op-spec.md, "Quantized
variants"), written from the spec alone: the op inputs back to float blocks, which then go
through reference.ffn_reference."""
from __future__ import annotations

import numpy as np


def int4_values(packed: np.ndarray) -> np.ndarray:
    """[..., d / 2] bytes -> [..., d] values 0..15: byte m of every 16 holds value m of its 32
    (low nibble) and value m + 16 (high nibble)."""
    *lead, half = packed.shape
    out = np.empty((*lead, half * 2), np.int64)
    for chunk in range(half // 16):
        b = packed[..., chunk * 16:(chunk + 1) * 16].astype(np.int64)
        out[..., chunk * 32:chunk * 32 + 16] = b % 16
        out[..., chunk * 32 + 16:chunk * 32 + 32] = b // 16
    return out


def dequantize(inputs: dict, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """gate, up, down [n, B, d] float64 from the op's weight and scale inputs."""
    zp = 2 ** (bits - 1)

    def values(q):
        return (int4_values(q) if bits == 4 else q.astype(np.int64)) - zp

    out = []
    for name in ("gate", "up"):
        v = values(inputs[f"{name}_weight"])                       # [n, B, d]
        s = np.asarray(inputs[f"{name}_scales"], np.float64)        # [n, B, ceil(d/G)]
        cols = np.arange(v.shape[-1]) // group_size
        out.append(v * s[:, :, cols])
    v = values(inputs["down_weight"])                              # [n, B, d]
    s = np.asarray(inputs["down_scales"], np.float64)               # [n, ceil(B/G), d]
    rows = np.arange(v.shape[1]) // group_size
    out.append(v * s[:, rows, :])
    return tuple(out)


def round_to_int8(x: np.ndarray, group_size: int) -> np.ndarray:
    """X rounded to int8 per group of `group_size` columns (accuracy_level 4), float32 arithmetic as
    the spec writes it: s = max |x| / 127, q = clip(round_half_even(x / s), -127, 127), 0 where s = 0,
    x_hat = q * s."""
    x = np.asarray(x, np.float32)
    d = x.shape[-1]
    flat = x.reshape(-1, d)
    out = np.empty_like(flat)
    for g0 in range(0, d, group_size):
        part = flat[:, g0:g0 + group_size]
        s = np.abs(part).max(axis=1, keepdims=True) / np.float32(127)
        with np.errstate(divide="ignore", invalid="ignore"):  # s = 0, NaN or inf
            q = np.clip(np.rint(part / s), -127, 127)
            q = np.where(s == 0, np.float32(0), q).astype(np.float32)
            out[:, g0:g0 + group_size] = q * s
    return out.reshape(x.shape)
