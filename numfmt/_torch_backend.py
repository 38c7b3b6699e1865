"""numfmt's quantizers in plain torch tensor operations, on any torch device.

The arithmetic is the reference arithmetic of ``numfmt._kernels`` (read its module
docstring first), written as whole-tensor operations instead of loops, so that the
same bits come out on a CPU, a GPU or any other torch device:

* bit manipulation on ``view(torch.int32)`` / ``view(torch.int64)`` (block maxima
  over magnitude bits, exponent fields, codes, the stochastic-rounding hash);
* floor(log2|v|) from the float64 exponent field (subnormals scaled by 2^64 first);
* powers of two built from their bits (the same float64, subnormal or zero, as the
  kernels' ``POW2`` table holds), multiplications by them (exact unless the product
  under/overflows, and then rounded the same way everywhere);
* ``torch.round`` (half to even), ``floor`` / ``ceil`` / ``trunc``, ``copysign``,
  comparisons, ``where``;
* the float32 steps of NVFP4 and of compat="microxcaling" as single IEEE float32
  multiplications, divisions and casts, exactly where the kernels round to float32;
  every divisor is a tensor on the data's device (CUDA turns division by a CPU scalar
  into a multiplication by its reciprocal, which is not the correctly rounded quotient);
* for OCP MX with RNE on float32 input, the kernels' float32 loops (``_mx_rne_f32``).

No step relies on a fused or reassociated float operation: every float product that
feeds an addition is exact, so a backend that contracted it into an FMA would get the
same bits. Nothing calls a transcendental function: microxcaling's
floor(float32(log2(a))) is read off a table of thresholds (``_log2f_thresholds``),
built once from ``math.log2`` -- the libm call the Numba kernel makes.

Stochastic rounding uses the kernels' counter-based hash (splitmix64 of
(seed, element index), top 32 bits) in int64 arithmetic: additions and
multiplications wrap modulo 2^64 on every torch device (two's complement), XOR is
bitwise, and a logical right shift is an arithmetic shift with the sign-extended
bits masked off. The element index is the one the kernels use: the element's flat
position with the quantized axis moved last (C order), or the flat position for
element formats.

Entry points (tensors in, tensors out, all on the input's device): ``quantize_blocks``
for block formats on a (rows, L) tensor (codes and scales, or fake-quantized values),
``encode`` / ``decode`` for element formats, ``dequantize_blocks``. ``numfmt.torch``
wraps them (axis handling, checks, QTensors, autograd).
"""
from __future__ import annotations

import bisect
import functools
import math

import numpy as np
import torch

from numfmt import _kernels as K
from numfmt import core
from numfmt.formats import BlockFormat, FloatFormat, IntFormat

__all__ = ["quantize_blocks", "encode", "decode", "dequantize_blocks"]

RNE, RNA, RTZ, RUP, RDN, STOCHASTIC = K.RNE, K.RNA, K.RTZ, K.RUP, K.RDN, K.STOCHASTIC
_F64_MAX = 1.7976931348623157e308
_M64 = (1 << 64) - 1


# ---------------------------------------------------------------------------
# small exact helpers
# ---------------------------------------------------------------------------
_INF64_BITS = 0x7FF0000000000000


def pow2(k: torch.Tensor) -> torch.Tensor:
    """2^k as float64 for an int64 tensor k, built from its bits: the value the kernels'
    ``pow2`` table holds (a normal number for -1022 <= k <= 1023, the subnormal 2^k down
    to 2^-1074, 0 below, +Inf above). Shift counts are clamped, so lanes that a ``where``
    discards later compute no out-of-range shift."""
    normal = (k.clamp(-1022, 1023) + 1023) << 52
    sub = torch.ones_like(k) << (k + 1074).clamp(0, 51)
    bits = torch.where(k >= -1022, normal, torch.where(k >= -1074, sub, 0))
    bits = torch.where(k > 1023, _INF64_BITS, bits)
    return bits.view(torch.float64)


def _pow2_scalar(k: int) -> float:
    return math.ldexp(1.0, k) if k >= -1074 else 0.0


