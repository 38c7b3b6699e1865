"""The vectorized fast paths of numfmt's kernels equal the element-by-element reference
loops they replace, bit for bit (as integer views), on edge-heavy data.

The fast paths (OCP + RNE: MX integer and float elements, in float32 arithmetic for
float32 input; SINT integer elements; NVFP4) rewrite the arithmetic for speed; the
reference loops are the original arithmetic, kept for the other modes. Forcing each
kernel onto its reference loop must not change a bit.
"""
from __future__ import annotations

import numpy as np
import pytest

import numfmt
from numfmt import _kernels as K


def _edge_data(seed: int, rows: int, L: int, dtype) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, L)) * np.exp2(rng.integers(-30, 30, size=(rows, 1)))
    flat = x.reshape(-1)
    k = rng.integers(0, flat.size, size=flat.size // 2)
    e = rng.integers(-10, 10, size=k.size).astype(float)
    kind = rng.integers(0, 7, size=k.size)
    vals = np.select(
        [kind == 0, kind == 1, kind == 2, kind == 3, kind == 4, kind == 5],
        [np.zeros(k.size), -np.zeros(k.size),
         (rng.integers(0, 64, k.size) + 0.5) * np.exp2(e - 6),           # ties
         np.exp2(e) * (1 - 2.0 ** -24 * rng.integers(1, 4, k.size)),      # just below 2^e
         rng.standard_normal(k.size) * 1e-40,                             # f32 subnormals
         rng.standard_normal(k.size) * 3e38],                             # huge
        rng.integers(0, 64, k.size) * np.exp2(e - 3))
    flat[k] = vals * np.where(rng.random(k.size) < 0.5, -1.0, 1.0)
    x[1] = 0.0
    x[2] = -0.0
    x[3] = rng.standard_normal(L) * 1e-42          # a block of subnormals only
    x[4, 5] = np.nan
    x[5, -1] = -np.inf
    # shared exponents around the edge of the float32 fast loops' range (a scale
    # 2^k with k near -126) and of the input's subnormals
    x[6] = rng.standard_normal(L) * 2.0 ** -113
    x[7] = rng.standard_normal(L) * 2.0 ** -119
    x[8] = rng.standard_normal(L) * 2.0 ** -124
    with np.errstate(over="ignore"):
        return x.astype(dtype)


def _bits(a):
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


@pytest.fixture
def reference_loops(monkeypatch):
    """Route every kernel through its reference loop (the original arithmetic)."""
    monkeypatch.setattr(K, "_FAST_MX", False)
    monkeypatch.setattr(K, "_FAST_ABSMAX", False)
    monkeypatch.setattr(K, "_FAST_NVFP4", False)


FORMATS = ["mxint8", "mxint4", "mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e2m3", "mxfp4", "sint4",
           "sint8", "nvfp4"]
SHAPES = [((16, 96), -1), ((9, 70), -1), ((12, 64), 0)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_paths_equal_reference_loops(dtype, request):
    cases = []
    for fname in FORMATS:
        for shape, axis in SHAPES:
            x = _edge_data(len(cases), *shape, dtype)
            cases.append((fname, x, axis))
    fast = [(numfmt.quantize(x, f, axis=a), numfmt.fake_quantize(x, f, axis=a))
            for f, x, a in cases]
    request.getfixturevalue("reference_loops")
    for (f, x, a), (q, y) in zip(cases, fast):
        q_ref = numfmt.quantize(x, f, axis=a)
        y_ref = numfmt.fake_quantize(x, f, axis=a)
        assert np.array_equal(_bits(q.codes), _bits(q_ref.codes)), f
        assert np.array_equal(_bits(q.scales), _bits(q_ref.scales)), f
        assert np.array_equal(_bits(y), _bits(y_ref)), f
