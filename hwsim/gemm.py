"""Bit-exact model of an integer-accumulate block-scaled GEMM (MX, SINT, narrow floats).

``matmul(a, b)`` computes ``a @ b.T`` for a QTensor ``a`` (M x K) and a QTensor
``b`` (N x K), both quantized along K (axis 1, the layout of a PyTorch Linear
weight), the way a MAC array with an in-block integer accumulator and a
floating-point inter-block accumulator computes it.

The arithmetic (gemmlowp style)
-------------------------------
Element values. Every element format is an integer times a fixed power of two,
its *element quantum* ``2^qa``::

    MX integer (mxint<b>):   value(c) = c * 2^(2-b)           c = two's complement code
    SINT integer (sint<b>):  value(c) = c                      (scale applied per block)
    float element (E, M):    value(c) = I(c) * 2^(emin - M)    I(c) = value / min_subnormal,
                                                               an exact integer
                                                               (E2M1: |I| <= 12, E4M3: <= 229376)

so ``a[m, k] = A[m, k] * 2^qa * sa[m, blk_a(k)]`` with an integer ``A``, and
likewise for ``b``. ``sa`` is the block scale: ``2^(code - 127)`` for E8M0
(code 255 is NaN), the fp16 value for SINT, 1 for an element format without
scales.

In-block integer sum. The sub-block length is ``L = min(block_a, block_b)``
(one block size must be a multiple of the other, else ValueError; a format
without scales spans all of K; if neither has scales, L = K). Sub-block ``j``
covers ``k in [jL, min((j+1)L, K))``. The accumulator is an integer in units of
the *product quantum* ``q = 2^(qa + qb)``, fed in index order from 0::

    acc_0 = 0,   acc_{i+1} = ovf(acc_i + A[m, k_i] * B[n, k_i])
    S[m, n, j] = acc_L                        (an integer, product quantum units)

``ovf`` is the accumulator's overflow rule for ``Accumulator(bits=P, overflow=...)``:
``"exact"`` the identity (no bound; with ``bits=P`` given, additions of a
nonzero product whose exact result lies outside [-2^(P-1), 2^(P-1)-1] are
counted, values stay exact),
``"wrap"`` two's complement modulo 2^P, ``"saturate"`` clamp to
[-2^(P-1), 2^(P-1)-1] at every addition.

Block term. The block's value is the exact real ``S * sa * sb * 2^(qa+qb)``;
it is rounded once to the inter-block format ``F = FloatAcc(mantissa_bits=m,
rounding=r)``::

    t[m, n, j] = round_F(S * sa[m, j] * sb[n, j] * 2^(qa+qb))

Inter-block accumulation, in K order from +0.0, each addition rounding the
exact sum once::

    c_0 = +0.0,   c_{j+1} = round_F(c_j + t_j)

``F`` has ``m`` fraction bits (m + 1 significant bits) and the exponent range
of IEEE FP32 (emin = -126 with gradual underflow: quantum 2^(-126-m) below
2^-126; emax = 127). Overflow gives +-Inf under ``"rne"`` and +-max_finite =
+-(2 - 2^-m) * 2^127 under ``"rtz"``. ``m = 23, "rne"`` is IEEE FP32 addition.
An exact zero sum is +0.0 (IEEE: -0 only for -0 + -0).

Promotion (DeepSeek-V3's fix). With ``promote_every = N`` (a multiple of L),
after every ``N / L`` blocks the partial sum is added to a separate FP32
register and restarted::

    R <- round_fp32_rne(R + c),  c <- +0.0          (R starts at +0.0)

and the output is ``R`` after a final promotion of any remainder; without
promotion the output is ``c`` (representable in FP32 because m <= 23).

Specials. A NaN E8M0 scale, or a NaN/Inf fp16 scale, makes the block term the
IEEE product ``S * scale`` (NaN, or Inf for a nonzero S), so the output is
NaN/Inf where the hardware's is. A NaN or Inf *element* (E4M3, E5M2 codes)
makes its block term the IEEE float64 sum of that block's products (NaN or
+-Inf); in the integer accumulator (and its statistics) such an element is 0.

Statistics (``GemmResult``). ``max_abs_acc`` is the largest magnitude of the
*exact* in-block integer sum, in product-quantum units: over every block sum
(the accumulator's value when the block ends) when the exact fast path runs,
and over every prefix ``acc_i`` in index order when the sequential path runs
(any ``bits`` given, wrap/saturate, or ``prefix_stats=True``).
``acc_bits_needed = ceil(log2(max_abs_acc + 1)) + 1`` (sign included; the
width that holds +-max_abs_acc). ``overflow_count`` is the number of additions
that wrapped, saturated, or (``"exact"`` with ``bits``) would have overflowed.

Paths (all give the same bits; the tests compare them with a Python-integer
reference):

* exact accumulator, no ``bits``: block sums through BLAS in float32 when the
  worst case ``L * max|A| * max|B| <= 2^24`` (every partial sum of integers
  below 2^24 is exact in float32 in any order), else float64 when <= 2^53,
  then a Numba pass for the rounding; wider sums (E5M2 x E5M2: 70 bits) go
  through Python integers (slow). The output is cut into tiles of
  ``TILE_ROWS x TILE_COLS`` whose block sums and running sums stay in L2; each
  tile runs its K / L block GEMMs (single-threaded BLAS: K = L calls are too
  short for OpenBLAS's own threading) and folds each at once; tiles are spread
  over ``numba.get_num_threads()`` worker threads. With FP32 round-to-nearest
  inter-block sums and power-of-two scales whose terms are exact in FP32, the
  fold is plain float32 addition of exact terms.
* otherwise: a Numba loop in index order over ``SEQ_ROWS`` rows at a time, in
  float32 when every value stays below 2^24, float64 below 2^52 (exact), else
  int64 (in-block sums up to 62 bits; wider is a ValueError for wrap/saturate).

The inter-block rounding works on the float64 bit pattern of the exact value,
held as a double-double ``hi + lo`` (TwoSum / TwoProduct, error-free); below
2^-126 (the FP32-subnormal range) a slower frexp-based routine takes over.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numba
import numpy as np
from numba import njit, prange

import numfmt
from numfmt._kernels import f64_bits, f64_from_bits
from numfmt.formats import BlockFormat, IntFormat
from numfmt.qtensor import QTensor

__all__ = ["Accumulator", "FloatAcc", "GemmResult", "matmul", "OVERFLOWS", "ACC_ROUNDINGS",
           "operand_integers", "sub_block_length", "round_to_float_acc", "accumulator_trace",
           "bits_for"]

OVERFLOWS = ("exact", "wrap", "saturate")
ACC_ROUNDINGS = ("rne", "rtz")

_EXACT, _WRAP, _SAT = 0, 1, 2


# ---------------------------------------------------------------------------
# configuration objects
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Accumulator:
    """The in-block integer accumulator: ``bits`` (sign included; None = unbounded) and
    the ``overflow`` rule ("exact", "wrap": two's complement mod 2^bits, "saturate":
    clamp to [-2^(bits-1), 2^(bits-1)-1] at every addition)."""

    bits: int | None = None
    overflow: str = "exact"

    def __post_init__(self) -> None:
        if self.bits is not None:
            if isinstance(self.bits, bool) or not isinstance(self.bits, (int, np.integer)):
                raise TypeError(f"Accumulator bits must be an int or None, got {self.bits!r}")
            if self.bits < 2:
                raise ValueError(f"Accumulator bits={self.bits} is not allowed; it must be >= 2 "
                                 f"(or None for an unbounded accumulator)")
            object.__setattr__(self, "bits", int(self.bits))
        if self.overflow not in OVERFLOWS:
            raise ValueError(f"overflow={self.overflow!r} is not one of {OVERFLOWS}")
        if self.overflow != "exact" and self.bits is None:
            raise ValueError(f"overflow={self.overflow!r} needs a width: give bits=P")

    @property
    def lo(self) -> int | None:
        return None if self.bits is None else -(1 << (self.bits - 1))

    @property
    def hi(self) -> int | None:
        return None if self.bits is None else (1 << (self.bits - 1)) - 1


@dataclass(frozen=True)
class FloatAcc:
    """The inter-block floating-point accumulator: ``mantissa_bits`` fraction bits (1..23)
    with FP32's exponent range, ``rounding`` "rne" or "rtz" at every rounding, and
    ``promote_every`` (elements of K, a multiple of the block length) after which the
    partial sum is added into a separate FP32 register and restarted."""

    mantissa_bits: int = 23
    rounding: str = "rne"
    promote_every: int | None = None

    def __post_init__(self) -> None:
        m = self.mantissa_bits
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)):
            raise TypeError(f"FloatAcc mantissa_bits must be an int, got {m!r}")
        if not 1 <= m <= 23:
            raise ValueError(f"FloatAcc mantissa_bits={m} is not allowed; allowed 1..23 "
                             f"(FP32 has 23)")
        if self.rounding not in ACC_ROUNDINGS:
            raise ValueError(f"FloatAcc rounding={self.rounding!r} is not one of {ACC_ROUNDINGS}")
        p = self.promote_every
        if p is not None:
            if isinstance(p, bool) or not isinstance(p, (int, np.integer)):
                raise TypeError(f"promote_every must be an int or None, got {p!r}")
            if p < 1:
                raise ValueError(f"promote_every={p} is not allowed; it must be >= 1 (or None)")

    @property
    def max_finite(self) -> float:
        return math.ldexp(2.0 - 2.0 ** -self.mantissa_bits, 127)


@dataclass(frozen=True, eq=False)
class GemmResult:
    """Result of ``matmul``.

    ``out``              float32 M x N.
    ``max_abs_acc``      largest |exact in-block integer sum| in product-quantum units
                         (block sums on the fast path, every prefix on the sequential path).
    ``overflow_count``   additions that wrapped / saturated / would have overflowed.
    ``acc_bits_needed``  ceil(log2(max_abs_acc + 1)) + 1, sign included.
    ``block_length``     the in-block dot-product length L.
    ``product_quantum_exp``  qa + qb: one accumulator unit is 2^(qa+qb) times the scales.
    ``path``             which implementation ran ("blas32", "blas64", "sequential", "python").
    """

    out: np.ndarray
    max_abs_acc: int
    overflow_count: int
    acc_bits_needed: int
    block_length: int = 0
    product_quantum_exp: int = 0
    path: str = ""
    prefix_stats: bool = False
    extra: dict = field(default_factory=dict)


def bits_for(max_abs) -> int:
    """Signed width that holds integers up to ``max_abs`` in magnitude: bitlen + 1."""
    return int(max_abs).bit_length() + 1


# ---------------------------------------------------------------------------
# operands
# ---------------------------------------------------------------------------
class _Operand:
    """A 2-D QTensor (rows x K, quantized along K) as integers, scale factors and quantum.

    ``factors`` (rows, nblocks) float64 block scale values (NaN allowed); ``block`` the
    block size along K (None: no scales / whole axis); ``qexp`` the element quantum
    exponent; ``max_int`` the largest |integer| over the format's finite codes; ``pow2``
    whether every factor is a power of two (or NaN). The per-element views are built on
    first use: ``ints`` (rows, K) int64 element integers (0 at NaN/Inf codes),
    ``special`` (rows, K) bool NaN/Inf element, ``values`` (rows, K) float64 value in
    quantum units (NaN/Inf kept); ``blocked(dtype, nsub, L)`` the integers as a
    (nsub, rows, L) stack of zero-padded blocks, straight from the codes."""

    def __init__(self, codes, tables, factors, block, qexp, pow2, elem):
        self.codes = codes
        self.int_table, self.special_table, self.value_table, self.max_int = tables
        self.factors = factors
        self.block = block
        self.qexp = qexp
        self.pow2 = pow2
        self.elem = elem

    @functools.cached_property
    def ints(self) -> np.ndarray:
        return self.int_table[self.codes]

    @functools.cached_property
    def special(self) -> np.ndarray:
        return self.special_table[self.codes]

    @functools.cached_property
    def values(self) -> np.ndarray:
        return self.value_table[self.codes]

    @functools.cached_property
    def any_special(self) -> bool:
        return bool(self.special_table.any() and self.special.any())

    def blocked(self, dtype, nsub: int, L: int) -> np.ndarray:
        out = np.empty((nsub, self.codes.shape[0], L), dtype=dtype)
        _blocked_codes(self.codes, self.int_table.astype(dtype), L, out)
        return out


def _element_quantum_exp(fmt) -> int:
    elem = fmt.element if isinstance(fmt, BlockFormat) else fmt
    if isinstance(elem, IntFormat):
        if isinstance(fmt, BlockFormat):
            return fmt.element_scale_exp
        return 0
    return int(round(math.log2(elem.min_subnormal)))


_TABLE_CACHE: dict = {}


def _int_table(elem, qexp_elem: int):
    """(integer per code, special per code, value-in-quantum per code, max |integer|)."""
    key = (elem, qexp_elem)
    if key not in _TABLE_CACHE:
        table = numfmt.decode_table(elem)  # float64 value of every code (no MX int scale)
        special = ~np.isfinite(table)
        vals = np.ldexp(table, -qexp_elem)
        ints = np.where(special, 0.0, vals)
        if not np.all(ints == np.round(ints)):
            raise AssertionError(f"{elem.name}: element values are not integers of 2^{qexp_elem}")
        ints = ints.astype(np.int64)
        _TABLE_CACHE[key] = (ints, special, vals, int(np.abs(ints).max()))
    return _TABLE_CACHE[key]


def operand_integers(q: QTensor, name: str = "operand") -> _Operand:
    """Split a 2-D QTensor quantized along axis 1 into integers, scale factors and quantum."""
    if not isinstance(q, QTensor):
        raise TypeError(f"{name} must be a numfmt QTensor, got {type(q).__name__}")
    if len(q.shape) != 2:
        raise ValueError(f"{name} must be 2-D (rows x K), got shape {q.shape}")
    if q.axis != 1:
        raise ValueError(f"{name} must be quantized along K (axis 1 / -1), got axis={q.axis}")
    q.check_codes()
    fmt = q.format
    rows, K = q.shape
    if isinstance(fmt, BlockFormat):
        if fmt.scaling == "nvfp4":
            raise ValueError(f"{name}: format {fmt.name!r} (two-level NVFP4 scaling) is not "
                             f"supported by hwsim.matmul; allowed: MX (E8M0 scales), SINT "
                             f"(absmax) and element formats")
        elem = fmt.element
        qexp = _element_quantum_exp(fmt)
        elem_q = qexp - fmt.element_scale_exp  # decode_table has no MX int scale
        block = fmt.block_size
        if fmt.scaling == "mx":
            sc = q.scales.astype(np.int64)
            factors = np.ldexp(1.0, sc - 127)
            factors[sc == 255] = np.nan
            pow2 = True
        else:
            factors = np.asarray(q.scales, dtype=np.float64)
            fin = factors[np.isfinite(factors) & (factors != 0)]
            m, _ = np.frexp(fin)
            pow2 = bool(np.all(np.abs(m) == 0.5))
    else:
        elem = fmt
        qexp = _element_quantum_exp(fmt)
        elem_q = qexp
        block = None
        factors = np.ones((rows, 1), dtype=np.float64)
        pow2 = True
    if elem.bits > 16:
        raise ValueError(f"{name}: element format {elem.name!r} has {elem.bits} bits; "
                         f"hwsim.matmul takes element formats of at most 16 bits")
    return _Operand(np.ascontiguousarray(q.codes), _int_table(elem, elem_q), factors, block,
                    qexp, pow2, elem)


@njit(parallel=True, cache=True)
def _blocked_codes(codes, table, L, out):
    """out[j, r, i] = table[codes[r, j*L + i]], zero past K (one pass over the codes)."""
    nsub, rows, _ = out.shape
    K = codes.shape[1]
    for r in prange(rows):
        for j in range(nsub):
            k0 = j * L
            for i in range(L):
                k = k0 + i
                out[j, r, i] = table[codes[r, k]] if k < K else 0


def sub_block_length(block_a: int | None, block_b: int | None, k: int) -> int:
    """The in-block dot length L: the smaller block size (one must divide the other);
    a side without blocks spans K; K when neither has blocks."""
    sizes = [s for s in (block_a, block_b) if s is not None]
    if not sizes:
        return max(k, 1)
    if len(sizes) == 2:
        lo, hi = min(sizes), max(sizes)
        if hi % lo:
            raise ValueError(f"the K blocks do not line up: block sizes {block_a} and {block_b}; "
                             f"one must be a multiple of the other")
    return max(1, min(min(sizes), k)) if k else min(sizes)


def _block_factors(op: _Operand, nsub: int, L: int, K: int) -> np.ndarray:
    """(rows, nsub) factor of each sub-block (a block spanning several sub-blocks repeats)."""
    starts = np.arange(nsub, dtype=np.int64) * L
    if op.block is None:
        idx = np.zeros(nsub, dtype=np.int64)
    else:
        idx = starts // op.block
    return np.ascontiguousarray(op.factors[:, idx])


# ---------------------------------------------------------------------------
# rounding kernels
# ---------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _two_sum(a, b):
    s = a + b
    bb = s - a
    e = (a - (s - bb)) + (b - bb)
    return s, e


@njit(cache=True, inline="always")
def _split(a):
    c = 134217729.0 * a  # 2^27 + 1
    hi = c - (c - a)
    return hi, a - hi


@njit(cache=True, inline="always")
def _two_prod(a, b):
    p = a * b
    ah, al = _split(a)
    bh, bl = _split(b)
    e = ((ah * bh - p) + ah * bl + al * bh) + al * bl
    return p, e


_FP32_MIN_NORMAL = 2.0 ** -126


@njit(cache=True)
def _round_dd(hi, lo, m, rtz):
    """Round the exact value hi + lo (|lo| <= ulp(hi)/2) to m fraction bits, FP32 range.

    Fast case (2^-126 < |hi| < Inf) on the float64 bit pattern: the low 52 - m bits are
    the remainder; lo only matters when the remainder is 0 (lo < 0 puts the value just
    below) or exactly half (lo breaks the tie). Everything else: ``_round_dd_slow``.
    """
    a = abs(hi)
    if not (a > _FP32_MIN_NORMAL and a < np.inf):
        return _round_dd_slow(hi, lo, m, rtz)
    b = lo if hi > 0.0 else -lo
    u = f64_bits(a)
    one = np.int64(1) << np.int64(52 - m)
    rem = u & (one - 1)
    base = u - rem
    if rem == 0:
        if b < 0.0 and rtz:
            base -= one
    elif not rtz:
        half = one >> np.int64(1)
        if rem > half or (rem == half and (b > 0.0 or (b == 0.0 and (base & one) != 0))):
            base += one
    # (2 - 2^-m) * 2^127: biased exponent 1150, the top m fraction bits set
    maxbits = (np.int64(1150) << np.int64(52)) | (((np.int64(1) << np.int64(m)) - 1) << np.int64(52 - m))
    if base > maxbits:
        r = f64_from_bits(maxbits) if rtz else np.inf
    else:
        r = f64_from_bits(base)
    return r if hi > 0.0 else -r


@njit(cache=True)
def _round_dd_slow(hi, lo, m, rtz):
    """Round the exact value hi + lo (|lo| <= ulp(hi)/2) to m fraction bits, FP32 range."""
    if hi != hi or hi == np.inf or hi == -np.inf:
        return hi
    if hi == 0.0:
        return hi
    if hi < 0.0:
        a = -hi
        b = -lo
        sgn = -1.0
    else:
        a = hi
        b = lo
        sgn = 1.0
    fr, ex = math.frexp(a)
    E = ex - 1
    if fr == 0.5 and b < 0.0:
        E -= 1
    if E < -126:
        E = -126
    ulp = math.ldexp(1.0, E - m)
    t = a / ulp
    i = np.floor(t)
    f = t - i
    if f == 0.0 and b < 0.0:
        i -= 1.0
        up = True
        tie = False
    else:
        up = f > 0.5 or (f == 0.5 and b > 0.0)
        tie = f == 0.5 and b == 0.0
    if not rtz:
        if up or (tie and i - 2.0 * np.floor(0.5 * i) == 1.0):
            i += 1.0
    r = i * ulp
    maxf = math.ldexp(2.0 - math.ldexp(1.0, -m), 127)
    if r > maxf:
        r = maxf if rtz else np.inf
    return sgn * r


@njit(cache=True, inline="always")
def _term(s_hi, s_lo, c, pow2, m, rtz):
    """round_F(S * c) for S = s_hi + s_lo exactly (s_lo = 0 unless pow2)."""
    if pow2:
        return _round_dd(s_hi * c, s_lo * c, m, rtz)
    p, e = _two_prod(s_hi, c)
    if p != p or p == np.inf or p == -np.inf:
        return p
    return _round_dd(p, e, m, rtz)


@njit(cache=True, inline="always")
def _add(acc, t, m, rtz):
    s, e = _two_sum(acc, t)
    if s != s or s == np.inf or s == -np.inf:
        return s
    return _round_dd(s, e, m, rtz)


def round_to_float_acc(x, mantissa_bits: int = 23, rounding: str = "rne") -> float:
    """Round a float64 to the inter-block format (m fraction bits, FP32 exponent range)."""
    FloatAcc(mantissa_bits, rounding)
    return float(_round_dd(float(x), 0.0, int(mantissa_bits), rounding == "rtz"))


@njit(cache=True)
def _special_sum(va, vb, k0, k1):
    s = 0.0
    for k in range(k0, k1):
        s += va[k] * vb[k]
    return s


@njit(cache=True, inline="always")
def _fold_one(S_hi, S_lo, c, pow2, sp, spv, m, rtz, promote_now, partial, reg):
    """One block of one output: returns (partial, reg)."""
    if sp:
        t = spv * c
    else:
        t = _term(S_hi + 0.0, S_lo, c, pow2, m, rtz)
    partial = _add(partial, t, m, rtz)
    if promote_now:
        reg = _add(reg, partial, 23, False)
        partial = 0.0
    return partial, reg


# ---------------------------------------------------------------------------
# exact fast path: fold BLAS block sums
# ---------------------------------------------------------------------------
@njit(cache=True, nogil=True)
def _fold_block(T, r0, n0, j, L, K, FA, FBt, q, pow2, spa, spb, VA, VB, any_special, m, rtz,
                promote_now, partial, reg, peak):
    """partial/reg[r, n] (output rows r0 + r, columns n0 + n) absorb block j's sums
    T[r, n]; peak[r, n] keeps the largest |T| seen."""
    mt, nt = T.shape
    k0 = j * L
    k1 = min(K, k0 + L)
    for r in range(mt):
        mrow = r0 + r
        fa = FA[mrow, j] * q
        sa = any_special and spa[mrow, j]
        for i in range(nt):
            n = n0 + i
            s = T[r, i]
            c = fa * FBt[j, n]
            sp = any_special and (sa or spb[n, j])
            spv = _special_sum(VA[mrow], VB[n], k0, k1) if sp else 0.0
            a = abs(s)
            peak[r, i] = a if a > peak[r, i] else peak[r, i]
            p, g = _fold_one(np.float64(s), 0.0, c, pow2, sp, spv, m, rtz, promote_now,
                             partial[r, i], reg[r, i])
            partial[r, i] = p
            reg[r, i] = g


@njit(cache=True, nogil=True)
def _fold_tile_fp32(T, fa, fb, acc32, peak):
    """The m = 23, rne case with power-of-two factors, no specials and every term exact in
    FP32 (``_fp32_fold_ok``): acc32 += T * (fa * fb) in float32 is exactly
    round_fp32(acc + round_fp32(S * c)), each product of a power of two being exact."""
    mt, nt = T.shape
    # |S| as the float32 magnitude bits: unsigned integers order like the values, and an
    # integer max vectorizes where a float one does not
    Tb = T.view(np.uint32)
    pb = peak.view(np.uint32)
    absmask = np.uint32(0x7FFFFFFF)
    for r in range(mt):
        f = fa[r]
        Tr = T[r]
        Tbr = Tb[r]
        ar = acc32[r]
        pr = pb[r]
        for i in range(nt):
            ar[i] += Tr[i] * (f * fb[i])
            a = Tbr[i] & absmask
            p = pr[i]
            pr[i] = a if a > p else p


# ---------------------------------------------------------------------------
# sequential path
# ---------------------------------------------------------------------------
@njit(parallel=True, cache=True)
def _sequential(A, Bt, L, K, mode, lo, hi, FA, FB, q, pow2, spa, spb, VA, VB, any_special, m,
                rtz, promote_blocks, out, stat_max, stat_cnt):
    """Index-order integer accumulation with wrap/saturate/exact, then the float fold."""
    M = A.shape[0]
    N = Bt.shape[1]
    nsub = (K + L - 1) // L
    for mrow in prange(M):
        acc = np.zeros(N, np.int64)
        ex = np.zeros(N, np.int64)
        pmax = np.zeros(N, np.int64)
        cnt = np.zeros(N, np.int64)
        partial = np.zeros(N, np.float64)
        reg = np.zeros(N, np.float64)
        for j in range(nsub):
            k0 = j * L
            k1 = min(K, k0 + L)
            acc[:] = 0
            ex[:] = 0
            for k in range(k0, k1):
                a = A[mrow, k]
                if a == 0:
                    continue
                brow = Bt[k]
                if mode == 2:
                    for n in range(N):
                        p = a * brow[n]
                        e = ex[n] + p
                        ex[n] = e
                        ae = abs(e)
                        pmax[n] = ae if ae > pmax[n] else pmax[n]
                        v = acc[n] + p
                        c = v
                        if c > hi:
                            c = hi
                        if c < lo:
                            c = lo
                        cnt[n] += c != v
                        acc[n] = c
                elif mode == 1:
                    span = hi - lo  # 2^P - 1
                    for n in range(N):
                        p = a * brow[n]
                        e = ex[n] + p
                        ex[n] = e
                        ae = abs(e)
                        pmax[n] = ae if ae > pmax[n] else pmax[n]
                        v = acc[n] + p
                        c = ((v - lo) & span) + lo
                        cnt[n] += c != v
                        acc[n] = c
                else:
                    for n in range(N):
                        p = a * brow[n]
                        e = ex[n] + p
                        ex[n] = e
                        ae = abs(e)
                        pmax[n] = ae if ae > pmax[n] else pmax[n]
                        cnt[n] += (p != 0) and ((e > hi) or (e < lo))
                        acc[n] = e
            fa = FA[mrow, j] * q
            sa = any_special and spa[mrow, j]
            promote_now = promote_blocks > 0 and (j + 1) % promote_blocks == 0
            for n in range(N):
                s = acc[n]
                s_hi = np.float64(s)
                s_lo = np.float64(s - np.int64(s_hi))
                c = fa * FB[n, j]
                sp = any_special and (sa or spb[n, j])
                spv = _special_sum(VA[mrow], VB[n], k0, k1) if sp else 0.0
                p, g = _fold_one(s_hi, s_lo, c, pow2, sp, spv, m, rtz, promote_now,
                                 partial[n], reg[n])
                partial[n] = p
                reg[n] = g
        best = 0
        total = 0
        for n in range(N):
            if pmax[n] > best:
                best = pmax[n]
            total += cnt[n]
        stat_max[mrow] = best
        stat_cnt[mrow] = total
        for n in range(N):
            if promote_blocks > 0:
                if nsub % promote_blocks != 0:
                    reg[n] = _add(reg[n], partial[n], 23, False)
                out[mrow, n] = np.float32(reg[n])
            else:
                out[mrow, n] = np.float32(partial[n])


@njit(cache=True, nogil=True, inline="always")
def _step_saturate(a, brow, acc, ex, pmax, cnt, lo, hi, one):
    """One index k for every n: acc <- clamp(acc + a*b) (a simple loop LLVM vectorizes;
    float32 or float64 lanes, every value an exact integer)."""
    for n in range(brow.shape[0]):
        p = a * brow[n]
        e = ex[n] + p
        ex[n] = e
        ae = abs(e)
        pm = pmax[n]
        pmax[n] = ae if ae > pm else pm
        v = acc[n] + p
        c = min(max(v, lo), hi)
        cnt[n] += min(abs(v - c), one)
        acc[n] = c


@njit(cache=True, nogil=True, inline="always")
def _step_wrap(a, brow, acc, ex, pmax, cnt, lo, hi, one):
    """acc <- two's complement wrap of acc + a*b to [lo, hi]: v - 2^P floor((v - lo) / 2^P)."""
    span = hi - lo + one
    inv = one / span
    for n in range(brow.shape[0]):
        p = a * brow[n]
        e = ex[n] + p
        ex[n] = e
        ae = abs(e)
        pm = pmax[n]
        pmax[n] = ae if ae > pm else pm
        v = acc[n] + p
        c = v - span * np.floor((v - lo) * inv)
        cnt[n] += min(abs(v - c), one)
        acc[n] = c


