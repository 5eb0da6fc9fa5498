"""dsmoe-export: DSMoE LLaMA models to ONNX Runtime with a gated block-sparse FFN op."""
__version__ = "0.1.0"

from .errors import CheckpointError, DSMoEError, ExportError  # noqa: E402

__all__ = ["__version__", "CheckpointError", "DSMoEError", "ExportError", "export"]


def export(*args, **kwargs):
    """See `dsmoe_export.exporter.export` (imported lazily: torch is heavy)."""
    from .exporter import export as _export
    return _export(*args, **kwargs)
