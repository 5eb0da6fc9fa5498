"""The exported graph's interface: optimum's input/output names and dynamic axes."""
from __future__ import annotations

import torch
from torch import nn

from .modeling import DSMoEForCausalLM

BATCH, SEQ, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def input_names(num_layers: int) -> list[str]:
    return ["input_ids", "attention_mask", "position_ids", *past_names(num_layers)]


def output_names(num_layers: int) -> list[str]:
    return ["logits", *present_names(num_layers)]


class FlatKVWrapper(nn.Module):
    """Flattens the KV cache into positional tensors, in `input_names` order."""

    def __init__(self, model: DSMoEForCausalLM):
        super().__init__()
        self.m = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        logits, presents = self.m(input_ids, attention_mask, position_ids, pairs)
        return (logits, *[t for kv in presents for t in kv])


def example_inputs(model: DSMoEForCausalLM, dtype: torch.dtype = torch.float32):
    """Trace inputs. Batch, sequence and past are all >= 2 and distinct: a size of
    1 (or two equal sizes) would let torch.export specialise or merge the axes."""
    cfg = model.cfg
    b, s, p = 2, 3, 4
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
    mask = torch.ones(b, p + s, dtype=torch.int64)
    pos = torch.arange(p, p + s).expand(b, s).contiguous()
    kv = (b, cfg.num_key_value_heads, p, cfg.head_dim)
    past = [torch.randn(kv, generator=g).to(dtype) for _ in range(2 * cfg.num_hidden_layers)]
    return (ids, mask, pos, *past)


def dynamic_shapes(num_layers: int):
    batch, seq, past = torch.export.Dim(BATCH), torch.export.Dim(SEQ), torch.export.Dim(PAST)
    # The mask's length is past + seq; AUTO lets torch.export derive that relation.
    return {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: torch.export.Dim.AUTO},
        "position_ids": {0: batch, 1: seq},
        "past": tuple({0: batch, 2: past} for _ in range(2 * num_layers)),
    }
