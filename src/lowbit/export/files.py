"""Atomic file writing for the exporters: a temporary file in the target folder, fsync, then
``os.replace``; the folder is created if missing, and the file gets the usual permissions
(``0o666`` less the umask, as ``open`` would give, not ``mkstemp``'s ``0o600``)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["ExportError", "write_atomic"]


class ExportError(ValueError):
    """The exported file could not be written (read-only or full disk, ...): one line naming it."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` so that a reader sees the old file or the whole new one.

    Missing parent folders are created. Raises :class:`ExportError` (a ValueError) naming the
    file when the disk refuses (permissions, no space); no temporary file is left behind.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        why = err.strerror or type(err).__name__
        raise ExportError(f"cannot write {path}: {why}") from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    return path
