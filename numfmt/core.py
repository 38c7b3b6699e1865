"""The public verbs: quantize, dequantize, fake_quantize, encode, decode.

NumPy in, NumPy out. Inputs may be float16, bfloat16 (ml_dtypes), float32 or
float64, of any shape; a block format quantizes along ``axis`` in blocks of
``block_size``; a last partial block behaves as if zero-padded.

OCP MX (``compat="ocp"``, OCP MX v1.0 section 6.3)
    shared_exponent X = floor(log2(amax)) - element_emax, taken exactly from the
    float's bits, clamped below at -127; X > 127 makes the scale NaN (0xFF).
    Elements are V / 2^X rounded in the chosen mode and saturated at the
    element's max. NaN or Inf anywhere in a block: the scale is NaN and the
    block decodes to NaN. An all-zero block has X = -127 and decodes to zeros
    keeping their sign (float elements).

Scale rules (``scale_rule``, MX formats with compat="ocp"; torchao's
``ScaleCalculationMode`` of the same names, see docs/scale_rules.md)
    With amax the block's largest |v| (exact, from its bits), e = floor(log2 amax),
    m the element's fraction bits in its top binade (mantissa bits; b - 2 for MXINTb)
    and element_max its largest value (MXINTb: (2^(b-1) - 1) * 2^(2-b)):

    * ``"floor"`` (default, OCP MX v1.0):  X = e - element_emax.
    * ``"ceil"``:   X = ceil(log2 amax) - element_emax  (e + 1 unless amax is a power
      of two): elements never exceed 2^element_emax, nothing saturates.
    * ``"even"``:   X = floor(log2(round(amax))) - element_emax, amax rounded to m
      fraction bits with ties away from zero (torchao adds half an element ulp to
      amax's bits and keeps the exponent; AMD Quark's "even" scale): X is e + 1 when
      amax's significand is >= 2 - 2^-(m+1).
    * ``"rceil"``:  X = ceil(log2 d), d = float32(amax / element_max), clamped to
      -127..127 (NVIDIA cuBLAS's "computing scaling factors for FP8 with UE8M0
      scales", the PTX ``cvt.rp.satfinite.ue8m0x2.f32`` of d). d is the correctly
      rounded float32 quotient for float32 input; for float64 input the float64
      quotient rounded to float32.

    Every rule: an all-zero block has X = -127, X < -127 is clamped to -127; X > 127
    makes the scale NaN (floor, ceil, even; reachable only from float64 input or
    MXINT), rceil saturates at 127 instead. NaN or Inf in a block gives a NaN scale
    under every rule (torchao gives Inf blocks a finite scale). The rule only moves X:
    elements are rounded from the exact V / 2^X as above, in every rounding mode.

microxcaling (``compat="microxcaling"``)
    Bit-identical to Microsoft's microxcaling ``mx.mx_ops._quantize_mx``
    (pure-PyTorch path, scale_bits 8, axes=[-1]) on float32 data: X from
    floor(log2f(amax)) (rounds up a few ulps below a power of two), element
    arithmetic in float32 (its 'nearest' is our "rna", 'even' our "rne",
    'floor' our "rtz"), an all-zero block uses exponent -126 - emax, -0.0
    becomes +0.0. Inputs are cast to float32 first, as its ``A.float()`` path.

SINT / per-channel (``scaling="absmax"``)
    scale = RNE(amax / element_max) in the scale format (fp16 for sint, fp32
    for int8_channel); element = round_mode(V / scale), saturated.

NVFP4: see ``numfmt._kernels.nvfp4_quantize``.
"""
from __future__ import annotations

import functools
import operator

import ml_dtypes
import numpy as np

from numfmt import _kernels as K
from numfmt.formats import (COMPATS, ROUNDINGS, SCALE_RULES, BlockFormat, FloatFormat, IntFormat,
                            check_scale_rule, get)
from numfmt.qtensor import QTensor

__all__ = ["quantize", "dequantize", "fake_quantize", "encode", "decode", "decode_table"]

