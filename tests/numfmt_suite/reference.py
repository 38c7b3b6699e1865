"""A small, slow, obviously-correct reference for numfmt, written from the spec.

Nothing here calls numfmt's kernels or its decode tables: only the format
*parameters* (exponent bits, mantissa bits, bias, special-value policy, block
size, ...) are read from the numfmt format objects, because formats are data.
All arithmetic is exact (``fractions.Fraction``); the only roundings are the
ones the spec asks for, done by searching the list of representable values.

Spec rules implemented (issue 2, ``numfmt/core.py`` and ``numfmt/_kernels.py``
docstrings):

* element value of a float code: ``(-1)^S 2^(E-bias) (1 + M/2^m)``, subnormal
  ``(-1)^S 2^(1-bias) M/2^m`` for E = 0; specials by policy.
* rounding of an exact value v to a set of representable values: rne (tie to
  the neighbour whose value / (hi - lo) is even), rna (tie away from zero), rtz,
  rup, rdn, stochastic (up with probability (v - lo) / (hi - lo), decided as
  ``u < frac * 2^32`` with u the top 32 bits of splitmix64(seed, index)).
  Saturating formats give +-max beyond the range; a zero keeps v's sign.
* OCP MX: X = floor(log2 amax) - element_emax, clamped below at -127, > 127
  NaN; NaN/Inf in a block: scale 0xFF, all NaN; all-zero block: X = -127.
  Scale rules (``mx_shared_exponent``, from torchao's ScaleCalculationMode
  definitions): ceil X = ceil(log2 amax) - emax; even X = floor(log2 of amax
  rounded to m fraction bits, ties away) - emax; rceil X = ceil(log2 d) with
  d = amax / element_max rounded to float32 (RNE), clamped to -127..127.
* SINT / per channel: scale = RNE_scalefmt(amax / element_max), element =
  round_mode(v / scale) saturated; zero scale gives zeros.
* NVFP4: NVIDIA's float32 recipe, written with NumPy float32 scalars.

The stochastic hash index is the element's position in the array with the
quantized axis moved last, flattened in C order (what the kernels document as
"element index"); for ``encode`` it is the C-order flat index.
"""
from __future__ import annotations

import bisect
import functools
import math
from fractions import Fraction

import numpy as np

MASK64 = (1 << 64) - 1

try:  # shared hypothesis settings of the numfmt tests: reproducible in CI
    from hypothesis import HealthCheck, settings as _settings
    CI = _settings(derandomize=True, deadline=None, database=None, print_blob=False,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                          HealthCheck.filter_too_much])
except ImportError:  # pragma: no cover
    CI = None
ROUNDINGS = ("rne", "rna", "rtz", "rup", "rdn", "stochastic")


