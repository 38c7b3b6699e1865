"""TF32 (1 sign, 8 exponent, 10 mantissa bits; FP32's range) against an independent
reference: the float32 bit pattern rounded to 10 mantissa bits by integer arithmetic.

TF32 has FP32's exponent field and bias, so rounding a float32 to TF32 is rounding its
31 magnitude bits to a multiple of 2^13: the carry runs from the mantissa into the
exponent on its own (subnormal -> normal, 1.11..1 -> 10.0), and a TF32 code is the top
19 bits of the float32 pattern. The format is saturating (numfmt's default): a finite
value that rounds past the largest finite code gives that code; +-Inf stays +-Inf; every
NaN gives the canonical positive NaN code.
"""
import numpy as np
import pytest

import numfmt

pytestmark = pytest.mark.usefixtures("one_numba_thread")

SHIFT = 13                       # 23 - 10 mantissa bits
INF_MAG = 0xFF << 10             # exponent field all ones, mantissa 0
MAX_MAG = INF_MAG - 1            # 0x1.ffcp127
NAN_CODE = (1 << 18) - 1         # exponent all ones, mantissa all ones, sign 0
TF32_MAX = float.fromhex("0x1.ffcp127")


def ref_encode(x32: np.ndarray, mode: str) -> np.ndarray:
    """TF32 codes of float32 values, from their bit patterns (int64 arithmetic)."""
    bits = np.ascontiguousarray(x32, dtype=np.float32).view(np.uint32).astype(np.int64)
    sign = bits >> 31
    mag = bits & 0x7FFFFFFF
    q = mag >> SHIFT
    rem = mag & ((1 << SHIFT) - 1)
    if mode == "rne":
        half = 1 << (SHIFT - 1)
        q = q + ((rem > half) | ((rem == half) & (q & 1 == 1)))
    elif mode != "rtz":
        raise AssertionError(mode)
    is_nan = mag > 0x7F800000
    is_inf = mag == 0x7F800000
    q = np.where(~is_inf & ~is_nan & (q >= INF_MAG), MAX_MAG, q)   # saturate finite
    codes = (sign << 18) | q
    return np.where(is_nan, NAN_CODE, codes)


def ref_decode(codes: np.ndarray) -> np.ndarray:
    """float32 value of TF32 codes: the code is the top 19 bits of the FP32 pattern."""
    return (np.asarray(codes, dtype=np.uint32) << np.uint32(SHIFT)).view(np.float32)


def same_f32(a, b):
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    return (a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))


def boundary_inputs() -> np.ndarray:
    """For every TF32 magnitude (subnormals, normals, the max, Inf, NaNs) the float32
    patterns at the code, one above, just below / at / above the rounding tie, and the
    last before the next code; both signs."""
    base = np.arange(1 << 18, dtype=np.uint32) << np.uint32(SHIFT)
    offs = np.array([0, 1, 0x0FFF, 0x1000, 0x1001, 0x1FFF], dtype=np.uint32)
    mag = (base[:, None] + offs[None, :]).reshape(-1)
    pat = np.concatenate([mag, mag | np.uint32(1 << 31)])
    return pat.view(np.float32)


def test_tf32_parameters():
    f = numfmt.get("tf32")
    assert (f.bits, f.exponent_bits, f.mantissa_bits, f.bias) == (19, 8, 10, 127)
    assert f.max_normal == TF32_MAX
    assert f.min_normal == 2.0 ** -126
    assert f.min_subnormal == 2.0 ** -136
    assert f.max_code == MAX_MAG and f.nan_code == NAN_CODE and f.inf_code == INF_MAG


def test_decode_every_code():
    codes = np.arange(1 << 19, dtype=np.uint32)
    assert same_f32(numfmt.decode(codes, "tf32"), ref_decode(codes)).all()
    # the bug this guards: 0.126 decoded as a float32 bit pattern gave 1.8e-40
    assert numfmt.decode(numfmt.encode(np.float32([0.126]), "tf32"), "tf32")[0] == \
        np.float32(0.1259765625)


@pytest.mark.parametrize("mode", ["rne", "rtz"])
def test_encode_boundaries(mode):
    x = boundary_inputs()
    got = numfmt.encode(x, "tf32", rounding=mode).astype(np.int64)
    want = ref_encode(x, mode)
    bad = np.nonzero(got != want)[0]
    assert bad.size == 0, (f"{bad.size} mismatches; first x={x[bad[0]]!r} "
                           f"got {got[bad[0]]:#x} want {want[bad[0]]:#x}")


def test_round_trips_random_patterns():
    rng = np.random.default_rng(13)
    x = rng.integers(0, 1 << 32, size=200_000, dtype=np.uint64).astype(np.uint32)
    x = x.view(np.float32)
    want = ref_decode(ref_encode(x, "rne"))
    assert same_f32(numfmt.decode(numfmt.encode(x, "tf32"), "tf32"), want).all()
    assert same_f32(numfmt.fake_quantize(x, "tf32"), want).all()
    assert same_f32(numfmt.dequantize(numfmt.quantize(x, "tf32")), want).all()


def test_specials_and_saturation():
    x = np.float32([0.0, -0.0, np.inf, -np.inf, np.nan, 3.4028235e38, -3.4028235e38,
                    2.0 ** -136, 2.0 ** -137, 1.5 * 2.0 ** -137, 0.126])
    got = numfmt.fake_quantize(x, "tf32")
    want = np.float32([0.0, -0.0, np.inf, -np.inf, np.nan, TF32_MAX, -TF32_MAX,
                       2.0 ** -136, 0.0, 2.0 ** -136, 0.1259765625])
    assert same_f32(got, want).all(), got
    assert np.signbit(got[1]) and not np.signbit(got[0])