_MODE = {name: i for i, name in enumerate(ROUNDINGS)}
_MICROXCALING_MODES = ("rne", "rna", "rtz")
_SCALE_DTYPES = {"fp16": np.float16, "bf16": ml_dtypes.bfloat16, "fp32": np.float32,
                 "fp8_e4m3": ml_dtypes.float8_e4m3fn, "fp8_e5m2": ml_dtypes.float8_e5m2}


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------
def _as_float_array(x) -> np.ndarray:
    """x as float32 or float64 (float16 / bfloat16 widened exactly to float32)."""
    if isinstance(x, np.ndarray):
        arr = x
    elif hasattr(x, "__array__") and not isinstance(x, (str, bytes)):
        arr = np.asarray(x)
    elif isinstance(x, (float, int, list, tuple)) and not isinstance(x, bool):
        arr = np.asarray(x)
        if arr.dtype.kind in "iub":
            arr = arr.astype(np.float64)
    else:
        raise TypeError(f"expected a float array, got {type(x).__name__}")
    dt = arr.dtype
    if dt == np.float32 or dt == np.float64:
        return arr
    if dt == np.float16 or dt == ml_dtypes.bfloat16:
        return arr.astype(np.float32)
    raise TypeError(f"expected a float16, bfloat16, float32 or float64 array, got dtype {dt}; "
                    f"cast it explicitly (e.g. x.astype(np.float32))")


def _check_rounding(rounding: str, seed) -> int:
    if rounding not in _MODE:
        raise ValueError(f"rounding={rounding!r} is not one of {ROUNDINGS}")
    if rounding == "stochastic":
        if seed is None:
            raise ValueError("rounding='stochastic' needs a seed (an int >= 0)")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed={seed!r} is not allowed; it must be an int >= 0")
    return _MODE[rounding]


def _check_axis(axis, ndim: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"axis must be an int, got {axis!r}")
    nd = max(ndim, 1)
    if not -nd <= axis < nd:
        raise ValueError(f"axis={axis} is out of range for an array of {ndim} dimension(s); "
                         f"allowed {-nd}..{nd - 1}")
    return int(operator.index(axis)) % nd


def _code_dtype(bits: int):
    return np.uint8 if bits <= 8 else (np.uint16 if bits <= 16 else np.uint32)


def _bits_view(flat: np.ndarray):
    if flat.dtype == np.float32:
        return flat.view(np.uint32), 23, 0xFF, 127, np.uint32(0x7FFFFFFF), np.uint32(0x7F800000)
    return (flat.view(np.uint64), 52, 0x7FF, 1023, np.uint64(0x7FFFFFFFFFFFFFFF),
            np.uint64(0x7FF0000000000000))


