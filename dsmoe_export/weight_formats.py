"""Checks of the export's weight formats (``--ffn-weights``, ``--matmul-weights``, ``--group-size``)
against each other and the model, before anything is built. The formats themselves are stored
by graph/weights.py (MatMuls, the embedding table) and graph/ffn.py (the FFN blocks)."""
from __future__ import annotations

from . import quant
from .errors import ExportError


def check_formats(ffn_weights: str, matmul_weights: str, group_size: int, *, dtype: str = "float32",
                  lm_head_weights: str | None = None) -> None:
    lm_head_weights = lm_head_weights or matmul_weights
    for name, value in (("ffn_weights", ffn_weights), ("matmul_weights", matmul_weights),
                        ("lm_head_weights", lm_head_weights)):
        if value not in quant.FORMATS:
            raise ExportError(f"{name} must be one of {', '.join(quant.FORMATS)}, got {value!r}")
    try:
        quant.check_group_size(group_size)
    except ValueError as e:
        raise ExportError(f"--group-size: {e}") from None
    if dtype != "float32" and (ffn_weights, matmul_weights, lm_head_weights) != ("float32",) * 3:
        raise ExportError("--ffn-weights / --matmul-weights / --lm-head-weights need --dtype float32 "
                          "(float32 activations)")


def check_shapes(cfg, *, ffn_weights: str, sparse: bool, file=None) -> None:
    """The sparse op's int4 blocks pack 32 values per 16 bytes along d."""
    if sparse and ffn_weights == "int4" and cfg.hidden_size % 32:
        raise ExportError(f"--ffn-weights int4 needs hidden_size to be a multiple of 32, got {cfg.hidden_size}",
                          file=file)
