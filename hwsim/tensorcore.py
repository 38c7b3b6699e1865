"""Bit-exact models of GPU matrix units (NVIDIA tensor cores, V100 to B200).

One generic block-FMA model; each GPU is a preset of its parameters (``tensor_core``).
The model and the parameter values are those of Khattak and Mikaitis, measured on the
hardware and validated bit for bit against it:

* F. A. Khattak and M. Mikaitis, "Generalized Methodology for Determining Numerical
  Features of Hardware Floating-Point Matrix Multipliers: Part I", IEEE HPEC 2025;
* F. A. Khattak and M. Mikaitis, "Accurate Models of NVIDIA Tensor Cores",
  arXiv:2512.07004;
* the public MATLAB model north-numerical-computing/MATLAB-tensor-core (``models/*TC.m``
  hold the per-GPU parameters, ``models/tools/Generic_BFMA_TC.m`` the generic unit).

The arithmetic (gemmlowp style)
-------------------------------
One operation of the unit takes ``n = fma_size`` products and an addend::

    d = TC(a[0:n], b[0:n], c)

Inputs. ``a_k`` and ``b_k`` are values of the input format (p = its mantissa bits,
emin_in = its smallest normal exponent). Each is an integer significand times a power of
two, with the exponent clamped at emin_in (a subnormal keeps emin_in and a significand
below 2^p)::

    a_k = A_k * 2^(ea_k - p),   ea_k = max(floor(log2|a_k|), emin_in),   |A_k| < 2^(p+1)

Products, exact and denormalized. ``P_k = A_k * B_k`` is exact (|P_k| < 2^(2p+2), a
significand in [0, 4) with 2p fraction bits) at exponent ``E_k = ea_k + eb_k``; it is *not*
normalized (a product in [2, 4) keeps its exponent: ``products_denormalized``). Zero
products take no part. The addend ``c`` is read as an FP32 number (an FP16 addend is
exact in FP32): ``c = C * 2^(Ec - 23)``, ``Ec = max(floor(log2|c|), -126)``, ``|C| < 2^24``.

Alignment to the largest exponent, with truncation. The anchor is the largest exponent
among the nonzero products and a nonzero addend, no lower than ``min_anchor_exponent``::

    X = max(E_0, ..., E_{n-1}, Ec, min_anchor_exponent)

Every term is truncated (toward zero: its magnitude's bits are shifted out) to a multiple
of the alignment unit ``u = 2^(X - F)``, where ``F = 23 + extra_alignment_bits`` is the
number of fraction bits the adder keeps below the anchor's units bit (FP32's 23, plus
the extra bits; negative on Hopper / Ada FP8)::

    T_k = sign(P_k) * floor(|P_k| * 2^(E_k - 2p) / u)          (an integer)
    T_c = sign(c)   * floor(|C|   * 2^(Ec - 23)  / u)

With ``sticky_bit`` each term gets one more bit below u holding the OR of the bits it
lost (u halves). The adder is exact on these integers (it has the carry bits:
|sum| < (n + 1) * 2^(F + 2)), so there is one fused sum and no intermediate rounding::

    S = T_c + sum_k T_k,            exact value  S * u

Final normalization and rounding. ``S * u`` is normalized and rounded once to the output
format with ``result_mantissa_bits`` fraction bits (``rounding``: "rtz" toward zero,
"rne" to nearest even), with the output's subnormals (quantum 2^(emin_out - m)) and
overflow to +-Inf when the rounded exponent exceeds the output's emax. ``S = 0`` gives
+0. The FP32 output of Hopper and Ada FP8 keeps 13 fraction bits (14 significant bits,
DeepSeek-V3's "about 14 bits" on H800).

Grouping. No interleaving or grouping parameter: the public model's notes describe the
Hopper FP8 operation as two 16-product halves joined in an interleaved pattern, yet the
measured H100 outputs (and its current parameters) are one 32-product operation as above;
the measured sets here need nothing else.

Long dot products, chunk by chunk (the recursive summation of the MATLAB model)::

    D_0 = c,   D_{j+1} = TC(a[jn:(j+1)n], b[jn:(j+1)n], D_j),   d = D_{ceil(K/n)}

(a shorter last chunk is padded with zero products, which take no part).

Specials. A row holding a NaN or Inf input (or addend) gives the IEEE float64 value of
``c + sum_k a_k * b_k`` (NaN for Inf * 0 and Inf - Inf, else +-Inf), as the MATLAB model's
pre-check does; a running ``D_j`` that overflowed to +-Inf stays +-Inf (Inf plus finite
products), and FP32 promotion adds it as IEEE does.

Paths. ``TensorCore.dot`` and ``hwsim.matmul(..., inter_block=tc)`` run plain ``njit``
kernels, rows split over ``numba.get_num_threads()`` threads (the bits do not depend on
the thread count). Each truncated term is formed as ``int(a_k * b_k * 2^(F - X))``: the
product is exact in float64 (in FP32 for FP8 and FP16 inputs, whose products have at most
22 significant bits and exponents in [-48, 32]), the scaling by a power of two is exact,
and the conversion truncates toward zero; the integer sum is exact. The measured units'
case (unnormalized products, no sticky bit) runs batches of independent chains (rows of a
dot, columns of a GEMM row) one step at a time, so the out-of-order core overlaps them;
``dot`` takes each chunk's anchor straight from the FP32 bit patterns, checking the values
on the way, and a row holding anything else (a value outside the format, NaN, Inf) is
decoded again on a careful path that names it. A GEMM on FP8 / FP16 elements multiplies
the unscaled elements and folds each chunk's two block scales into its anchor and scale.
The tests compare every path bit for bit with a Python ``Fraction`` reference and with
the GPUs' measured outputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
from numba import njit

import numfmt
from numfmt._kernels import f64_bits, f64_from_bits
from numfmt.formats import FloatFormat

__all__ = ["TensorCore", "tensor_core", "GPUS", "INPUTS", "OUTPUTS", "ROUNDINGS",
           "preset_table", "round_to_input", "decode_operand", "matmul_tensorcore"]

GPUS = ("V100", "A100", "A2", "A30", "L40S", "H100", "H200", "B200")
GPU_ALIASES = {"ADA": "L40S"}
INPUTS = ("fp16", "bf16", "tf32", "fp8_e4m3", "fp8_e5m2")
OUTPUTS = ("fp32", "fp16")
ROUNDINGS = ("rtz", "rne")
_NEG_EXP = -(1 << 24)  # exponent given to zero elements: below any anchor


@dataclass(frozen=True)
class TensorCore:
    """A block-FMA matrix unit (module docstring has the arithmetic).

    ``gpu``, ``input_format``, ``output_format``: what the unit is (numfmt names; the
    output is the format of the addend C and the result D, "fp32" or "fp16").
    """

    gpu: str
    input_format: str
    output_format: str = "fp32"
    fma_size: int = 4
    """Products fused in one operation: summed with one alignment and one rounding."""
    extra_alignment_bits: int = 0
    """Bits the aligned adder keeps below the anchor beyond FP32's 23 fraction bits
    (F = 23 + this). Negative: fewer than FP32 (-10 on Hopper / Ada FP8: 13 bits)."""
    rounding: str = "rtz"
    """Final rounding of the fused sum: "rtz" (toward zero; FP32 output on the measured
    GPUs) or "rne" (to nearest, ties to even; FP16 output)."""
    result_mantissa_bits: int | None = None
    """Fraction bits of the result register; None means the output format's (23 / 10).
    13 for FP32 output of Hopper / Ada FP8 (the result is truncated to 14 significant
    bits)."""
    sticky_bit: bool = False
    """Each aligned term keeps one sticky bit (OR of the bits shifted out) below the
    alignment unit. False on every measured NVIDIA unit: shifted-out bits are lost."""
    products_denormalized: bool = True
    """Products are exact and kept unnormalized (significand in [0, 4) at exponent
    ea + eb), so the alignment anchor is the largest ea + eb. False normalizes a product
    in [2, 4) first (exponent + 1), moving the anchor and the truncation point up a bit."""
    min_anchor_exponent: int | None = None
    """Lowest alignment anchor: X = max(exponents, this). -133 for FP32 output on Hopper
    and Blackwell, -15 for B200 FP16 output; None: no limit."""
    subnormal_inputs: bool = True
    """Subnormal inputs are used as they are; False flushes them to zero."""
    subnormal_outputs: bool = True
    """Subnormal addends and results are kept; False flushes them to zero."""
    source: str = ""
    """Where the parameter values come from."""

    def __post_init__(self) -> None:
        for name in ("fma_size", "extra_alignment_bits"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"TensorCore {name} must be an int, got {v!r}")
        if self.fma_size < 1:
            raise ValueError(f"TensorCore fma_size={self.fma_size} is not allowed; it must be "
                             f">= 1 (products fused per operation)")
        if self.input_format not in INPUTS:
            raise ValueError(f"unknown input format {self.input_format!r}; known: "
                             f"{', '.join(INPUTS)}")
        if self.output_format not in OUTPUTS:
            raise ValueError(f"unknown output format {self.output_format!r}; known: "
                             f"{', '.join(OUTPUTS)}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"TensorCore rounding={self.rounding!r} is not one of {ROUNDINGS}")
        if not -22 <= self.extra_alignment_bits <= 24:
            raise ValueError(f"TensorCore extra_alignment_bits={self.extra_alignment_bits} is "
                             f"out of range; allowed -22..24 (1..47 fraction bits)")
        if self.aligned_sum_bits > 53:
            raise ValueError(f"an aligned sum of {self.fma_size} products with "
                             f"{self.alignment_bits} fraction bits needs {self.aligned_sum_bits} "
                             f"bits; the model holds at most 53 (use a smaller fma_size)")
        rm = self.result_mantissa_bits
        if rm is not None:
            if isinstance(rm, bool) or not isinstance(rm, (int, np.integer)):
                raise TypeError(f"TensorCore result_mantissa_bits must be an int or None, "
                                f"got {rm!r}")
            full = self.output.mantissa_bits
            if not 1 <= rm <= full:
                raise ValueError(f"result_mantissa_bits={rm} is not allowed for "
                                 f"{self.output_format} output; allowed 1..{full}")
        ma = self.min_anchor_exponent
        if ma is not None:
            if isinstance(ma, bool) or not isinstance(ma, (int, np.integer)):
                raise TypeError(f"TensorCore min_anchor_exponent must be an int or None, "
                                f"got {ma!r}")
            if not -600 <= ma <= 600:
                raise ValueError(f"TensorCore min_anchor_exponent={ma} is out of range; "
                                 f"allowed -600..600 (or None)")

    # --- derived values (never typed in twice) ---------------------------------------
    @property
    def input(self) -> FloatFormat:
        """The numfmt input format."""
        return numfmt.get(self.input_format)

    @property
    def output(self) -> FloatFormat:
        """The numfmt output format (of C and D)."""
        return numfmt.get(self.output_format)

    @property
    def alignment_bits(self) -> int:
        """F: fraction bits kept below the anchor's units bit (23 + extra_alignment_bits)."""
        return 23 + int(self.extra_alignment_bits)

    @property
    def carry_bits(self) -> int:
        """Carry bits above a product's 2 integer bits that an exact adder of fma_size
        products and the addend needs; the model's adder has them (no measured unit lost
        a carry in the validation sets)."""
        return math.ceil(math.log2(self.fma_size + 1))

    @property
    def aligned_sum_bits(self) -> int:
        """Magnitude bits of the widest aligned sum: F + 2 integer bits + carries + sticky."""
        return self.alignment_bits + 2 + self.carry_bits + int(self.sticky_bit)

    @property
    def output_mantissa_bits(self) -> int:
        """Fraction bits of the rounded result."""
        rm = self.result_mantissa_bits
        return self.output.mantissa_bits if rm is None else int(rm)

    @property
    def significant_bits(self) -> int:
        """Significant bits of one operation's result (implicit bit included)."""
        return self.output_mantissa_bits + 1

    def describe(self) -> dict:
        """The parameters and the derived widths as a plain dict (for tables and JSON)."""
        return {"gpu": self.gpu, "inputs": self.input_format, "output": self.output_format,
                "fma_size": int(self.fma_size),
                "extra_alignment_bits": int(self.extra_alignment_bits),
                "alignment_bits": self.alignment_bits, "rounding": self.rounding,
                "result_mantissa_bits": self.output_mantissa_bits,
                "sticky_bit": bool(self.sticky_bit),
                "products_denormalized": bool(self.products_denormalized),
                "min_anchor_exponent": self.min_anchor_exponent,
                "carry_bits": self.carry_bits, "source": self.source}

    # --- the operation -------------------------------------------------------------
    def dot(self, a, b, c=None, *, promote_every: int | None = None) -> np.ndarray:
        """The n inner products ``d_i = c_i + sum_k a[i, k] * b[i, k]`` as the unit
        computes them (chunks of ``fma_size``, recursively accumulated).

        ``a``, ``b``: (n, K) float arrays of values of the input format; ``c``: (n,)
        values of the output format (None: zeros). Returns float32 (n,) (an FP16 result
        as its float32 value). ``promote_every=N`` (a multiple of fma_size) adds the
        unit's partial sum into a separate FP32 register (RNE) every N products and
        restarts it from +0 (DeepSeek-V3's promotion); ``c`` then starts that register.
        """
        A, B, C = _check_dot_args(self, a, b, c)
        n, K = A.shape
        promote = _check_promote(self, promote_every)
        out = np.zeros(n, dtype=np.float32)
        if n == 0:
            return out
        if not self.subnormal_outputs and not promote:  # c enters the unit
            C = np.where(np.abs(C) < self.output.min_normal, 0.0, C)
        if K == 0:  # no products: d = c
            out[:] = C
            return out
        # one byte of status per row (no per-call arrays of int64: fresh large arrays
        # page-fault, a cost here comparable with the arithmetic); the kernel writes
        # float32: every result is an FP32 (or FP16) value, or +-Inf
        status = np.empty(n, dtype=np.int8)
        _split(_dot_rows, n, A, A.view(np.int32), B, B.view(np.int32), C, status,
               *_decode_params(self), *_kernel_params(self), promote, _sum_width(self),
               _products_f32(self), out)
        special = None
        if status.any():
            _raise_bad_row(A, status & 2, self.input, "a")
            _raise_bad_row(B, status & 4, self.input, "b")
            special = (status & 1) != 0
        if c is not None:
            special = ~np.isfinite(C) if special is None else special | ~np.isfinite(C)
        if special is not None and special.any():
            out[special] = _ieee_rows(A[special], B[special], C[special])
        return out