@njit(cache=True, nogil=True, inline="always")
def _step_exact(a, brow, acc, ex, pmax, cnt, lo, hi, one):
    """acc <- acc + a*b; count nonzero-product additions whose result leaves [lo, hi]."""
    zero = one - one
    for n in range(brow.shape[0]):
        p = a * brow[n]
        e = ex[n] + p
        ex[n] = e
        ae = abs(e)
        pm = pmax[n]
        pmax[n] = ae if ae > pm else pm
        out_of_range = min(max(e - hi, zero) + max(lo - e, zero), one)
        cnt[n] += out_of_range * min(abs(p), one)
        acc[n] = e


SEQ_ROWS = 4  # rows of a per task of the index-order float kernel: one pass over b for all


@njit(parallel=True, cache=True)
def _sequential_fp(A, Bt, L, K, mode, lo, hi, FA, FB, q, pow2, spa, spb, VA, VB, any_special, m,
                   rtz, promote_blocks, fast32, FA32, FB32t, out, stat_max, stat_cnt):
    """``_sequential`` in float arithmetic (float32 when every value stays below 2^24, else
    float64 below 2^53: integers are exact), which LLVM vectorizes across n: counts as
    min(|v - c|, 1), wrap as v - 2^P floor((v - lo) / 2^P). SEQ_ROWS rows of a share each
    pass over b. A and Bt (and lo, hi) have the float dtype. ``fast32``: the fold is
    float32 addition of exact terms (``_fp32_fold_ok``; FA32 = FA * q, FB32t = FB.T in
    float32), vectorized like the BLAS path's."""
    M = A.shape[0]
    N = Bt.shape[1]
    nsub = (K + L - 1) // L
    R = SEQ_ROWS
    one = lo - lo + 1
    ntask = (M + R - 1) // R
    for t in prange(ntask):
        r0 = t * R
        nr = min(R, M - r0)
        acc = np.zeros((R, N), A.dtype)
        ex = np.zeros((R, N), A.dtype)
        pmax = np.zeros((R, N), A.dtype)
        cnt = np.zeros((R, N), A.dtype)
        partial = np.zeros((R, N), np.float64)
        reg = np.zeros((R, N), np.float64)
        acc32 = np.zeros((R, N), np.float32)
        for j in range(nsub):
            k0 = j * L
            k1 = min(K, k0 + L)
            acc[:] = 0
            ex[:] = 0
            for k in range(k0, k1):
                brow = Bt[k]
                for rr in range(nr):
                    a = A[r0 + rr, k]
                    if a == 0:
                        continue
                    if mode == 2:
                        _step_saturate(a, brow, acc[rr], ex[rr], pmax[rr], cnt[rr], lo, hi, one)
                    elif mode == 1:
                        _step_wrap(a, brow, acc[rr], ex[rr], pmax[rr], cnt[rr], lo, hi, one)
                    else:
                        _step_exact(a, brow, acc[rr], ex[rr], pmax[rr], cnt[rr], lo, hi, one)
            if fast32:
                fbj = FB32t[j]
                for rr in range(nr):
                    f = FA32[r0 + rr, j]
                    ar = acc32[rr]
                    sr = acc[rr]
                    for n in range(N):
                        ar[n] += np.float32(sr[n]) * (f * fbj[n])
                continue
            promote_now = promote_blocks > 0 and (j + 1) % promote_blocks == 0
            for rr in range(nr):
                mrow = r0 + rr
                fa = FA[mrow, j] * q
                sa = any_special and spa[mrow, j]
                for n in range(N):
                    c = fa * FB[n, j]
                    sp = any_special and (sa or spb[n, j])
                    spv = _special_sum(VA[mrow], VB[n], k0, k1) if sp else 0.0
                    p, g = _fold_one(np.float64(acc[rr, n]), 0.0, c, pow2, sp, spv, m, rtz,
                                     promote_now, partial[rr, n], reg[rr, n])
                    partial[rr, n] = p
                    reg[rr, n] = g
        for rr in range(nr):
            mrow = r0 + rr
            best = 0.0
            total = 0.0
            for n in range(N):
                pm = np.float64(pmax[rr, n])
                best = pm if pm > best else best
                total += cnt[rr, n]
            stat_max[mrow] = best
            stat_cnt[mrow] = total
            for n in range(N):
                if fast32:
                    out[mrow, n] = acc32[rr, n]
                elif promote_blocks > 0:
                    g = reg[rr, n]
                    if nsub % promote_blocks != 0:
                        g = _add(g, partial[rr, n], 23, False)
                    out[mrow, n] = np.float32(g)
                else:
                    out[mrow, n] = np.float32(partial[rr, n])


