"""A conformance kit: property-test your own quantizer against numfmt, bit for bit.

Hypothesis strategies
---------------------
``formats(kinds=("block", "element"), objects=False)``
    registered format names (or format objects).
``elements(fmt)``
    float32 scalars for one element format, weighted toward representable
    values, ties (exact midpoints between neighbours), one float32 ulp either
    side of a tie, zeros of both signs, the largest value and just above it,
    float32 subnormals, and NaN/Inf.
``blocks(fmt, n_blocks=(1, 3), specials=True)``
    1-D float32 arrays of ``n_blocks * block_size`` values (a format with one
    scale per axis gets 1..96 values). Each block gets a shared exponent X
    (mostly moderate, sometimes at the E8M0 ends or in the float32 subnormal
    range) and values built as grid * 2^X: exact ties, ties +- 1 ulp, the block
    amax a few ulps below a power of two (where floor(log2) and a float32 log2
    disagree), all-zero and -0.0 blocks, and, with ``specials``, NaN / +-Inf.
    For an MX format whose ``scale_rule`` is not "floor", some blocks also put their
    amax at and a few ulps around that rule's decision point (a power of two for
    "ceil", (2 - 2^-(m+1)) * 2^k for "even", element_max * 2^k for "rceil").

``check_quantizer(fn, fmt, *, rounding="rne", compat="ocp", max_examples=200, seed=0,
scale_rule=None)``
    runs ``fn(x)`` on arrays from ``blocks(fmt)`` and compares the result with
    ``numfmt.fake_quantize(x, fmt, rounding=..., compat=..., scale_rule=...)`` bit for bit
    (float32 bit patterns; every NaN equals every NaN; +0.0 and -0.0 differ).
    ``fn`` takes a float32 ndarray of shape (n,) and returns the fake-quantized
    float32 ndarray of the same shape, or a ``numfmt.QTensor`` (dequantized
    here). On a mismatch it raises ``AssertionError`` naming the shrunk
    counterexample: block index, element index, and the hex bits of the input
    block, of the expected and of the returned values.

Example (a pytest test)::

    import numpy as np, numfmt
    from numfmt.testing import check_quantizer

    def test_my_mxint8():
        check_quantizer(my_mxint8_fake_quantize, "mxint8", rounding="rne")

The kit needs hypothesis (a numfmt dependency) but not pytest.
"""
from __future__ import annotations

import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as _hseed
from hypothesis import strategies as st

import numfmt
from numfmt.formats import BlockFormat, FloatFormat, IntFormat, get
from numfmt.qtensor import QTensor

__all__ = ["formats", "elements", "blocks", "check_quantizer", "hex_bits"]

_F32_MAX = float(np.finfo(np.float32).max)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def hex_bits(a) -> str:
    """float32 values as space-separated 8-digit hex bit patterns."""
    a = np.asarray(a, dtype=np.float32).reshape(-1)
    return " ".join(f"{int(b):08x}" for b in a.view(np.uint32))


def _f32(v: float) -> np.float32:
    with np.errstate(over="ignore", under="ignore"):
        return np.float32(v)


def _ulp_step(v: np.float32, k: int) -> np.float32:
    """v moved k float32 ulps (k may be negative)."""
    out = np.float32(v)
    toward = np.float32(np.inf if k > 0 else -np.inf)
    for _ in range(abs(k)):
        out = np.nextafter(out, toward)
    return out


def _grid(fmt) -> np.ndarray:
    """Sorted finite non-negative values of the element in units of the block scale."""
    elem = fmt.element if isinstance(fmt, BlockFormat) else fmt
    if isinstance(elem, FloatFormat) and elem.bits > 16:
        return np.array([0.0, 1.0, 1.5, 2.0])
    t = numfmt.decode_table(elem)
    t = t[np.isfinite(t)]
    t = np.unique(np.abs(t))
    if isinstance(fmt, BlockFormat) and fmt.element_scale_exp:
        t = t * 2.0 ** fmt.element_scale_exp
    return t


def _emax(fmt) -> int:
    if isinstance(fmt, BlockFormat):
        return fmt.element_emax
    if isinstance(fmt, IntFormat):
        return fmt.bits - 2
    return fmt.emax


def _block_len(fmt) -> int | None:
    return fmt.block_size if isinstance(fmt, BlockFormat) else None


