"""Numba kernels: pure functions of (array, format parameters, rounding).

Units and arithmetic
--------------------
All rounding happens in float64 on exactly scaled values. For an input v
(float32 or float64, read exactly) and a block with shared exponent X:

* float elements with m mantissa bits and smallest normal exponent emin:
      e_v   = floor(log2|v|)                   (from v's bits)
      qe    = max(e_v - X, emin) - m           (exponent of the element quantum)
      t     = v * 2^-(X + qe)                  (exact: a power-of-two scaling)
      n     = round_mode(t)                    (an integer, |n| <= 2^(m+1))
      value = n * 2^qe  (element units),  dequantized = value * 2^X
  saturated at the element's max normal.
* integer elements with implicit exponent ese (MX: 2 - bits; plain ints: 0):
      n = clamp(round_mode(v * 2^-(X + ese)), min_code, max_code),
      dequantized = n * 2^(X + ese).

Because every scaling is by a power of two and |t| < 2^53, each step is exact,
so the only rounding is the one the mode asks for.

Element codes: integers are two's complement in the low ``bits`` bits; floats
are sign | exponent field | mantissa field, and the magnitude code of
n * 2^qe is ((qe - (emin - m)) << m) + |n| (this covers subnormals, normals and
the carry into the next binade at once).

Rounding modes (integer codes used by the kernels): 0 rne, 1 rna, 2 rtz,
3 rup (toward +inf), 4 rdn (toward -inf), 5 stochastic (round up with
probability equal to the fraction, resolved to 2^-32, from a counter-based hash
of (seed, element index), so the bits do not depend on the thread count).
"""
from __future__ import annotations

import math

import numba as nb
import numpy as np
from numba import prange

RNE, RNA, RTZ, RUP, RDN, STOCHASTIC = range(6)
COMPAT_OCP, COMPAT_MX = 0, 1

_P2_OFFSET = 1100
# 2^k for k in [-1100, 1099]; below 2^-1074 they are 0, above 2^1023 Inf (never indexed).
with np.errstate(over="ignore"):
    POW2 = np.ldexp(1.0, np.arange(-_P2_OFFSET, _P2_OFFSET, dtype=np.int64)).astype(np.float64)

_JIT = dict(cache=True, nogil=True, fastmath=False, error_model="numpy")


@nb.njit(inline="always", **_JIT)
def pow2(k):
    return POW2[k + _P2_OFFSET]


@nb.njit(inline="always", **_JIT)
def _hash_u32(seed, index):
    """splitmix64 of (seed, index), top 32 bits: a counter-based uniform integer."""
    z = np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(index) + np.uint64(0x632BE59BD9B4E5F5)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return z >> np.uint64(32)


@nb.njit(inline="always", **_JIT)
def round_mode(t, mode, seed, index):
    """Round the float64 ``t`` to an integer-valued float64; the sign of a zero follows t."""
    if mode == RNE:
        r = np.rint(t)
    elif mode == RNA:
        r = math.floor(abs(t) + 0.5)
    elif mode == RTZ:
        r = math.trunc(t)
    elif mode == RUP:
        r = math.ceil(t)
    elif mode == RDN:
        r = math.floor(t)
    else:
        fl = math.floor(t)
        frac = t - fl  # exact
        u = _hash_u32(seed, index)
        r = fl + (1.0 if np.float64(u) < frac * 4294967296.0 else 0.0)
    return math.copysign(abs(r), t)


@nb.njit(inline="always", **_JIT)
def float_exponent(bits, shift, emask, fbias, v):
    """floor(log2|v|) for a finite nonzero v, from its bits (slow path for subnormals)."""
    ef = np.int64((bits >> shift) & emask)
    if ef != 0:
        return ef - fbias
    m, e = math.frexp(v)
    return np.int64(e) - 1


@nb.njit(inline="always", **_JIT)
def log2f_floor(a):
    """floor(float32(log2(a))) for a > 0: the exponent microxcaling derives with torch.log2."""
    return np.int64(math.floor(np.float32(math.log2(a))))


