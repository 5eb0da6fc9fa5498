"""Locate the op library that `pip install` built into this package, check its API level,
register it with ONNX Runtime."""
from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

try:
    from .errors import LibraryError, LibraryNotFoundError
except ImportError:  # loaded by file path, outside the package (tests/conftest.py in a bare checkout)
    class LibraryNotFoundError(FileNotFoundError):
        pass

    class LibraryError(RuntimeError):
        pass

# Overrides the installed library (a development build, a sanitizer build).
ENV_VAR = "DSMOE_OPS_LIBRARY"

_NAMES = {"linux": "libdsmoe_ops.so", "darwin": "libdsmoe_ops.dylib", "win32": "dsmoe_ops.dll"}

# The op library's API level: what the runtime may rely on (op versions, optional outputs,
# registration behaviour). A library states its level through an exported C function
#     extern "C" int DsmoeOpsApiVersion(void);
# A library without that symbol predates it and is level 1 (the first release).
LIBRARY_API_SYMBOL = "DsmoeOpsApiVersion"
UNVERSIONED_LIBRARY_API = 1
MIN_LIBRARY_API = 1   # the oldest level this runtime can drive
MAX_LIBRARY_API = 1   # the newest level it knows; newer libraries still load (they must stay compatible)

# The ONNX Runtime C API version the library was built against (its headers' ORT_API_VERSION):
#     extern "C" int DsmoeOpsOrtApiVersion(void);
# onnxruntime 1.N provides API versions up to N, so the library needs onnxruntime >= 1.N.
ORT_API_SYMBOL = "DsmoeOpsOrtApiVersion"


# The CPU kernels' cache blocking as the library sizes it on this machine (its L1d, the slab
# layout's k-slice depth, the packed panels' k-slice; DSMOE_CPU_L1D_BYTES overrides the L1d):
#     extern "C" int DsmoeOpsCpuCacheBlocking(int64_t* l1d_bytes, int64_t* slab_slice_steps,
#                                             int64_t* panel_slice_floats);
CACHE_BLOCKING_SYMBOL = "DsmoeOpsCpuCacheBlocking"

# The switch of the kernels' own huge-page advice at session creation (process-wide; on by
# default), returning the previous setting:
#     extern "C" int DsmoeOpsSetHugePageAdvice(int enabled);
HUGE_PAGE_ADVICE_SYMBOL = "DsmoeOpsSetHugePageAdvice"


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


def _symbol(path: str | os.PathLike, symbol: str):
    """The library's exported C function `symbol` (None when it does not export it)."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise LibraryError(f"{path}: cannot load the op library: {e}") from e
    return getattr(lib, symbol, None)


def _int_symbol(path: str | os.PathLike, symbol: str) -> int | None:
    """The int returned by the library's `symbol()` (None when it does not export it)."""
    fn = _symbol(path, symbol)
    if fn is None:
        return None
    fn.restype, fn.argtypes = ctypes.c_int, []
    return int(fn())


def cpu_cache_blocking(path: str | os.PathLike) -> dict | None:
    """{"l1d_bytes", "slab_slice_steps", "panel_slice_floats"} of the library at `path` in this
    process (None: a library that does not say). LibraryError when DSMOE_CPU_L1D_BYTES is not a
    positive size."""
    fn = _symbol(path, CACHE_BLOCKING_SYMBOL)
    if fn is None:
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.POINTER(ctypes.c_int64)] * 3
    l1d, steps, floats = ctypes.c_int64(0), ctypes.c_int64(0), ctypes.c_int64(0)
    if fn(ctypes.byref(l1d), ctypes.byref(steps), ctypes.byref(floats)) != 0:
        raise LibraryError(f"DSMOE_CPU_L1D_BYTES={os.environ.get('DSMOE_CPU_L1D_BYTES')!r}: expected a positive "
                           f"number of bytes up to 1 GiB (e.g. 32768, 32K or 1M)")
    return {"l1d_bytes": l1d.value, "slab_slice_steps": steps.value, "panel_slice_floats": floats.value}


def set_huge_page_advice(path: str | os.PathLike, enabled: bool) -> bool | None:
    """Turn the library's own huge-page advice (its kernels', at session creation) on or
    off in this process for the sessions created from now on; returns the previous setting (None:
    a library without the switch)."""
    fn = _symbol(path, HUGE_PAGE_ADVICE_SYMBOL)
    if fn is None:
        return None
    fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_int]
    return bool(fn(1 if enabled else 0))


def library_api_version(path: str | os.PathLike) -> int:
    """The API level the library at `path` was built for (see LIBRARY_API_SYMBOL)."""
    version = _int_symbol(path, LIBRARY_API_SYMBOL)
    return UNVERSIONED_LIBRARY_API if version is None else version


def library_ort_api_version(path: str | os.PathLike) -> int | None:
    """The ONNX Runtime C API version the library at `path` needs (None: a library that does not
    say; RegisterCustomOps still refuses an older onnxruntime with an error status)."""
    return _int_symbol(path, ORT_API_SYMBOL)


def onnxruntime_api_version(version: str | None = None) -> int | None:
    """The newest C API version an onnxruntime release provides: N for 1.N.x (None when the
    version string is not of that form)."""
    if version is None:
        import onnxruntime as ort

        version = ort.__version__
    parts = version.split(".")
    try:
        major, minor = int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or "x")
    except (IndexError, ValueError):
        return None
    return minor if major == 1 else None


def check_onnxruntime(path: str | os.PathLike, version: str | None = None) -> None:
    """Raise LibraryError when the installed onnxruntime is older than the library needs."""
    needed = library_ort_api_version(path)
    if version is None:
        import onnxruntime as ort

        version = ort.__version__
    have = onnxruntime_api_version(version)
    if needed is not None and have is not None and have < needed:
        raise LibraryError(
            f"{path}: the op library needs onnxruntime >= 1.{needed} (it was built against the "
            f"ONNX Runtime C API version {needed}), but onnxruntime {version} is installed; "
            f"upgrade it (pip install 'onnxruntime>=1.{needed}', or onnxruntime-gpu) or rebuild the "
            f"library against older headers (ORT_INCLUDE_DIR, custom_ops/README.md)")


def check_library(path: str | os.PathLike) -> int:
    """Raise LibraryError when the library is older than this runtime supports, or needs a newer
    onnxruntime than the installed one; returns its level."""
    level = library_api_version(path)
    if level < MIN_LIBRARY_API:
        raise LibraryError(
            f"{path}: the op library was built for API level {level}, older than this dsmoe_runtime "
            f"supports (>= {MIN_LIBRARY_API}); rebuild it from the same source tree as the runtime "
            f"(`pip install .`, or cmake --build for {ENV_VAR})")
    check_onnxruntime(path)
    return level


def register(session_options, path: str | os.PathLike | None = None) -> str:
    """Check the op library and register it with an `onnxruntime.SessionOptions`; returns its path."""
    path = str(path) if path is not None else get_library_path()
    if not Path(path).is_file():
        raise LibraryNotFoundError(f"{path}: no such file (expected the built op library)")
    check_library(path)
    try:
        session_options.register_custom_ops_library(path)
    except Exception as e:  # onnxruntime reports the library's own status message
        import onnxruntime as ort

        raise LibraryError(f"{path}: onnxruntime {ort.__version__} refused the op library: {e}") from e
    return path
