"""The one error type users see: which file, which field, what was expected."""
from __future__ import annotations

from pathlib import Path


class DSMoEError(Exception):
    """A user-facing error. `str()` is one line: `FILE: FIELD: MESSAGE`."""

    def __init__(self, message: str, *, file: str | Path | None = None, field: str | None = None):
        self.file = str(file) if file is not None else None
        self.field = field
        self.message = message
        super().__init__(self.__str__())

    def __str__(self) -> str:
        parts = [p for p in (self.file, self.field) if p]
        return ": ".join(parts + [self.message])


class CheckpointError(DSMoEError):
    """The model folder is missing, malformed or inconsistent."""


class ExportError(DSMoEError):
    """Export or its validation failed."""
