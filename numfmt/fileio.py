"""Atomic file writes, shared by every package.

A file is written under a temporary name in its destination folder and renamed
over the destination (``os.replace``), so a reader or a rerun after an
interruption sees either the old file or the complete new one, never a half-
written file. The file gets the mode an ordinary ``open()`` would give it.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

__all__ = ["write_atomic", "write_json_atomic", "atomic_path"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path, *, make_parents: bool = True):
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    For writers that take a file name (e.g. ``safetensors.numpy.save_file``).
    On any exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    folder = path.parent
    if make_parents:
        folder.mkdir(parents=True, exist_ok=True)
    elif not folder.is_dir():
        raise FileNotFoundError(f"folder {str(folder)!r} for {str(path)!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_atomic(path, data: bytes | str, *, make_parents: bool = True) -> Path:
    """Write ``data`` (bytes, or str as UTF-8) to ``path`` atomically; returns the path."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    with atomic_path(path, make_parents=make_parents) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def write_json_atomic(path, obj, *, make_parents: bool = True, **dumps_kwargs) -> Path:
    """``json.dumps(obj, indent=2)`` plus a newline, written atomically."""
    dumps_kwargs.setdefault("indent", 2)
    return write_atomic(path, json.dumps(obj, **dumps_kwargs) + "\n", make_parents=make_parents)