@njit(cache=True, nogil=True)
def _finish(partial, reg, promote_blocks, nsub, out, r0, n0):
    mt, nt = partial.shape
    for r in range(mt):
        for i in range(nt):
            if promote_blocks > 0:
                g = reg[r, i]
                if nsub % promote_blocks != 0:
                    g = _add(g, partial[r, i], 23, False)
                out[r0 + r, n0 + i] = np.float32(g)
            else:
                out[r0 + r, n0 + i] = np.float32(partial[r, i])


# ---------------------------------------------------------------------------
# the public function
# ---------------------------------------------------------------------------
_DEFAULT_ACC = Accumulator()
_DEFAULT_FLOAT = FloatAcc()
# output tile of the exact BLAS path: its block sums, running sums and peaks stay in L2
TILE_ROWS, TILE_COLS = 128, 512
_STAT_LOCK = threading.Lock()


def matmul(a, b, *, acc: Accumulator = _DEFAULT_ACC, inter_block: FloatAcc = _DEFAULT_FLOAT,
           out: str = "fp32", prefix_stats: bool = False,
           promote_every: int | None = None) -> GemmResult:
    """``a @ b.T`` as an integer-accumulate MAC array computes it (module docstring).

    ``a``: QTensor M x K quantized along axis 1; ``b``: QTensor N x K along axis 1
    (a Linear weight). ``acc``: the in-block integer accumulator; ``inter_block``:
    the floating-point accumulator across blocks; ``out``: "fp32" (the only
    output format). ``prefix_stats=True`` makes the exact accumulator run in index
    order so that ``max_abs_acc`` covers every prefix (what a saturating
    accumulator must hold), not only block sums.

    An element format without scales has scale 1 and adopts the other operand's
    block size; if neither has scales, the whole of K is one block.

    ``inter_block`` may instead be a ``hwsim.TensorCore`` (``hwsim.tensor_core(...)``):
    the GEMM then runs the way that matrix unit accumulates it (``hwsim.tensorcore``
    docstring: operands of its input format with power-of-two or no block scales, chunks
    of ``fma_size`` products aligned and truncated inside the unit, chained over K), with
    FP32 promotion every ``promote_every`` elements (None: never). The integer
    accumulator statistics do not apply there (``max_abs_acc`` 0, ``path`` "tensorcore").
    """
    from hwsim.tensorcore import TensorCore, matmul_tensorcore
    if not isinstance(acc, Accumulator):
        raise TypeError(f"acc must be a hwsim.Accumulator, got {type(acc).__name__}")
    if isinstance(inter_block, TensorCore):
        if acc != _DEFAULT_ACC or prefix_stats:
            raise ValueError("acc= and prefix_stats= describe the integer accumulator; a "
                             "TensorCore accumulates inside the unit (leave them unset)")
        if out != "fp32":
            raise ValueError(f"out={out!r} is not allowed; allowed: 'fp32'")
        res = matmul_tensorcore(a, b, inter_block, promote_every)
        return GemmResult(res, 0, 0, bits_for(0), block_length=int(inter_block.fma_size),
                          product_quantum_exp=0, path="tensorcore")
    if not isinstance(inter_block, FloatAcc):
        raise TypeError(f"inter_block must be a hwsim.FloatAcc or hwsim.TensorCore, got "
                        f"{type(inter_block).__name__}")
    if promote_every is not None:
        raise ValueError("promote_every= goes with a TensorCore inter_block; a FloatAcc takes "
                         "FloatAcc(promote_every=...)")
    if out != "fp32":
        raise ValueError(f"out={out!r} is not allowed; allowed: 'fp32'")
    A = operand_integers(a, "a")
    B = operand_integers(b, "b")
    M, K = a.shape
    N, Kb = b.shape
    if K != Kb:
        raise ValueError(f"a is {a.shape} and b is {b.shape}: their K (axis 1) must agree "
                         f"(b is N x K, a Linear weight)")
    L = sub_block_length(A.block, B.block, K)
    nsub = -(-K // L) if K else 0
    ib = inter_block
    promote_blocks = 0
    if ib.promote_every is not None:
        if ib.promote_every % L:
            raise ValueError(f"promote_every={ib.promote_every} is not a multiple of the block "
                             f"length {L}")
        promote_blocks = ib.promote_every // L
    m_bits, rtz = int(ib.mantissa_bits), ib.rounding == "rtz"
    qexp = A.qexp + B.qexp
    q = math.ldexp(1.0, qexp)
    FA = _block_factors(A, nsub, L, K)
    FB = _block_factors(B, nsub, L, K)
    pow2 = A.pow2 and B.pow2
    any_special = A.any_special or B.any_special
    if any_special:
        spa = _special_blocks(A.special, nsub, L)
        spb = _special_blocks(B.special, nsub, L)
        VA, VB = A.values, B.values
    else:
        spa = np.zeros((1, 1), dtype=np.bool_)
        spb = spa
        VA = VB = np.zeros((1, 1), dtype=np.float64)
    worst = L * A.max_int * B.max_int  # largest |partial sum| any data can give
    result = np.zeros((M, N), dtype=np.float32)
    common = dict(block_length=L, product_quantum_exp=qexp)
    if M == 0 or N == 0 or K == 0:
        return GemmResult(result, 0, 0, bits_for(0), path="empty", **common)

    sequential = acc.bits is not None or acc.overflow != "exact" or prefix_stats
    if sequential:
        if worst >= 1 << 62:
            raise ValueError(f"in-block sums of {a.format.name} x {b.format.name} over {L} "
                             f"products need {bits_for(worst)} bits; the index-order path "
                             f"handles at most 63 (use the exact accumulator without bits)")
        lo = acc.lo if acc.bits is not None and acc.bits < 63 else -(1 << 62)
        hi = acc.hi if acc.bits is not None and acc.bits < 63 else (1 << 62) - 1
        mode = {"exact": _EXACT, "wrap": _WRAP, "saturate": _SAT}[acc.overflow]
        if acc.bits is not None and acc.bits >= 63:
            mode = _EXACT  # nothing below 2^62 can overflow
        stat_max = np.zeros(M, dtype=np.int64)
        stat_cnt = np.zeros(M, dtype=np.int64)
        if worst < 1 << 52 and (acc.bits is None or acc.bits <= 52):
            # a float type holds every value exactly: the vectorizing kernel, in float32
            # when the accumulator and the exact prefixes stay below 2^24 (twice the lanes)
            pb = 1 << (acc.bits - 1) if acc.bits is not None and acc.bits <= 24 else 0
            lim = 24 if 2 * worst + pb < 1 << 24 else 52
            fdt = np.float32 if lim == 24 else np.float64
            sm = np.zeros(M, dtype=np.float64)
            sc = np.zeros(M, dtype=np.float64)
            if acc.bits is None or acc.bits >= lim:
                lo_f, hi_f = -2.0 ** lim, 2.0 ** lim - 1
            else:
                lo_f, hi_f = float(acc.lo), float(acc.hi)
            # |block sum| <= max(worst, 2^(P-1)) under any overflow rule
            sbound = max(worst, 1 << (acc.bits - 1)) if acc.bits is not None else worst
            fast32 = _fp32_fold_ok(FA, FB, qexp, pow2, any_special, m_bits, rtz,
                                   promote_blocks, sbound, q)
            if fast32:
                FA32 = np.ascontiguousarray(FA * q, dtype=np.float32)
                FB32t = np.ascontiguousarray(FB.T, dtype=np.float32)
            else:
                FA32 = FB32t = np.zeros((1, 1), dtype=np.float32)
            _sequential_fp(np.ascontiguousarray(A.ints, dtype=fdt),
                           np.ascontiguousarray(B.ints.T, dtype=fdt), L, K, mode, fdt(lo_f),
                           fdt(hi_f), FA, FB, q, pow2, spa, spb, VA, VB, any_special, m_bits,
                           rtz, promote_blocks, fast32, FA32, FB32t, result, sm, sc)
            stat_max[:] = sm
            stat_cnt[:] = sc
        else:
            Bt = np.ascontiguousarray(B.ints.T)
            _sequential(np.ascontiguousarray(A.ints), Bt, L, K, mode, lo, hi, FA, FB, q, pow2,
                        spa, spb, VA, VB, any_special, m_bits, rtz, promote_blocks, result,
                        stat_max, stat_cnt)
        mx = int(stat_max.max())
        return GemmResult(result, mx, int(stat_cnt.sum()), bits_for(mx), path="sequential",
                          prefix_stats=True, **common)

    if worst < 1 << 53:
        dt = np.float32 if worst <= 1 << 24 else np.float64
        return _exact_blas(A, B, M, N, K, L, nsub, FA, FB, q, pow2, spa, spb, VA, VB,
                           any_special, m_bits, rtz, promote_blocks, dt, result, common)
    return _exact_python(A, B, M, N, K, L, nsub, FA, FB, q, pow2, spa, spb, VA, VB,
                         any_special, m_bits, rtz, promote_blocks, result, common)


def _special_blocks(spec: np.ndarray, nsub: int, L: int) -> np.ndarray:
    rows, K = spec.shape
    pad = nsub * L - K
    s = np.pad(spec, ((0, 0), (0, pad))) if pad else spec
    return np.ascontiguousarray(s.reshape(rows, nsub, L).any(axis=2))


def _padded_blocks(ints: np.ndarray, nsub: int, L: int, dt) -> np.ndarray:
    rows, K = ints.shape
    pad = nsub * L - K
    x = ints.astype(dt)
    if pad:
        x = np.pad(x, ((0, 0), (0, pad)))
    return x


def _fp32_fold_ok(FA, FB, qexp_f: float, pow2, any_special, m_bits, rtz, promote_blocks,
                  worst, q) -> bool:
    """True when every term S * c is exactly an FP32 number (or 0) and the m=23 rne fold is
    plain float32 addition: integer |S| <= 2^24 and 2^-149 <= c, c * 2^24 < 2^128; and the
    factors FA * q and FB are themselves FP32 numbers, so c = (FA * q) * FB is exact in
    float32 too."""
    if m_bits != 23 or rtz or not pow2 or any_special or promote_blocks or worst > 1 << 24:
        return False
    if not (np.isfinite(FA).all() and np.isfinite(FB).all()):
        return False
    ea = np.frexp(FA)[1] - 1
    eb = np.frexp(FB)[1] - 1
    lo = int(ea.min()) + int(eb.min()) + qexp_f
    hi = int(ea.max()) + int(eb.max()) + qexp_f
    # S * c is a multiple of 2^(exp c) with at most 25 bits: exact in FP32 when its quantum
    # is at least FP32's 2^-149 and |S*c| <= 2^24 * c stays below the overflow threshold.
    each = (int(ea.min()) + qexp_f >= -149 and int(ea.max()) + qexp_f <= 127
            and int(eb.min()) >= -149 and int(eb.max()) <= 127)
    return lo >= -149 and hi + 24 <= 127 and each


@contextlib.contextmanager
def _single_threaded_blas():
    """Run NumPy's OpenBLAS with one thread inside the block (restored after).

    The block GEMMs have K = L (32): OpenBLAS's own threading costs more than it gives
    on such calls (measured 150x slower on a loaded 2-core machine), so the row tiles
    run in parallel instead, each calling single-threaded BLAS. Found the way
    threadpoolctl does it (the library's exported set/get functions); a no-op when
    NumPy uses another BLAS.
    """
    fns = _openblas_thread_fns()
    if fns is None:
        yield
        return
    get_n, set_n = fns
    before = get_n()
    with _BLAS_LOCK:
        set_n(1)
        try:
            yield
        finally:
            set_n(before)


_BLAS_LOCK = threading.RLock()
_BLAS_FNS: list = []


def _openblas_thread_fns():
    if not _BLAS_FNS:
        found = None
        try:
            with open("/proc/self/maps") as fh:
                paths = sorted({line.split()[-1] for line in fh
                                if "openblas" in line.lower() and ".so" in line})
            for path in paths:
                lib = ctypes.CDLL(path)
                for suffix in ("64_", ""):
                    for prefix in ("scipy_openblas", "openblas"):
                        g = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                        st = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                        if g is not None and st is not None and "numpy" in path:
                            g.restype = ctypes.c_int
                            st.argtypes = [ctypes.c_int]
                            found = (g, st)
                            break
                    if found:
                        break
                if found:
                    break
        except OSError:
            found = None
        _BLAS_FNS.append(found)
    return _BLAS_FNS[0]


def _exact_blas(A, B, M, N, K, L, nsub, FA, FB, q, pow2, spa, spb, VA, VB, any_special, m_bits,
                rtz, promote_blocks, dt, result, common) -> GemmResult:
    """Block sums by BLAS on output tiles small enough to stay in L2, folded block by
    block: for each tile (rows r0.., columns n0..) and block j, T = A_j @ B_j^T (one GEMM
    with inner length L: OpenBLAS runs these at ~90 % of its large-GEMM rate) is folded
    into the tile's running sums at once. Tiles run on worker threads (BLAS single-threaded,
    folds nogil)."""
    A3 = A.blocked(dt, nsub, L)      # (nsub, M, L)
    B3 = B.blocked(dt, nsub, L)      # (nsub, N, L)
    worst = L * A.max_int * B.max_int
    fast32 = _fp32_fold_ok(FA, FB, A.qexp + B.qexp, pow2, any_special, m_bits, rtz,
                           promote_blocks, worst, q)
    FBt = np.ascontiguousarray(FB.T)
    if fast32:
        FA32 = np.ascontiguousarray(FA * q, dtype=np.float32)
        FB32 = np.ascontiguousarray(FBt, dtype=np.float32)
    stat_rows = np.zeros(M, dtype=np.float64)
    workers = max(1, numba.get_num_threads())
    mt = min(M, TILE_ROWS)
    nt = min(N, TILE_COLS)
    tiles = [(r0, n0) for r0 in range(0, M, mt) for n0 in range(0, N, nt)]

    def run_tiles(mine):
        for r0, n0 in mine:
            mr = min(mt, M - r0)
            nr = min(nt, N - n0)
            T = np.empty((mr, nr), dtype=dt)
            peak = np.zeros((mr, nr), dtype=dt)
            if fast32:
                acc32 = np.zeros((mr, nr), dtype=np.float32)
            else:
                pt = np.zeros((mr, nr), dtype=np.float64)
                rt = np.zeros((mr, nr), dtype=np.float64)
            for j in range(nsub):
                np.matmul(A3[j, r0:r0 + mr], B3[j, n0:n0 + nr].T, out=T)
                if fast32:
                    _fold_tile_fp32(T, FA32[r0:r0 + mr, j], FB32[j, n0:n0 + nr], acc32, peak)
                else:
                    promote_now = promote_blocks > 0 and (j + 1) % promote_blocks == 0
                    _fold_block(T, r0, n0, j, L, K, FA, FBt, q, pow2, spa, spb, VA, VB,
                                any_special, m_bits, rtz, promote_now, pt, rt, peak)
            if fast32:
                result[r0:r0 + mr, n0:n0 + nr] = acc32
            else:
                _finish(pt, rt, promote_blocks, nsub, result, r0, n0)
            best = peak.max(axis=1)
            with _STAT_LOCK:
                np.maximum(stat_rows[r0:r0 + mr], best, out=stat_rows[r0:r0 + mr])

    with _single_threaded_blas():
        if workers == 1 or len(tiles) == 1:
            run_tiles(tiles)
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(run_tiles, [tiles[w::workers] for w in range(workers)]))
    mx = int(stat_rows.max())
    return GemmResult(result, mx, 0, bits_for(mx), path="blas32" if dt == np.float32 else
                      "blas64", **common)