# ---------------------------------------------------------------------------
# presets
# ---------------------------------------------------------------------------
_SRC = "north-numerical-computing/MATLAB-tensor-core models/"
_SRC_PAPER = "; Khattak & Mikaitis, arXiv:2512.07004"

# (fma_size, extra_alignment_bits) per architecture and input format, from the public
# model's per-GPU files; result_mantissa_bits = 23 + extra bits when FP32 output gets fewer.
_ARCH = {
    "volta": {"fp16": (4, 0)},
    "ampere": {"fp16": (8, 1), "bf16": (8, 1), "tf32": (4, 1)},
    "ada": {"fp16": (8, 1), "bf16": (8, 1), "tf32": (4, 1), "fp8_e4m3": (16, -10),
            "fp8_e5m2": (16, -10)},
    "hopper": {"fp16": (16, 2), "bf16": (16, 2), "tf32": (8, 2), "fp8_e4m3": (32, -10),
               "fp8_e5m2": (32, -10)},
    "blackwell": {"fp16": (16, 2), "bf16": (16, 2), "tf32": (8, 2), "fp8_e4m3": (32, 2),
                  "fp8_e5m2": (32, 2)},
}
_GPU_ARCH = {"V100": ("volta", "V100TC.m"), "A100": ("ampere", "A100TC.m"),
             "A2": ("ampere", "A2TC.m (calls A100TC)"),
             "A30": ("ampere", "A30TC.m (calls A100TC)"),
             "L40S": ("ada", "L40STC.m, AdaTC.m"), "H100": ("hopper", "H100TC.m"),
             "H200": ("hopper", "H100TC.m (H200 is the same GH100 silicon)"),
             "B200": ("blackwell", "B200TC.m")}
# FP16 output exists for FP16 inputs and (Ada, Hopper) FP8 inputs; BF16 and TF32 units
# accumulate in FP32 only; the public B200 model computes FP8 with FP32 output only.
_FP16_OUT = {"volta": ("fp16",), "ampere": ("fp16",), "ada": ("fp16", "fp8_e4m3", "fp8_e5m2"),
             "hopper": ("fp16", "fp8_e4m3", "fp8_e5m2"), "blackwell": ("fp16",)}


