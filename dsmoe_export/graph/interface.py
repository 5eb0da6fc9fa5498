"""The exported graph's interface: optimum's input/output names and dynamic axes.

Inputs `input_ids` [batch, seq], `attention_mask` [batch, total] (0 = left padding),
`past_key_values.{i}.key|value` [batch, kv_heads, past, head_dim]; outputs `logits`
[batch, seq, vocab], `present.{i}.key|value` [batch, kv_heads, total, head_dim] and, on request,
`active.{i}` [batch, seq, n]. No `position_ids`: positions are cache slots (decoder.py).
An optional scalar input `logits_to_keep` (an overridable initializer, default 0 = all positions)
limits logits to the last positions of the call.
"""
from __future__ import annotations

BATCH, SEQ, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
LOGITS_SEQ = "logits_sequence_length"  # sequence_length, or logits_to_keep when that is above 0
LOGITS_TO_KEEP = "logits_to_keep"
# Metadata value of "dsmoe_export.graph": GroupQueryAttention, positions = cache slots, past and
# present may share one buffer (dsmoe_runtime preallocates it).
GRAPH_KIND = "gqa-v1"


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def active_names(num_layers: int) -> list[str]:
    return [f"active.{i}" for i in range(num_layers)]


def input_names(num_layers: int) -> list[str]:
    return ["input_ids", "attention_mask", *past_names(num_layers)]


def output_names(num_layers: int) -> list[str]:
    return ["logits", *present_names(num_layers)]
