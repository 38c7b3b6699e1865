"""Files: content hashes and the safetensors / pickle check (one home each).

* ``file_sha256(path)``: SHA-256 of a file's bytes; ``arrays_sha256(arrays)``: of named
  arrays (names, shapes, dtypes and bytes, sorted by name); ``dir_sha256(directory)``: of
  a model directory's config.json and .safetensors files (names and bytes).
* ``read_json(path, what)``: a JSON document, or a ValueError naming the file;
  ``read_json_or_none(path)``: None for a missing or damaged one.
* ``safetensors_kind(path)``: ``"safetensors"`` when the file starts as safetensors does
  (an unsigned 64-bit little-endian header length n, then an n-byte JSON object that
  fits in the file), ``"pickle"`` for torch.save's zip archive (``PK\\x03\\x04``) or a
  bare pickle (protocol byte ``\\x80``), else ``"other"``; ``require_safetensors(path,
  what)`` refuses the last two with a one-line ValueError. Pickles are never unpickled:
  that can run arbitrary code.
"""
from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np

__all__ = ["file_sha256", "arrays_sha256", "dir_sha256", "safetensors_kind",
           "require_safetensors", "read_json", "read_json_or_none", "PICKLE_SUFFIXES"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def file_sha256(path) -> str:
    """SHA-256 of a file's bytes, hex (read in 4 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def arrays_sha256(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over names, shapes, dtypes and bytes of the arrays (sorted by name), hex."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(k.encode())
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def dir_sha256(directory: Path) -> str:
    """SHA-256 over the names and bytes of config.json and every .safetensors file."""
    h = hashlib.sha256()
    for p in sorted(Path(directory).rglob("*")):
        if p.is_file() and (p.suffix == ".safetensors" or p.name == "config.json"):
            h.update(str(p.relative_to(directory)).encode())
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
    return h.hexdigest()


def read_json(path, what: str = "file"):
    """The JSON document of ``path``; a ValueError naming the file when it is not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} {str(path)!r} is not valid JSON: {exc}") from None


def read_json_or_none(path):
    """The JSON document of ``path``, or None when it is missing or unreadable (a marker or
    settings file that an interrupted run may have left half-written elsewhere)."""
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def safetensors_kind(path) -> str:
    """'safetensors', 'pickle' or 'other' (see the module docstring)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n and 8 + n <= size and head[8:9] == b"{":
            return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "pickle"
    return "other"


def require_safetensors(path, what: str) -> None:
    """A ValueError naming ``what`` unless ``path`` is a safetensors file."""
    kind = safetensors_kind(path)
    if kind == "pickle":
        raise ValueError(f"refusing {what} {str(path)!r}: it is a pickled (torch) checkpoint, "
                         "and unpickling can run arbitrary code; convert it to .safetensors "
                         "(safetensors.torch.save_file(state_dict, 'model.safetensors'))")
    if kind != "safetensors":
        raise ValueError(f"{what} {str(path)!r} is not a safetensors file (no valid safetensors "
                         "header)")