def _canonical_gpu(gpu) -> str:
    if not isinstance(gpu, str):
        raise TypeError(f"gpu must be a name, got {type(gpu).__name__}")
    key = gpu.strip().upper()
    key = GPU_ALIASES.get(key, key)
    if key not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; known: {', '.join(GPUS)} (alias: Ada = L40S)")
    return key


def tensor_core(gpu: str, inputs: str = "fp16", output: str = "fp32") -> TensorCore:
    """The preset for ``gpu`` (V100, A100, A2, A30, L40S / Ada, H100, H200, B200) with
    ``inputs`` (fp16, bf16, tf32, fp8_e4m3, fp8_e5m2) and ``output`` (fp32, fp16)."""
    name = _canonical_gpu(gpu)
    if not isinstance(inputs, str) or inputs.strip().lower() not in INPUTS:
        raise ValueError(f"unknown input format {inputs!r}; known: {', '.join(INPUTS)}")
    if not isinstance(output, str) or output.strip().lower() not in OUTPUTS:
        raise ValueError(f"unknown output format {output!r}; known: {', '.join(OUTPUTS)}")
    inputs, output = inputs.strip().lower(), output.strip().lower()
    arch, src = _GPU_ARCH[name]
    table = _ARCH[arch]
    if inputs not in table:
        raise ValueError(f"{name} tensor cores do not take {inputs} inputs; they take "
                         f"{', '.join(table)}")
    if output == "fp16" and inputs not in _FP16_OUT[arch]:
        raise ValueError(f"{name} with {inputs} inputs has no fp16 output; fp16 output exists "
                         f"for {', '.join(_FP16_OUT[arch])} inputs")
    fma, extra = table[inputs]
    result_bits = 23 + extra if (output == "fp32" and extra < 0) else None
    rounding = "rne" if output == "fp16" else "rtz"
    if arch in ("hopper", "blackwell"):
        min_anchor = -15 if (arch == "blackwell" and output == "fp16") else -133
    else:
        min_anchor = None
    return TensorCore(gpu=name, input_format=inputs, output_format=output, fma_size=fma,
                      extra_alignment_bits=extra, rounding=rounding,
                      result_mantissa_bits=result_bits, min_anchor_exponent=min_anchor,
                      source=_SRC + src + _SRC_PAPER)


def preset_table() -> list[TensorCore]:
    """Every (GPU, inputs, output) preset, in GPUS x INPUTS x OUTPUTS order."""
    out = []
    for g in GPUS:
        for i in INPUTS:
            for o in OUTPUTS:
                try:
                    out.append(tensor_core(g, i, o))
                except ValueError:
                    continue
    return out


# ---------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------
def _as_2d(x, name: str) -> np.ndarray:
    if isinstance(x, np.ndarray):
        arr = x
    else:
        try:
            import torch
            if isinstance(x, torch.Tensor):
                x = x.detach().cpu().numpy()
        except ImportError:  # torch is optional here
            pass
        arr = np.asarray(x)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a float array, got dtype {arr.dtype}")
    return arr.astype(np.float64, copy=False)


def first_unrepresentable(x: np.ndarray, fmt: FloatFormat):
    """Index (tuple) and value of the first element of ``x`` (float64) that is not a value
    of ``fmt`` (NaN counts only if the format has NaN, +-Inf only if it has Inf), or None."""
    flat = x.reshape(-1)
    fin = np.isfinite(flat)
    ok = np.ones(flat.shape, dtype=bool)
    nonfin = ~fin
    if nonfin.any():
        isnan = np.isnan(flat)
        ok &= ~(isnan & (not fmt.has_nan))
        ok &= ~(np.isinf(flat) & (not fmt.has_inf))
    v = np.where(fin, flat, 0.0)
    mag = np.abs(v)
    _, ex = np.frexp(mag)
    e = np.maximum(ex.astype(np.int64) - 1, fmt.emin)
    scaled = np.ldexp(mag, (fmt.mantissa_bits - e).astype(np.int32))
    ok &= ~fin | ((scaled == np.floor(scaled)) & (mag <= fmt.max_normal))
    if ok.all():
        return None
    i = int(np.argmin(ok))
    return np.unravel_index(i, x.shape), float(flat[i])


def _check_values(x: np.ndarray, fmt: FloatFormat, name: str) -> None:
    bad = first_unrepresentable(x, fmt)
    if bad is not None:
        idx, val = bad
        where = ", ".join(str(int(i)) for i in idx)
        raise ValueError(f"{name}[{where}] = {val!r} is not representable in {fmt.name}; "
                         f"{name} must hold values of the unit's {fmt.name} format")


def _as_values(x, name: str, fmt: FloatFormat) -> np.ndarray:
    """x as a C-contiguous float32 array (every input format is a subset of FP32); a value
    that float32 cannot hold is not one of ``fmt``'s: ValueError naming it."""
    if isinstance(x, np.ndarray) and x.dtype == np.float32:
        return np.ascontiguousarray(x)
    arr = _as_2d(x, name)
    a32 = arr.astype(np.float32)
    with np.errstate(invalid="ignore"):
        same = (a32 == arr) | (np.isnan(a32) & np.isnan(arr))
    if not same.all():
        _check_values(arr, fmt, name)
    return np.ascontiguousarray(a32)


def _check_dot_args(tc: TensorCore, a, b, c):
    A = _as_values(a, "a", tc.input)
    B = _as_values(b, "b", tc.input)
    if A.ndim != 2 or B.ndim != 2:
        raise ValueError(f"a and b must be 2-D (n, K); got shapes {A.shape} and {B.shape}")
    if A.shape != B.shape:
        raise ValueError(f"a is {A.shape} and b is {B.shape}: they must have the same "
                         f"shape (n, K)")
    n = A.shape[0]
    if c is None:
        return A, B, np.zeros(n, dtype=np.float64)
    C = np.ascontiguousarray(_as_2d(c, "c"))
    if C.shape != (n,):
        raise ValueError(f"c has shape {C.shape}; it must be ({n},), one addend per row "
                         f"of a {A.shape}")
    _check_values(C, tc.output, "c")
    return A, B, C


def _check_promote(tc: TensorCore, promote_every) -> int:
    if promote_every is None:
        return 0
    if isinstance(promote_every, bool) or not isinstance(promote_every, (int, np.integer)):
        raise TypeError(f"promote_every must be an int or None, got {promote_every!r}")
    if promote_every < 1 or promote_every % tc.fma_size:
        raise ValueError(f"promote_every={promote_every} is not allowed; it must be a positive "
                         f"multiple of the unit's fma_size {tc.fma_size}")
    return int(promote_every)


def _raise_bad_row(x: np.ndarray, rows: np.ndarray, fmt: FloatFormat, name: str) -> None:
    """ValueError naming the first value of ``x`` (row-major) that is not one of ``fmt``'s,
    in the first row where ``rows`` is nonzero (none: nothing to raise)."""
    hit = np.flatnonzero(rows)
    if hit.size:
        i = int(hit[0])
        (j,), val = first_unrepresentable(x[i], fmt)
        raise ValueError(f"{name}[{i}, {int(j)}] = {val!r} is not representable in "
                         f"{fmt.name}; {name} must hold values of the unit's {fmt.name} "
                         f"format")


def _raise_bad(x: np.ndarray, bad: np.ndarray, fmt: FloatFormat, name: str) -> None:
    rows = np.nonzero(bad >= 0)[0]
    if rows.size:
        i = int(rows[0])
        j = int(bad[i])
        where = ", ".join(str(int(t)) for t in np.unravel_index(i * x.shape[1] + j, x.shape))
        raise ValueError(f"{name}[{where}] = {float(x[i, j])!r} is not representable in "
                         f"{fmt.name}; {name} must hold values of the unit's {fmt.name} format")


# ---------------------------------------------------------------------------
# decoding: values -> (integer significand, exponent), checking representability
# ---------------------------------------------------------------------------
def _decode_params(tc: TensorCore):
    """(p, emin, bits of max_normal, subnormal inputs, NaN allowed, Inf allowed), as the
    kernels take them (int32 / bool)."""
    fmt = tc.input
    maxbits = int(np.float32(fmt.max_normal).view(np.int32))
    return (np.int32(fmt.mantissa_bits), np.int32(fmt.emin), np.int32(maxbits),
            bool(tc.subnormal_inputs), bool(fmt.has_nan), bool(fmt.has_inf))