# ---------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------
def formats(kinds=("block", "element"), objects: bool = False):
    """Registered format names (or objects when ``objects``), of the given kinds."""
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    bad = set(kinds) - {"block", "element"}
    if bad:
        raise ValueError(f"kinds {sorted(bad)} not allowed; use 'block' and/or 'element'")
    names = [n for n in numfmt.formats()
             if ("block" if isinstance(get(n), BlockFormat) else "element") in kinds]
    s = st.sampled_from(names)
    return s.map(get) if objects else s


_POOLS: dict = {}


def _pool(fmt) -> np.ndarray:
    """Candidate values in element units (block scale 1), hardest cases first after 0:
    +-0, the grid, exact ties, ties +-1 and 2 float32 ulps, just above the max, values
    far below the smallest step, and a few fixed pseudo-random values."""
    key = fmt
    if key in _POOLS:
        return _POOLS[key]
    grid = _grid(fmt)
    mids = (grid[:-1] + grid[1:]) / 2
    if grid.size > 256:  # wide formats (fp16, bf16): an evenly spread subset
        pick = np.unique(np.linspace(0, grid.size - 2, 255).astype(np.int64))
        mids = mids[pick]
        grid = np.unique(np.concatenate([grid[pick], grid[pick + 1], grid[-1:]]))
    near = [np.float32(m) for m in mids]
    near_vals = []
    for m in near:
        for k in (-2, -1, 1, 2):
            near_vals.append(float(_ulp_step(m, k)))
    top = float(grid[-1])
    step = float(grid[grid > 0][0])
    rnd = np.random.default_rng(12345).uniform(0, top * 1.1, 24)
    mags = ([0.0] + list(grid[1:]) + list(mids) + near_vals
            + [top * f for f in (1.0 + 2.0 ** -20, 1.03125, 1.5, 4.0)]
            + [step * f for f in (2.0 ** -30, 2.0 ** -3, 0.25, 0.49)] + list(rnd))
    vals = [-0.0, 0.0]
    for v in mags[1:]:
        f = float(_f32(v))
        if math.isfinite(f):  # bf16's top * 4 is beyond float32
            vals += [f, -f]
    pool = np.array(vals, dtype=np.float64)
    _POOLS[key] = pool
    return pool


def elements(fmt):
    """float32 scalars (as np.float32) weighted toward the hard cases of ``fmt``."""
    fmt = get(fmt)
    pool = _pool(fmt)
    extremes = [np.nan, np.inf, -np.inf, 1e-45, -1e-45, 1e-40, -3e-39, 1.1754942e-38,
                _F32_MAX, -_F32_MAX]
    return st.one_of(
        st.integers(0, len(pool) - 1).map(lambda i: np.float32(pool[i])),
        st.sampled_from(extremes).map(np.float32),
    )


def _draw_exponent(draw, fmt) -> int:
    """A block's shared exponent X (the block's values are element units * 2^X)."""
    emax = _emax(fmt)
    hi = 127 - emax  # the largest X a float32 block can reach
    pick = draw(st.integers(0, 9))
    if pick == 8:
        return draw(st.integers(-150, -120))  # E8M0 floor, float32 subnormals
    if pick == 9:
        return draw(st.integers(hi - 6, hi))
    return draw(st.integers(-12, 12))


def _absmax_scale_pool(fmt) -> np.ndarray:
    """Values in units of an absmax scale: the integers 0..max, the half-integers (exact
    ties) and +-1 ulp around them."""
    key = ("absmax", fmt)
    if key not in _POOLS:
        elem = fmt.element
        if isinstance(elem, IntFormat):
            grid = np.arange(elem.max_code + 1.0)
            mids = grid[:-1] + 0.5
            near = [float(_ulp_step(np.float32(m), k)) for m in mids for k in (-1, 1)]
            mags = [0.0] + list(grid[1:]) + list(mids) + near
            vals = [-0.0, 0.0]
            for v in mags[1:]:
                vals += [v, -v]
            _POOLS[key] = np.array(vals)
        else:
            _POOLS[key] = _pool(elem)
    return _POOLS[key]


_ABSMAX_SCALES = (2.0 ** -14, 2.0 ** -8, 0.0078125, 0.0123291015625, 0.5, 1.0, 3.0,
                  1.2001953125, 100.0, 4096.0, 65504.0)