@nb.njit(inline="always", **_JIT)
def round_float_elem(v, e_v, X, m, emin, maxmag, mode, seed, index):
    """Round v / 2^X to a float element (see module docstring); returns (n, qe, saturated).

    n is the signed integer significand as float64 (zero keeps the sign of v).
    """
    ey = e_v - X
    if ey < emin:
        ey = emin
    qe = ey - m
    t = v * pow2(-(X + qe))
    n = round_mode(t, mode, seed, index)
    if abs(n) * pow2(qe) > maxmag:
        return n, qe, True
    return n, qe, False


# ---------------------------------------------------------------------------
# MX: power-of-two shared exponent (E8M0 scale)
# ---------------------------------------------------------------------------
@nb.njit(inline="always", **_JIT)
def _mx_block_exponent(xb, start, stop, shift, emask, fbias, absmask, specialbits, x,
                       elem_emax, compat):
    """Return (X, is_nan): the block's shared exponent, or is_nan for NaN/Inf/overflow."""
    amb = xb[start] & absmask
    imax = start
    for i in range(start + 1, stop):
        b = xb[i] & absmask
        if b > amb:
            amb = b
            imax = i
    if amb >= specialbits:
        return np.int64(0), True
    if compat == COMPAT_MX:
        if amb == 0:
            e = np.int64(-126)  # log2 of FP32_MIN_NORMAL added to a zero amax
        else:
            e = log2f_floor(abs(np.float64(x[imax])))
    else:
        if amb == 0:
            return np.int64(-127), False
        e = float_exponent(amb, shift, emask, fbias, abs(np.float64(x[imax])))
    X = e - elem_emax
    if X > 127:
        return np.int64(0), True
    if X < -127:
        X = np.int64(-127)
    return X, False


@nb.njit(inline="always", **_JIT)
def _mx_element(v, bits, X, is_int, ese, m, emin, maxmag, lo, hi, shift, emask, fbias,
                mode, compat, seed, index):
    """One MX element. Returns (n, qe, saturated) with value n * 2^qe in element units."""
    if compat == COMPAT_MX:
        return _mx_element_microxcaling(v, X, is_int, ese, m, emin, maxmag, lo, hi, mode)
    if is_int:
        t = v * pow2(-(X + ese))
        n = round_mode(t, mode, seed, index)
        if n > hi:
            return np.float64(hi), ese, True
        if n < lo:
            return np.float64(lo), ese, True
        return n + 0.0, ese, False  # integers have no -0
    if v == 0.0:
        return v, emin - m, False
    e_v = float_exponent(bits, shift, emask, fbias, v)
    return round_float_elem(v, e_v, X, m, emin, maxmag, mode, seed, index)


@nb.njit(inline="always", **_JIT)
def _mx_element_microxcaling(v, X, is_int, ese, m, emin, maxmag, lo, hi, mode):
    """microxcaling's float32 arithmetic (mx.mx_ops._quantize_mx, pure-PyTorch path).

    a  = float32(v / 2^X); private exponent pe = max(floor(log2f|a|), emin)
    t  = a * 2^(m - pe)   (exact)
    'nearest' (rna): floor(float32(|t| + 0.5)); 'even' (rne): the same minus 1
    when float32(|t| - 0.5) is an even integer; 'floor' (rtz): floor(|t|).
    The sign is torch.sign(a): a zero (either sign) gives +0.0, a negative value
    that rounds to zero gives -0.0.
    """
    a = np.float64(np.float32(v * pow2(-X)))
    if a == 0.0:
        return 0.0, emin - m, False
    if is_int:
        qe = ese
    else:
        pe = log2f_floor(abs(a))
        if pe < emin:
            pe = emin
        qe = pe - m
    t = abs(a) * pow2(-qe)
    if mode == RTZ:
        r = math.floor(t)
    else:
        r = math.floor(np.float64(np.float32(t + 0.5)))
        if mode == RNE:
            d = np.float64(np.float32(t - 0.5))
            if d >= 0.0 and d * 0.5 == math.floor(d * 0.5):
                r -= 1.0
    n = r if a > 0 else -r
    if is_int:
        if n > hi:
            return np.float64(hi), qe, True
        if n < lo:
            return np.float64(lo), qe, True
        return n + 0.0, qe, False  # integers have no -0
    if r * pow2(qe) > maxmag:
        return n, qe, True
    return n, qe, False