def floor_log2(v: torch.Tensor) -> torch.Tensor:
    """floor(log2|v|) as int64 for finite nonzero float64 v, from the exponent field (a
    subnormal is first scaled by 2^64, exactly, into the normal range); garbage for zeros
    and non-finite values, which callers mask."""
    ef = (v.view(torch.int64) >> 52) & 0x7FF
    ef_sub = ((v * 18446744073709551616.0).view(torch.int64) >> 52) & 0x7FF
    return torch.where(ef == 0, ef_sub - (1023 + 64), ef - 1023)


def _s64(c: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    c &= _M64
    return c - (1 << 64) if c >= 1 << 63 else c


def _lsr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 lanes (``>>`` is arithmetic: mask the sign copies)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


# eager under torch.compile: Inductor treats arange-derived integers as index
# expressions and folds the wrapping int64 products exactly, overflowing int64
@torch.compiler.disable
def hash_u32(seed: int, index: torch.Tensor) -> torch.Tensor:
    """The kernels' ``_hash_u32``: splitmix64 of (seed, index), top 32 bits, as int64."""
    z = index + _s64(int(seed) * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E5F5)
    z = (z ^ _lsr(z, 30)) * _s64(0xBF58476D1CE4E5B9)
    z = (z ^ _lsr(z, 27)) * _s64(0x94D049BB133111EB)
    z = z ^ _lsr(z, 31)
    return _lsr(z, 32)


def round_mode(t: torch.Tensor, mode: int, seed: int, index) -> torch.Tensor:
    """The kernels' ``round_mode`` on float64 lanes; the sign of a zero follows t.
    ``index`` (int64 tensor of t's shape, or a callable returning it) is used only by
    stochastic rounding."""
    if mode == RNE:
        r = torch.round(t)
    elif mode == RNA:
        r = torch.floor(t.abs() + 0.5)
    elif mode == RTZ:
        r = torch.trunc(t)
    elif mode == RUP:
        r = torch.ceil(t)
    elif mode == RDN:
        r = torch.floor(t)
    else:
        fl = torch.floor(t)
        frac = t - fl  # exact
        u = hash_u32(seed, index() if callable(index) else index).to(torch.float64)
        r = fl + (u < frac * 4294967296.0).to(torch.float64)
    return torch.copysign(r.abs(), t)


def nonzero_scaled(t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The kernels' ``nonzero_scaled``: a nonzero v whose scaled value underflowed to
    zero reads +-2^-1074."""
    return torch.where((t == 0) & (v != 0), torch.copysign(torch.full_like(t, 5e-324), v), t)


def round_to_float(v, m: int, emin: int, maxmag: float, subnormals: bool, mode: int,
                   seed: int = 0, index=None) -> torch.Tensor:
    """The kernels' ``round_to_float`` on finite float64 lanes (saturates at maxmag)."""
    ey = floor_log2(v)
    small = ey < emin
    qe = ey.clamp_min(emin) - m
    r = round_mode(v * pow2(-qe), mode, seed, index) * pow2(qe)
    r = torch.where(r.abs() > maxmag, torch.copysign(torch.full_like(r, maxmag), v), r)
    if not subnormals:
        lowest = torch.copysign(torch.full_like(r, _pow2_scalar(emin)), v)
        r = torch.where(small | (r == 0), lowest, r)
    return torch.where(v == 0, v, r)


def float_code(val, m: int, emin: int, bias: int, sign_bit: int,
               max_code_mag: int) -> torch.Tensor:
    """The kernels' ``float_code``: int64 code of representable finite float64 values."""
    a = val.abs()
    ey = floor_log2(a)
    sub = ey < emin
    cm_sub = (a * _pow2_scalar(m - emin)).to(torch.int64)
    cm_norm = ((ey + bias) << m) + (a * pow2(m - ey)).to(torch.int64) - (1 << m)
    cm = torch.where(sub, cm_sub, cm_norm).clamp_max(max_code_mag)
    cm = torch.where(a == 0, 0, cm)
    return cm | (torch.signbit(val).to(torch.int64) * sign_bit)


@functools.lru_cache(maxsize=None)
def _log2f_thresholds_np() -> np.ndarray:
    """For every float32 binade [2^e, 2^(e+1)), e = -149..127: the smallest float32 bit
    pattern a there with floor(float32(log2(a))) = e + 1 (the float32 rounding of log2
    reaches the next integer), or the pattern of 2^(e+1) when none does. Found by
    bisection with math.log2 (libm's log2, the call the Numba kernel makes) and numpy's
    float32 cast (round to nearest even); the tests check the table against
    ``numfmt._kernels.log2f_floor`` at and below every threshold."""
    out = np.empty(277, np.int64)
    for i, e in enumerate(range(-149, 128)):
        lo = _f32_bits(math.ldexp(1.0, e))
        hi = _f32_bits(math.ldexp(1.0, e + 1)) if e < 127 else 0x7F800000

        def bumps(bits: int, e=e) -> bool:
            a = float(np.array([bits], np.uint32).view(np.float32)[0])
            return math.floor(float(np.float32(math.log2(a)))) > e

        # monotone within the binade: bisect for the first pattern that bumps
        out[i] = lo + bisect.bisect_left(range(lo, hi), True, key=bumps)
    return out


def _f32_bits(v: float) -> int:
    return int(np.array([v], np.float32).view(np.uint32)[0])


@torch.compiler.disable  # a cached constant: torch.compile must not trace its NumPy build
@functools.lru_cache(maxsize=None)
def _log2f_thresholds(device: torch.device) -> torch.Tensor:
    return torch.from_numpy(_log2f_thresholds_np()).to(device)


def log2f_floor(a: torch.Tensor) -> torch.Tensor:
    """The kernels' ``log2f_floor``: floor(float32(log2(a))) for float64 lanes a > 0 that
    hold float32 values, as int64, from the exact exponent and the threshold table."""
    e = floor_log2(a)
    bits = a.to(torch.float32).view(torch.int32).to(torch.int64)
    thr = _log2f_thresholds(a.device)[(e.clamp(-149, 127) + 149)]
    return e + (bits >= thr).to(torch.int64)


def _flat_index(rows: int, L: int, nblk: int, bs: int, device) -> torch.Tensor:
    """(rows, nblk, bs) int64: each padded lane's element index r * L + b * bs + j."""
    j = torch.arange(nblk * bs, device=device, dtype=torch.int64)
    r = torch.arange(rows, device=device, dtype=torch.int64)[:, None] * L
    return (r + j).reshape(rows, nblk, bs)


def _blocks(x2: torch.Tensor, bs: int):
    """(rows, L) -> (rows, nblk, bs) with the last partial block zero-padded."""
    rows, L = x2.shape
    nblk = -(-L // bs)
    pad = nblk * bs - L
    if pad:
        x2 = torch.nn.functional.pad(x2, (0, pad))
    return x2.reshape(rows, nblk, bs), nblk


# ---------------------------------------------------------------------------
# block formats
# ---------------------------------------------------------------------------
def quantize_blocks(x2: torch.Tensor, fmt: BlockFormat, mode: int, compat: str, seed: int,
                    want_codes: bool, fast: bool = True):
    """Quantize a (rows, L) float32/float64 tensor along L.

    want_codes: returns (codes int64 (rows, L), scales (rows, nblk) -- int64 E8M0 / E4M3
    codes for MX / NVFP4, float64 values for absmax --, tensor_scale float32 0-d or
    None). Otherwise returns the fake-quantized float32 (rows, L) tensor.

    fast: OCP + RNE on float32 input takes the float32 route of ``_mx_rne_f32`` when every
    block is in its range (one host sync; the torch.compile wrapper passes False).
    """
    rows, L = x2.shape
    bs = L if fmt.block_size is None else fmt.block_size
    xb, nblk = _blocks(x2, bs)
    index = functools.partial(_flat_index, rows, L, nblk, bs, x2.device)
    if fmt.scaling == "mx":
        res = _mx(xb, fmt, mode, compat, seed, index, want_codes, fast)
    elif fmt.scaling == "absmax":
        res = _absmax(xb, fmt, mode, seed, index, want_codes)
    else:
        res = _nvfp4(x2, xb, fmt, mode, seed, index, want_codes)
    if want_codes:
        codes, scales, ts = res
        return codes.reshape(rows, nblk * bs)[:, :L], scales, ts
    return res.reshape(rows, nblk * bs)[:, :L]


def _mx_rne_f32(xb, X, is_nan, fmt, want_codes):
    """OCP MX with RNE on float32 input in float32 arithmetic: the kernels'
    ``_mx_int_block_f32`` / ``_mx_float_block_f32`` (their docstrings give the argument
    that each step is exact), half the bytes and a third of the passes of the float64
    lanes. Returns int64 codes or float32 values (NaN blocks still to be written), or
    None when a block lies outside those routines' exact range (scales near 2^-127):
    the caller then runs the float64 reference arithmetic (one host sync decides)."""
    elem = fmt.element
    Xi = X.to(torch.int32)[..., None]
    ok_nan = is_nan[..., None]
    if isinstance(elem, IntFormat):
        k = Xi + fmt.element_scale_exp
        if not bool((ok_nan | ((k >= -126) & (k <= 127))).all()):
            return None
        k = k.clamp(-126, 127)
        q = torch.round(xb * ((127 - k) << 23).view(torch.float32))
        q = q.clamp(elem.min_code, elem.max_code)
        if want_codes:
            return q.to(torch.int64) & ((1 << elem.bits) - 1)
        return (q + 0.0) * ((127 + k) << 23).view(torch.float32)  # integers have no -0
    m, emin = elem.mantissa_bits, elem.emin
    base = Xi + emin
    if not bool((ok_nan | ((base - m >= -126) & (base - m <= 126))).all()):
        return None
    base = base.clamp_min(-126 + m)
    b = xb.view(torch.int32)
    ey = torch.maximum(((b >> 23) & 0xFF) - 127, base)
    k = ey - m
    q = torch.round(xb * ((127 - k) << 23).view(torch.float32))
    up = ((127 + k) << 23).view(torch.float32)
    maxv = (elem.max_normal * pow2(X)).to(torch.float32)[..., None]  # Inf past float32
    if want_codes:
        aq = q.abs()
        cm = ((ey - base) << m).to(torch.int64) + aq.to(torch.int64)
        cm = torch.where(aq * up > maxv, elem.max_code, cm)
        return cm | torch.where(b < 0, 1 << (elem.bits - 1), 0)
    val = q * up
    return torch.minimum(torch.maximum(val, -maxv), maxv)


def _rule_exponent(amax: torch.Tensor, e: torch.Tensor, fmt: BlockFormat) -> torch.Tensor:
    """The kernels' ``_rule_exponent`` on float64 lanes: the unclamped shared exponent of
    each block by ``fmt.scale_rule`` from its amax (float64, exact) and e = floor(log2
    amax); rceil is returned already clamped above at 127 (it saturates). Zero, NaN and
    Inf lanes give garbage that the caller masks."""
    rule = fmt.scale_rule
    emax = fmt.element_emax
    if rule == "floor":
        return e - emax
    _, m, elem_max = core.scale_rule_params(fmt)
    if rule == "rceil":
        # a device tensor as divisor (see _absmax); the float64 quotient is exact-rounded,
        # and rounding it to float32 gives the correctly rounded float32 quotient for
        # float32 amax (53 >= 2 * 24 + 2)
        d = (amax / torch.tensor(elem_max, dtype=torch.float64, device=amax.device))
        d = d.to(torch.float32).to(torch.float64)
        ed = floor_log2(torch.where(d > 0, d, 1))
        X = ed + (d != pow2(ed)).to(torch.int64)
        X = torch.where(d == 0, -127, X)
        return torch.where(torch.isinf(d), 127, X.clamp_max(127))
    sig = amax * pow2(-e)  # amax's significand in [1, 2), exact
    if rule == "ceil":
        bump = sig != 1.0
    else:  # even: rounded to m fraction bits, ties away, it reaches 2
        bump = sig >= 2.0 - _pow2_scalar(-(m + 1))
    return e + bump.to(torch.int64) - emax


def _mx(xb, fmt, mode, compat, seed, index, want_codes, fast=True):
    """OCP MX (and compat="microxcaling"): see ``numfmt._kernels._mx_block_exponent``,
    ``_mx_element`` and ``_mx_generic_block``."""
    elem = fmt.element
    is_int = isinstance(elem, IntFormat)
    mx_compat = compat == "microxcaling"
    if xb.dtype == torch.float32:
        mag = xb.view(torch.int32) & 0x7FFFFFFF
        special = 0x7F800000
    else:
        mag = xb.view(torch.int64) & 0x7FFFFFFFFFFFFFFF
        special = 0x7FF0000000000000
    amb = mag.amax(dim=-1)                                  # rows x nblk
    amax = amb.view(xb.dtype).to(torch.float64)             # the block's largest |v|
    is_nan = amb >= special
    zero = amb == 0
    if mx_compat:
        e = torch.where(zero, -126,
                        log2f_floor(torch.where(zero, 1, amax)))
        X = e - fmt.element_emax
    else:
        X = _rule_exponent(amax, floor_log2(amax), fmt)
    is_nan = is_nan | (X > 127)
    X = X.clamp_min(-127)
    if not mx_compat:
        X = torch.where(zero, -127, X)
    X = torch.where(is_nan, 0, X)
    nan_b = is_nan[..., None]
    if fast and not mx_compat and mode == RNE and xb.dtype == torch.float32:
        res = _mx_rne_f32(xb, X, is_nan, fmt, want_codes)
        if res is not None:
            if want_codes:
                return (torch.where(nan_b, 0, res), torch.where(is_nan, 255, X + 127), None)
            return torch.where(nan_b, float("nan"), res)
    Xe = X[..., None]
    v = xb.to(torch.float64)

    if is_int:
        m, emin, maxmag, max_code_mag = 0, 0, float(elem.max_code), elem.max_code
        lo, hi = elem.min_code, elem.max_code
    else:
        m, emin, maxmag, max_code_mag = elem.mantissa_bits, elem.emin, elem.max_normal, elem.max_code
        lo = hi = 0
    ese = fmt.element_scale_exp
    code_mask = (1 << elem.bits) - 1
    sign_bit = 1 << (elem.bits - 1)
    if mx_compat:
        n, qe, sat = _mx_microxcaling(v, Xe, is_int, ese, m, emin, maxmag, lo, hi, mode)
    elif is_int:
        t = nonzero_scaled(v * pow2(-(Xe + ese)), v)
        n = round_mode(t, mode, seed, index)
        sat = (n > hi) | (n < lo)
        n = n.clamp(lo, hi) + 0.0  # integers have no -0
        qe = None
    else:
        nz = v != 0
        ey = torch.where(nz, floor_log2(v) - Xe, emin).clamp_min(emin)
        qe = ey - m
        t = nonzero_scaled(v * pow2(-(Xe + qe)), v)
        n = round_mode(t, mode, seed, index)
        sat = n.abs() * pow2(qe) > maxmag
    if want_codes:
        if is_int:
            codes = n.to(torch.int64) & code_mask
        else:
            if mx_compat:
                cm = float_code(n.abs() * pow2(qe), m, emin, 1 - emin, 0, max_code_mag)
            else:
                cm = ((qe - (emin - m)) << m) + n.abs().to(torch.int64)
            cm = torch.where(sat, max_code_mag, cm)
            codes = cm | (torch.signbit(n).to(torch.int64) * sign_bit)
        codes = torch.where(nan_b, 0, codes)
        scales = torch.where(is_nan, 255, X + 127)
        return codes, scales, None
    if is_int:
        val = n * _pow2_scalar(ese)
    else:
        val = torch.where(sat, torch.copysign(torch.full_like(n, maxmag), n), n * pow2(qe))
    fake = (val * pow2(Xe)).to(torch.float32)
    return torch.where(is_nan[..., None], float("nan"), fake)


def _mx_microxcaling(v, Xe, is_int, ese, m, emin, maxmag, lo, hi, mode):
    """The kernels' ``_mx_element_microxcaling`` (microxcaling's float32 arithmetic):
    returns (n, qe, saturated) lanes."""
    a = (v * pow2(-Xe)).to(torch.float32).to(torch.float64)
    zero = a == 0
    aa = a.abs()
    if is_int:
        qe = torch.full_like(Xe, ese).expand(a.shape)
    else:
        pe = log2f_floor(torch.where(zero, 1, aa)).clamp_min(emin)
        qe = pe - m
    t = aa * pow2(-qe)
    if mode == RTZ:
        r = torch.floor(t)
    else:
        r = torch.floor((t + 0.5).to(torch.float32).to(torch.float64))
        if mode == RNE:
            d = (t - 0.5).to(torch.float32).to(torch.float64)
            r = r - ((d >= 0) & (d * 0.5 == torch.floor(d * 0.5))).to(torch.float64)
    n = torch.where(a > 0, r, -r)
    if is_int:
        sat = (n > hi) | (n < lo)
        n = n.clamp(lo, hi) + 0.0
    else:
        sat = r * pow2(qe) > maxmag
    # a zero gives +0.0, exponent emin - m, not saturated
    n = torch.where(zero, 0, n)
    qe = torch.where(zero, emin - m, qe)
    sat = sat & ~zero
    return n, qe, sat


def _absmax(xb, fmt, mode, seed, index, want_codes):
    """SINT / per-channel scaled integers: the kernels' ``_absmax_body``."""
    elem = fmt.element
    s = fmt.scale
    is_int = isinstance(elem, IntFormat)
    v = xb.to(torch.float64)
    a = v.abs()
    special = (~(a <= _F64_MAX)).any(dim=-1)            # NaN or Inf in the group
    amax = torch.where(special[..., None], 0, a).amax(dim=-1)
    elem_max = float(elem.max_code) if is_int else elem.max_normal
    # a device tensor as divisor: CUDA turns division by a CPU scalar into a multiplication
    # by its reciprocal, which is not the correctly rounded quotient
    scale = round_to_float(amax / torch.tensor(elem_max, dtype=torch.float64, device=v.device), s.mantissa_bits, s.emin, s.max_normal,
                           s.subnormals, RNE)
    sc = scale[..., None]
    zero_s = sc == 0
    q = nonzero_scaled(v / torch.where(zero_s, 1, sc), v)
    if is_int:
        val = round_mode(q, mode, seed, index).clamp(elem.min_code, elem.max_code) + 0.0
        val = torch.where(zero_s, 0, val)
    else:
        val = round_to_float(torch.where(torch.isfinite(q), q, 0),
                             elem.mantissa_bits, elem.emin, elem.max_normal, True, mode, seed,
                             index)
        val = torch.where(zero_s, v * 0.0, val)
    sp = special[..., None]
    if want_codes:
        if is_int:
            codes = val.to(torch.int64) & ((1 << elem.bits) - 1)
        else:
            codes = float_code(val, elem.mantissa_bits, elem.emin, elem.bias,
                               1 << (elem.bits - 1), elem.max_code)
        codes = torch.where(sp, 0, codes)
        scales = torch.where(special, float("nan"), scale)
        return codes, scales, None
    fake = (val * sc).to(torch.float32)
    return torch.where(sp, float("nan"), fake)


def nvfp4_tensor_scale(x2: torch.Tensor) -> torch.Tensor:
    """NVFP4's fp32 s_enc = 6 * 448 / amax as a 0-d float32 tensor (``numfmt.core``):
    amax the largest finite |x| (of the float32 values when the input's largest finite
    value is beyond float32), 1 for amax = 0, float32's max when the division overflows."""
    a = x2.abs()
    fin = torch.isfinite(a)
    amax_in = torch.where(fin, a, 0).amax() if a.numel() else a.new_zeros(())
    amax = amax_in.to(torch.float64)
    if x2.dtype == torch.float64:
        a32 = x2.to(torch.float32).abs()
        amax32 = torch.where(torch.isfinite(a32), a32, 0).amax().to(torch.float64)
        amax = torch.where(torch.isfinite(amax.to(torch.float32)), amax, amax32)
    s = torch.tensor(6.0 * 448.0, dtype=torch.float32, device=x2.device) / amax.to(torch.float32)
    s = torch.where(amax > 0, s, 1)
    return torch.where(torch.isfinite(s), s, float(np.finfo(np.float32).max))


def _nvfp4(x2, xb, fmt, mode, seed, index, want_codes):
    """NVIDIA's NVFP4 recipe in float32 arithmetic: the kernels' ``_nvfp4_body``."""
    s32 = nvfp4_tensor_scale(x2)
    x32 = xb.to(torch.float32)
    amb = (x32.view(torch.int32) & 0x7FFFFFFF).amax(dim=-1)
    special = amb >= 0x7F800000
    amax_b = amb.view(torch.float32)
    sv = ((amax_b / torch.tensor(6.0, dtype=torch.float32, device=x2.device)) * s32)
    sv = torch.where(special, 0, sv).to(torch.float64)
    sb = round_to_float(sv, 3, -6, 448.0, True, RNE)
    sb32 = sb.to(torch.float32)[..., None]
    zero_s = sb32 == 0
    t = ((x32 * s32) / torch.where(zero_s, 1, sb32)).to(torch.float64)
    t = torch.where(torch.isfinite(t), t, 0)
    e = round_to_float(t, 1, 0, 6.0, True, mode, seed, index)
    e = torch.where(zero_s, x32.to(torch.float64) * 0.0, e)
    sp = special[..., None]
    if want_codes:
        codes = float_code(e, 1, 0, 1, 0x8, 0x7)
        codes = torch.where(sp, 0, codes)
        scodes = torch.where(special, 0x7F,
                             float_code(sb, 3, -6, 7, 0x80, 0x7E))
        return codes, scodes, s32
    fake = (e.to(torch.float32) * sb32) / s32
    return torch.where(sp, float("nan"), fake)


# ---------------------------------------------------------------------------
# dequantize
# ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _table(key, device: torch.device) -> torch.Tensor:
    kind, fmt = key
    if kind == "elem":
        t = core.decode_table(fmt)
    else:
        t = core._elem_table(fmt)
    return torch.from_numpy(np.array(t, dtype=np.float64)).to(device)


def dequantize_blocks(codes: torch.Tensor, scales: torch.Tensor, fmt: BlockFormat,
                      tensor_scale, L: int) -> torch.Tensor:
    """float32 (rows, L) values of int64 codes (rows, L) and scales (rows, nblk): int64
    E8M0 / E4M3 codes (MX / NVFP4) or float64 values (absmax)."""
    rows = codes.shape[0]
    bs = L if fmt.block_size is None else fmt.block_size
    cb, nblk = _blocks(codes, bs)
    dev = codes.device
    if fmt.scaling == "mx":
        sc = scales[..., None]
        v = _table(("block", fmt), dev)[cb] * pow2(sc - 127)
        out = torch.where(sc == 255, float("nan"), v).to(torch.float32)
    elif fmt.scaling == "absmax":
        out = (_table(("block", fmt), dev)[cb] * scales[..., None]).to(torch.float32)
    else:
        sb32 = _table(("elem", fmt.scale), dev)[scales].to(torch.float32)[..., None]
        e = _table(("elem", fmt.element), dev)[cb].to(torch.float32)
        s32 = torch.as_tensor(np.float32(tensor_scale), device=dev)
        out = (e * sb32) / s32
    return out.reshape(rows, nblk * bs)[:, :L]


# ---------------------------------------------------------------------------
# element formats
# ---------------------------------------------------------------------------
def encode(x: torch.Tensor, fmt, mode: int, seed: int) -> torch.Tensor:
    """int64 codes of float32/float64 lanes in an element format: the kernels'
    ``element_encode`` (the caller has refused NaN where the format has none, non-finite
    values for integers and negative values for unsigned formats)."""
    flat = x.reshape(-1)
    v = flat.to(torch.float64)
    index = lambda: torch.arange(flat.numel(), device=x.device, dtype=torch.int64)  # noqa: E731
    if isinstance(fmt, IntFormat):
        n = round_mode(v, mode, seed, index).clamp(fmt.min_code, fmt.max_code)
        return (n.to(torch.int64) & ((1 << fmt.bits) - 1)).reshape(x.shape)
    sign_bits = fmt.bits if fmt.signed else fmt.bits + 1  # unsigned: the sign bit falls off
    sign_bit = 1 << (sign_bits - 1)
    m, emin = fmt.mantissa_bits, fmt.emin
    neg = torch.signbit(v)
    isnan = torch.isnan(v)
    isinf = torch.isinf(v)
    fin = torch.where(isnan | isinf, 0, v)
    r = round_to_float(fin, m, emin, _F64_MAX, fmt.subnormals, mode, seed, index)
    over = (r.abs() > fmt.max_normal) & ~isinf
    toward = torch.zeros_like(neg) | (mode == RTZ)
    if mode == RUP:
        toward = neg
    elif mode == RDN:
        toward = ~neg
    code = float_code(torch.where(over, 0, r), m, emin, fmt.bias, sign_bit,
                      fmt.max_code)
    # overflow: +-max when saturating or rounding toward the bound, else Inf (or NaN)
    if fmt.saturating:
        c_over = torch.full_like(code, fmt.max_code)
    else:
        c_over = torch.where(toward, torch.full_like(code, fmt.max_code),
                             torch.full_like(code, fmt.inf_code if fmt.has_inf else fmt.nan_code))
    c_over = torch.where(neg & (c_over != fmt.nan_code), c_over | sign_bit, c_over)
    code = torch.where(over, c_over, code)
    if fmt.has_inf:
        code = torch.where(isinf, torch.where(neg, fmt.inf_code | sign_bit,
                                              torch.full_like(code, fmt.inf_code)), code)
    else:  # an Inf input overflows away from the bound (never "toward")
        c_inf = torch.full_like(code, fmt.max_code if fmt.saturating else fmt.nan_code)
        c_inf = torch.where(neg & (c_inf != fmt.nan_code), c_inf | sign_bit, c_inf)
        code = torch.where(isinf, c_inf, code)
    if fmt.has_nan:
        code = torch.where(isnan, torch.full_like(code, fmt.nan_code), code)
    if fmt.specials == "fnuz":  # no -0: a zero result of either sign is code 0
        code = torch.where((code == fmt.nan_code) & (v.abs() < fmt.max_normal), 0, code)
    if not fmt.signed:
        code = code & ((1 << fmt.bits) - 1)
    return code.reshape(x.shape)


def decode(codes: torch.Tensor, fmt) -> torch.Tensor:
    """float32 values of int64 element codes (``numfmt.decode``): the float64 decode
    table cast to float32; formats wider than 16 bits read their value from the fields."""
    if fmt.bits <= 16:
        return _table(("elem", fmt), codes.device)[codes].to(torch.float32)
    return _decode_fields(codes, fmt)


def _decode_fields(codes: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Value of wide float codes from sign, exponent and mantissa fields (exact in
    float64, then cast to float32); fp32 itself is its own bit pattern."""
    if (fmt.exponent_bits, fmt.mantissa_bits, fmt.bias, fmt.specials, fmt.signed) == \
            (8, 23, 127, "ieee", True):
        return codes.to(torch.int32).view(torch.float32)  # wraps to the same 32 bits
    m, e = fmt.mantissa_bits, fmt.exponent_bits
    mf = codes & ((1 << m) - 1)
    ef = (codes >> m) & ((1 << e) - 1)
    neg = ((codes >> (m + e)) & 1).bool() if fmt.signed else torch.zeros_like(codes, dtype=torch.bool)
    frac = mf.to(torch.float64) * _pow2_scalar(-m)
    if fmt.subnormals:
        mag = torch.where(ef == 0, frac * _pow2_scalar(1 - fmt.bias),
                          (1.0 + frac) * pow2(ef - fmt.bias))
    else:
        mag = (1.0 + frac) * pow2(ef - fmt.bias)
    top = (1 << e) - 1
    if fmt.specials == "ieee":
        mag = torch.where((ef == top) & (mf == 0), float("inf"), mag)
        mag = torch.where((ef == top) & (mf != 0), float("nan"), mag)
    elif fmt.specials == "nan_only":
        mag = torch.where((ef == top) & (mf == (1 << m) - 1), float("nan"), mag)
    elif fmt.specials == "fnuz":  # the negative-zero code is the NaN
        mag = torch.where(codes == fmt.nan_code, float("nan"), mag)
    return torch.where(neg, -mag, mag).to(torch.float32)