# ---------------------------------------------------------------------------
# the counter-based hash used by stochastic rounding
# ---------------------------------------------------------------------------
def hash_u32(seed: int, index: int) -> int:
    """splitmix64 finaliser of seed * golden + index + constant, top 32 bits."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 0x632BE59BD9B4E5F5) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    z ^= z >> 31
    return z >> 32


# ---------------------------------------------------------------------------
# exact helpers
# ---------------------------------------------------------------------------
def frac(v) -> Fraction:
    """The exact value of a finite float (any NumPy float scalar or Python float)."""
    return Fraction(float(v))


def floor_log2(a: Fraction) -> int:
    """floor(log2(a)) for a > 0, exactly."""
    e = a.numerator.bit_length() - a.denominator.bit_length()
    if Fraction(2) ** e > a:
        e -= 1
    assert Fraction(2) ** e <= a < Fraction(2) ** (e + 1)
    return e


def to_f32(value: Fraction, neg_zero: bool = False) -> np.float32:
    """Round an exact value to float32 (RNE). Used only where the value has at most
    53 significant bits and lies in float64 range, so float() is exact."""
    if value == 0:
        return np.float32(-0.0 if neg_zero else 0.0)
    f = float(value)
    assert Fraction(f) == value, "to_f32 is only for float64-exact values"
    with np.errstate(over="ignore"):
        return np.float32(f)


# ---------------------------------------------------------------------------
# element formats: every code, by the spec's formula
# ---------------------------------------------------------------------------
def ceil_log2(a: Fraction) -> int:
    """ceil(log2(a)) for a > 0, exactly."""
    e = floor_log2(a)
    return e if Fraction(2) ** e == a else e + 1


F32_MAX = (2 - Fraction(1, 2 ** 23)) * Fraction(2) ** 127


def round_to_f32(v: Fraction) -> Fraction | None:
    """v >= 0 rounded to float32 by RNE (exactly, once); None when it overflows to Inf."""
    r = round_float_formula(v, 23, -126, "rne")
    return None if r > F32_MAX else r


def mx_shared_exponent(amax: Fraction, fmt, rule: str = "floor", float64_input: bool = False):
    """The shared exponent X of an MX block whose values are finite, from its exact amax,
    by scale rule; None for a NaN scale. Written from torchao's ScaleCalculationMode
    (torchao.prototype.mx_formats.mx_tensor.to_mx) and numfmt's documented extensions:

        floor  floor(log2 amax) - emax                        (OCP MX v1.0)
        ceil   ceil(log2 amax) - emax
        even   floor(log2 R(amax)) - emax, R rounds to m fraction bits after the leading
               bit, ties away (m = element mantissa bits; bits - 2 for MX integers)
        rceil  ceil(log2 d), d = RNE_float32(amax / element_max) (float64 input: the
               quotient rounded to float64 first); d = 0: -127; d = Inf: 127

    Then X < -127 becomes -127; X > 127 a NaN scale (rceil: clamped to 127). An all-zero
    block has X = -127."""
    elem = fmt.element
    is_int = elem.kind == "int"
    emax = 0 if is_int else elem.emax
    if amax == 0:
        return -127
    if rule == "floor":
        X = floor_log2(amax) - emax
    elif rule == "ceil":
        X = ceil_log2(amax) - emax
    elif rule == "even":
        m = elem.bits - 2 if is_int else elem.mantissa_bits
        e = floor_log2(amax)
        q = Fraction(2) ** (e - m)  # the quantum of m fraction bits in amax's binade
        n = amax / q
        r = math.floor(n + Fraction(1, 2)) * q  # ties away (amax > 0)
        X = floor_log2(r) - emax
    elif rule == "rceil":
        _, vmax, _ = mx_element_values(fmt)
        quot = amax / vmax
        if float64_input:
            quot = Fraction(float(quot))  # correctly rounded to float64 (Python's Fraction)
        d = round_to_f32(quot)
        if d is None:
            X = 127
        elif d == 0:
            X = -127
        else:
            X = min(ceil_log2(d), 127)
    else:
        raise ValueError(f"unknown scale rule {rule!r}")
    X = max(X, -127)
    return None if X > 127 else X


def decode_code(code: int, fmt):
    """(kind, value) of one code: kind in {"num", "inf", "nan"}; value a Fraction with
    the sign of zero returned as a separate flag: ("num", Fraction, negative)."""
    if fmt.kind == "int":
        v = code - (1 << fmt.bits) if code >> (fmt.bits - 1) else code
        return "num", Fraction(v), False
    m, e = fmt.mantissa_bits, fmt.exponent_bits
    M = code & ((1 << m) - 1)
    E = (code >> m) & ((1 << e) - 1)
    S = (code >> (m + e)) & 1 if fmt.signed else 0
    top = (1 << e) - 1
    if fmt.specials == "ieee" and E == top:
        return ("inf" if M == 0 else "nan"), None, bool(S)
    if fmt.specials == "nan_only" and E == top and M == (1 << m) - 1:
        return "nan", None, bool(S)
    if fmt.specials == "fnuz" and S and E == 0 and M == 0:  # the negative-zero code
        return "nan", None, True
    if E == 0 and fmt.subnormals:
        mag = Fraction(M, 1 << m) * Fraction(2) ** (1 - fmt.bias)
    else:
        mag = (1 + Fraction(M, 1 << m)) * Fraction(2) ** (E - fmt.bias)
    return "num", (-mag if S else mag), bool(S)


def decode_float(code: int, fmt) -> float:
    """The float64 value of a code (NaN, +-Inf, -0.0 included)."""
    kind, val, neg = decode_code(code, fmt)
    if kind == "nan":
        return math.nan
    if kind == "inf":
        return -math.inf if neg else math.inf
    if val == 0:
        return -0.0 if neg else 0.0
    return float(val)


class Grid:
    """The representable finite values of an element format (<= 16 bits), sorted, with
    the code of each. ``scale`` multiplies every value (MX integer elements: 2^(2-bits))."""

    def __init__(self, fmt, scale: Fraction = Fraction(1)):
        self.fmt = fmt
        self.scale = scale
        code_of: dict[Fraction, int] = {}
        nan_codes, inf_codes = [], {}
        for code in range(1 << fmt.bits):
            kind, val, neg = decode_code(code, fmt)
            if fmt.kind == "int" and not fmt.min_code <= val <= fmt.max_code:
                continue  # -2^(b-1) is outside a symmetric integer format
            if kind == "nan":
                nan_codes.append(code)
            elif kind == "inf":
                inf_codes[neg] = code
            else:
                val = val * scale
                if val == 0:
                    code_of.setdefault(("zero", neg), code)
                    code_of.setdefault(Fraction(0), code)
                else:
                    assert val not in code_of, "two codes for one value"
                    code_of[val] = code
        self.code_of = code_of
        self.values = sorted(v for v in code_of if isinstance(v, Fraction))
        self.max = self.values[-1]
        self.min = self.values[0]
        self.smallest = min(abs(w) for w in self.values)  # smallest magnitude
        self.nan_codes = nan_codes
        self.inf_codes = inf_codes

    def code(self, value: Fraction, negative_zero: bool = False) -> int:
        if value == 0:
            return self.code_of.get(("zero", negative_zero), self.code_of[Fraction(0)])
        return self.code_of[value]


@functools.lru_cache(maxsize=None)
def grid(fmt, scale: Fraction = Fraction(1)) -> Grid:
    return Grid(fmt, scale)


@functools.lru_cache(maxsize=None)
def extended_values(fmt) -> list[Fraction]:
    """Non-negative values of a float format with its exponent range unbounded above
    (two more binades past the top), for IEEE overflow decisions."""
    m = fmt.mantissa_bits
    emin = (1 if fmt.subnormals else 0) - fmt.bias
    top_e = (1 << fmt.exponent_bits) - 1 - fmt.bias
    vals = set()
    if fmt.subnormals:
        vals.update(Fraction(k, 1 << m) * Fraction(2) ** emin for k in range(0, 1 << m))
    for e in range(emin, top_e + 3):
        vals.update(Fraction((1 << m) + k, 1 << m) * Fraction(2) ** e for k in range(1 << m))
    return sorted(vals)


# ---------------------------------------------------------------------------
# rounding an exact value to a sorted list of values
# ---------------------------------------------------------------------------
def round_to_values(v: Fraction, values: list[Fraction], mode: str, u: int | None = None):
    """Round v to one of ``values`` (sorted, signed, finite). Returns the chosen value,
    or None when v lies outside [values[0], values[-1]]."""
    if v < values[0] or v > values[-1]:
        return None
    i = bisect.bisect_left(values, v)
    if values[i] == v:
        return v
    lo, hi = values[i - 1], values[i]
    if mode == "rup":
        return hi
    if mode == "rdn":
        return lo
    if mode == "rtz":
        return lo if v > 0 else hi
    if mode == "stochastic":
        assert u is not None
        return hi if u < (v - lo) / (hi - lo) * 2 ** 32 else lo
    dlo, dhi = v - lo, hi - v
    if dlo < dhi:
        return lo
    if dhi < dlo:
        return hi
    if mode == "rna":
        return hi if v > 0 else lo
    assert mode == "rne", mode
    q = hi - lo
    lo_even = (lo / q).denominator == 1 and (lo / q).numerator % 2 == 0
    hi_even = (hi / q).denominator == 1 and (hi / q).numerator % 2 == 0
    assert lo_even != hi_even, (lo, hi)
    return lo if lo_even else hi


@functools.lru_cache(maxsize=None)
def signed_extended(fmt) -> list[Fraction]:
    return signed_values(extended_values(fmt), fmt.signed)


def signed_values(pos: list[Fraction], signed: bool) -> list[Fraction]:
    if not signed:
        return pos
    return sorted(set([-p for p in pos] + pos))


def round_float_formula(v: Fraction, m: int, emin: int, mode: str, u: int | None = None,
                        subnormals: bool = True) -> Fraction:
    """Round v to a float with m mantissa bits, smallest normal exponent emin and an
    unbounded exponent range, by the textbook formula (used for fp32/fp16 scales and
    to cross-check the value-list rounding)."""
    if v == 0:
        return v
    a = abs(v)
    e = floor_log2(a)
    if e < emin:
        if not subnormals:
            return Fraction(2) ** emin * (1 if v > 0 else -1)
        e = emin
    q = Fraction(2) ** (e - m)
    lo = math.floor(v / q)
    if lo * q == v:
        return v
    # neighbours on the same quantum grid; the parity of n decides rne ties
    r = round_to_values(v / q, [Fraction(lo), Fraction(lo + 1)], mode, u)
    return r * q


# ---------------------------------------------------------------------------
# element encode (no block scale)
# ---------------------------------------------------------------------------
def _nan_code(g: Grid, sign_bit: int) -> int:
    """The canonical NaN: the positive all-ones code, or the only NaN there is (FNUZ:
    the negative-zero code)."""
    pos = [c for c in g.nan_codes if not (c & sign_bit)]
    return max(pos) if pos else g.nan_codes[0]


def encode_one(x, fmt, mode: str, u: int | None = None) -> int:
    """Code of one float64 value x in an element format (numfmt.encode's rules)."""
    if fmt.kind == "int":
        assert math.isfinite(x)
        vals = [Fraction(k) for k in range(fmt.min_code, fmt.max_code + 1)]
        v = frac(x)
        if v > vals[-1]:
            k = vals[-1]
        elif v < vals[0]:
            k = vals[0]
        else:
            k = round_to_values(v, vals, mode, u)
        return int(k) & ((1 << fmt.bits) - 1)
    g = grid(fmt)
    sign_bit = 1 << (fmt.bits - 1) if fmt.signed else 0
    if math.isnan(x):
        return _nan_code(g, sign_bit)
    neg = math.copysign(1.0, x) < 0
    if math.isinf(x):
        if fmt.has_inf:
            return g.inf_codes[neg]
        over = True
        toward = False
    else:
        v = frac(x)
        smallest = g.smallest
        if not fmt.subnormals and abs(v) < smallest:
            # no zero and no subnormals (E8M0): every smaller magnitude becomes the
            # smallest one, keeping the sign (numfmt's documented choice)
            return g.code(-smallest if neg and fmt.signed else smallest)
        ext = signed_extended(fmt)
        r = round_to_values(v, ext, mode, u)
        over = r is None or abs(r) > g.max
        toward = mode == "rtz" or (mode == "rup" and neg) or (mode == "rdn" and not neg)
    if over:
        if fmt.saturating or toward:
            return g.code(-g.max if neg else g.max)
        if fmt.has_inf:
            return g.inf_codes[neg]
        return _nan_code(g, sign_bit)
    return g.code(r, negative_zero=neg)


def encode(values, fmt, mode: str = "rne", seed: int = 0) -> np.ndarray:
    flat = np.asarray(values).astype(np.float64).reshape(-1)
    out = [encode_one(float(x), fmt, mode, hash_u32(seed, i) if mode == "stochastic" else None)
           for i, x in enumerate(flat)]
    return np.array(out, dtype=np.int64).reshape(np.shape(values))


def decode(codes, fmt) -> np.ndarray:
    c = np.asarray(codes).reshape(-1)
    out = np.array([decode_float(int(k), fmt) for k in c], dtype=np.float64)
    return out.astype(np.float32).reshape(np.shape(codes))


# ---------------------------------------------------------------------------
# block formats
# ---------------------------------------------------------------------------
def _rows(x: np.ndarray, axis: int):
    xm = np.moveaxis(x, axis, -1)
    L = xm.shape[-1]
    rows = xm.size // L if L else 0
    return np.ascontiguousarray(xm).reshape(rows, L), xm.shape


def _restore(flat: np.ndarray, moved_shape, axis: int, shape):
    out = np.moveaxis(flat.reshape(moved_shape), -1, axis)
    return np.ascontiguousarray(out).reshape(shape)


def _round_element(v: Fraction, values: list[Fraction], vmax: Fraction, mode, u):
    """round_mode(v) on ``values``, saturated at the largest and the smallest value
    (+-vmax, or -2^(b-1) for full-range integers)."""
    assert values[-1] == vmax
    if v > values[-1]:
        return values[-1]
    if v < values[0]:
        return values[0]
    return round_to_values(v, values, mode, u)


class Result:
    """codes, scales (as numfmt stores them), fake (float32), tensor_scale."""

    def __init__(self, codes, scales, fake, tensor_scale=None):
        self.codes, self.scales, self.fake, self.tensor_scale = codes, scales, fake, tensor_scale


def mx_element_values(fmt):
    """(sorted signed element values in units of the block scale, max, Grid)."""
    ese = Fraction(2) ** fmt.element_scale_exp
    g = grid(fmt.element, ese)
    return g.values, g.max, g


def quantize_mx(x, fmt, axis=-1, mode="rne", seed=0, rule=None) -> Result:
    """OCP MX v1.0 (compat="ocp"), exactly; the shared exponent by ``rule`` (default: the
    format's ``scale_rule``), see ``mx_shared_exponent``."""
    rule = getattr(fmt, "scale_rule", "floor") if rule is None else rule
    x = np.asarray(x)
    if x.dtype != np.float64:
        x = x.astype(np.float32)
    shape = x.shape
    ax = axis % max(x.ndim, 1)
    x2, moved = _rows(x.reshape(1) if x.ndim == 0 else x, ax)
    rows, L = x2.shape
    bs = fmt.block_size
    nblk = -(-L // bs)
    flat = x2.reshape(-1)
    values, vmax, g = mx_element_values(fmt)
    is_int = fmt.element.kind == "int"
    codes = np.zeros(flat.size, np.int64)
    fake = np.zeros(flat.size, np.float32)
    scales = np.zeros(rows * nblk, np.int64)
    for r in range(rows):
        for b in range(nblk):
            idx = range(r * L + b * bs, r * L + min(L, (b + 1) * bs))
            blk = [float(flat[i]) for i in idx]
            if any(not math.isfinite(v) for v in blk):
                X = None
            else:
                amax = max(abs(frac(v)) for v in blk)
                X = mx_shared_exponent(amax, fmt, rule, x.dtype == np.float64)
            if X is None:
                scales[r * nblk + b] = 255
                for i in idx:
                    codes[i], fake[i] = 0, np.nan
                continue
            scales[r * nblk + b] = X + 127
            for i in idx:
                xv = float(flat[i])
                v = frac(xv) / Fraction(2) ** X
                u = hash_u32(seed, i) if mode == "stochastic" else None
                e = _round_element(v, values, vmax, mode, u)
                neg_zero = (not is_int) and math.copysign(1.0, xv) < 0
                codes[i] = g.code(e, negative_zero=neg_zero)
                fake[i] = to_f32(e * Fraction(2) ** X, neg_zero)
    sshape = shape[:ax] + (nblk,) + shape[ax + 1:] if x.ndim else (nblk,)
    return Result(_restore(codes, moved, ax, shape).astype(np.uint8),
                  _restore(scales, moved[:-1] + (nblk,), ax, sshape).astype(np.uint8),
                  _restore(fake, moved, ax, shape))


def round_scale(value: Fraction, sfmt) -> Fraction:
    """RNE into a scale float format, saturating at its max (sign: value >= 0)."""
    m = sfmt.mantissa_bits
    emin = (1 if sfmt.subnormals else 0) - sfmt.bias
    r = round_float_formula(value, m, emin, "rne", subnormals=sfmt.subnormals)
    # the scale format's max finite value, from its parameters
    top = (1 << sfmt.exponent_bits) - 1
    if sfmt.specials == "ieee" or (sfmt.specials == "nan_only" and m == 0):
        top -= 1
    mm = (1 << m) - 1 - (1 if sfmt.specials == "nan_only" and m > 0 else 0)
    smax = (1 + Fraction(mm, 1 << m)) * Fraction(2) ** (top - sfmt.bias)
    return min(r, smax)


def quantize_absmax(x, fmt, axis=-1, mode="rne", seed=0) -> Result:
    """SINT / per channel: scale = RNE(amax / element_max), element = round(v / scale)."""
    x = np.asarray(x)
    if x.dtype != np.float64:
        x = x.astype(np.float32)
    shape = x.shape
    ax = axis % max(x.ndim, 1)
    x2, moved = _rows(x.reshape(1) if x.ndim == 0 else x, ax)
    rows, L = x2.shape
    bs = L if fmt.block_size is None else fmt.block_size
    nblk = -(-L // bs) if bs else 0
    flat = x2.reshape(-1)
    elem = fmt.element
    is_int = elem.kind == "int"
    g = grid(elem)
    values, vmax = g.values, g.max
    codes = np.zeros(flat.size, np.int64)
    fake = np.zeros(flat.size, np.float32)
    scales = np.zeros(rows * nblk, np.float64)
    for r in range(rows):
        for b in range(nblk):
            idx = range(r * L + b * bs, r * L + min(L, (b + 1) * bs))
            blk = [float(flat[i]) for i in idx]
            if any(not math.isfinite(v) for v in blk):
                scales[r * nblk + b] = np.nan
                for i in idx:
                    codes[i], fake[i] = 0, np.nan
                continue
            amax = max(abs(frac(v)) for v in blk)
            s = round_scale(amax / vmax, fmt.scale)
            scales[r * nblk + b] = float(s)
            for i in idx:
                xv = float(flat[i])
                neg_zero = (not is_int) and math.copysign(1.0, xv) < 0
                if s == 0:
                    e = Fraction(0)
                else:
                    u = hash_u32(seed, i) if mode == "stochastic" else None
                    e = _round_element(frac(xv) / s, values, vmax, mode, u)
                codes[i] = g.code(e, negative_zero=neg_zero)
                fake[i] = to_f32(e * s, neg_zero)
    sshape = shape[:ax] + (nblk,) + shape[ax + 1:] if x.ndim else (nblk,)
    return Result(_restore(codes, moved, ax, shape).astype(np.uint8),
                  _restore(scales, moved[:-1] + (nblk,), ax, sshape),
                  _restore(fake, moved, ax, shape))


def quantize_nvfp4(x, fmt, axis=-1, mode="rne", seed=0) -> Result:
    """NVIDIA's NVFP4 recipe, every step a float32 operation:

        x       = f32(x)   (a float64 value beyond float32's range becomes Inf)
        s_enc   = f32(6 * 448) / amax(finite |x|)   (1 if amax = 0; f32 max if Inf)
        scale_b = e4m3_RNE(f32(f32(amax_b / 6) * s_enc)), saturating at 448
        element = round_mode_E2M1(f32(f32(v * s_enc) / scale_b)), saturating at 6
        decoded = f32(f32(element * scale_b) / s_enc)
    """
    x = np.asarray(x)
    shape = x.shape
    ax = axis % max(x.ndim, 1)
    x2, moved = _rows(x.reshape(1) if x.ndim == 0 else x, ax)
    rows, L = x2.shape
    bs = fmt.block_size
    nblk = -(-L // bs)
    flat64 = x2.reshape(-1).astype(np.float64)
    f32 = np.float32
    with np.errstate(over="ignore"):  # float64 beyond float32's range is Inf in the recipe
        flat = flat64.astype(np.float32)
    fin = np.abs(flat[np.isfinite(flat)])
    amax = f32(fin.max()) if fin.size else f32(0)
    with np.errstate(over="ignore", divide="ignore"):
        s_enc = f32(6.0 * 448.0) / amax if amax > 0 else f32(1.0)
    if not np.isfinite(s_enc):
        s_enc = f32(np.finfo(np.float32).max)
    e4m3, e2m1 = fmt.scale, fmt.element
    gs, ge = grid(e4m3), grid(e2m1)
    codes = np.zeros(flat.size, np.int64)
    fake = np.zeros(flat.size, np.float32)
    scales = np.zeros(rows * nblk, np.int64)
    for r in range(rows):
        for b in range(nblk):
            idx = range(r * L + b * bs, r * L + min(L, (b + 1) * bs))
            blk = flat[list(idx)]
            if not np.isfinite(blk).all():
                scales[r * nblk + b] = 0x7F
                for i in idx:
                    codes[i], fake[i] = 0, np.nan
                continue
            amax_b = np.abs(blk).max() if blk.size else f32(0)
            with np.errstate(over="ignore"):
                sv = f32(f32(amax_b / f32(6.0)) * s_enc)
            sb = _round_element(frac(sv), gs.values, gs.max, "rne", None)
            scales[r * nblk + b] = gs.code(sb)
            sb32 = f32(float(sb))
            for i in idx:
                v = flat[i]
                neg = math.copysign(1.0, float(v)) < 0
                if sb == 0:
                    e = Fraction(0)
                else:
                    with np.errstate(over="ignore"):
                        t = f32(f32(v * s_enc) / sb32)
                    u = hash_u32(seed, i) if mode == "stochastic" else None
                    e = _round_element(frac(t), ge.values, ge.max, mode, u) \
                        if math.isfinite(float(t)) else (ge.max if t > 0 else -ge.max)
                codes[i] = ge.code(e, negative_zero=neg)
                ev = f32(-0.0) if (e == 0 and neg) else f32(float(e))
                fake[i] = f32(f32(ev * sb32) / s_enc)
    sshape = shape[:ax] + (nblk,) + shape[ax + 1:] if x.ndim else (nblk,)
    return Result(_restore(codes, moved, ax, shape).astype(np.uint8),
                  _restore(scales, moved[:-1] + (nblk,), ax, sshape).astype(np.uint8),
                  _restore(fake, moved, ax, shape), tensor_scale=s_enc)


def quantize(x, fmt, axis=-1, mode="rne", seed=0) -> Result:
    """Dispatch on the format: element formats encode, block formats by scaling."""
    if fmt.kind != "block":
        xs = np.asarray(x)
        if xs.dtype != np.float64:
            xs = xs.astype(np.float32)
        codes = encode(xs, fmt, mode, seed)
        return Result(codes, None, decode(codes, fmt))
    if fmt.scaling == "mx":
        return quantize_mx(x, fmt, axis, mode, seed)
    if fmt.scaling == "absmax":
        return quantize_absmax(x, fmt, axis, mode, seed)
    return quantize_nvfp4(x, fmt, axis, mode, seed)
