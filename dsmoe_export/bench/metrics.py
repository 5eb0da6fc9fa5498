"""What a call moves and computes, and how far its time is from the machine's limits.

- bytes: the fp32 weights a call must read. Sparse op and MoE: the *union* of the
  blocks active for any token of the call (3 matrices of ``B x d`` each), plus the
  router for the sparse op; dense: all ``3 * D * d``. Activations are not counted.
- FLOPs: the useful ones, ``6 * B * d`` per (token, block) pair computed (two
  projections in, one out, 2 FLOPs per multiply-add): active pairs for sparse and
  MoE, all ``T * n`` pairs for dense.
- bound: the roofline time ``max(bytes / bandwidth, FLOPs / GEMM rate)`` from the
  probed ceilings; ``of_roofline = bound / measured`` (1.0 = at the physical limit).
"""
from __future__ import annotations

FLOAT_BYTES = 4


def block_bytes(d: int, B: int) -> int:
    return 3 * B * d * FLOAT_BYTES


def call_cost(kind: str, *, d: int, n: int, B: int, tokens: int, union: int, pairs: int,
              group_size: int = 32) -> tuple[int, int]:
    """(bytes of weights read, useful FLOPs) of one call of graph ``kind``. Quantized kinds
    (``sparse-int4``, ``dense-int8``, ``qmoe-int4``, ...): the stored bytes (weights and float32 scales)."""
    if "-" in kind:
        from .. import quant

        base, fmt = kind.split("-", 1)
        per_block = quant.size_bytes(fmt, 1, B, d, group_size)
        blocks = n if base == "dense" else union
        weights = blocks * per_block + (n * d * FLOAT_BYTES if base == "sparse" else 0)
        return weights, 6 * B * d * (n * tokens if base == "dense" else pairs)
    if kind == "dense":
        return n * block_bytes(d, B), 6 * B * d * n * tokens
    weights = union * block_bytes(d, B)
    if kind.startswith("sparse"):
        weights += n * d * FLOAT_BYTES  # the router
    return weights, 6 * B * d * pairs


def rates(bytes_: int, flops: int, seconds: float, ceilings: dict | None) -> dict:
    """GB/s, GFLOP/s, their share of the ceilings and the roofline efficiency of one call."""
    out = {"gb_s": bytes_ / seconds / 1e9 if seconds > 0 else None,
           "gflop_s": flops / seconds / 1e9 if seconds > 0 else None}
    if ceilings and seconds > 0:
        bw, gf = ceilings["bandwidth_gb_s"], ceilings["gemm_gflop_s"]
        out["gb_s_pct"] = 100.0 * out["gb_s"] / bw
        out["gflop_s_pct"] = 100.0 * out["gflop_s"] / gf
        bound = max(bytes_ / (bw * 1e9), flops / (gf * 1e9))
        out["bound_ms"] = bound * 1e3
        out["of_roofline"] = bound / seconds
    return out


def annotate(rows: list[dict], ceilings: dict | None) -> None:
    """Adds the rates to rows in place: op rows from bytes / flops / ms_min, end-to-end rows
    from their FFN share (ffn_bytes / ffn_flops / ffn_ms, keys prefixed ffn_)."""
    for row in rows:
        for prefix, ms in (("", "ms_min"), ("ffn_", "ffn_ms")):
            if f"{prefix}bytes" in row and row.get(ms) is not None:
                seconds = row[ms] / 1e3
                row.update({prefix + k: v for k, v in
                            rates(row[f"{prefix}bytes"], row[f"{prefix}flops"], seconds, ceilings).items()})