@nb.njit(parallel=True, **_JIT)
def mx_quantize(x, xb, rows, L, bs, codes, scales, fake, want_codes, shift, emask, fbias,
                absmask, specialbits, is_int, ebits_total, ese, m, emin, elem_emax, maxmag,
                max_code_mag, lo, hi, mode, compat, seed):
    """MX block quantization of x viewed as (rows, L), blocks of bs along L.

    Writes element codes (``want_codes``) into ``codes`` and E8M0 scale codes into
    ``scales`` (rows, nblocks), or the dequantized float32 values into ``fake``.
    """
    nblk = (L + bs - 1) // bs
    total = rows * nblk
    code_mask = (1 << ebits_total) - 1
    sign_bit = 1 << (ebits_total - 1)
    qemin = emin - m
    for g in prange(total):
        r = g // nblk
        b = g - r * nblk
        start = r * L + b * bs
        stop = min(start + bs, r * L + L)
        X, is_nan = _mx_block_exponent(xb, start, stop, shift, emask, fbias, absmask,
                                       specialbits, x, elem_emax, compat)
        if is_nan:
            if want_codes:
                scales[g] = 255
                for i in range(start, stop):
                    codes[i] = 0
            else:
                for i in range(start, stop):
                    fake[i] = np.nan
            continue
        if want_codes:
            scales[g] = X + 127
        for i in range(start, stop):
            v = np.float64(x[i])
            n, qe, sat = _mx_element(v, xb[i], X, is_int, ese, m, emin, maxmag, lo, hi,
                                     shift, emask, fbias, mode, compat, seed, i)
            if want_codes:
                if is_int:
                    codes[i] = np.int64(n) & code_mask
                else:
                    if sat:
                        cm = max_code_mag
                    else:
                        cm = ((qe - qemin) << m) + np.int64(abs(n))
                    if math.copysign(1.0, n) < 0:
                        cm |= sign_bit
                    codes[i] = cm
            else:
                if sat and not is_int:
                    val = math.copysign(maxmag, n)
                else:
                    val = n * pow2(qe)
                fake[i] = val * pow2(X)


# ---------------------------------------------------------------------------
# Generic rounding of a float64 scalar into a float format (scales, elements)
# ---------------------------------------------------------------------------
@nb.njit(inline="always", **_JIT)
def round_to_float(v, m, emin, maxmag, subnormals, mode, seed, index):
    """Round a finite float64 v into a float format; saturates at maxmag.

    Formats without subnormals (E8M0) round magnitudes below 2^emin up to it.
    """
    if v == 0.0:
        return v
    mant, e = math.frexp(v)
    ey = np.int64(e) - 1
    if ey < emin:
        if not subnormals:
            return math.copysign(pow2(emin), v)
        ey = emin
    qe = ey - m
    n = round_mode(v * pow2(-qe), mode, seed, index)
    r = n * pow2(qe)
    if abs(r) > maxmag:
        return math.copysign(maxmag, v)
    if r == 0.0 and not subnormals:
        return math.copysign(pow2(emin), v)
    return r


@nb.njit(inline="always", **_JIT)
def float_code(val, m, emin, bias, sign_bit, max_code_mag):
    """Code of a representable finite float value (inverse of decoding)."""
    a = abs(val)
    if a == 0.0:
        cm = np.int64(0)
    else:
        mant, e = math.frexp(a)
        ey = np.int64(e) - 1
        if ey < emin:
            cm = np.int64(a * pow2(-(emin - m)))
        else:
            cm = ((ey + bias) << m) + np.int64(a * pow2(-(ey - m))) - (np.int64(1) << m)
        if cm > max_code_mag:
            cm = max_code_mag
    if math.copysign(1.0, val) < 0:
        cm |= sign_bit
    return cm


