"""ONNX Runtime registers `SimplifiedLayerNormalization` in the default ONNX domain, where the onnx
package does not know it: without this schema `onnx.checker` rejects every export ("No Op
registered for SimplifiedLayerNormalization"). Registered on first use, for the checker only."""
from __future__ import annotations

import onnx
from onnx.defs import OpSchema

_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]


def register_ort_schemas() -> None:
    if onnx.defs.has("SimplifiedLayerNormalization"):
        return
    schema = OpSchema(
        "SimplifiedLayerNormalization", "", 1,
        doc="ONNX Runtime's RMS normalization (onnxruntime/core/graph/contrib_ops/onnx_function_util).",
        inputs=[OpSchema.FormalParameter("X", "T"), OpSchema.FormalParameter("scale", "V")],
        outputs=[OpSchema.FormalParameter("Y", "V"),
                 OpSchema.FormalParameter("inv_std_var", "U", param_option=OpSchema.FormalParameterOption.Optional)],
        type_constraints=[("T", _FLOATS, "input"), ("U", ["tensor(float)", "tensor(double)"], "stash"),
                          ("V", _FLOATS, "output")],
        attributes=[OpSchema.Attribute("axis", OpSchema.AttrType.INT, "first normalized axis", required=False),
                    OpSchema.Attribute("epsilon", OpSchema.AttrType.FLOAT, "epsilon", required=False),
                    OpSchema.Attribute("stash_type", OpSchema.AttrType.INT, "stash type", required=False)])
    onnx.defs.register_schema(schema)
