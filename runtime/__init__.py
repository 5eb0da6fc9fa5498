"""dsmoe_runtime: what an ONNX Runtime application needs to run a DSMoE export.

`get_library_path()` is the hook for `SessionOptions.register_custom_ops_library`,
as onnxruntime-extensions does it.
"""
from ._library import LibraryNotFoundError, get_library_path, register

__all__ = ["get_library_path", "register", "LibraryNotFoundError"]