def _exact_python(A, B, M, N, K, L, nsub, FA, FB, q, pow2, spa, spb, VA, VB, any_special,
                  m_bits, rtz, promote_blocks, result, common) -> GemmResult:
    """Block sums wider than 2^53: Python integers (object arrays), then the same fold."""
    if not pow2:
        raise ValueError("in-block sums wider than 53 bits with non-power-of-two (SINT) scales "
                         "are not supported")
    Ai = _padded_blocks(A.ints, nsub, L, np.int64).astype(object)
    Bi = _padded_blocks(B.ints, nsub, L, np.int64).astype(object)
    partial = np.zeros((M, N), dtype=np.float64)
    reg = np.zeros((M, N), dtype=np.float64)
    best = 0
    for j in range(nsub):
        S = Ai[:, j * L:(j + 1) * L].dot(Bi[:, j * L:(j + 1) * L].T)  # exact Python ints
        s_hi = np.array([[float(v) for v in row] for row in S], dtype=np.float64)
        s_lo = np.array([[float(v - int(h)) for v, h in zip(row, hrow)]
                         for row, hrow in zip(S, s_hi)], dtype=np.float64)
        absS = np.abs(S)
        best = max(best, int(absS.max()))
        promote_now = promote_blocks > 0 and (j + 1) % promote_blocks == 0
        _fold_dd_block(s_hi, s_lo, j, L, K, FA, FB, q, spa, spb, VA, VB, any_special, m_bits,
                       rtz, promote_now, partial, reg)
    _finish(partial, reg, promote_blocks, nsub, result, 0, 0)
    return GemmResult(result, best, 0, bits_for(best), path="python", **common)


