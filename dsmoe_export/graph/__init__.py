"""The ONNX graph of a DSMoE (or dense) LLaMA, emitted directly from the weights."""
from .builder import IR_VERSION, MS_DOMAIN, OPSET, GraphBuilder
from .decoder import GraphOptions, build_model, check_config, projected_ffn_applies

__all__ = ["GraphBuilder", "GraphOptions", "IR_VERSION", "MS_DOMAIN", "OPSET", "build_model", "check_config",
           "projected_ffn_applies"]
