"""dsmoe_runtime: what an ONNX Runtime application needs to run a DSMoE export.

- `get_library_path()` / `register(opts)`: the op library for
  `SessionOptions.register_custom_ops_library` (as onnxruntime-extensions does it);
- `DSMoESession`: a session on the best execution provider with `generate()`
  (greedy or sampling, KV cache, left-padded batches, streaming) and
  activation statistics (`ActivationStats`);
- `load_tokenizer(folder)`: the tokenizer copied beside an export;
- `python -m dsmoe_runtime MODEL.onnx --prompt ...`: the command line.

See docs/runtime.md.
"""
from ._library import (ENV_VAR, MAX_LIBRARY_API, MIN_LIBRARY_API, check_library, check_onnxruntime,
                       get_library_path, library_api_version, library_ort_api_version, register)
from .errors import DSMoERuntimeError, InputError, LibraryError, LibraryNotFoundError, ModelError

__all__ = ["get_library_path", "register", "check_library", "library_api_version", "ENV_VAR",
           "MIN_LIBRARY_API", "MAX_LIBRARY_API", "check_onnxruntime", "library_ort_api_version", "DSMoESession", "ActivationStats", "sample_tokens",
           "load_tokenizer", "DSMoERuntimeError", "LibraryNotFoundError", "LibraryError", "ModelError", "InputError"]


def __getattr__(name):  # the session pulls in numpy/onnxruntime: load it on first use
    if name == "DSMoESession":
        from .session import DSMoESession
        return DSMoESession
    if name == "ActivationStats":
        from .stats import ActivationStats
        return ActivationStats
    if name == "load_tokenizer":
        from .tokenizer import load_tokenizer
        return load_tokenizer
    if name == "sample_tokens":
        from .sampling import sample_tokens
        return sample_tokens
    raise AttributeError(f"module 'dsmoe_runtime' has no attribute {name!r}")
