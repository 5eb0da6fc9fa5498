"""Locate the op library that `pip install` built into this package."""
from __future__ import annotations

import os
import sys
from pathlib import Path

# Overrides the installed library (a development build, a sanitizer build).
ENV_VAR = "DSMOE_OPS_LIBRARY"

_NAMES = {"linux": "libdsmoe_ops.so", "darwin": "libdsmoe_ops.dylib", "win32": "dsmoe_ops.dll"}


class LibraryNotFoundError(FileNotFoundError):
    pass


def _library_name() -> str:
    return _NAMES.get(sys.platform, _NAMES["linux"])


def get_library_path() -> str:
    """Absolute path of the custom-op library (CPU kernels; CUDA kernels when built with nvcc)."""
    override = os.environ.get(ENV_VAR)
    if override:
        path = Path(override)
        if not path.is_file():
            raise LibraryNotFoundError(f"{ENV_VAR}={override}: no such file (expected the built op library)")
        return str(path.resolve())
    path = Path(__file__).resolve().parent / _library_name()
    if not path.is_file():
        raise LibraryNotFoundError(
            f"{path}: the op library is missing; install the package with `pip install .` "
            f"(it compiles custom_ops/) or point {ENV_VAR} at a build"
        )
    return str(path)


def register(session_options) -> str:
    """Register the op library with an `onnxruntime.SessionOptions`; returns its path."""
    path = get_library_path()
    session_options.register_custom_ops_library(path)
    return path
