"""Independent float64 references for whole models.

The dense reference is transformers' LlamaForCausalLM. The DSMoE reference
is the same model with every MLP swapped for the numpy op reference
(dsmoe_export/testing/reference.py) on weights cut straight from the folder's tensors: it
shares no code with dsmoe_export's model, packing or exporter.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers
from dsmoe_export.testing.reference import ffn_reference
from transformers import LlamaForCausalLM

transformers.logging.set_verbosity_error()

ACT = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


class NumpyDSMoEMLP(torch.nn.Module):
    def __init__(self, mlp, router_w, router_b, dsmoe: dict, act: str):
        super().__init__()
        n = dsmoe["num_experts"]
        gate = mlp.gate_proj.weight.detach().double().numpy()
        up = mlp.up_proj.weight.detach().double().numpy()
        down = mlp.down_proj.weight.detach().double().numpy()
        D, d = gate.shape
        B = D // n
        self.w = dict(
            router_weight=router_w, router_bias=router_b,
            gate=np.stack([gate[i * B:(i + 1) * B] for i in range(n)]),
            up=np.stack([up[i * B:(i + 1) * B] for i in range(n)]),
            down=np.stack([down[:, i * B:(i + 1) * B].T for i in range(n)]),
        )
        self.kw = dict(threshold=dsmoe.get("threshold", 0.5), rescale=dsmoe.get("rescale", True),
                       weighting=dsmoe.get("weighting", "score"), activation=dsmoe.get("activation", act))
        self.scores: list[np.ndarray] = []

    def forward(self, x):
        xn = x.detach().double().numpy()
        y, _ = ffn_reference(xn, self.w["router_weight"], self.w["gate"], self.w["up"], self.w["down"],
                             self.w["router_bias"], **self.kw)
        logits = xn @ self.w["router_weight"].T + (0 if self.w["router_bias"] is None else self.w["router_bias"])
        self.scores.append(1 / (1 + np.exp(-logits)))
        return torch.from_numpy(y).to(x.dtype)


def hf_reference(model_dir: str | Path, *, sparse: bool) -> LlamaForCausalLM:
    """float64 transformers Llama; with `sparse`, the MLPs are the numpy DSMoE reference."""
    from safetensors.numpy import load_file

    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64).eval()
    if sparse:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        tensors = {}
        for f in Path(model_dir).glob("*.safetensors"):
            tensors.update(load_file(str(f)))
        for i, layer in enumerate(model.model.layers):
            rw = tensors[f"model.layers.{i}.mlp.router.weight"].astype(np.float64)
            rb = tensors.get(f"model.layers.{i}.mlp.router.bias")
            layer.mlp = NumpyDSMoEMLP(layer.mlp, rw, None if rb is None else rb.astype(np.float64),
                                      cfg["dsmoe"], ACT[cfg.get("hidden_act", "silu")])
    return model


def min_threshold_margin(model: LlamaForCausalLM, threshold: float) -> float:
    """Smallest |score - tau| seen by the numpy MLPs since the last reset: a tiny margin
    means fp32 and fp64 may legitimately pick different blocks for that token."""
    scores = [s for layer in model.model.layers for s in getattr(layer.mlp, "scores", [])]
    for layer in model.model.layers:
        if hasattr(layer.mlp, "scores"):
            layer.mlp.scores = []
    return min((float(np.min(np.abs(s - threshold))) for s in scores if s.size), default=1.0)
