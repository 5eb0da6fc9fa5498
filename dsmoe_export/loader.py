"""Model folder -> validated PyTorch reference model."""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import load_state_dict
from .config import ModelConfig, load_config
from .modeling import DSMoEForCausalLM


def load_model(model_dir: str | Path, *, sparse: bool = True, dtype: torch.dtype = torch.float32,
               progress=None) -> tuple[DSMoEForCausalLM, ModelConfig]:
    """Load a DSMoE folder (or, with sparse=False, any LLaMA folder) as the reference model in eval mode."""
    cfg = load_config(model_dir, require_dsmoe=sparse)
    tensors = load_state_dict(model_dir, cfg, with_routers=sparse, dtype=dtype, progress=progress)
    model = DSMoEForCausalLM(cfg, sparse=sparse).to(dtype)
    model.load_tensors(tensors)
    return model.eval(), cfg