def decode_operand(x: np.ndarray, tc: TensorCore, exp_offset: np.ndarray | None = None,
                   name: str = "x"):
    """Values and exponents of input-format values (2-D) as the unit sees them:
    ``x = M * 2^(e - p)`` with ``e = max(floor(log2|x|), emin_in)``, plus ``exp_offset``
    (a power-of-two scale folded into the exponent). Returns float64 ``V = M *
    2^(e + offset - p)`` (exact), int32 ``e + offset`` and the rows holding a NaN or
    Inf. A zero, a flushed subnormal, a NaN or an Inf has V = 0 and e = -2^24 (below any
    anchor). A value that is not one of the input format's raises ValueError naming the
    first one (row-major) and its index."""
    x = np.ascontiguousarray(x, dtype=np.float32)  # one kernel signature: input formats
    V = np.empty(x.shape, dtype=np.float64)        # are all subsets of FP32
    E = np.empty(x.shape, dtype=np.int32)
    bad = np.empty(x.shape[0], dtype=np.int64)
    spec = np.empty(x.shape[0], dtype=np.bool_)
    off = (np.zeros((1, 1), dtype=np.int32) if exp_offset is None
           else np.ascontiguousarray(exp_offset, dtype=np.int32))
    _split(_decode, x.shape[0], x, x.view(np.int32), V, E, bad, spec, *_decode_params(tc),
           off, exp_offset is not None)
    _raise_bad(x, bad, tc.input, name)
    return V, E, spec


_JIT = dict(cache=True, nogil=True, fastmath=False, error_model="numpy")
_POOL: list = []


