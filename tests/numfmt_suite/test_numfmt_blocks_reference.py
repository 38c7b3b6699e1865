"""Block formats: numfmt's Numba path == the slow exact reference, bit for bit.

Codes, scales (E8M0 / E4M3 codes, fp16 / fp32 values), the NVFP4 tensor scale
and fake_quantize outputs are compared as integers; fake_quantize must equal
dequantize(quantize) bit for bit. compat="microxcaling" is compared against the
torch port in test_numfmt_microxcaling.py.
"""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import numfmt
import numfmt_reference as ref
from numfmt.testing import blocks

pytestmark = pytest.mark.usefixtures("one_numba_thread")

MODES = ref.ROUNDINGS
BLOCK_FORMATS = [numfmt.get(n) for n in (
    "mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4_e2m1", "mxint8", "mxint6",
    "mxint4", "sint8", "sint6", "sint4", "nvfp4", "int8_channel")] + [
    numfmt.get("mxint4", block_size=16),
    numfmt.get("mxint8", int_full_range=True),
    numfmt.get("mxfp4", block_size=7),
    numfmt.get("sint4", block_size=None),
    numfmt.get("sint8", scale="bf16"),
    numfmt.get("sint4", block_size=16, int_full_range=True),
]


def fmt_id(f):
    return f"{f.name}-b{f.block_size}-{f.scale.name}" + ("-full" if f.int_full_range else "")


def bits_equal(a, b):
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        return False
    if a.dtype.kind == "f":
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        nan = np.isnan(a64) & np.isnan(b64)
        same = (a64 == b64) & (np.signbit(a64) == np.signbit(b64))
        return bool((same | nan).all())
    return bool((a.astype(np.int64) == b.astype(np.int64)).all())


def describe(x, got, exp):
    bad = np.flatnonzero(~((np.asarray(got).reshape(-1) == np.asarray(exp).reshape(-1))
                           | (np.isnan(np.asarray(got, np.float64).reshape(-1))
                              & np.isnan(np.asarray(exp, np.float64).reshape(-1)))))
    i = bad[:4]
    xf = np.asarray(x, np.float64).reshape(-1)
    return (f"{bad.size} differ; first flat indices {i.tolist()}: x={xf[i].tolist() if xf.size == np.asarray(got).size else '-'}"
            f" got={np.asarray(got).reshape(-1)[i].tolist()} expected={np.asarray(exp).reshape(-1)[i].tolist()}")


def assert_matches_reference(x, fmt, mode, axis=-1, seed=5):
    r = ref.quantize(x, fmt, axis, mode, seed)
    q = numfmt.quantize(x, fmt, axis=axis, rounding=mode, seed=seed)
    f = numfmt.fake_quantize(x, fmt, axis=axis, rounding=mode, seed=seed)
    assert q.codes.dtype == np.uint8 and q.codes.shape == np.shape(x)
    assert bits_equal(q.codes, r.codes), "codes: " + describe(x, q.codes, r.codes)
    if fmt.scaling == "absmax":
        # scales stored in the scale format's dtype; the reference's exact values
        # must be representable there (no rounding on the way in)
        assert bits_equal(q.scales.astype(np.float64), r.scales), "scales: " + describe(
            None, q.scales.astype(np.float64), r.scales)
        assert bits_equal(r.scales.astype(q.scales.dtype).astype(np.float64), r.scales)
    else:
        assert q.scales.dtype == np.uint8
        assert bits_equal(q.scales, r.scales), "scales: " + describe(None, q.scales, r.scales)
    if fmt.scaling == "nvfp4":
        assert np.float32(q.tensor_scale).view(np.uint32) == np.float32(r.tensor_scale).view(np.uint32)
    assert f.dtype == np.float32 and f.shape == np.shape(x)
    assert bits_equal(f, r.fake), "fake_quantize: " + describe(x, f, r.fake)
    d = numfmt.dequantize(q)
    assert d.dtype == np.float32
    assert bits_equal(d, f), "dequantize(quantize) != fake_quantize: " + describe(x, d, f)