# ---------------------------------------------------------------------------
# absmax scaling: SINT (fp16 group scales), per-channel int8 (fp32 scales)
# ---------------------------------------------------------------------------
@nb.njit(parallel=True, **_JIT)
def absmax_quantize(x, rows, L, bs, codes, scales, fake, want_codes, is_int, ebits_total,
                    elem_max, lo, hi, m, emin, bias, max_code_mag, s_m, s_emin, s_max,
                    s_subnormals, mode, seed):
    """scale = RNE_scalefmt(amax / elem_max); element = round_mode(v / scale), saturated.

    v / scale is a correctly rounded float64 quotient; for float32 inputs and
    fp16 scales it never crosses a rounding boundary, so the result is exact.
    A zero scale (all-zero group, or amax below the scale's smallest value) gives
    zeros with the input's sign kept for float elements. NaN or Inf in a group
    gives a NaN scale and NaN values.
    """
    nblk = (L + bs - 1) // bs
    total = rows * nblk
    code_mask = (1 << ebits_total) - 1
    sign_bit = 1 << (ebits_total - 1)
    for g in prange(total):
        r = g // nblk
        b = g - r * nblk
        start = r * L + b * bs
        stop = min(start + bs, r * L + L)
        amax = 0.0
        special = False
        for i in range(start, stop):
            a = abs(np.float64(x[i]))
            if not (a <= 1.7976931348623157e308):
                special = True
            elif a > amax:
                amax = a
        if special:
            if want_codes:
                scales[g] = np.nan
                for i in range(start, stop):
                    codes[i] = 0
            else:
                for i in range(start, stop):
                    fake[i] = np.nan
            continue
        s = round_to_float(amax / elem_max, s_m, s_emin, s_max, s_subnormals, RNE, 0, 0)
        if want_codes:
            scales[g] = s
        for i in range(start, stop):
            v = np.float64(x[i])
            if s == 0.0:
                val = 0.0 if is_int else v * 0.0
            elif is_int:
                n = round_mode(v / s, mode, seed, i)
                if n > hi:
                    n = np.float64(hi)
                elif n < lo:
                    n = np.float64(lo)
                val = n + 0.0  # integers have no -0
            else:
                val = round_to_float(v / s, m, emin, elem_max, True, mode, seed, i)
            if want_codes:
                if is_int:
                    codes[i] = np.int64(val) & code_mask
                else:
                    codes[i] = float_code(val, m, emin, bias, sign_bit, max_code_mag)
            else:
                fake[i] = val * s


# ---------------------------------------------------------------------------
# NVFP4: E2M1 elements, E4M3 block scales, FP32 tensor scale
# ---------------------------------------------------------------------------
@nb.njit(**_JIT)
def finite_absmax(x):
    """Largest finite |x| (0 when there is none)."""
    amax = 0.0
    for i in range(x.size):
        a = abs(np.float64(x[i]))
        if a <= 1.7976931348623157e308 and a > amax:
            amax = a
    return amax


@nb.njit(parallel=True, **_JIT)
def nvfp4_quantize(x, rows, L, bs, s_enc, codes, scales, fake, want_codes, mode, seed):
    """NVIDIA's NVFP4 recipe in float32 arithmetic, in this order:

        s_enc   = 6 * 448 / amax(tensor)                 (fp32, given)
        scale_b = e4m3_RNE(float32(amax_b / 6) * s_enc)  (saturating)
        element = round_mode_E2M1(float32(float32(v * s_enc) / scale_b))
        decoded = float32(float32(element * scale_b) / s_enc)

    A block whose scale rounds to zero holds zeros (signed); NaN/Inf in a block
    gives the E4M3 NaN scale code 0x7F and NaN values.
    """
    nblk = (L + bs - 1) // bs
    total = rows * nblk
    s32 = np.float32(s_enc)
    for g in prange(total):
        r = g // nblk
        b = g - r * nblk
        start = r * L + b * bs
        stop = min(start + bs, r * L + L)
        amax = np.float32(0.0)
        special = False
        for i in range(start, stop):
            a = abs(np.float32(x[i]))
            if not (a <= np.float32(3.4028234663852886e38)):
                special = True
            elif a > amax:
                amax = a
        if special:
            if want_codes:
                scales[g] = 0x7F
                for i in range(start, stop):
                    codes[i] = 0
            else:
                for i in range(start, stop):
                    fake[i] = np.nan
            continue
        sv = np.float64(np.float32(np.float32(amax / np.float32(6.0)) * s32))
        sb = round_to_float(sv, 3, -6, 448.0, True, RNE, 0, 0)
        if want_codes:
            scales[g] = float_code(sb, 3, -6, 7, 0x80, 0x7E)
        sb32 = np.float32(sb)
        for i in range(start, stop):
            v32 = np.float32(x[i])
            if sb == 0.0:
                e = np.float64(v32) * 0.0
            else:
                t = np.float64(np.float32(np.float32(v32 * s32) / sb32))
                e = round_to_float(t, 1, 0, 6.0, True, mode, seed, i)
            if want_codes:
                codes[i] = float_code(e, 1, 0, 1, 0x8, 0x7)
            else:
                fake[i] = np.float32(np.float32(np.float32(e) * sb32) / s32)