@njit(cache=True)
def _fold_dd_block(s_hi, s_lo, j, L, K, FA, FB, q, spa, spb, VA, VB, any_special, m, rtz,
                   promote_now, partial, reg):
    M, N = s_hi.shape
    k0 = j * L
    k1 = min(K, k0 + L)
    for r in range(M):
        for n in range(N):
            c = FA[r, j] * q * FB[n, j]
            sp = any_special and (spa[r, j] or spb[n, j])
            spv = _special_sum(VA[r], VB[n], k0, k1) if sp else 0.0
            p, g = _fold_one(s_hi[r, n], s_lo[r, n], c, True, sp, spv, m, rtz, promote_now,
                             partial[r, n], reg[r, n])
            partial[r, n] = p
            reg[r, n] = g


def set_threads(n: int) -> None:
    """Numba worker threads used by the kernels (the benchmark uses 2)."""
    numba.set_num_threads(int(n))



def accumulator_trace(a, b, *, acc: Accumulator = _DEFAULT_ACC):
    """The in-block accumulator after every addition, in index order (small problems).

    Returns ``(trace, block_sums)``: ``trace[m, n, k]`` is ``acc_{i+1}`` of the module
    docstring for k = the i-th index of its block (Python ints in an object array when
    any value exceeds int64, else int64), after the overflow rule; ``block_sums[m, n, j]``
    the value each block ends with (what is scaled and rounded into the float sum).
    NaN / Inf elements count as 0, as in ``matmul``.
    """
    if not isinstance(acc, Accumulator):
        raise TypeError(f"acc must be a hwsim.Accumulator, got {type(acc).__name__}")
    A = operand_integers(a, "a")
    B = operand_integers(b, "b")
    M, K = a.shape
    N, Kb = b.shape
    if K != Kb:
        raise ValueError(f"a is {a.shape} and b is {b.shape}: their K (axis 1) must agree")
    L = sub_block_length(A.block, B.block, K)
    nsub = -(-K // L) if K else 0
    Ai = A.ints.astype(object)
    Bi = B.ints.astype(object)
    trace = np.zeros((M, N, K), dtype=object)
    sums = np.zeros((M, N, nsub), dtype=object)
    lo, hi = acc.lo, acc.hi
    for j in range(nsub):
        cur = np.zeros((M, N), dtype=object)
        for k in range(j * L, min(K, (j + 1) * L)):
            v = cur + Ai[:, k][:, None] * Bi[:, k][None, :]
            if acc.overflow == "saturate":
                v = np.minimum(np.maximum(v, lo), hi)
            elif acc.overflow == "wrap":
                v = ((v - lo) % (1 << acc.bits)) + lo
            cur = v
            trace[:, :, k] = cur
        sums[:, :, j] = cur
    if K and all(-(1 << 63) <= int(x) < (1 << 63) for x in (trace.min(initial=0),
                                                             trace.max(initial=0))):
        return trace.astype(np.int64), sums.astype(np.int64)
    return trace, sums