def _split(kernel, n: int, *args) -> None:
    """Run ``kernel(start, stop, *args)`` over [0, n) in numba.get_num_threads() contiguous
    pieces on worker threads (the kernels release the GIL; each output element is written
    by one piece, so the bits do not depend on the thread count). Plain njit kernels
    compile several times faster than parallel=True ones."""
    threads = max(1, min(numba.get_num_threads(), n))
    if threads == 1:
        kernel(0, n, *args)
        return
    if not _POOL or _POOL[0]._max_workers < threads:
        from concurrent.futures import ThreadPoolExecutor
        _POOL[:] = [ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tensorcore")]
    step = -(-n // threads)
    futs = [_POOL[0].submit(kernel, i, min(i + step, n), *args) for i in range(step, n, step)]
    kernel(0, min(step, n), *args)  # the calling thread takes the first piece
    for f in futs:
        f.result()


_MASK52 = (1 << 52) - 1
_I32 = np.int32
_NEG32 = np.int32(_NEG_EXP)


@njit(inline="always", **_JIT)
def _exp_and_lost(mag, lo, sh0):
    """For an FP32 magnitude ``mag`` (int32 bits) read as a value of a format with p
    fraction bits and smallest normal exponent emin (``lo = emin + 127``, ``sh0 = 23 - p``):
    (its biased clamped exponent ``max(be, lo)``, the FP32 significand bits below the
    format's quantum 2^(ec - p)): nonzero when the value is not one of the format's (sh =
    ec - max(be, 1) + sh0 low bits of the magnitude; from 24 on they reach the exponent
    field, which is right: such a nonzero value is below the smallest subnormal). Every
    intermediate is wrapped in int32: Numba types int32 arithmetic as int64, and the
    wrappers let LLVM keep twice the lanes (2x measured)."""
    be = _I32(mag >> _I32(23))                 # biased FP32 exponent; 0: FP32 subnormal
    ea = _I32(max(be, lo))
    sh = _I32(min(_I32(_I32(ea - _I32(max(be, _I32(1)))) + sh0), _I32(31)))
    return ea, _I32(mag & _I32(_I32(_I32(1) << sh) - _I32(1)))


@njit(inline="always", **_JIT)
def _decode_one(xb, p, emin, maxbits, subnormals, has_nan, has_inf):
    """One element from its FP32 bits ``xb`` (int32): (kept, exponent e, bad, NaN / Inf).
    ``v = M * 2^(e - p)`` with ``e = max(floor(log2|v|), emin)``; v is a value of the
    format iff its FP32 significand has no bits below 2^(e - p) (_exp_and_lost) and
    |v| <= max_normal (or it is a NaN / an Inf the format has). Branch-free integer
    selects only (bad and NaN / Inf come back as int32 0 / 1 to be OR-ed), so the row
    loops vectorize."""
    mag = _I32(xb & _I32(0x7FFFFFFF))
    ea, lost = _exp_and_lost(mag, _I32(emin + 127), _I32(23 - p))
    ec = _I32(ea - _I32(127))
    exact = lost == _I32(0)
    fin = mag <= maxbits                       # False for NaN, Inf and beyond the format
    nz = mag != _I32(0)
    special_ok = ((mag > _I32(0x7F800000)) & has_nan) | ((mag == _I32(0x7F800000)) & has_inf)
    ok = (~nz) | (fin & exact) | ((~fin) & special_ok)
    normal = _I32(mag >> _I32(23)) >= _I32(emin + 127)  # a normal of the format
    keep = nz & fin & exact & (subnormals | normal)
    return keep, ec, _I32(0) if ok else _I32(1), _I32(0) if fin else _I32(1)


@njit(inline="always", **_JIT)
def _decode_row(x, xb, V, E, p, emin, maxbits, subnormals, has_nan, has_inf, off, use_off):
    """Decode one row (values x, their FP32 bits xb) into V (float64, 0 when not kept) and
    E (int32, -2^24 when not kept); returns (first bad column or -1, row holds a NaN /
    Inf). The row loop has integer reductions only, so it vectorizes."""
    bad = _I32(0)
    special = _I32(0)
    if use_off:  # two loops: a runtime flag inside one kept it from vectorizing
        for k in range(x.shape[0]):
            keep, ec, b, s = _decode_one(xb[k], p, emin, maxbits, subnormals, has_nan, has_inf)
            bad |= b
            special |= s
            o = _I32(off[k])
            # 2^o from its bits (|o| <= 127: an E8M0 scale): the scaling is exact
            V[k] = (np.float64(x[k]) * f64_from_bits((np.int64(1023) + o) << 52)) if keep else 0.0
            E[k] = (ec + o) if keep else _NEG32
    else:
        for k in range(x.shape[0]):
            keep, ec, b, s = _decode_one(xb[k], p, emin, maxbits, subnormals, has_nan, has_inf)
            bad |= b
            special |= s
            V[k] = np.float64(x[k]) if keep else 0.0
            E[k] = ec if keep else _NEG32
    if bad == 0:
        return -1, special != 0
    for k in range(x.shape[0]):  # the first bad one, for the error message
        if _decode_one(xb[k], p, emin, maxbits, subnormals, has_nan, has_inf)[2] != 0:
            return k, special != 0
    return -1, special != 0


@njit(**_JIT)
def _decode(r0, r1, x, xb, V, E, bad, spec, p, emin, maxbits, subnormals, has_nan, has_inf,
            off, use_off):
    for i in range(r0, r1):
        bad[i], spec[i] = _decode_row(x[i], xb[i], V[i], E[i], p, emin, maxbits, subnormals,
                                      has_nan, has_inf, off[i] if use_off else off[0],
                                      use_off)


# ---------------------------------------------------------------------------
# the block-FMA kernel
# ---------------------------------------------------------------------------
def _kernel_params(tc: TensorCore):
    out = tc.output
    return (tc.alignment_bits, tc.output_mantissa_bits, out.emin, out.emax,
            tc.rounding == "rne", bool(tc.sticky_bit), bool(tc.products_denormalized),
            -(1 << 30) if tc.min_anchor_exponent is None else int(tc.min_anchor_exponent),
            bool(tc.subnormal_outputs), int(tc.fma_size))


@njit(inline="always", **_JIT)
def _bitlen(a):
    """Bits of a positive int64 below 2^53 (exact through float64)."""
    return ((f64_bits(np.float64(a)) >> 52) & 0x7FF) - 1022


@njit(inline="always", **_JIT)
def _round_q(S, lsb, m_out, emin, emax, rne, out_sub):
    """S * 2^lsb (|S| < 2^53) rounded to m_out fraction bits in [emin, emax] with
    subnormals: returns (negative, q, qe, overflow) with the value (-1)^neg * q * 2^qe."""
    if S == 0:
        return False, np.int64(0), np.int64(0), False
    neg = S < 0
    A = -S if neg else S
    e = _bitlen(A) - 1 + lsb
    if e < emin:
        e = emin
    qe = e - m_out
    sh = qe - lsb
    if sh <= 0:
        q = A
        qe = lsb
    elif sh >= 62:
        q = np.int64(0)
    else:
        q = A >> sh
        if rne:
            rem = A - (q << sh)
            half = np.int64(1) << (sh - 1)
            if rem > half or (rem == half and (q & 1) == 1):
                q += 1
    if q == 0:
        return neg, q, qe, False
    top = _bitlen(q) - 1 + qe
    if top > emax:
        return neg, q, qe, True
    if not out_sub and top < emin:
        return neg, np.int64(0), qe, False
    return neg, q, qe, False


@njit(inline="always", **_JIT)
def _anchor(va, ea, vb, eb, k0, k1, denorm):
    """Largest product exponent ea + eb over products k0..k1-1 (zeros sit below -2^24);
    with normalized products, + 1 for a product of magnitude >= 2^(ea + eb + 1)."""
    X = np.int64(-(1 << 40))
    if denorm:
        for k in range(k0, k1):
            X = max(X, np.int64(ea[k]) + np.int64(eb[k]))
    else:
        for k in range(k0, k1):
            E = np.int64(ea[k]) + np.int64(eb[k])
            if abs(va[k] * vb[k]) >= math.ldexp(1.0, E + 1):
                E += 1
            X = max(X, E)
    return X


@njit(inline="always", **_JIT)
def _aligned_sum(va, vb, k0, k1, scale, sticky):
    """sum_k trunc(a_k * b_k / u) with scale = 1 / u (a power of two): every product is
    exact in float64, the scaling exact, the conversion to int64 truncates toward zero
    (drops the bits below u), and the integer sum is exact in any order. With ``sticky``
    each term is 2 * trunc + the OR of the bits it lost, in units of u / 2."""
    S = np.int64(0)
    if not sticky:
        for k in range(k0, k1):
            S += np.int64(va[k] * vb[k] * scale)
    else:
        for k in range(k0, k1):
            y = va[k] * vb[k] * scale
            t = np.int64(y)
            lost = np.int64(np.float64(t) != y)
            S += 2 * t + (-lost if y < 0 else lost)
    return S


@njit(inline="always", **_JIT)
def _to_float(neg, q, qe, inf):
    # q * 2^qe with 2^qe from its bits: |qe| < 1000 for any input with its E8M0 scale
    v = np.inf if inf else np.float64(q) * f64_from_bits((np.int64(1023) + qe) << 52)
    return -v if neg else v


@njit(inline="always", **_JIT)
def _from_float(c):
    """A finite float c as (neg, q, qe) with c = (-1)^neg * q * 2^qe, q < 2^53."""
    if c == 0.0:
        return False, np.int64(0), np.int64(0)
    bits = f64_bits(abs(c))
    ef = (bits >> 52) & 0x7FF
    full = (bits & _MASK52) | (np.int64(1) << 52)
    return c < 0, full, ef - 1075


@njit(inline="always", **_JIT)
def _anchor_denorm(ea, eb, k0, k1):
    """_anchor for unnormalized products: max_k ea + eb, in int32 (exponents are below
    2^10 in magnitude, zeros at -2^24: the sums fit), a vectorized integer max (each
    intermediate wrapped in int32: Numba would widen it to int64, half the lanes)."""
    X = _I32(-(1 << 30))
    for k in range(k0, k1):
        X = _I32(max(X, _I32(ea[k] + eb[k])))
    return X


@njit(inline="always", **_JIT)
def _sum_truncated(va, vb, k0, k1, scale, width):
    """_aligned_sum without a sticky bit. Each truncated term is below 2^(F + 2) in
    magnitude (two significands below 2, the anchor at the largest exponent). ``width``:
    2 when fma_size terms sum below 2^31 (int32 terms, int32 sum: 8 or 16 lanes), 1 when a
    term fits an int32 (F <= 29; int32 terms summed in int64), 0 otherwise (int64). The
    conversions truncate toward zero; the integer sum is exact in any order. The factors
    may be FP32 values: the product is formed in float64 (exact), never in float32."""
    if width == 2:
        S32 = _I32(0)
        for k in range(k0, k1):
            S32 = _I32(S32 + _I32(np.float64(va[k]) * np.float64(vb[k]) * scale))
        return np.int64(S32)
    S = np.int64(0)
    if width == 1:
        for k in range(k0, k1):
            S += np.int64(_I32(np.float64(va[k]) * np.float64(vb[k]) * scale))
    else:
        for k in range(k0, k1):
            S += np.int64(np.float64(va[k]) * np.float64(vb[k]) * scale)
    return S


def _products_f32(tc: TensorCore) -> bool:
    """Every product of two input values is an exact, normal FP32 number (FP8 and FP16
    inputs), and fma_size such products, truncated, sum in int32 (_sum_width 2)."""
    f = tc.input
    return (_sum_width(tc) == 2 and 2 * (f.emin - f.mantissa_bits) >= -126
            and f.max_normal < 2.0 ** 32)


def _gemm_f32(tc: TensorCore, fmt) -> bool:
    """The GEMM can run on unscaled FP32 elements (_gemm_rows with f32): the unit's measured
    case, FP32-exact products, and every chunk of fma_size inside one scale block."""
    from numfmt.formats import BlockFormat
    if not (tc.products_denormalized and not tc.sticky_bit and tc.subnormal_inputs
            and _products_f32(tc)):
        return False
    if isinstance(fmt, BlockFormat) and fmt.block_size is not None:
        return fmt.block_size % tc.fma_size == 0
    return True


def _sum_width(tc: TensorCore) -> int:
    """The _sum_truncated width for a unit (F + 2 magnitude bits per term, fma terms)."""
    F = tc.alignment_bits
    return 2 if F + 2 + int(tc.fma_size).bit_length() <= 31 else (1 if F <= 29 else 0)


@njit(inline="always", **_JIT)
def _with_addend(X, q, qe, min_anchor):
    """The anchor over the products (X) and the addend q * 2^qe read as FP32 (exponent >=
    -126), no lower than min_anchor; below -2^23 when there is nothing nonzero."""
    if q != 0:
        X = max(X, max(_bitlen(q) - 1 + qe, np.int64(-126)))
    if X < -(1 << 23):
        return X
    return max(X, np.int64(min_anchor))


@njit(inline="always", **_JIT)
def _finish(S, X, neg, q, qe, F, m_out, emin, emax, rne, sticky, out_sub):
    """Add the addend (-1)^neg * q * 2^qe truncated to the unit 2^(X - F) (with its sticky
    bit) to the products' aligned sum S, and round: (neg, q, qe, inf) of the result."""
    if q != 0:
        sh = qe - (X - F)
        if sh >= 0:
            t = q << sh
            lost = False
        else:
            r = min(-sh, np.int64(62))
            t = q >> r
            lost = (t << r) != q
        if sticky:
            t = (t << 1) | np.int64(lost)
        S += -t if neg else t
    return _round_q(S, X - F - (1 if sticky else 0), m_out, emin, emax, rne, out_sub)


@njit(inline="always", **_JIT)
def _unit(X, F):
    """1 / u = 2^(F - X) from its bits (|F - X| < 1000 for any input with its scale)."""
    return f64_from_bits((np.int64(1023) + F - X) << 52)


@njit(inline="always", **_JIT)
def _promote(reg, neg, q, qe, inf):
    return np.float32(reg + np.float32(_to_float(neg, q, qe, inf)))


@njit(inline="always", **_JIT)
def _chain(va, ea, vb, eb, c, F, m_out, emin, emax, rne, sticky, denorm, min_anchor, out_sub,
           fma, promote):
    """D_{j+1} = TC(chunk j, D_j) over one row pair (va, ea) x (vb, eb) from D_0 = c, for
    any unit; with ``promote`` > 0, D restarts at +0 and is added (FP32, RNE) into a
    register that starts at c, every ``promote`` products. The running D is held as
    (-1)^neg * q * 2^qe; a D of +-Inf stays +-Inf (Inf plus finite products). The
    measured units' case runs batched (_batch_*) instead; this one serves the other
    units and the rows that the batched ``dot`` hands to its careful path."""
    K = va.shape[0]
    reg = np.float32(c)
    neg, q, qe = _from_float(c) if promote == 0 else (False, np.int64(0), np.int64(0))
    inf = False
    for k0 in range(0, K, fma):
        k1 = min(k0 + fma, K)
        if not inf:
            X = _with_addend(_anchor(va, ea, vb, eb, k0, k1, denorm), q, qe, min_anchor)
            if X < -(1 << 23):
                neg = False
            else:
                S = _aligned_sum(va, vb, k0, k1, _unit(X, F), sticky)
                neg, q, qe, inf = _finish(S, X, neg, q, qe, F, m_out, emin, emax, rne, sticky,
                                          out_sub)
        if promote != 0 and (k1 % promote == 0 or k1 == K):
            reg = _promote(reg, neg, q, qe, inf)
            neg, q, qe, inf = False, np.int64(0), np.int64(0), False
    return np.float64(reg) if promote != 0 else _to_float(neg, q, qe, inf)


@njit(inline="always", **_JIT)
def _anchor_bits(ab, bb, k0, k1, lo, sh0):
    """The chunk's anchor straight from the FP32 bits of a row pair, for units that keep
    subnormal inputs: returns (X + 254, inexact, big). Biased exponents: an element's
    clamped exponent is ``max(be, emin + 127) = lo`` (be its FP32 biased exponent), a
    product's the sum of two (zero products: -2^24). ``inexact`` is nonzero when an
    element has significand bits below its format's quantum (``sh = ec - max(be, 1) +
    23 - p`` low bits of the FP32 magnitude; sh0 = 23 - p), ``big`` the largest FP32
    magnitude (bits): either above the format's (NaN and Inf included) sends the row to
    the careful path, which names the bad value or takes the NaN / Inf. Integer max / OR
    reductions only: the loop vectorizes (folding the two into one select made it 2.6x
    slower here)."""
    X = _I32(-(1 << 30))
    inexact = _I32(0)
    big = _I32(0)
    for k in range(k0, k1):
        ma = _I32(ab[k] & _I32(0x7FFFFFFF))
        mb = _I32(bb[k] & _I32(0x7FFFFFFF))
        ea, la = _exp_and_lost(ma, lo, sh0)
        eb, lb = _exp_and_lost(mb, lo, sh0)
        inexact = _I32(inexact | _I32(la | lb))
        big = _I32(max(big, _I32(max(ma, mb))))
        e = _I32(ea + eb)
        X = _I32(max(X, e if (ma != _I32(0)) & (mb != _I32(0)) else _NEG32))
    return X, inexact, big


@njit(inline="always", **_JIT)
def _batch_state():
    """The work arrays of one batch of chains: the products' anchors Xp, the anchors X,
    the scales 1 / u, the aligned sums S, and the running D = (-1)^neg * q * 2^qe (+-Inf
    when inf) with its FP32 promotion register reg."""
    return (np.empty(_BATCH, dtype=np.int32), np.empty(_BATCH, dtype=np.int64),
            np.empty(_BATCH, dtype=np.float64), np.empty(_BATCH, dtype=np.int64),
            np.empty(_BATCH, dtype=np.bool_), np.empty(_BATCH, dtype=np.int64),
            np.empty(_BATCH, dtype=np.int64), np.empty(_BATCH, dtype=np.bool_),
            np.empty(_BATCH, dtype=np.float32))


# The measured units' case runs on batches of independent chains (rows of a dot, columns
# of a GEMM row): each step is one loop over the batch, so the out-of-order core overlaps
# the chains; fused per chain, every step waited on the one before (about 2x slower here).
@njit(inline="always", **_JIT)
def _batch_start(nb, C, c0, promote, neg, q, qe, inf, reg):
    """D_0 = c for chains c0..c0+nb-1 (or +0, with c starting the FP32 register)."""
    for t in range(nb):
        c = C[c0 + t]
        reg[t] = np.float32(c)
        if promote == 0:
            neg[t], q[t], qe[t] = _from_float(c)
        else:
            neg[t], q[t], qe[t] = False, np.int64(0), np.int64(0)
        inf[t] = False


@njit(inline="always", **_JIT)
def _bits_of(a):
    """Bits of a nonnegative int64 below 2^53 (``_bitlen``), without a branch: -1022 for 0
    (callers select that case away)."""
    return ((f64_bits(np.float64(a)) >> 52) & 0x7FF) - 1022


_NONE = -(1 << 23)  # an anchor below this: nothing nonzero to add (_with_addend)


@njit(inline="always", **_JIT)
def _batch_anchor(nb, Xp, q, qe, inf, min_anchor, F, X, scale):
    """_with_addend and the scale 1 / u (0 for a chain with nothing to add, or at +-Inf)
    of each chain's next operation, from its products' anchor Xp and its addend (-1)^neg
    * q * 2^qe. Branch-free selects (the same arithmetic as _with_addend), so the chains'
    data cannot mispredict a branch."""
    for t in range(nb):
        qt = q[t]
        xa = max(_bits_of(qt) - 1 + qe[t], np.int64(-126))
        x = max(np.int64(Xp[t]), xa if qt != 0 else np.int64(-(1 << 40)))
        x = max(x, np.int64(min_anchor)) if x >= _NONE else x
        X[t] = x
        u = f64_from_bits((np.int64(1023) + F - x) << 52)
        scale[t] = u if (x >= _NONE) & (not inf[t]) else 0.0


@njit(inline="always", **_JIT)
def _batch_finish(nb, S, X, neg, q, qe, inf, reg, F, m_out, emin, emax, rne, out_sub,
                  promote_now):
    """D_{j+1} for each chain: its addend truncated to the unit 2^(X - F) and added to its
    aligned sum S, then rounded to m_out fraction bits in [emin, emax] (``_finish`` and
    ``_round_q`` for the measured units: no sticky bit), written as branch-free selects
    over the batch; with ``promote_now``, D is added into the FP32 register and restarts
    at +0. A chain at +-Inf stays there; one with nothing to add keeps q = 0, sign +."""
    for t in range(nb):
        x = X[t]
        active = (not inf[t]) & (x >= _NONE)
        lsb = x - F
        qt = q[t]
        sh = qe[t] - lsb  # the addend q * 2^qe in units of 2^lsb, truncated toward zero
        ta = (qt << min(sh, np.int64(62))) if sh >= 0 else (qt >> min(-sh, np.int64(62)))
        s2 = S[t] + (-ta if neg[t] else ta)
        nz = s2 != 0
        ng = s2 < 0
        A = -s2 if ng else s2
        e = max(_bits_of(A) - 1 + lsb, np.int64(emin))
        qe2 = e - m_out
        s = qe2 - lsb  # bits below the result's last place
        sc = min(max(s, np.int64(1)), np.int64(62))
        qq = A >> sc
        if rne:
            rem = A - (qq << sc)
            half = np.int64(1) << (sc - 1)
            qq += np.int64((rem > half) | ((rem == half) & ((qq & 1) == 1)))
        qq = A if s <= 0 else (np.int64(0) if s >= 62 else qq)
        qe2 = lsb if s <= 0 else qe2
        top = _bits_of(qq) - 1 + qe2
        ovf = (qq != 0) & (top > emax)
        flush = (qq != 0) & (not out_sub) & (top < emin) & (not ovf)
        qq = np.int64(0) if flush else qq
        neg[t] = (ng & nz) if active else (neg[t] & inf[t])
        q[t] = (qq if nz else np.int64(0)) if active else qt
        qe[t] = (qe2 if nz else np.int64(0)) if active else qe[t]
        inf[t] = (ovf & nz) if active else inf[t]
    if promote_now:
        for t in range(nb):
            reg[t] = _promote(reg[t], neg[t], q[t], qe[t], inf[t])
            neg[t], q[t], qe[t], inf[t] = False, np.int64(0), np.int64(0), False


@njit(inline="always", **_JIT)
def _batch_result(t, neg, q, qe, inf, reg, promote):
    return np.float64(reg[t]) if promote != 0 else _to_float(neg[t], q[t], qe[t], inf[t])


@njit(**_JIT)
def _dot_row_careful(a, ab, b, bb, c, VA, EA, VB, EB, dp_p, dp_emin, dp_max, dp_sub, dp_nan,
                     dp_inf, F, m_out, emin, emax, rne, sticky, denorm, min_anchor,
                     out_sub, fma, promote):
    """One row pair decoded into buffers, then chained: (result, status), status bits
    1: a NaN or Inf (the caller takes IEEE), 2: a value of a that is not one of the
    format's, 4: one of b (the caller names it)."""
    off = np.zeros(1, dtype=np.int32)
    bad_a, sa = _decode_row(a, ab, VA, EA, dp_p, dp_emin, dp_max, dp_sub, dp_nan, dp_inf,
                            off, False)
    bad_b, sb = _decode_row(b, bb, VB, EB, dp_p, dp_emin, dp_max, dp_sub, dp_nan, dp_inf,
                            off, False)
    r = _chain(VA, EA, VB, EB, c, F, m_out, emin, emax, rne, sticky, denorm, min_anchor,
               out_sub, fma, promote)
    status = (1 if sa or sb else 0) | (2 if bad_a >= 0 else 0) | (4 if bad_b >= 0 else 0)
    return r, np.int8(status)


_BATCH = 64  # chains per batch: their state and one chunk of operands stay in L1


@njit(**_JIT)
def _pass_anchor_bits(ab, bb, t0, nb, k0, k1, lo, sh0, maxbits, Xp, odd):
    """Rows t0..t0+nb-1, chunk k0..k1: the products' anchor (biased by 254) into Xp, and
    the rows' checks OR-ed into odd. Its own function (not inlined): LLVM vectorized the
    loop nest about 2x better alone than inside the batch loop."""
    for t in range(nb):
        Xb, inexact, big = _anchor_bits(ab[t0 + t, k0:k1], bb[t0 + t, k0:k1], 0, k1 - k0,
                                        lo, sh0)
        Xp[t] = _I32(Xb - _I32(254))
        odd[t] = _I32(odd[t] | _I32(inexact | (_I32(1) if big > maxbits else _I32(0))))


@njit(inline="always", **_JIT)
def _sum_truncated_f32(va, vb, m, scale):
    """_sum_truncated (width 2) in FP32 arithmetic, for FP32 factors whose products are
    normal FP32 numbers (FP8 and FP16 inputs: at most 22 significant bits, exponents in
    [-48, 32]), so a * b is exact in FP32, and ``scale`` a power of two <= 2^100: a scaled
    product stays exact, or falls below 1 and truncates to 0 either way. 16 lanes."""
    S32 = _I32(0)
    for k in range(m):
        S32 = _I32(S32 + _I32(va[k] * vb[k] * scale))
    return np.int64(S32)


@njit(**_JIT)
def _pass_sum(a, b, t0, nb, k0, k1, scale, odd, width, f32, S):
    """Rows t0..t0+nb-1, chunk k0..k1: the aligned sums (0 for a row on the careful
    path). ``f32``: the products are exact in FP32 (_sum_truncated_f32, 4x faster than
    forming them in float64). Its own function, like _pass_anchor_bits."""
    if f32:
        for t in range(nb):
            # no nonzero product needs a scale above 2^(F + 48) < 2^100 (_sum_truncated_f32)
            s = np.float32(min(scale[t], 2.0 ** 100))
            S[t] = 0 if odd[t] != 0 else _sum_truncated_f32(a[t0 + t, k0:k1],
                                                            b[t0 + t, k0:k1], k1 - k0, s)
    else:
        for t in range(nb):
            S[t] = 0 if odd[t] != 0 else _sum_truncated(a[t0 + t, k0:k1], b[t0 + t, k0:k1],
                                                        0, k1 - k0, scale[t], width)


@njit(**_JIT)
def _dot_rows(r0, r1, a, ab, b, bb, C, status, dp_p, dp_emin, dp_max, dp_sub, dp_nan,
              dp_inf, F, m_out, emin, emax, rne, sticky, denorm, min_anchor, out_sub, fma,
              promote, width, f32, out):
    """Rows r0..r1-1 of TensorCore.dot into ``out`` and ``status`` (int8, the bits of
    _dot_row_careful; 0 for an ordinary row); ``f32``: _products_f32. The measured units'
    case (unnormalized products, no sticky bit, subnormal inputs kept) runs batches of rows, chunk by chunk: the
    anchors straight from the FP32 bits (_anchor_bits), the terms from the values (exact
    float64 products; zeros give 0). A row that holds anything but ordinary values of the
    format (bad, NaN, Inf), and every row of other units, goes through _dot_row_careful.
    The loops take each chunk as a slice (a loop from 0): LLVM vectorized them about 2x
    better so than with offset bounds."""
    K = a.shape[1]
    VA = np.empty(K, dtype=np.float64)
    VB = np.empty(K, dtype=np.float64)
    EA = np.empty(K, dtype=np.int32)
    EB = np.empty(K, dtype=np.int32)
    if not (denorm and not sticky and dp_sub):
        for i in range(r0, r1):
            out[i], status[i] = _dot_row_careful(
                a[i], ab[i], b[i], bb[i], C[i], VA, EA, VB, EB, dp_p, dp_emin, dp_max, dp_sub,
                dp_nan, dp_inf, F, m_out, emin, emax, rne, sticky, denorm, min_anchor,
                out_sub, fma, promote)
        return
    lo = _I32(dp_emin + 127)
    sh0 = _I32(23 - dp_p)
    odd = np.empty(_BATCH, dtype=np.int32)
    Xp, X, scale, S, neg, q, qe, inf, reg = _batch_state()
    for t0 in range(r0, r1, _BATCH):
        nb = min(_BATCH, r1 - t0)
        _batch_start(nb, C, t0, promote, neg, q, qe, inf, reg)
        odd[:nb] = 0
        for k0 in range(0, K, fma):
            k1 = min(K, k0 + fma)
            _pass_anchor_bits(ab, bb, t0, nb, k0, k1, lo, sh0, dp_max, Xp, odd)
            _batch_anchor(nb, Xp, q, qe, inf, min_anchor, F, X, scale)
            _pass_sum(a, b, t0, nb, k0, k1, scale, odd, width, f32, S)
            _batch_finish(nb, S, X, neg, q, qe, inf, reg, F, m_out, emin, emax, rne,
                          out_sub, promote != 0 and (k1 % promote == 0 or k1 == K))
        for t in range(nb):
            i = t0 + t
            if odd[t] != 0:
                out[i], status[i] = _dot_row_careful(
                    a[i], ab[i], b[i], bb[i], C[i], VA, EA, VB, EB, dp_p, dp_emin, dp_max,
                    dp_sub, dp_nan, dp_inf, F, m_out, emin, emax, rne, sticky, denorm,
                    min_anchor, out_sub, fma, promote)
            else:
                out[i] = _batch_result(t, neg, q, qe, inf, reg, promote)
                status[i] = 0


@njit(**_JIT)
def _gemm_rows(r0, r1, A, EA, SA, B, EB, SB, F, m_out, emin, emax, rne, sticky, denorm,
               min_anchor, out_sub, fma, promote, width, f32, out):
    """Rows r0..r1-1 of the GEMM through the unit: ``out[i, j]`` chains row i of A with
    row j of B from D_0 = +0. A, B hold the elements as ``decode_operand`` gives them, EA,
    EB their exponents, and SA[i, c], SB[j, c] the scale exponent of each row's chunk c.
    ``f32`` (_gemm_f32): FP32 elements, unscaled; a chunk's anchor is its unscaled one plus
    the two scales, and its scale 1 / u times 2^(sa + sb) multiplies the unscaled FP32
    products (exact), clamped to [2^-100, 2^100]: below, every term (< 2^34 * 2^-100)
    truncates to 0 as it would unclamped; above is never needed. Otherwise: float64
    elements with their scales folded in, SA = SB = 0. The measured units' case runs
    batches of columns j (independent chains), chunk by chunk, each chunk taken as a
    slice (see _dot_rows); other units chain each output alone."""
    N = B.shape[0]
    K = A.shape[1]
    if not (denorm and not sticky):
        for i in range(r0, r1):
            for j in range(N):
                out[i, j] = _chain(A[i], EA[i], B[j], EB[j], 0.0, F, m_out, emin, emax, rne,
                                   sticky, denorm, min_anchor, out_sub, fma, promote)
        return
    Xp, X, scale, S, neg, q, qe, inf, reg = _batch_state()
    zeros = np.zeros(_BATCH, dtype=np.float64)
    for i in range(r0, r1):
        for j0 in range(0, N, _BATCH):
            nb = min(_BATCH, N - j0)
            _batch_start(nb, zeros, 0, promote, neg, q, qe, inf, reg)
            for k0 in range(0, K, fma):
                k1 = min(K, k0 + fma)
                c = k0 // fma
                ea = EA[i, k0:k1]
                av = A[i, k0:k1]
                sa = SA[i, c]
                for t in range(nb):
                    Xp[t] = _I32(_I32(_anchor_denorm(ea, EB[j0 + t, k0:k1], 0, k1 - k0) + sa)
                                 + SB[j0 + t, c])
                _batch_anchor(nb, Xp, q, qe, inf, min_anchor, F, X, scale)
                if f32:  # two loops: the flag inside one loop slowed the GEMM 2x
                    for t in range(nb):
                        s = scale[t]
                        if s != 0.0:
                            s *= f64_from_bits((np.int64(1023) + sa + SB[j0 + t, c]) << 52)
                            s = min(max(s, 2.0 ** -100), 2.0 ** 100)
                        S[t] = _sum_truncated_f32(av, B[j0 + t, k0:k1], k1 - k0,
                                                  np.float32(s))
                else:
                    for t in range(nb):
                        S[t] = _sum_truncated(av, B[j0 + t, k0:k1], 0, k1 - k0, scale[t],
                                              width)
                _batch_finish(nb, S, X, neg, q, qe, inf, reg, F, m_out, emin, emax, rne,
                              out_sub, promote != 0 and (k1 % promote == 0 or k1 == K))
            for t in range(nb):
                out[i, j0 + t] = _batch_result(t, neg, q, qe, inf, reg, promote)


def _ieee_rows(A, B, C):
    with np.errstate(invalid="ignore", over="ignore"):
        return np.sum(A.astype(np.float64) * B.astype(np.float64), axis=1) + C


# ---------------------------------------------------------------------------
# block-scaled GEMM through the unit (hwsim.matmul(..., inter_block=tc))
# ---------------------------------------------------------------------------
def matmul_tensorcore(a, b, tc: TensorCore, promote_every: int | None = None) -> np.ndarray:
    """``a @ b.T`` for QTensors ``a`` (M x K) and ``b`` (N x K), quantized along K with
    elements of ``tc.input_format``, as the unit computes it (float32 M x N).

    Block scales must be powers of two (OCP MX E8M0, or no scales); the unit folds a
    scale into its elements' exponents (a scaled element keeps its significand, its
    exponent moves by the scale's), so a block's products align and truncate inside
    the unit exactly like unscaled ones at that magnitude. Each output is the chain
    ``D_{j+1} = TC(chunk j, D_j)`` from D_0 = +0 over all of K; ``promote_every=N`` adds
    the unit's partial sum into an FP32 register (RNE) every N elements and restarts
    it (DeepSeek-V3). An element NaN / Inf or a NaN scale makes the output the IEEE
    float64 value of the row pair's dot product (NaN / +-Inf).
    """
    from numfmt.formats import BlockFormat
    from numfmt.qtensor import QTensor
    for name, q in (("a", a), ("b", b)):
        if not isinstance(q, QTensor):
            raise TypeError(f"{name} must be a numfmt QTensor, got {type(q).__name__}")
        if len(q.shape) != 2 or q.axis != 1:
            raise ValueError(f"{name} must be a 2-D QTensor quantized along axis 1; got shape "
                             f"{q.shape}, axis {q.axis}")
        fmt = q.format
        elem = fmt.element if isinstance(fmt, BlockFormat) else fmt
        if not isinstance(elem, FloatFormat) or elem.name != tc.input_format:
            raise ValueError(f"{name} has {getattr(elem, 'name', elem)!r} elements; the "
                             f"{tc.gpu} unit takes {tc.input_format} (quantize to "
                             f"{tc.input_format} or an MX format with those elements)")
        if isinstance(fmt, BlockFormat) and fmt.scaling != "mx":
            raise ValueError(f"{name} is {fmt.name!r} ({fmt.scaling} scaling); the tensor-core "
                             f"path needs power-of-two block scales (MX) or none")
    M, K = a.shape
    N, Kb = b.shape
    if K != Kb:
        raise ValueError(f"a is {a.shape} and b is {b.shape}: their K (axis 1) must agree "
                         f"(b is N x K, a Linear weight)")
    promote = _check_promote(tc, promote_every)
    out = np.zeros((M, N), dtype=np.float32)
    if M == 0 or N == 0 or K == 0:
        return out
    va, offa, nana = _operand_values(a, tc)
    vb, offb, nanb = _operand_values(b, tc)
    res = np.empty((M, N), dtype=np.float64)
    chunks = slice(0, K, tc.fma_size)
    f32 = _gemm_f32(tc, a.format) and _gemm_f32(tc, b.format)
    if f32:
        # products of the unscaled elements are exact in FP32; each chunk lies inside one
        # scale block, so its two scales fold into the chunk's anchor and scale
        MA, EA, speca = decode_operand(va, tc, None, name="a")
        MB, EB, specb = decode_operand(vb, tc, None, name="b")
        MA, MB = MA.astype(np.float32), MB.astype(np.float32)
        SA = np.ascontiguousarray(offa[:, chunks], dtype=np.int32)
        SB = np.ascontiguousarray(offb[:, chunks], dtype=np.int32)
    else:
        MA, EA, speca = decode_operand(va, tc, offa, name="a")
        MB, EB, specb = decode_operand(vb, tc, offb, name="b")
        SA = np.zeros((M, len(range(0, K, tc.fma_size))), dtype=np.int32)
        SB = np.zeros((N, SA.shape[1]), dtype=np.int32)
    _split(_gemm_rows, M, MA, EA, SA, MB, EB, SB, *_kernel_params(tc), promote,
           _sum_width(tc), f32, res)
    spa = nana.any(axis=1) | speca
    spb = nanb.any(axis=1) | specb
    if spa.any() or spb.any():
        fa = va.astype(np.float64) * np.ldexp(1.0, offa.astype(np.int32))
        fb = vb.astype(np.float64) * np.ldexp(1.0, offb.astype(np.int32))
        fa[nana] = np.nan
        fb[nanb] = np.nan
        rows = np.nonzero(spa)[0]
        cols = np.nonzero(spb)[0]
        with np.errstate(invalid="ignore", over="ignore"):
            if rows.size:
                res[rows, :] = np.einsum("mk,nk->mn", fa[rows], fb)
            if cols.size:
                res[:, cols] = np.einsum("mk,nk->mn", fa, fb[cols])
    out[:] = res
    return out


def _decode_codes(codes: np.ndarray, elem: FloatFormat) -> np.ndarray:
    """float32 values of element codes (numfmt.decode; TF32's 19-bit codes included)."""
    return numfmt.decode(codes, elem)


def round_to_input(x, fmt: str | TensorCore, rounding: str = "rne") -> np.ndarray:
    """``x`` rounded to a tensor-core input format (a name in INPUTS, or a unit's), as
    float32 values ready for ``TensorCore.dot``."""
    name = fmt.input_format if isinstance(fmt, TensorCore) else fmt
    if name not in INPUTS:
        raise ValueError(f"unknown input format {name!r}; known: {', '.join(INPUTS)}")
    elem = numfmt.get(name)
    return _decode_codes(numfmt.encode(np.asarray(x, dtype=np.float32), elem,
                                       rounding=rounding), elem)


def _operand_values(q, tc: TensorCore):
    """Element values (float32, unscaled), per-element scale exponents (int64) and the
    per-element NaN-scale mask of a 2-D QTensor along axis 1."""
    from numfmt.formats import BlockFormat
    fmt = q.format
    elem = fmt.element if isinstance(fmt, BlockFormat) else fmt
    q.check_codes()
    vals = _decode_codes(q.codes.reshape(q.shape), elem)
    rows, K = vals.shape
    off = np.zeros((rows, K), dtype=np.int64)
    nan = np.zeros((rows, K), dtype=bool)
    if isinstance(fmt, BlockFormat) and q.scales is not None:
        scodes = np.asarray(q.scales).reshape(rows, -1).astype(np.int64)
        per_elem = np.repeat(scodes, fmt.block_size, axis=1)[:, :K]
        nan = per_elem == 255
        off = np.where(nan, 0, per_elem - 127)
    return vals, off, nan