# ---------------------------------------------------------------------------
# Elements without a scale
# ---------------------------------------------------------------------------
@nb.njit(parallel=True, **_JIT)
def element_encode(x, codes, is_int, ebits_total, m, emin, bias, maxmag, max_code_mag,
                   subnormals, saturating, has_inf, nan_code, inf_code, lo, hi, mode, seed):
    """Round each value to the element format and write its code.

    Overflow (|rounded| > max): saturating formats give +-max; otherwise the
    IEEE rule: Inf (or NaN where there is no Inf) when rounding away from the
    bound, +-max when rounding toward it. Inf inputs: Inf, or +-max / NaN likewise.
    """
    sign_bit = np.int64(1) << (ebits_total - 1)
    code_mask = (np.int64(1) << ebits_total) - 1
    for i in prange(x.size):
        v = np.float64(x[i])
        if is_int:
            n = round_mode(v, mode, seed, i)
            if n > hi:
                n = np.float64(hi)
            elif n < lo:
                n = np.float64(lo)
            codes[i] = np.int64(n) & code_mask
            continue
        if v != v:
            codes[i] = nan_code
            continue
        neg = math.copysign(1.0, v) < 0
        over = False
        if abs(v) > 1.7976931348623157e308:
            if has_inf:
                codes[i] = (inf_code | sign_bit) if neg else inf_code
                continue
            over = True
            toward = False
        else:
            r = round_to_float(v, m, emin, 1.7976931348623157e308, subnormals, mode, seed, i)
            if abs(r) > maxmag:
                over = True
                toward = (mode == RTZ) or (mode == RUP and neg) or (mode == RDN and not neg)
        if over:
            if saturating or toward:
                c = max_code_mag
            elif has_inf:
                c = inf_code
            else:
                c = nan_code
            codes[i] = (c | sign_bit) if (neg and c != nan_code) else c
        else:
            codes[i] = float_code(r, m, emin, bias, sign_bit, max_code_mag)


@nb.njit(parallel=True, **_JIT)
def table_decode(codes, table, out):
    for i in prange(codes.size):
        out[i] = table[codes[i]]


@nb.njit(parallel=True, **_JIT)
def mx_dequantize(codes, scales, rows, L, bs, table, out):
    """out = table[code] * 2^(scale_code - 127); scale code 255 is NaN."""
    nblk = (L + bs - 1) // bs
    for g in prange(rows * nblk):
        r = g // nblk
        b = g - r * nblk
        start = r * L + b * bs
        stop = min(start + bs, r * L + L)
        sc = np.int64(scales[g])
        if sc == 255:
            for i in range(start, stop):
                out[i] = np.nan
        else:
            f = pow2(sc - 127)
            for i in range(start, stop):
                out[i] = table[codes[i]] * f


@nb.njit(parallel=True, **_JIT)
def scaled_dequantize(codes, scales, rows, L, bs, table, out):
    """out = table[code] * scale (float64 scales, NaN propagates)."""
    nblk = (L + bs - 1) // bs
    for g in prange(rows * nblk):
        r = g // nblk
        b = g - r * nblk
        start = r * L + b * bs
        stop = min(start + bs, r * L + L)
        s = scales[g]
        for i in range(start, stop):
            out[i] = table[codes[i]] * s


@nb.njit(parallel=True, **_JIT)
def nvfp4_dequantize(codes, scales, rows, L, bs, s_enc, e4m3_table, e2m1_table, out):
    nblk = (L + bs - 1) // bs
    s32 = np.float32(s_enc)
    for g in prange(rows * nblk):
        r = g // nblk
        b = g - r * nblk
        start = r * L + b * bs
        stop = min(start + bs, r * L + L)
        sb32 = np.float32(e4m3_table[scales[g]])
        for i in range(start, stop):
            out[i] = np.float32(np.float32(np.float32(e2m1_table[codes[i]]) * sb32) / s32)