def _rows(x: np.ndarray, axis: int):
    """x with the quantized axis last, as a C-contiguous (rows, L) array."""
    if axis == x.ndim - 1 and x.flags.c_contiguous:  # the common case, without moveaxis
        L = x.shape[-1]
        return x.reshape(x.size // L if L else 0, L), x.shape
    xm = np.moveaxis(x, axis, -1)
    L = xm.shape[-1]
    rows = xm.size // L if L else 0
    return np.ascontiguousarray(xm).reshape(rows, L), xm.shape


# ---------------------------------------------------------------------------
# decode tables
# ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def decode_table(elem) -> np.ndarray:
    """float64 value of every code of an element format of at most 16 bits."""
    if isinstance(elem, IntFormat):
        codes = np.arange(1 << elem.bits, dtype=np.int64)
        vals = np.where(codes >= 1 << (elem.bits - 1), codes - (1 << elem.bits), codes)
        return vals.astype(np.float64)
    if elem.bits > 16:
        raise ValueError(f"decode table for {elem.name!r} ({elem.bits} bits) is too large")
    vals = _float_field_values(np.arange(1 << elem.bits, dtype=np.int64), elem)
    vals.setflags(write=False)
    return vals


def _float_field_values(codes: np.ndarray, elem: FloatFormat) -> np.ndarray:
    """float64 value of float element codes (int64) read from their sign, exponent and
    mantissa fields (exact: at most 23 mantissa bits and 8 exponent bits)."""
    m, e = elem.mantissa_bits, elem.exponent_bits
    mf = codes & ((1 << m) - 1)
    ef = (codes >> m) & ((1 << e) - 1)
    neg = (codes >> (m + e)) & 1 if elem.signed else np.zeros_like(codes)
    frac = mf / float(1 << m)
    if elem.subnormals:
        mag = np.where(ef == 0, np.ldexp(frac, 1 - elem.bias), np.ldexp(1.0 + frac, ef - elem.bias))
    else:
        mag = np.ldexp(1.0 + frac, ef - elem.bias)
    top = (1 << e) - 1
    if elem.specials == "ieee":
        mag = np.where((ef == top) & (mf == 0), np.inf, mag)
        mag = np.where((ef == top) & (mf != 0), np.nan, mag)
    elif elem.specials == "nan_only":
        mag = np.where((ef == top) & (mf == (1 << m) - 1), np.nan, mag)
    elif elem.specials == "fnuz":  # the negative-zero code is the NaN
        mag = np.where(codes == elem.nan_code, np.nan, mag)
    return np.where(neg == 1, -mag, mag)


def _elem_table(fmt: BlockFormat) -> np.ndarray:
    t = decode_table(fmt.element)
    return t * 2.0 ** fmt.element_scale_exp if fmt.element_scale_exp else t


def _float_params(elem: FloatFormat):
    return (elem.mantissa_bits, elem.emin, elem.max_normal, elem.max_code)


# ---------------------------------------------------------------------------
# quantize / fake_quantize
# ---------------------------------------------------------------------------
def quantize(x, fmt, *, axis: int = -1, rounding: str = "rne", compat: str = "ocp",
             seed: int | None = None, scale_rule: str | None = None) -> QTensor:
    """Quantize ``x`` to ``fmt`` along ``axis``; returns a QTensor of codes and scales.

    ``scale_rule``: how MX shared exponents are found (``SCALE_RULES``; see the module
    docstring). None keeps the format's own (``fmt.scale_rule``, "floor" unless
    overridden with ``numfmt.get(name, scale_rule=...)``); a rule given here is
    recorded in the QTensor's format."""
    return _run(x, with_scale_rule(fmt, scale_rule), axis, rounding, compat, seed,
                want_codes=True)


def with_scale_rule(fmt, scale_rule):
    """``fmt`` as a format object, with ``scale_rule`` applied when it is not None (a
    ValueError names a bad rule, or a non-MX format given a rule other than "floor")."""
    fmt = get(fmt)
    if scale_rule is None:
        return fmt
    check_scale_rule(scale_rule)
    if not isinstance(fmt, BlockFormat):
        if scale_rule == "floor":
            return fmt
        raise ValueError(f"scale_rule={scale_rule!r} applies to MX block formats; "
                         f"{fmt.name!r} is an element format")
    if fmt.scale_rule == scale_rule:
        return fmt
    return get(fmt, scale_rule=scale_rule)


def fake_quantize(x, fmt, *, axis: int = -1, rounding: str = "rne", compat: str = "ocp",
                  seed: int | None = None, out: np.ndarray | None = None,
                  scale_rule: str | None = None) -> np.ndarray:
    """Exactly ``dequantize(quantize(x, ...))`` as float32, without materialising codes.
    ``scale_rule`` as in ``quantize``.

    ``out``: an optional writeable C-contiguous float32 array of x's shape to write the
    result into (and return), as NumPy's ``out=``; it may be ``x`` itself. In a loop
    this saves the page faults of a fresh output array (about a third of the time on
    large tensors)."""
    fmt = with_scale_rule(fmt, scale_rule)
    if out is not None:
        _check_out(out, x)
    return _run(x, fmt, axis, rounding, compat, seed, want_codes=False, out=out)


def _check_out(out, x) -> None:
    shape = np.shape(x)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a NumPy float32 array, got {type(out).__name__}")
    if out.dtype != np.float32:
        raise TypeError(f"out must have dtype float32, got {out.dtype}")
    if out.shape != tuple(shape):
        raise ValueError(f"out has shape {out.shape}; it must have x's shape {tuple(shape)}")
    if not (out.flags.c_contiguous and out.flags.writeable):
        raise ValueError("out must be a writeable C-contiguous array")
    if (isinstance(x, np.ndarray) and np.may_share_memory(out, x) and not
            (x.dtype == out.dtype and x.strides == out.strides
             and x.__array_interface__["data"][0] == out.__array_interface__["data"][0])):
        # the blocks are written while later ones are still being read
        raise ValueError("out overlaps x without being x itself (same memory, dtype and "
                         "layout); pass x itself or a separate array")


def _run(x, fmt, axis, rounding, compat, seed, *, want_codes, out=None):
    fmt = get(fmt)
    mode = _check_rounding(rounding, seed)
    seed = 0 if seed is None else int(seed)
    if compat not in COMPATS:
        raise ValueError(f"compat={compat!r} is not one of {COMPATS}")
    x = _as_float_array(x)
    ax = _check_axis(axis, x.ndim)
    if not isinstance(fmt, BlockFormat):
        if compat != "ocp":
            raise ValueError(f"compat={compat!r} applies to MX block formats, not {fmt.name!r}")
        codes = encode(x, fmt, rounding=rounding, seed=seed)
        if want_codes:
            return QTensor(codes, None, fmt, ax, x.shape)
        return _into(decode(codes, fmt), out)
    if compat == "microxcaling":
        if fmt.scaling != "mx":
            raise ValueError(f"compat='microxcaling' applies to MX formats, not {fmt.name!r}")
        if rounding not in _MICROXCALING_MODES:
            raise ValueError(f"compat='microxcaling' supports rounding {_MICROXCALING_MODES} "
                             f"(its 'even', 'nearest', 'floor'), not {rounding!r}")
        check_microxcaling_rule(fmt)
        x = x.astype(np.float32, copy=False)
    shape = x.shape
    x2, moved_shape = _rows(x.reshape(1) if x.ndim == 0 else x, ax)
    rows, L = x2.shape
    bs = L if fmt.block_size is None else fmt.block_size
    nblk = (L + bs - 1) // bs if bs else 0
    flat = x2.reshape(-1)
    elem = fmt.element
    is_int = isinstance(elem, IntFormat)
    codes = np.empty(flat.size if want_codes else 0, dtype=_code_dtype(elem.bits))
    # the kernels write straight into ``out`` when the quantized axis is already last
    direct = out is not None and (ax == x.ndim - 1 or x.ndim == 0)
    fake = (out.reshape(-1) if direct else
            np.empty(0 if want_codes else flat.size, dtype=np.float32))
    tensor_scale = None
    if fmt.scaling == "mx":
        scales = np.empty(rows * nblk if want_codes else 0, dtype=np.uint8)
        xb, shift, emask, fbias, absmask, special = _bits_view(flat)
        if is_int:
            m, emin, maxmag, mcm = 0, 0, float(elem.max_code), elem.max_code
        else:
            m, emin, maxmag, mcm = _float_params(elem)
        lo = elem.min_code if is_int else 0
        hi = elem.max_code if is_int else 0
        if flat.size:
            K.mx_quantize(flat, xb, rows, L, bs, codes, scales, fake, want_codes, shift, emask,
                          fbias, absmask, special, is_int, elem.bits, fmt.element_scale_exp, m,
                          emin, fmt.element_emax, maxmag, mcm, lo, hi, mode,
                          K.COMPAT_MX if compat == "microxcaling" else K.COMPAT_OCP, seed,
                          *scale_rule_params(fmt))
    elif fmt.scaling == "absmax":
        sdt = _SCALE_DTYPES.get(fmt.scale.name)
        if sdt is None:
            raise ValueError(f"absmax scales in {fmt.scale.name!r} are not supported; "
                             f"allowed: {sorted(_SCALE_DTYPES)}")
        scales64 = np.empty(rows * nblk if want_codes else 0, dtype=np.float64)
        s = fmt.scale
        if is_int:
            m, emin, bias, mcm = 0, 0, 0, 0
            elem_max, lo, hi = float(elem.max_code), elem.min_code, elem.max_code
        else:
            m, emin, bias, mcm = elem.mantissa_bits, elem.emin, elem.bias, elem.max_code
            elem_max, lo, hi = elem.max_normal, 0, 0
        if flat.size:
            K.absmax_quantize(flat, rows, L, bs, codes, scales64, fake, want_codes, is_int,
                              elem.bits, elem_max, lo, hi, m, emin, bias, mcm, s.mantissa_bits,
                              s.emin, s.max_normal, s.subnormals, mode, seed)
        scales = scales64.astype(sdt)
    else:  # nvfp4
        amax = K.finite_absmax(flat) if flat.size else 0.0
        with np.errstate(over="ignore"):
            if not np.isfinite(np.float32(amax)):  # float64 values that round to Inf
                # The recipe works on float32 values: a float64 input is rounded to float32
                # first, so a value beyond its range is an Inf there (its block is NaN) and
                # the tensor scale comes from the largest value that stays finite.
                a = np.abs(flat.astype(np.float32))
                a = a[np.isfinite(a)]
                amax = float(a.max()) if a.size else 0.0
            s_enc = np.float32(6.0 * 448.0) / np.float32(amax) if amax > 0 else np.float32(1.0)
        if not np.isfinite(s_enc):
            s_enc = np.float32(np.finfo(np.float32).max)
        tensor_scale = np.float32(s_enc)
        scales = np.empty(rows * nblk if want_codes else 0, dtype=np.uint8)
        if flat.size:
            K.nvfp4_quantize(flat, rows, L, bs, float(tensor_scale), codes, scales, fake,
                             want_codes, mode, seed)
    if not want_codes:
        if direct:
            return out
        y = fake.reshape(moved_shape)
        y = np.moveaxis(y, -1, ax) if x.ndim else y.reshape(())
        return _into(np.ascontiguousarray(y).reshape(shape), out)
    codes = np.moveaxis(codes.reshape(moved_shape), -1, ax)
    scale_shape = moved_shape[:-1] + (nblk,)
    scales = np.moveaxis(scales.reshape(scale_shape), -1, ax)
    return QTensor(np.ascontiguousarray(codes).reshape(shape), np.ascontiguousarray(scales), fmt,
                   ax, shape, tensor_scale=tensor_scale)


def check_microxcaling_rule(fmt: BlockFormat) -> None:
    if fmt.scale_rule != "floor":
        raise ValueError(f"compat='microxcaling' has its own floor(log2f) scale; "
                         f"scale_rule={fmt.scale_rule!r} is not allowed with it (only 'floor')")


def scale_rule_params(fmt: BlockFormat) -> tuple[int, int, float]:
    """(rule code, m, element_max) of an MX format's scale rule, for the kernels: m the
    element's fraction bits in its top binade (mantissa bits; bits - 2 for MX integers,
    whose codes are multiples of 2^(2-bits) below 2), element_max its largest value in
    units of the block scale."""
    elem = fmt.element
    if isinstance(elem, IntFormat):
        m = elem.bits - 2
        emax_val = elem.max_code * 2.0 ** fmt.element_scale_exp
    else:
        m, emax_val = elem.mantissa_bits, elem.max_normal
    return SCALE_RULES.index(fmt.scale_rule), m, emax_val


def _into(y: np.ndarray, out):
    if out is None:
        return y
    out[...] = y
    return out


# ---------------------------------------------------------------------------
# dequantize
# ---------------------------------------------------------------------------
def dequantize(q: QTensor) -> np.ndarray:
    """The float32 values a QTensor stands for."""
    if not isinstance(q, QTensor):
        raise TypeError(f"dequantize expects a QTensor, got {type(q).__name__}")
    q.validate()
    fmt = q.format
    if not isinstance(fmt, BlockFormat):
        return decode(q.codes, fmt)
    q.check_codes()
    ax = q.axis
    ndim = len(q.shape)
    codes = q.codes.reshape(1) if ndim == 0 else q.codes
    cm = np.ascontiguousarray(np.moveaxis(codes, ax, -1))
    moved_shape = cm.shape
    L = moved_shape[-1]
    rows = cm.size // L if L else 0
    bs = L if fmt.block_size is None else fmt.block_size
    flat = cm.reshape(-1)
    sm = np.ascontiguousarray(np.moveaxis(q.scales.reshape(q.scales.shape or (1,)), ax, -1)).reshape(-1)
    out = np.empty(flat.size, dtype=np.float32)
    if flat.size:
        if fmt.scaling == "mx":
            K.mx_dequantize(flat, sm, rows, L, bs, _elem_table(fmt), out)
        elif fmt.scaling == "absmax":
            K.scaled_dequantize(flat, sm.astype(np.float64), rows, L, bs, _elem_table(fmt), out)
        else:
            K.nvfp4_dequantize(flat, sm, rows, L, bs, float(q.tensor_scale),
                               decode_table(fmt.scale), decode_table(fmt.element), out)
    out = np.moveaxis(out.reshape(moved_shape), -1, ax)
    return np.ascontiguousarray(out).reshape(q.shape)


# ---------------------------------------------------------------------------
# element formats
# ---------------------------------------------------------------------------
def encode(values, elem_fmt, *, rounding: str = "rne", seed: int | None = None) -> np.ndarray:
    """Codes of ``values`` in an element format (uint8 for <= 8 bits, else uint16/uint32).

    Saturating formats clamp to +-max (Inf inputs too, unless the format has
    Inf); ``saturating=False`` follows IEEE overflow. NaN in a format without
    NaN is an error.
    """
    fmt = get(elem_fmt)
    if isinstance(fmt, BlockFormat):
        raise ValueError(f"encode takes an element format; {fmt.name!r} is a block format "
                         f"(use quantize)")
    mode = _check_rounding(rounding, seed)
    seed = 0 if seed is None else int(seed)
    x = _as_float_array(values)
    flat = np.ascontiguousarray(x).reshape(-1)
    codes = np.empty(flat.size, dtype=_code_dtype(fmt.bits))
    if isinstance(fmt, IntFormat):
        if flat.size and not np.isfinite(flat).all():
            bad = flat[~np.isfinite(flat)][0]
            raise ValueError(f"{bad} cannot be encoded in integer format {fmt.name!r}")
        if flat.size:
            K.element_encode(flat, codes, True, fmt.bits, 0, 0, 0, 0.0, 0, True, True, False, 0,
                             0, fmt.min_code, fmt.max_code, mode, seed)
        return codes.reshape(x.shape)
    if not fmt.has_nan and flat.size and np.isnan(flat).any():
        raise ValueError(f"NaN cannot be encoded in {fmt.name!r}, which has no NaN")
    if not fmt.signed and flat.size and (np.signbit(flat) & (flat != 0)).any():
        bad = flat[np.signbit(flat) & (flat != 0)][0]
        raise ValueError(f"{bad} cannot be encoded in unsigned format {fmt.name!r}")
    sign_bits = fmt.bits if fmt.signed else fmt.bits + 1  # unsigned: the sign bit falls off
    if flat.size:
        tmp = np.empty(flat.size, dtype=np.int64)
        K.element_encode(flat, tmp, False, sign_bits, fmt.mantissa_bits, fmt.emin, fmt.bias,
                         fmt.max_normal, fmt.max_code, fmt.subnormals, fmt.saturating,
                         fmt.has_inf, fmt.nan_code, fmt.inf_code, 0, 0, mode, seed)
        if not fmt.signed:
            tmp &= (1 << fmt.bits) - 1
        if fmt.specials == "fnuz":
            # no -0: a zero result of either sign is code 0 (the kernel wrote the -0
            # code, which is the NaN here; an overflow to NaN has |x| > max_normal)
            tmp[(tmp == fmt.nan_code) & (np.abs(flat) < fmt.max_normal)] = 0
        codes[:] = tmp
    return codes.reshape(x.shape)


def decode(codes, elem_fmt) -> np.ndarray:
    """float32 values of element codes."""
    fmt = get(elem_fmt)
    if isinstance(fmt, BlockFormat):
        raise ValueError(f"decode takes an element format; {fmt.name!r} is a block format "
                         f"(use dequantize)")
    c = np.asarray(codes)
    if c.dtype.kind not in "ui":
        raise TypeError(f"codes must be an unsigned integer array, got dtype {c.dtype}")
    if c.size and (c.min() < 0 or int(c.max()) >= 1 << fmt.bits):
        raise ValueError(f"codes must lie in 0..{(1 << fmt.bits) - 1} for {fmt.name!r}")
    if fmt.bits > 16:
        # Too wide for a table: FP32 is its own bit pattern; any other wide float
        # (TF32's 19 bits: sign, 8 exponent, 10 mantissa) is read from its fields.
        if (fmt.exponent_bits, fmt.mantissa_bits, fmt.bias, fmt.specials, fmt.signed) == \
                (8, 23, 127, "ieee", True):
            return c.astype(np.uint32).view(np.float32).copy()
        flat = np.ascontiguousarray(c).reshape(-1).astype(np.int64)
        return _float_field_values(flat, fmt).astype(np.float32).reshape(c.shape)
    flat = np.ascontiguousarray(c).reshape(-1).astype(np.int64)
    out = np.empty(flat.size, dtype=np.float32)
    if flat.size:
        K.table_decode(flat, decode_table(fmt), out)
    return out.reshape(c.shape)