# ---------------------------------------------------------------------------
# deterministic edge arrays
# ---------------------------------------------------------------------------
def edge_matrix(fmt, seed=0) -> np.ndarray:
    """Rows of 2.5 blocks (a partial last block) holding the hard cases."""
    bs = fmt.block_size or 40
    L = 2 * bs + (bs + 1) // 2
    rng = np.random.default_rng(seed)
    elem = fmt.element
    emax = fmt.element_emax if fmt.scaling == "mx" else 0
    g = ref.grid(elem, ref.Fraction(2) ** fmt.element_scale_exp)
    pos = np.array(sorted({float(v) for v in g.values if v >= 0}))
    mids = (pos[:-1] + pos[1:]) / 2
    rows = []

    def row_from_units(units, X):
        u = np.resize(np.asarray(units, np.float64), L)
        with np.errstate(over="ignore", under="ignore"):
            return (u * 2.0 ** X).astype(np.float32)

    rows.append((rng.standard_normal(L) * 3).astype(np.float32))
    rows.append((rng.standard_normal(L) * np.exp2(rng.integers(-20, 20, L))).astype(np.float32))
    for X in (0, -3, 5, -127, -135, 127 - emax - 1):
        # grid points, exact ties and ties +- 1 ulp, signs alternating, with the max
        # placed in every block so the shared exponent is X
        m32 = mids.astype(np.float32)
        units = np.concatenate([mids, np.nextafter(m32, np.float32(0)),
                                np.nextafter(m32, np.float32(np.inf)), pos])
        units = units * np.where(np.arange(units.size) % 2, -1, 1)
        rng.shuffle(units)
        r = row_from_units(units, X)
        with np.errstate(over="ignore"):  # the top of a wide element at X near 127: Inf
            for b in range(0, L, bs):
                r[b] = np.float32(pos[-1] * 2.0 ** X)
        rows.append(r)
    # amax a few ulps below a power of two (floor(log2) must be exact)
    for k in (0, 7, -100, 126):
        r = (rng.uniform(-1, 1, L) * 2.0 ** (k - 1)).astype(np.float32)
        r[::bs] = np.nextafter(np.float32(2.0 ** k), np.float32(0))
        r[1::bs] = -np.float32(2.0 ** k) * np.float32(1 - 2 ** -22)
        rows.append(r)
    # zeros of both signs, a zero block next to a non-zero one, negatives rounding to 0
    r = np.zeros(L, np.float32)
    r[1::2] = -0.0
    r[bs:2 * bs] = rng.standard_normal(bs).astype(np.float32)
    r[bs + 1] = np.float32(-1e-30)
    rows.append(r)
    # float32 subnormals and the float32 top
    rows.append((rng.uniform(-1, 1, L) * 2.0 ** -130).astype(np.float32))
    top = rng.uniform(-1, 1, L).astype(np.float32) * np.float32(3.4e38)
    rows.append(top)
    # NaN / Inf in some blocks only
    r = rng.standard_normal(L).astype(np.float32)
    r[3] = np.nan
    r[bs + 2] = np.inf
    r[-1] = -np.inf
    rows.append(r)
    # saturation: values far above the block's grid are impossible in MX (the
    # max sets X), but the rounding of the max element can carry over the top
    r = np.full(L, np.float32(pos[-1] * 1.0) * np.float32(1 + 2 ** -10))
    r[1::3] = -r[1::3]
    rows.append(r)
    return np.stack(rows)


@pytest.mark.parametrize("fmt", BLOCK_FORMATS, ids=fmt_id)
@pytest.mark.parametrize("mode", MODES)
def test_block_formats_equal_reference_on_edges(fmt, mode):
    assert_matches_reference(edge_matrix(fmt), fmt, mode)


# ---------------------------------------------------------------------------
# hypothesis: the conformance kit's own generator feeds the comparison
# ---------------------------------------------------------------------------
@st.composite
def format_mode_array(draw):
    fmt = draw(st.sampled_from(BLOCK_FORMATS))
    mode = draw(st.sampled_from(MODES))
    x = draw(blocks(fmt, n_blocks=(1, 2)))
    return fmt, mode, x


@settings(ref.CI, max_examples=120)
@given(format_mode_array(), st.integers(0, 2 ** 40))
def test_block_formats_equal_reference_hypothesis(fmt_mode_x, seed):
    fmt, mode, x = fmt_mode_x
    assert_matches_reference(x, fmt, mode, seed=seed)


# ---------------------------------------------------------------------------
# dtypes, axes, partial blocks, empty and 0-d arrays
# ---------------------------------------------------------------------------
SOME = [numfmt.get(n) for n in ("mxint8", "mxfp4", "mxfp8_e5m2", "sint4", "nvfp4",
                                "int8_channel")]


@pytest.mark.parametrize("fmt", SOME, ids=fmt_id)
@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float64])
def test_other_input_dtypes(fmt, dtype):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((3, 50)) * 4).astype(dtype)
    if dtype == np.float64:
        # values with more than 24 significant bits, some just off float32 ties
        x = x + rng.uniform(-1, 1, x.shape) * 2.0 ** -30
    for mode in ("rne", "rup", "stochastic"):
        assert_matches_reference(x, fmt, mode)
    if dtype != np.float64:
        f1 = numfmt.fake_quantize(x, fmt)
        f2 = numfmt.fake_quantize(x.astype(np.float32), fmt)
        assert bits_equal(f1, f2)


def test_float64_extreme_dynamic_range_directed_modes():
    """float64 inputs whose scaled value lies below float64's subnormals: directed modes
    must still see the sign and size of the exact value."""
    x = np.zeros(32)
    x[0] = 2.0 ** 130  # X = 130 - emax
    x[1] = 2.0 ** -1070
    x[2] = -(2.0 ** -1074)
    for name in ("mxint8", "mxfp8_e4m3"):
        for mode in ("rup", "rdn", "rtz", "rne"):
            assert_matches_reference(x, numfmt.get(name), mode)


