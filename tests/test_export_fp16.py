"""`--dtype float16`: weights, activations, KV cache and logits in float16 (for the CUDA EP,
docs/cuda.md). The graph must be valid ONNX with float16 initializers and run on the CPU EP
too: the op library registers no float16 CPU kernel, so ONNX Runtime runs the op's ONNX
function body there (checked here against the float16 PyTorch model, which the exporter's
own validation also does at tolerance >= 3e-2)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from dsmoe_export import onnx_op
from dsmoe_export.graph import interface
from dsmoe_export.cli import main
from dsmoe_export.synthetic import make_model_folder
from dsmoe_export.validate import make_session, prompt_inputs


@pytest.mark.parametrize("dense", [False, True])
def test_float16_export(tmp_path, dense):
    folder = make_model_folder(tmp_path / "model")
    out = tmp_path / "model16.onnx"
    args = [str(folder), str(out), "--dtype", "float16", "-q"] + (["--dense"] if dense else [])
    assert main(args) == 0  # includes the validation against the float16 PyTorch model
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=False)
    floats = [t for t in model.graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)]
    big = [t for t in floats if np.prod(t.dims) >= 64]
    assert big and all(t.data_type == TensorProto.FLOAT16 for t in big), "weights must be float16"
    io_types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    assert io_types["logits"] == TensorProto.FLOAT16
    assert all(t == TensorProto.FLOAT16 for k, t in io_types.items() if k.startswith(("past_key", "present")))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["dsmoe_export.dtype"] == "float16"
    ops = [node for node in model.graph.node if node.op_type == onnx_op.OP_TYPE]
    assert bool(ops) == (not dense)

    # The CPU EP with the op library registered: the function body runs the float16 op.
    session = make_session(out, custom_ops=not dense)
    ids, mask, pos = prompt_inputs(256, seq=5)
    n = sum(1 for v in model.graph.input if v.name.startswith("past_key_values.")) // 2
    kv = [v for v in model.graph.input if v.name.startswith("past_key_values.")][0].type.tensor_type.shape.dim
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    for name in interface.past_names(n):
        feeds[name] = np.zeros((2, kv[1].dim_value, 0, kv[3].dim_value), np.float16)
    logits = session.run(["logits"], feeds)[0]
    assert logits.dtype == np.float16 and np.isfinite(logits).all()


def test_bad_dtype_is_one_line(tmp_path, capsys):
    folder = make_model_folder(tmp_path / "model")
    with pytest.raises(SystemExit):
        main([str(folder), str(tmp_path / "x.onnx"), "--dtype", "int8"])
    assert "--dtype" in capsys.readouterr().err
