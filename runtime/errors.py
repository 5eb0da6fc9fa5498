"""The errors dsmoe_runtime raises: each message names what is wrong and how to fix it."""
from __future__ import annotations


class DSMoERuntimeError(Exception):
    """Base class of dsmoe_runtime's errors."""


class LibraryNotFoundError(DSMoERuntimeError, FileNotFoundError):
    """The op library is not where it should be (not built, or a wrong DSMOE_OPS_LIBRARY)."""


class LibraryError(DSMoERuntimeError, RuntimeError):
    """The op library exists but cannot be used: too old for this runtime, built for a newer
    onnxruntime, or refused by onnxruntime."""


class ModelError(DSMoERuntimeError, ValueError):
    """The ONNX file is not a DSMoE causal-LM export this runtime can drive."""


class InputError(DSMoERuntimeError, ValueError):
    """Arguments of a call do not match the model (shape, dtype, range, padding side)."""