def test_nvfp4_float64_beyond_float32_is_its_float32_cast():
    """NVFP4's recipe is float32: a float64 value beyond float32's range is an Inf there
    (its block turns NaN) and the tensor scale comes from the values that stay finite, so
    the other blocks keep their values instead of all turning NaN."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 48)) * 3.0
    x[0, 5] = 1e39            # rounds to Inf in float32
    x[1, 40] = -3.0e38        # finite in float32: sets the tensor scale
    x[1, 41] = float(np.finfo(np.float32).max)
    fmt = numfmt.get("nvfp4")
    for mode in ("rne", "rtz", "stochastic"):
        assert_matches_reference(x, fmt, mode)
    with np.errstate(over="ignore"):
        x32 = x.astype(np.float32)
    q64, q32 = numfmt.quantize(x, fmt), numfmt.quantize(x32, fmt)
    assert np.float32(q64.tensor_scale).view(np.uint32) == np.float32(q32.tensor_scale).view(np.uint32)
    assert np.array_equal(q64.codes, q32.codes) and np.array_equal(q64.scales, q32.scales)
    y = numfmt.fake_quantize(x, fmt)
    assert bits_equal(y, numfmt.fake_quantize(x32, fmt))
    assert np.isnan(y[0, :16]).all() and np.isfinite(y[0, 16:]).all() and np.isfinite(y[1]).all()


@pytest.mark.parametrize("fmt", SOME, ids=fmt_id)
@pytest.mark.parametrize("axis", [0, 1, -3, 2])
def test_axis_other_than_last(fmt, axis):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((5, 37, 3)) * np.exp2(rng.integers(-5, 5, (5, 37, 3)))).astype(np.float32)
    assert_matches_reference(x, fmt, "rne", axis=axis)
    assert_matches_reference(x, fmt, "stochastic", axis=axis, seed=9)
    q = numfmt.quantize(x, fmt, axis=axis)
    ax = axis % 3
    bs = fmt.block_size or x.shape[ax]
    expect = list(x.shape)
    expect[ax] = -(-x.shape[ax] // bs)
    assert q.scales.shape == tuple(expect) and q.axis == ax
    # moving the axis last by hand gives the same values
    moved = numfmt.fake_quantize(np.moveaxis(x, ax, -1).copy(), fmt)
    assert bits_equal(np.moveaxis(moved, -1, ax), numfmt.fake_quantize(x, fmt, axis=axis))


@pytest.mark.parametrize("fmt", SOME, ids=fmt_id)
def test_partial_last_block_behaves_zero_padded(fmt):
    if fmt.block_size is None:
        pytest.skip("one scale per axis: no partial block")
    rng = np.random.default_rng(4)
    bs = fmt.block_size
    x = rng.standard_normal((4, 2 * bs + 3)).astype(np.float32)
    padded = np.concatenate([x, np.zeros((4, bs - 3), np.float32)], axis=1)
    assert bits_equal(numfmt.fake_quantize(x, fmt), numfmt.fake_quantize(padded, fmt)[:, :x.shape[1]]) \
        or fmt.scaling == "nvfp4"  # nvfp4: the tensor amax is the same, so also equal
    for L in (1, bs - 1, bs + 1):
        assert_matches_reference(x[:, :L], fmt, "rne")


@pytest.mark.parametrize("fmt", SOME + [numfmt.get("fp8_e4m3"), numfmt.get("int4")],
                         ids=lambda f: f.name)
@pytest.mark.parametrize("shape,axis", [((0,), -1), ((3, 0), -1), ((0, 32), -1), ((0, 32), 0),
                                        ((2, 0, 5), 1)])
def test_empty_arrays(fmt, shape, axis):
    x = np.zeros(shape, np.float32)
    q = numfmt.quantize(x, fmt, axis=axis)
    assert q.codes.shape == shape and q.codes.dtype == np.uint8
    f = numfmt.fake_quantize(x, fmt, axis=axis)
    assert f.shape == shape and f.dtype == np.float32
    assert numfmt.dequantize(q).shape == shape


@pytest.mark.parametrize("fmt", SOME + [numfmt.get("fp8_e4m3"), numfmt.get("int4")],
                         ids=lambda f: f.name)
@pytest.mark.parametrize("value", [3.3, -0.0, 0.0, 1e-40, -5e6])
def test_zero_dim_arrays(fmt, value):
    x = np.array(value, np.float32)
    q = numfmt.quantize(x, fmt)
    f = numfmt.fake_quantize(x, fmt)
    assert q.codes.shape == () and f.shape == () and f.dtype == np.float32
    one = numfmt.fake_quantize(x.reshape(1), fmt)
    assert bits_equal(f.reshape(1), one)
    assert bits_equal(numfmt.dequantize(q), f)
    if fmt.kind == "block":
        assert_matches_reference(x, fmt, "rne")
