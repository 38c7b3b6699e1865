"""Input checks shared by the optimizer, the baselines and the driver (all run before any work).

Their errors are ``analysis.errors.InputError`` (of the kind raised: ValueError, TypeError).
"""
from __future__ import annotations

import numbers

import numpy as np

import numfmt

from analysis.errors import checks_input

__all__ = ["as_weight", "check_format", "check_rank", "as_activations", "check_int",
           "check_float", "ROTATIONS"]

ROTATIONS = ("learned", "identity", "hadamard")


@checks_input
def as_weight(W, what: str = "W", min_rows: int = 2) -> np.ndarray:
    """W as a finite 2-D float64 array (numpy array or torch tensor of any float dtype)."""
    if hasattr(W, "detach") and hasattr(W, "cpu"):  # a torch tensor, without importing torch
        W = W.detach().cpu()
        if str(W.dtype) in ("torch.bfloat16", "torch.float16"):
            W = W.float()
        W = W.numpy()
    if not isinstance(W, np.ndarray):
        if isinstance(W, (list, tuple)):
            W = np.asarray(W)
        else:
            raise TypeError(f"{what} must be a 2-D numpy array or torch tensor, got "
                            f"{type(W).__name__}")
    if W.dtype.kind not in "fiu" and W.dtype.name != "bfloat16":
        raise TypeError(f"{what} must hold real numbers, got dtype {W.dtype}")
    if W.ndim != 2:
        raise ValueError(f"{what} must be 2-D (out x in), got shape {W.shape}")
    if W.shape[0] < min_rows or W.shape[1] < 2:
        raise ValueError(f"{what} has shape {W.shape}; it needs >= {min_rows} rows and >= 2 "
                         f"columns")
    W = W.astype(np.float64)
    bad = ~np.isfinite(W)
    if bad.any():
        i, j = map(int, np.argwhere(bad)[0])
        raise ValueError(f"{what} has {int(bad.sum())} NaN/Inf values (first at [{i}, {j}] = "
                         f"{W[i, j]}); all weights must be finite")
    return W


@checks_input
def check_format(fmt, what: str, allow_none: bool = False) -> str:
    """A registered numfmt format name (ValueError naming the value otherwise)."""
    if fmt is None and allow_none:
        return None
    if not isinstance(fmt, str):
        raise TypeError(f"{what} must be a numfmt format name, got {fmt!r}")
    try:
        f = numfmt.get(fmt)
    except ValueError as exc:
        raise ValueError(f"{what}={fmt!r}: {exc}") from None
    return f.name


@checks_input
def check_int(value, what: str, lo: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an int, got {value!r}")
    value = int(value)
    if lo is not None and value < lo:
        raise ValueError(f"{what}={value} must be >= {lo}")
    return value


@checks_input
def check_float(value, what: str, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number, got {value!r}")
    value = float(value)
    if not np.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{what}={value} must be a finite number{' > 0' if positive else ''}")
    return value


@checks_input
def check_rank(rank, shape, what: str = "rank") -> int:
    """1 <= rank < min(out, in)."""
    rank = check_int(rank, what)
    limit = min(shape)
    if not 1 <= rank < limit:
        raise ValueError(f"{what}={rank} is out of range for a {shape[0]} x {shape[1]} weight; "
                         f"allowed 1 <= {what} < min(out, in) = {limit}")
    return rank


@checks_input
def as_activations(X, n_in: int) -> np.ndarray | None:
    """Activations X (n x in) as finite float64; None passes through."""
    if X is None:
        return None
    shape = getattr(X, "shape", None)
    if shape is not None and len(shape) == 2 and shape[1] != n_in:
        raise ValueError(f"activations have width {shape[1]} but W has in = {n_in} input "
                         f"features; activations must be n x {n_in}")
    return as_weight(X, "activations", min_rows=1)
