"""A small ONNX graph builder: nodes, initializers from numpy, shared constants, fresh names."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# onnxruntime >= 1.20 loads IR 10 (opset 21); onnx >= 1.18 writes newer IRs by default, which
# onnxruntime 1.31 refuses ("max supported IR version: 13" and below for older runtimes).
IR_VERSION = 10
OPSET = 21
MS_DOMAIN = "com.microsoft"

NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
              np.dtype(np.int64): TensorProto.INT64, np.dtype(np.int32): TensorProto.INT32,
              np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.bool_): TensorProto.BOOL}


class GraphBuilder:
    """Collects nodes and initializers in order; `op` returns the name of its (first) output."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.domains: dict[str, int] = {"": OPSET}
        self._names: set[str] = set()
        self._consts: dict[tuple, str] = {}

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def op(self, op_type: str, inputs: list[str], *, name: str, outputs: int | list[str] = 1,
           domain: str = "", **attrs) -> str:
        """Append a node named `name`; its outputs are `name/out{j}` (or the names given).
        Returns the first output's name (use `self.nodes[-1].output` for the others)."""
        node_name = self.fresh(name)
        outs = outputs if isinstance(outputs, list) else [f"{node_name}/out{j}" for j in range(outputs)]
        if domain and domain not in self.domains:
            self.domains[domain] = 1
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=node_name, domain=domain or None,
                                           **attrs))
        return outs[0]

    def initializer(self, name: str, value: np.ndarray) -> str:
        name = self.fresh(name)
        # np.require, not np.ascontiguousarray: that one turns a scalar into shape [1]
        self.initializers.append(numpy_helper.from_array(np.require(value, requirements="C"), name))
        return name

    def const(self, value, dtype=np.int64) -> str:
        """A shared constant initializer (scalars and short 1-D lists)."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            label = "_".join(str(v) for v in arr.reshape(-1)[:4]) if arr.size else "empty"
            self._consts[key] = self.initializer(f"const/{arr.dtype.name}/{list(arr.shape)}/{label}", arr)
        return self._consts[key]

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self._names.add(name)
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def optional_input(self, name: str, default: np.ndarray) -> str:
        """A graph input with a default: an initializer of the same name, which a caller may feed
        (ONNX Runtime's overridable initializers); callers that do not know it see no new input."""
        self._names.add(name)
        arr = np.asarray(default)
        self.initializers.append(numpy_helper.from_array(arr, name))
        self.inputs.append(helper.make_tensor_value_info(name, NP_TO_ONNX[arr.dtype], list(arr.shape)))
        return name

    def output(self, name: str, elem_type: int, shape: list) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def model(self, graph_name: str, *, producer: str, metadata: dict[str, str]) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in self.domains.items()],
                                  producer_name=producer)
        model.ir_version = IR_VERSION
        for key, value in metadata.items():
            model.metadata_props.add(key=key, value=value)
        return model
