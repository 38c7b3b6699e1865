"""A slow, obviously-correct reference for hwsim.matmul: Python integers and Fractions.

Every rounding is done on an exact Fraction; NaN / Inf follow IEEE float arithmetic.
The other hwsim tests import ``reference_matmul`` and ``round_fraction`` from here.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

import numfmt
from numfmt.formats import BlockFormat, IntFormat


def element_integer(fmt, code: int):
    """(integer value in element-quantum units or None for NaN/Inf, quantum exponent, float value)."""
    elem = fmt.element if isinstance(fmt, BlockFormat) else fmt
    if isinstance(elem, IntFormat):
        v = code - (1 << elem.bits) if code >= 1 << (elem.bits - 1) else code
        qexp = fmt.element_scale_exp if isinstance(fmt, BlockFormat) else 0
        return v, qexp, float(v)
    val = float(numfmt.decode_table(elem)[code])
    qexp = int(round(math.log2(elem.min_subnormal)))
    if not math.isfinite(val):
        return None, qexp, val
    f = Fraction(val) / Fraction(2) ** qexp
    assert f.denominator == 1
    return int(f), qexp, val / 2.0 ** qexp


def block_factor(q, row: int, blk: int):
    """Scale value of a block as a float (NaN for E8M0 code 255)."""
    fmt = q.format
    if not isinstance(fmt, BlockFormat):
        return 1.0
    s = q.scales[row, blk]
    if fmt.scaling == "mx":
        return math.nan if int(s) == 255 else math.ldexp(1.0, int(s) - 127)
    return float(s)


def round_fraction(x: Fraction, m: int, rtz: bool) -> float:
    """Round an exact nonzero rational to m fraction bits, FP32 exponent range."""
    if x == 0:
        return 0.0
    sign = -1.0 if x < 0 else 1.0
    a = abs(x)
    E = a.numerator.bit_length() - a.denominator.bit_length()
    if Fraction(2) ** E > a:
        E -= 1
    while Fraction(2) ** (E + 1) <= a:
        E += 1
    E = max(E, -126)
    ulp = Fraction(2) ** (E - m)
    t = a / ulp
    i = t.numerator // t.denominator
    rem = t - i
    if not rtz and (rem > Fraction(1, 2) or (rem == Fraction(1, 2) and i % 2 == 1)):
        i += 1
    r = i * ulp
    maxf = (2 - Fraction(1, 2 ** m)) * Fraction(2) ** 127
    if r > maxf:
        return sign * (float(maxf) if rtz else math.inf)
    return sign * float(r)


def round_add(acc: float, t: float, m: int, rtz: bool) -> float:
    """round(exact(acc + t)) with IEEE specials and zero signs."""
    if not (math.isfinite(acc) and math.isfinite(t)):
        return acc + t
    s = Fraction(acc) + Fraction(t)
    if s == 0:
        return acc + t  # IEEE: +0 unless both are -0
    return round_fraction(s, m, rtz)


def reference_matmul(a, b, *, bits=None, overflow="exact", mantissa_bits=23, rounding="rne",
                     promote_every=None):
    """(out float32 M x N, max |exact prefix|, max |block sum|, overflow count)."""
    fa, fb = a.format, b.format
    M, K = a.shape
    N = b.shape[0]
    sizes = [f.block_size if f.block_size is not None else K
             for f in (fa, fb) if isinstance(f, BlockFormat)]
    L = min(sizes) if sizes else K
    L = min(L, K)
    rtz = rounding == "rtz"
    lo = -(1 << (bits - 1)) if bits else None
    hi = (1 << (bits - 1)) - 1 if bits else None
    out = np.zeros((M, N), dtype=np.float32)
    max_prefix = max_block = count = 0

    def block_of(fmt, k):
        if not isinstance(fmt, BlockFormat):
            return 0
        return k // (fmt.block_size if fmt.block_size is not None else K)

    for i in range(M):
        for n in range(N):
            partial = 0.0
            reg = 0.0
            nblocks = 0
            for k0 in range(0, K, L):
                acc = 0
                exact = 0
                special = []
                for k in range(k0, min(K, k0 + L)):
                    ia, qa, va = element_integer(fa, int(a.codes[i, k]))
                    ib, qb, vb = element_integer(fb, int(b.codes[n, k]))
                    if ia is None or ib is None:
                        special.append(va * vb)
                        ia = 0 if ia is None else ia
                        ib = 0 if ib is None else ib
                    p = ia * ib
                    exact += p
                    max_prefix = max(max_prefix, abs(exact))
                    v = acc + p
                    if overflow == "saturate":
                        c = min(max(v, lo), hi)
                        count += c != v
                        acc = c
                    elif overflow == "wrap":
                        c = ((v - lo) % (1 << bits)) + lo
                        count += c != v
                        acc = c
                    else:
                        if bits is not None:
                            count += p != 0 and not (lo <= v <= hi)
                        acc = v
                max_block = max(max_block, abs(exact))
                sa = block_factor(a, i, block_of(fa, k0))
                sb = block_factor(b, n, block_of(fb, k0))
                c = sa * sb * 2.0 ** (qa + qb)
                if special:
                    s = 0.0
                    for k in range(k0, min(K, k0 + L)):
                        _, _, va = element_integer(fa, int(a.codes[i, k]))
                        _, _, vb = element_integer(fb, int(b.codes[n, k]))
                        s += va * vb
                    t = s * c
                elif not math.isfinite(c):
                    t = float(acc) * c
                elif acc == 0:
                    t = 0.0 * c
                else:
                    t = round_fraction(Fraction(acc) * Fraction(c), mantissa_bits, rtz)
                partial = round_add(partial, t, mantissa_bits, rtz)
                nblocks += 1
                if promote_every and (nblocks * L) % promote_every == 0:
                    reg = round_add(reg, partial, 23, False)
                    partial = 0.0
            if promote_every:
                if (nblocks * L) % promote_every:
                    reg = round_add(reg, partial, 23, False)
                out[i, n] = np.float32(reg)
            else:
                out[i, n] = np.float32(partial)
    return out, max_prefix, max_block, count


# -- the reference checked against IEEE float32 where the two must agree ---------------------
def test_round_fraction_matches_float32_everywhere_it_is_defined():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(2000) * 10.0 ** rng.integers(-45, 39, 2000),
                        [1e-45, 1.5e-45, 2 ** -149 * 1.5, 3.4028235e38, 3.4028236e38, 3.5e38]])
    for v in x:
        with np.errstate(over="ignore"):
            want = np.float32(v)  # numpy rounds float64 -> float32 to nearest even
        got = round_fraction(Fraction(float(v)), 23, False)
        assert np.float32(got).view(np.uint32) == want.view(np.uint32) or (
            np.isinf(want) and np.isinf(got)), v


def test_round_fraction_truncates_and_saturates():
    assert round_fraction(Fraction(7, 4), 1, True) == 1.5
    assert round_fraction(Fraction(7, 4), 1, False) == 2.0
    assert round_fraction(Fraction(5, 4), 1, False) == 1.0  # tie to even
    assert round_fraction(Fraction(-7, 4), 1, True) == -1.5
    big = Fraction(2) ** 130
    assert round_fraction(big, 23, True) == float(np.finfo(np.float32).max)
    assert round_fraction(big, 23, False) == math.inf


@pytest.mark.parametrize("m", [23])
def test_round_add_is_float32_addition(m):
    rng = np.random.default_rng(1)
    a = (rng.standard_normal(500) * 10.0 ** rng.integers(-40, 38, 500)).astype(np.float32)
    b = (rng.standard_normal(500) * 10.0 ** rng.integers(-40, 38, 500)).astype(np.float32)
    for x, y in zip(a, b):
        want = np.float32(x) + np.float32(y)
        got = np.float32(round_add(float(x), float(y), m, False))
        assert got.view(np.uint32) == want.view(np.uint32) or (np.isnan(got) and np.isnan(want))