@st.composite
def _block_values(draw, fmt, size: int, specials: bool) -> list[float]:
    kind = draw(st.integers(0, 15))
    if kind == 15:  # all zero, signs mixed
        return [draw(st.sampled_from([0.0, -0.0])) for _ in range(size)]
    absmax = isinstance(fmt, BlockFormat) and fmt.scaling == "absmax"
    if absmax and kind < 8:
        # the scale amax / element_max is exactly a value of the scale format, so
        # v / scale = k + 1/2 ties really occur
        pool = _absmax_scale_pool(fmt)
        scale = draw(st.sampled_from(_ABSMAX_SCALES))
        idx = draw(st.lists(st.integers(0, len(pool) - 1), min_size=size, max_size=size))
        vals = [pool[i] * scale for i in idx]
        elem = fmt.element
        emax_val = float(elem.max_code) if isinstance(elem, IntFormat) else elem.max_normal
        vals[draw(st.integers(0, size - 1))] = emax_val * scale * draw(
            st.sampled_from([1.0, -1.0]))
    else:
        pool = _pool(fmt)
        X = _draw_exponent(draw, fmt)
        idx = draw(st.lists(st.integers(0, len(pool) - 1), min_size=size, max_size=size))
        vals = [pool[i] * 2.0 ** X for i in idx]
        if kind < 4:
            # amax a few ulps below a power of two: floor(log2) vs float32 log2f
            k = min(max(X + _emax(fmt) + 1, -125), 127)
            bound = float(_ulp_step(_f32(2.0 ** k), -draw(st.integers(1, 6))))
            vals[draw(st.integers(0, size - 1))] = draw(st.sampled_from([1.0, -1.0])) * bound
        elif kind < 8 and getattr(fmt, "scale_rule", "floor") != "floor":
            # amax at / around the scale rule's decision point
            bound = _rule_boundary(fmt, X, draw(st.integers(-3, 3)))
            if bound is not None:
                vals[draw(st.integers(0, size - 1))] = draw(st.sampled_from([1.0, -1.0])) * bound
    out = []
    for v in vals:
        f = float(_f32(v))
        out.append(f if math.isfinite(f) else math.copysign(_F32_MAX, v))
    if specials and draw(st.integers(0, 11)) == 0:
        out[draw(st.integers(0, size - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    return out


def _rule_boundary(fmt, X: int, ulps: int) -> float | None:
    """A float32 magnitude ``ulps`` ulps from the point where ``fmt.scale_rule`` moves
    the shared exponent, in the binade of a block with exponent X (None if not a finite
    nonzero float32)."""
    elem = fmt.element
    if isinstance(elem, IntFormat):
        m, vmax = elem.bits - 2, elem.max_code * 2.0 ** fmt.element_scale_exp
    else:
        m, vmax = elem.mantissa_bits, elem.max_normal
    k = X + _emax(fmt)
    point = {"ceil": 1.0, "even": 2.0 - 2.0 ** -(m + 1), "rceil": vmax}[fmt.scale_rule]
    v = _f32(point * 2.0 ** (k if fmt.scale_rule != "rceil" else X))
    if not (np.isfinite(v) and v > 0):
        return None
    v = _ulp_step(v, ulps)
    return float(v) if np.isfinite(v) and v > 0 else None


def blocks(fmt, n_blocks=(1, 3), specials: bool = True):
    """float32 1-D arrays of whole blocks of ``fmt`` (see the module docstring)."""
    fmt = get(fmt)
    lo, hi = n_blocks if isinstance(n_blocks, tuple) else (n_blocks, n_blocks)
    if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
        raise ValueError(f"n_blocks={n_blocks!r} must be an int >= 1 or a (lo, hi) pair")
    size = _block_len(fmt)

    @st.composite
    def _arr(draw):
        if size is None:  # element formats and one-scale-per-axis formats
            n = draw(st.integers(1, 96))
            if isinstance(fmt, BlockFormat):
                vals = draw(_block_values(fmt, n, specials))
            else:
                vals = draw(st.lists(elements(fmt), min_size=n, max_size=n))
                vals = [float(v) for v in vals]
                if not specials or not fmt.has_nan:
                    vals = [v if math.isfinite(v) else math.copysign(fmt.max_normal, v)
                            if not math.isnan(v) else 0.0 for v in vals]
            return np.array(vals, dtype=np.float32)
        nb = draw(st.integers(lo, hi))
        vals = []
        for _ in range(nb):
            vals.extend(draw(_block_values(fmt, size, specials)))
        return np.array(vals, dtype=np.float32)
    return _arr()


# ---------------------------------------------------------------------------
# the check
# ---------------------------------------------------------------------------
def _same_bits(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise: identical float32 bits, or both NaN."""
    return (a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))


def _describe(x, expected, got, fmt, rounding, compat, scale_rule=None) -> str:
    bad = np.flatnonzero(~_same_bits(expected, got))
    i = int(bad[0])
    bs = _block_len(fmt) or x.size
    b = i // bs
    blk = slice(b * bs, min((b + 1) * bs, x.size))
    rule = f", scale_rule={scale_rule!r}" if scale_rule is not None else (
        f", scale_rule={fmt.scale_rule!r}" if getattr(fmt, "scale_rule", "floor") != "floor"
        else "")
    return (f"quantizer differs from numfmt.fake_quantize(x, {fmt.name!r}, rounding={rounding!r}, "
            f"compat={compat!r}{rule}) at {bad.size} of {x.size} elements; first at element {i} "
            f"(block {b}, position {i - b * bs}):\n"
            f"  input    {hex_bits(x[i:i + 1])}  ({x[i]!r})\n"
            f"  expected {hex_bits(expected[i:i + 1])}  ({expected[i]!r})\n"
            f"  got      {hex_bits(got[i:i + 1])}  ({got[i]!r})\n"
            f"  input block {b} (hex float32 bits): {hex_bits(x[blk])}\n"
            f"  expected block {b}: {hex_bits(expected[blk])}\n"
            f"  got block {b}:      {hex_bits(got[blk])}")


def check_quantizer(fn, fmt, *, rounding: str = "rne", compat: str = "ocp",
                    max_examples: int = 200, seed: int = 0, specials: bool = True,
                    n_blocks=(1, 3), scale_rule: str | None = None) -> None:
    """Property-test ``fn`` against ``numfmt.fake_quantize`` (see the module docstring).

    ``scale_rule`` (MX formats: one of ``numfmt.SCALE_RULES``; None keeps the format's
    own, "floor" unless overridden) is the rule ``fn`` is checked against; the blocks
    then also probe that rule's boundaries.

    ``seed`` fixes hypothesis' search (the same seed explores the same arrays) and is
    also the stochastic-rounding seed passed to numfmt when ``rounding="stochastic"``.
    Raises AssertionError with the first (shrunk) counterexample in hex bits.
    """
    fmt = numfmt.core.with_scale_rule(fmt, scale_rule)
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1:
        raise ValueError(f"max_examples={max_examples!r} must be an int >= 1")
    # fail fast on bad rounding / compat, with numfmt's own messages
    numfmt.fake_quantize(np.zeros(_block_len(fmt) or 1, np.float32), fmt, rounding=rounding,
                         compat=compat, seed=seed if rounding == "stochastic" else None)
    nfseed = seed if rounding == "stochastic" else None

    def _call(x):
        got = fn(x.copy())
        if isinstance(got, QTensor):
            got = numfmt.dequantize(got)
        got = np.asarray(got)
        if got.shape != x.shape:
            raise AssertionError(f"quantizer returned shape {got.shape} for input shape {x.shape}"
                                 f"; input (hex float32 bits): {hex_bits(x)}")
        if got.dtype != np.float32:
            raise AssertionError(f"quantizer returned dtype {got.dtype}; float32 is expected")
        return got

    def _check(x):
        expected = numfmt.fake_quantize(x, fmt, rounding=rounding, compat=compat, seed=nfseed)
        got = _call(x)
        if not _same_bits(expected, got).all():
            raise AssertionError(_describe(x, expected, got, fmt, rounding, compat, scale_rule))

    # shape and dtype do not depend on the data: check them once, without shrinking
    _call(np.linspace(-1, 1, 2 * (_block_len(fmt) or 8)).astype(np.float32))

    test = given(blocks(fmt, n_blocks=n_blocks, specials=specials))(_check)
    test = settings(max_examples=max_examples, deadline=None, database=None,
                    derandomize=False, report_multiple_bugs=False, print_blob=False,
                    suppress_health_check=list(HealthCheck))(test)
    test = _hseed(seed)(test)
    test()
