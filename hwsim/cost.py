"""Hardware cost model: energy and area of a W4 main layer with a low-rank branch.

The model follows the Timeloop/Accelergy recipe: every component has an energy
per action (pJ) and an area (um^2); a layer's cost is the sum over components of
(actions x energy per action). Everything here is arithmetic on shapes and
format parameters; nothing touches tensors.

Anchors
-------
The per-action constants are calibrated to M. Horowitz, "Computing's energy
problem (and what to do about it)", ISSCC 2014, 45 nm, 0.9 V (``HOROWITZ``):

* int8 add 0.03, int32 add 0.1, int8 mult 0.2, int32 mult 3.1
* fp16 add 0.4, fp16 mult 1.1, fp32 add 0.9, fp32 mult 3.7
* a 64-bit read: 10 from an 8 KB SRAM, 20 from 32 KB, 100 from 1 MB,
  1300-2600 from DRAM (1950, the middle, is used)

Component equations (energies in pJ at 45 nm before ``energy_scale``)
---------------------------------------------------------------------
``n``, ``m`` are operand widths in bits; ``p = mantissa_bits + 1`` is a float's
significand width, ``e`` its exponent width.

* integer adder, n bits:          E_add(n)   = a0 + a1 * n
* integer multiplier, n x m bits: E_mul(n,m) = c2 * n * m + c1 * (n + m)
  (an n*m partial-product array plus the final carry-propagate edge)
* barrel shifter, w bits wide, L levels of 2:1 muxes:  E_shift(w, L) = s * w * L
* IEEE float add (rounded):  E_fadd = E_add(e) + E_add(p+3) + 2 * E_shift(p+3, ceil(log2(p+3))) + f0
  (exponent difference, significand add with guard/round/sticky, alignment and
  normalization shifters, rounding/exception logic f0)
* IEEE float multiply (rounded): E_fmul = F * E_mul(p, p) + E_add(e + 1) + E_shift(p, 1)
  + E_add(p) + g0  (significand array, exponent add with bias, 1-bit
  normalization, rounding incrementer; F and g0 absorb Booth recoding and
  pipelining of the measured unit)
* SRAM read per bit of a C-byte array: E_sram(C) = (10 / 64) * (C / 8 KiB)^beta,
  beta fitted through the 8 KB and 1 MB anchors (the 32 KB anchor is then a check)
* DRAM read per bit: 1950 / 64 pJ (the middle of Horowitz's 1.3-2.6 nJ per 64 bits)

Each pair (a0, a1), (c2, c1), (s, f0), (F, g0) is solved exactly from the two
anchors of its class (``horowitz_fit``); ``calibration()`` lists model against
anchor for all twelve. Writes cost the same as reads (an assumption).

Area (um^2 at 45 nm before ``area_scale``) uses the same forms for integer
adders, multipliers and shifters, fitted to the area column of the same
Horowitz table (8b add 36, 32b add 137, 8b mult 282, 32b mult 3495, fp16 add
1360, fp32 add 4184, fp16 mult 1640, fp32 mult 7700 um^2); a shifter cell is
assumed to have the area of one adder bit, a float multiplier is
``A_fm2 * p^2 + A_fm0 + A_add(e+1)`` and a float adder ``A_fa * (p+3)^gamma + A_add(e)`` (empirical
forms that fit those points; a linear-in-components form would need a negative
constant). Pipeline registers, control and SRAM macros are not in the area.

Technology scaling: every energy is multiplied by ``energy_scale`` and every area
by ``area_scale`` (1.0 = Horowitz's 45 nm; e.g. about 0.3 and 0.1 for a 7 nm
node, the user's choice). Any field of ``CostModel`` can be overridden from a
TOML or JSON file (``load_cost_model``).

Block dot product (what one output element of a quantized GEMM costs)
--------------------------------------------------------------------
Operands a (weights) and b (activations) with element formats and per-block
scales along the reduction axis K. The reduction is cut into chunks of
B = gcd of the operands' block sizes (``tree_width`` when neither has per-block
scales); a K-long dot product has ceil(K / B) chunks, the last possibly partial.
Per chunk of n elements:

* n element products: E_mul(wa, wb) with w = integer bits or significand width;
  for float elements also an exponent add E_add(max(ea, eb) + 1) and an
  alignment shift of the exact product into its fixed-point lane,
  E_shift(W1, ceil(log2(W1 - wa - wb + 1))), W1 = worst_case_bits(a, b, 1);
* an adder tree of n - 1 integer adders; an adder at level l (summing 2^l
  products) is W_l = hwsim.accumulator.worst_case_bits(a, b, 2^l) bits wide;
* with per-block scales: the scale application -- two power-of-two scales
  (E8M0) cost one exponent add E_add(8); otherwise the two block scales'
  significands (p1, p2 bits) are multiplied exactly, E_mul(p1, p2) +
  E_add(max(e1, e2) + 1), and the W-bit partial sum is multiplied by the
  result, E_mul(W, p1 + p2) -- and the conversion of the W-bit integer partial
  sum to fp32 (leading-zero count + normalization, E_shift(W, ceil(log2 W)) +
  E_add(8)); chunks are summed in fp32: ceil(K/B) - 1 fp32 adds per output;
* without per-block scales, chunks are summed in an integer accumulator of
  worst_case_bits(a, b, K) bits and converted once per output.

Per-tensor or per-channel scales (NVFP4's fp32 tensor scale, block_size=None)
add one fp32 multiply per output element. Two non-block IEEE formats (the
FP16 branch) use IEEE units: K fp16 multiplies and K - 1 fp32 adds per output
(tensor-core style fp32 accumulation).

Layer y = x W^T + (x R^T) L^T, x: T x in, W: out x in, R: r x in, L: out x r
-----------------------------------------------------------------------------
MACs: main T*out*in; branch T*r*in + T*out*r.
Compute energy = main GEMM + branch GEMMs + quantization of x into each
datapath's activation format (T*in elements each) + requantization of the
fp32 intermediate x R^T into the branch's activation format (T*r) + the fp32
add of the two paths (T*out) + rounding the output to ``output_bits`` (fp16).
Memory energy (a lower bound, perfect on-chip reuse): weights (main and branch,
scales included) read once from ``weight_level``; x read once per datapath in
that datapath's activation format and y written once at ``output_bits`` from
``activation_level``; the intermediate written and read once, in the branch's
activation format, at ``intermediate_level``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from numfmt.formats import BlockFormat, FloatFormat, IntFormat, get
from hwsim.accumulator import worst_case_bits

__all__ = [
    "HOROWITZ",
    "HOROWITZ_SOURCE",
    "HOROWITZ_AREA_UM2",
    "CostModel",
    "horowitz_fit",
    "load_cost_model",
    "calibration",
    "Config",
    "parse_config",
    "CONFIG_GRAMMAR",
    "FAMILIES",
    "matrix_storage_bits",
    "branch_storage_bits",
    "equal_memory_rank",
    "dot_product_energy",
    "mac_energy_pj",
    "quantize_energy_pj",
    "lane_area_um2",
    "LayerCost",
    "layer_cost",
    "model_cost",
    "DEFAULT_CONFIGS",
]

HOROWITZ_SOURCE = ("M. Horowitz, 'Computing's energy problem (and what to do about it)', "
                   "ISSCC 2014, 45 nm, 0.9 V")

# op -> (anchor pJ, what it is). Memory anchors are per 64-bit read.
HOROWITZ: dict[str, tuple[float, str]] = {
    "int8_add": (0.03, "8-bit integer add"),
    "int32_add": (0.1, "32-bit integer add"),
    "int8_mult": (0.2, "8-bit integer multiply"),
    "int32_mult": (3.1, "32-bit integer multiply"),
    "fp16_add": (0.4, "fp16 add"),
    "fp16_mult": (1.1, "fp16 multiply"),
    "fp32_add": (0.9, "fp32 add"),
    "fp32_mult": (3.7, "fp32 multiply"),
    "sram_8kb_read64": (10.0, "64-bit read from an 8 KB SRAM"),
    "sram_32kb_read64": (20.0, "64-bit read from a 32 KB SRAM"),
    "sram_1mb_read64": (100.0, "64-bit read from a 1 MB SRAM"),
    "dram_read64": (1950.0, "64-bit DRAM read (1.3-2.6 nJ; the middle is used)"),
}

# Area column of the same table (um^2, 45 nm).
HOROWITZ_AREA_UM2: dict[str, float] = {
    "int8_add": 36.0, "int32_add": 137.0, "int8_mult": 282.0, "int32_mult": 3495.0,
    "fp16_add": 1360.0, "fp32_add": 4184.0, "fp16_mult": 1640.0, "fp32_mult": 7700.0,
}

_FP16 = get("fp16")
_FP32 = get("fp32")
_SRAM_REF_BYTES = 8 * 1024


def _levels(width: int) -> int:
    """Mux levels of a barrel shifter that shifts by 0..width-1."""
    return max(1, math.ceil(math.log2(max(width, 2))))


def horowitz_fit() -> dict[str, float]:
    """Solve each component's two coefficients exactly from its two Horowitz anchors.

    Returns the default values of ``CostModel``'s energy and area coefficients.
    """
    H = {k: v for k, (v, _) in HOROWITZ.items()}
    A = HOROWITZ_AREA_UM2
    out: dict[str, float] = {}
    # integer adder: a0 + a1*n through (8, int8_add) and (32, int32_add)
    for unit, tab in (("pj", H), ("um2", A)):
        a1 = (tab["int32_add"] - tab["int8_add"]) / 24.0
        a0 = tab["int8_add"] - 8.0 * a1
        # multiplier: c2*n*m + c1*(n+m) through 8x8 and 32x32
        #   64 c2 + 16 c1 = int8,  1024 c2 + 64 c1 = int32  ->  768 c2 = int32 - 4*int8
        c2 = (tab["int32_mult"] - 4.0 * tab["int8_mult"]) / 768.0
        c1 = (tab["int8_mult"] - 64.0 * c2) / 16.0
        out[f"add_fixed_{unit}"], out[f"add_per_bit_{unit}"] = a0, a1
        out[f"mult_cell_{unit}"], out[f"mult_edge_{unit}"] = c2, c1
    add = lambda n: out["add_fixed_pj"] + out["add_per_bit_pj"] * n  # noqa: E731
    mul = lambda n, m: out["mult_cell_pj"] * n * m + out["mult_edge_pj"] * (n + m)  # noqa: E731

    # float add energy: E_add(e) + E_add(p+3) + 2 s (p+3) L(p+3) + f0, fp16 (e5, p11), fp32 (e8, p24)
    def fadd_rest(e, p, anchor):
        return anchor - add(e) - add(p + 3)

    def cells(p):
        return 2 * (p + 3) * _levels(p + 3)

    r16, r32 = fadd_rest(5, 11, H["fp16_add"]), fadd_rest(8, 24, H["fp32_add"])
    s = (r32 - r16) / (cells(24) - cells(11))
    out["shift_cell_pj"] = s
    out["fp_add_fixed_pj"] = r16 - s * cells(11)

    # float mult energy: F * E_mul(p,p) + E_add(e+1) + s*p + E_add(p) + g0
    def fmul_rest(e, p, anchor):
        return anchor - add(e + 1) - s * p - add(p)

    m16, m32 = fmul_rest(5, 11, H["fp16_mult"]), fmul_rest(8, 24, H["fp32_mult"])
    F = (m32 - m16) / (mul(24, 24) - mul(11, 11))
    out["fp_mult_factor"] = F
    out["fp_mult_fixed_pj"] = m16 - F * mul(11, 11)

    # areas of float units
    add_a = lambda n: out["add_fixed_um2"] + out["add_per_bit_um2"] * n  # noqa: E731
    out["shift_cell_um2"] = out["add_per_bit_um2"]
    y16, y32 = A["fp16_mult"] - add_a(6), A["fp32_mult"] - add_a(9)
    out["fp_mult_cell_um2"] = (y32 - y16) / (24 ** 2 - 11 ** 2)
    out["fp_mult_fixed_um2"] = y16 - out["fp_mult_cell_um2"] * 11 ** 2
    z16, z32 = A["fp16_add"] - add_a(5), A["fp32_add"] - add_a(8)
    gamma = math.log(z32 / z16) / math.log(27 / 14)
    out["fp_add_exponent"] = gamma
    out["fp_add_coeff_um2"] = z16 / 14 ** gamma

    # memory
    out["sram_ref_pj_per_bit"] = H["sram_8kb_read64"] / 64.0
    out["sram_exponent"] = math.log(H["sram_1mb_read64"] / H["sram_8kb_read64"]) / math.log(128.0)
    out["dram_pj_per_bit"] = H["dram_read64"] / 64.0
    return out


_FIT = horowitz_fit()

_LEVEL_RE = re.compile(r"^sram_(\d+)(kb|mb)$")


@dataclass(frozen=True)
class CostModel:
    """Per-action energy (pJ) and area (um^2) constants plus the layer assumptions.

    Defaults are ``horowitz_fit()`` (45 nm). ``energy_scale`` / ``area_scale``
    are technology-scaling factors applied to every energy / area.
    Memory levels are ``"dram"`` or ``"sram_<N>kb"`` / ``"sram_<N>mb"``.
    """

    add_fixed_pj: float = _FIT["add_fixed_pj"]
    add_per_bit_pj: float = _FIT["add_per_bit_pj"]
    mult_cell_pj: float = _FIT["mult_cell_pj"]
    mult_edge_pj: float = _FIT["mult_edge_pj"]
    shift_cell_pj: float = _FIT["shift_cell_pj"]
    fp_add_fixed_pj: float = _FIT["fp_add_fixed_pj"]
    fp_mult_factor: float = _FIT["fp_mult_factor"]
    fp_mult_fixed_pj: float = _FIT["fp_mult_fixed_pj"]
    sram_ref_pj_per_bit: float = _FIT["sram_ref_pj_per_bit"]
    sram_exponent: float = _FIT["sram_exponent"]
    dram_pj_per_bit: float = _FIT["dram_pj_per_bit"]
    add_fixed_um2: float = _FIT["add_fixed_um2"]
    add_per_bit_um2: float = _FIT["add_per_bit_um2"]
    mult_cell_um2: float = _FIT["mult_cell_um2"]
    mult_edge_um2: float = _FIT["mult_edge_um2"]
    shift_cell_um2: float = _FIT["shift_cell_um2"]
    fp_mult_cell_um2: float = _FIT["fp_mult_cell_um2"]
    fp_mult_fixed_um2: float = _FIT["fp_mult_fixed_um2"]
    fp_add_coeff_um2: float = _FIT["fp_add_coeff_um2"]
    fp_add_exponent: float = _FIT["fp_add_exponent"]
    energy_scale: float = 1.0
    area_scale: float = 1.0
    tree_width: int = 32
    weight_level: str = "dram"
    activation_level: str = "sram_1mb"
    intermediate_level: str = "sram_32kb"
    output_bits: int = 16

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type in ("float", "int"):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise TypeError(f"cost model field {f.name}={v!r} must be a finite number")
                if f.name != "fp_add_exponent" and v < 0:
                    raise ValueError(f"cost model field {f.name}={v!r} must be >= 0")
        for name in ("energy_scale", "area_scale"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be > 0")
        if not isinstance(self.tree_width, int) or self.tree_width < 1:
            raise ValueError(f"tree_width={self.tree_width!r} must be an int >= 1")
        if not isinstance(self.output_bits, int) or self.output_bits < 1:
            raise ValueError(f"output_bits={self.output_bits!r} must be an int >= 1")
        for name in ("weight_level", "activation_level", "intermediate_level"):
            self.pj_per_bit(getattr(self, name), _what=name)

    # --- components (pJ, scaled) ------------------------------------------
    def add_pj(self, n: int) -> float:
        """Integer adder of n bits: (a0 + a1 n) * energy_scale."""
        return (self.add_fixed_pj + self.add_per_bit_pj * n) * self.energy_scale

    def mult_pj(self, n: int, m: int) -> float:
        """Integer n x m multiplier: (c2 n m + c1 (n + m)) * energy_scale."""
        return (self.mult_cell_pj * n * m + self.mult_edge_pj * (n + m)) * self.energy_scale

    def shift_pj(self, width: int, levels: int) -> float:
        """Barrel shifter, ``width`` bits x ``levels`` mux levels."""
        return self.shift_cell_pj * width * levels * self.energy_scale

    def fp_add_pj(self, fmt) -> float:
        """A rounded IEEE-style add in float format ``fmt`` (see module docstring)."""
        e, p = _exp_sig(fmt)
        return (self.add_pj(e) + self.add_pj(p + 3) + 2 * self.shift_pj(p + 3, _levels(p + 3))
                + self.fp_add_fixed_pj * self.energy_scale)

    def fp_mult_pj(self, fmt) -> float:
        """A rounded IEEE-style multiply in float format ``fmt``."""
        e, p = _exp_sig(fmt)
        return (self.fp_mult_factor * self.mult_pj(p, p) + self.add_pj(e + 1)
                + self.shift_pj(p, 1) + self.add_pj(p) + self.fp_mult_fixed_pj * self.energy_scale)

    def pj_per_bit(self, level: str, _what: str = "memory level") -> float:
        """Read (or write) energy per bit at a memory level: ``dram`` or ``sram_<N>kb|mb``."""
        if not isinstance(level, str):
            raise TypeError(f"{_what} must be a string such as 'dram' or 'sram_32kb', got {level!r}")
        key = level.strip().lower()
        if key == "dram":
            return self.dram_pj_per_bit * self.energy_scale
        m = _LEVEL_RE.match(key)
        if not m or int(m.group(1)) < 1:
            raise ValueError(f"{_what}={level!r} is not a memory level; allowed: 'dram' or "
                             "'sram_<N>kb' / 'sram_<N>mb' with N >= 1 (e.g. 'sram_32kb')")
        capacity = int(m.group(1)) * (1024 if m.group(2) == "kb" else 1024 * 1024)
        return (self.sram_ref_pj_per_bit * (capacity / _SRAM_REF_BYTES) ** self.sram_exponent
                * self.energy_scale)

    # --- areas (um^2, scaled) -----------------------------------------------
    def add_um2(self, n: int) -> float:
        return (self.add_fixed_um2 + self.add_per_bit_um2 * n) * self.area_scale

    def mult_um2(self, n: int, m: int) -> float:
        return (self.mult_cell_um2 * n * m + self.mult_edge_um2 * (n + m)) * self.area_scale

    def shift_um2(self, width: int, levels: int) -> float:
        return self.shift_cell_um2 * width * levels * self.area_scale

    def fp_add_um2(self, fmt) -> float:
        e, p = _exp_sig(fmt)
        return self.add_um2(e) + self.fp_add_coeff_um2 * (p + 3) ** self.fp_add_exponent * self.area_scale

    def fp_mult_um2(self, fmt) -> float:
        e, p = _exp_sig(fmt)
        return self.add_um2(e + 1) + (self.fp_mult_cell_um2 * p * p + self.fp_mult_fixed_um2) * self.area_scale


def _exp_sig(fmt) -> tuple[int, int]:
    """(exponent bits, significand bits incl. the hidden one) of a float format."""
    fmt = get(fmt)
    if isinstance(fmt, BlockFormat):
        fmt = fmt.element
    if isinstance(fmt, IntFormat):
        return 0, fmt.bits
    return fmt.exponent_bits, fmt.mantissa_bits + 1


def load_cost_model(path=None, **overrides) -> CostModel:
    """A ``CostModel`` with fields overridden from a TOML / JSON file and keywords.

    The file is a flat table of field names (see ``CostModel``) to values;
    keywords win over the file. Unknown names raise ``ValueError`` listing the
    allowed ones.
    """
    values: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"cost model file {str(p)!r} does not exist")
        try:
            if p.suffix.lower() == ".toml":
                import tomllib
                values = tomllib.loads(p.read_text(encoding="utf-8"))
            elif p.suffix.lower() == ".json":
                values = json.loads(p.read_text(encoding="utf-8"))
            else:
                raise ValueError(f"cost model file {str(p)!r} must end in .toml or .json")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"cost model file {str(p)!r} is malformed: {exc}") from None
        except Exception as exc:  # tomllib.TOMLDecodeError
            if type(exc).__name__ == "TOMLDecodeError":
                raise ValueError(f"cost model file {str(p)!r} is malformed: {exc}") from None
            raise
        if not isinstance(values, dict):
            raise ValueError(f"cost model file {str(p)!r} must hold a table of field: value")
    values.update({k: v for k, v in overrides.items() if v is not None})
    allowed = [f.name for f in dataclasses.fields(CostModel)]
    bad = sorted(set(values) - set(allowed))
    if bad:
        raise ValueError(f"unknown cost model fields {bad}; allowed: {allowed}")
    return CostModel(**values)


def calibration(model: CostModel | None = None) -> list[dict]:
    """Model against anchor for every Horowitz operation.

    Returns ``[{"op", "anchor_pj", "model_pj", "source"}]``. Anchors are moved
    by the same ``energy_scale`` as the model so the comparison is node-free.
    """
    m = model or CostModel()
    k = m.energy_scale
    model_pj = {
        "int8_add": m.add_pj(8), "int32_add": m.add_pj(32),
        "int8_mult": m.mult_pj(8, 8), "int32_mult": m.mult_pj(32, 32),
        "fp16_add": m.fp_add_pj(_FP16), "fp16_mult": m.fp_mult_pj(_FP16),
        "fp32_add": m.fp_add_pj(_FP32), "fp32_mult": m.fp_mult_pj(_FP32),
        "sram_8kb_read64": 64 * m.pj_per_bit("sram_8kb"),
        "sram_32kb_read64": 64 * m.pj_per_bit("sram_32kb"),
        "sram_1mb_read64": 64 * m.pj_per_bit("sram_1mb"),
        "dram_read64": 64 * m.pj_per_bit("dram"),
    }
    return [{"op": op, "anchor_pj": anchor * k, "model_pj": model_pj[op],
             "source": f"{HOROWITZ_SOURCE}: {what}"}
            for op, (anchor, what) in HOROWITZ.items()]


# --- configurations ---------------------------------------------------------
CONFIG_GRAMMAR = ("W<b>A<b>[+W<b>A<b>|+FP16][r<rank>]  e.g. W4A4, W4A4+W8A8, W4A4+W8A8r64, "
                  "W4A4+FP16r32 (b is a bit width; r<rank> needs a branch)")
_CONFIG_RE = re.compile(r"^W(\d+)A(\d+)(?:\+(?:W(\d+)A(\d+)|(FP16)))?(?:R(\d+))?$")

FAMILIES: dict[str, dict[int, str]] = {
    "mxint": {4: "mxint4", 6: "mxint6", 8: "mxint8"},
    "sint": {4: "sint4", 6: "sint6", 8: "sint8"},
    "mxfp": {4: "mxfp4_e2m1", 6: "mxfp6_e2m3", 8: "mxfp8_e4m3"},
    "nvfp": {4: "nvfp4"},
}

DEFAULT_CONFIGS = ("W4A4", "W4A4+FP16r32", "W4A4+W8A8", "W4A4+W6A6", "W4A4+W4A8", "W4A4+W4A4")


@dataclass(frozen=True)
class Config:
    """A main W/A pair and an optional low-rank branch.

    ``branch_weight`` / ``branch_act`` are numfmt formats (``fp16`` for the
    16-bit branch) or None for a main-only layer; ``rank`` is None when the
    string gave none (the caller's default or equal-memory rank applies).
    """

    name: str
    main_weight: object
    main_act: object
    branch_weight: object | None = None
    branch_act: object | None = None
    rank: int | None = None

    @property
    def has_branch(self) -> bool:
        return self.branch_weight is not None

    @property
    def fp16_branch(self) -> bool:
        return self.has_branch and not isinstance(self.branch_weight, BlockFormat) and \
            getattr(self.branch_weight, "name", "") == "fp16"


def _family_of(spec: str) -> tuple[str, object | None]:
    """(family name, the exact format if ``spec`` named a format) for ``main=`` / ``branch=``."""
    if not isinstance(spec, str):
        fmt = get(spec)
        spec = fmt.name
    key = spec.strip().lower()
    if key in FAMILIES:
        return key, None
    fmt = get(key)  # raises with the list of known formats
    for fam in ("mxint", "sint", "mxfp", "nvfp"):
        if key.startswith(fam):
            return fam, fmt
    return "", fmt


def _resolve(bits: int, family: str, exact, override, what: str, s: str):
    if override is not None:
        fmt = get(override)
        elem = fmt.element if isinstance(fmt, BlockFormat) else fmt
        if elem.bits != bits:
            raise ValueError(f"config {s!r}: {what} is {bits}-bit but {what}={fmt.name!r} has "
                             f"{elem.bits}-bit elements")
        return fmt
    if exact is not None:
        elem = exact.element if isinstance(exact, BlockFormat) else exact
        if elem.bits == bits:
            return exact
    table = FAMILIES.get(family, {})
    if bits not in table:
        have = sorted(table) if table else []
        raise ValueError(f"config {s!r}: no {bits}-bit format for {what} in family "
                         f"{family or exact.name!r} (it has {have}); pass a format explicitly")
    return get(table[bits])


def parse_config(s: str, main="mxint4", branch="mxint", *, main_weight=None, main_act=None,
                 branch_weight=None, branch_act=None) -> Config:
    """Parse a configuration string (grammar ``CONFIG_GRAMMAR``).

    ``main`` / ``branch`` name a family (``mxint``, ``sint``, ``mxfp``, ``nvfp``)
    or a format (``mxint4``, ``sint4``, ``nvfp4``): a W<b> / A<b> of the format's
    width becomes that format, other widths the family's b-bit member
    (W4 -> mxint4, W6 -> mxint6, W8 -> mxint8 by default). The keyword
    overrides set one format exactly (its element width must match the string).
    ``+FP16`` is an fp16 branch (fp16 weights and activations).
    """
    if not isinstance(s, str):
        raise TypeError(f"a configuration must be a string like 'W4A4+W8A8', got {s!r}")
    text = s.strip().upper()
    m = _CONFIG_RE.match(text)
    if not m:
        raise ValueError(f"bad configuration {s!r}; grammar: {CONFIG_GRAMMAR}")
    wm, am, wb, ab, fp16, rank = m.groups()
    for b in (wm, am, wb, ab):
        if b is not None and not 2 <= int(b) <= 16:
            raise ValueError(f"configuration {s!r}: bit width {int(b)} is not allowed (2..16)")
    if rank is not None:
        rank = int(rank)
        if rank < 1:
            raise ValueError(f"configuration {s!r}: rank {rank} must be >= 1")
        if wb is None and fp16 is None:
            raise ValueError(f"configuration {s!r}: r<rank> needs a branch (+W<b>A<b> or +FP16); "
                             f"grammar: {CONFIG_GRAMMAR}")
    mfam, mexact = _family_of(main)
    mw = _resolve(int(wm), mfam, mexact, main_weight, "main_weight", s)
    ma = _resolve(int(am), mfam, mexact, main_act, "main_act", s)
    bw = ba = None
    if fp16:
        bw = get(branch_weight) if branch_weight is not None else _FP16
        ba = get(branch_act) if branch_act is not None else _FP16
        suffix = "+FP16"
    elif wb is not None:
        bfam, bexact = _family_of(branch)
        bw = _resolve(int(wb), bfam, bexact, branch_weight, "branch_weight", s)
        ba = _resolve(int(ab), bfam, bexact, branch_act, "branch_act", s)
        suffix = f"+W{int(wb)}A{int(ab)}"
    else:
        suffix = ""
    name = f"W{int(wm)}A{int(am)}{suffix}" + (f"r{rank}" if rank is not None else "")
    return Config(name, mw, ma, bw, ba, rank)


# --- storage ----------------------------------------------------------------
def _check_dim(what: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{what} must be an int, got {v!r}")
    if v < 0:
        raise ValueError(f"{what}={v} is negative; it must be >= 0")
    return v


def matrix_storage_bits(rows: int, cols: int, fmt) -> int:
    """Exact bits of a rows x cols matrix quantized along ``cols`` (the reduction axis).

    Block formats: rows * cols * element_bits + rows * ceil(cols / B) * scale_bits
    (a partial block stores a full scale); ``block_size=None``: one scale per
    row; NVFP4 adds its 32-bit per-tensor scale. Element formats: rows * cols * bits.
    """
    rows, cols = _check_dim("rows", rows), _check_dim("cols", cols)
    fmt = get(fmt)
    if not isinstance(fmt, BlockFormat):
        return rows * cols * fmt.bits
    blocks = 1 if fmt.block_size is None else -(-cols // fmt.block_size)
    bits = rows * cols * fmt.element.bits + rows * blocks * fmt.scale.bits
    if fmt.scaling == "nvfp4" and rows * cols:
        bits += 32
    return bits


def branch_storage_bits(shape: tuple[int, int], rank: int, branch="mxint8") -> int:
    """Bits of a rank-r branch of an (out, in) layer, scales included.

    L (out x r) is quantized along r, R (r x in) along in:
    ``matrix_storage_bits(out, r, branch) + matrix_storage_bits(r, in, branch)``.
    """
    out, inp = _shape(shape)
    rank = _check_dim("rank", rank)
    return matrix_storage_bits(out, rank, branch) + matrix_storage_bits(rank, inp, branch)


def _shape(shape) -> tuple[int, int]:
    if not isinstance(shape, (tuple, list)) or len(shape) != 2:
        raise ValueError(f"shape must be (out, in), got {shape!r}")
    out, inp = (_check_dim("out", shape[0]), _check_dim("in", shape[1]))
    if out < 1 or inp < 1:
        raise ValueError(f"shape {tuple(shape)!r} must have out >= 1 and in >= 1")
    return out, inp


def equal_memory_rank(shape: tuple[int, int], ref_rank: int = 32, ref_bits: int = 16,
                      branch="mxint8") -> int:
    """The largest rank r <= min(out, in) whose branch fits the reference budget.

    budget = ref_bits * ref_rank * (out + in) bits (an unquantized rank-ref_rank
    branch); r is the largest integer with ``branch_storage_bits(shape, r,
    branch) <= budget`` (exact integer arithmetic; storage is nondecreasing in r).
    Returns 0 if even rank 1 does not fit. mxint8 on 1152 x 1152 gives 62.
    """
    out, inp = _shape(shape)
    ref_rank, ref_bits = _check_dim("ref_rank", ref_rank), _check_dim("ref_bits", ref_bits)
    budget = ref_bits * ref_rank * (out + inp)
    lo, hi = 0, min(out, inp)
    if branch_storage_bits((out, inp), hi, branch) <= budget:
        return hi
    while hi - lo > 1:  # invariant: storage(lo) <= budget < storage(hi)
        mid = (lo + hi) // 2
        if branch_storage_bits((out, inp), mid, branch) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


# --- datapath energy --------------------------------------------------------
def _parts(fmt):
    """(element, block scale format or None, per-block size or None, has per-axis/tensor scale)."""
    fmt = get(fmt)
    if isinstance(fmt, BlockFormat):
        per_axis = fmt.block_size is None or fmt.scaling == "nvfp4"
        return fmt.element, (fmt.scale if fmt.block_size is not None else None), fmt.block_size, per_axis
    return fmt, None, None, False


def _ieee_pair(a, b) -> bool:
    return (not isinstance(get(a), BlockFormat) and not isinstance(get(b), BlockFormat)
            and isinstance(get(a), FloatFormat) and isinstance(get(b), FloatFormat))


def _wider(a, b):
    ea, pa = _exp_sig(a)
    eb, pb = _exp_sig(b)
    return get(a) if (pa, ea) >= (pb, eb) else get(b)


def _chunk_size(a, b, model: CostModel) -> int:
    _, _, ba, _ = _parts(a)
    _, _, bb, _ = _parts(b)
    sizes = [x for x in (ba, bb) if x is not None]
    return math.gcd(*sizes) if sizes else model.tree_width


def _product_width(elem) -> int:
    return elem.bits if isinstance(elem, IntFormat) else elem.mantissa_bits + 1


def _tree_adders(n: int) -> list[tuple[int, int]]:
    """[(adders, leaves summed by each adder's output)] of a binary tree over n leaves."""
    levels, level, width = [], 1, n
    while width > 1:
        adders = width // 2
        levels.append((adders, min(1 << level, n)))
        width -= adders
        level += 1
    return levels


def dot_product_energy(a, b, k: int, model: CostModel | None = None) -> dict[str, float]:
    """Energy (pJ) of one length-k dot product of formats a (weights) and b (activations).

    Returns the components ``multiply``, ``align``, ``adder_tree``, ``scale``,
    ``convert``, ``accumulate`` (see the module docstring for each equation);
    their sum is the energy of one output element.
    """
    m = model or CostModel()
    k = _check_dim("k", k)
    parts = dict.fromkeys(("multiply", "align", "adder_tree", "scale", "convert", "accumulate"), 0.0)
    if k == 0:
        return parts
    if _ieee_pair(a, b):
        parts["multiply"] = k * m.fp_mult_pj(_wider(a, b))
        parts["accumulate"] = (k - 1) * m.fp_add_pj(_FP32)
        return parts
    ea, sa, _, axa = _parts(a)
    eb, sb, _, axb = _parts(b)
    B = _chunk_size(a, b, m)
    pa, pb = _product_width(ea), _product_width(eb)
    is_float = isinstance(ea, FloatFormat) or isinstance(eb, FloatFormat)
    prod = m.mult_pj(pa, pb)
    align = 0.0
    if is_float:
        ex = max(_exp_sig(ea)[0], _exp_sig(eb)[0])
        prod += m.add_pj(ex + 1)
        w1 = worst_case_bits(ea, eb, 1)
        align = m.shift_pj(w1, _levels(max(w1 - pa - pb + 1, 2)))

    def tree(n: int) -> float:
        return sum(adders * m.add_pj(worst_case_bits(ea, eb, leaves)) for adders, leaves in _tree_adders(n))

    full, rem = divmod(k, B)
    chunks = full + (1 if rem else 0)
    parts["multiply"] = k * prod
    parts["align"] = k * align
    parts["adder_tree"] = full * tree(B) + (tree(rem) if rem else 0.0)
    block_scaled = sa is not None or sb is not None

    def convert(width: int) -> float:
        return m.shift_pj(width, _levels(width)) + m.add_pj(8)

    if block_scaled:
        pow2 = all(s is None or (s.mantissa_bits == 0) for s in (sa, sb))
        wb_full = worst_case_bits(ea, eb, B)
        if pow2:
            parts["scale"] = chunks * m.add_pj(8)  # E8M0 exponent add
        else:
            parts["scale"] = full * _scale_apply_pj(sa, sb, wb_full, m) + (
                _scale_apply_pj(sa, sb, worst_case_bits(ea, eb, rem), m) if rem else 0.0)
        parts["convert"] = full * convert(wb_full) + (convert(worst_case_bits(ea, eb, rem)) if rem else 0.0)
        parts["accumulate"] = (chunks - 1) * m.fp_add_pj(_FP32)
    else:
        acc = worst_case_bits(ea, eb, k)
        parts["accumulate"] = (chunks - 1) * m.add_pj(acc)
        parts["convert"] = convert(acc)
    if axa or axb:
        parts["scale"] += m.fp_mult_pj(_FP32)
    return parts


def _scale_apply_pj(sa, sb, width: int, m: CostModel) -> float:
    """Multiply a width-bit integer partial sum by the product of two non-power-of-two scales.

    The scales' product is exact (E_mul(ps_a, ps_b) + E_add(max(e) + 1)); the
    partial sum is multiplied by its significand, E_mul(width, ps_a + ps_b).
    """
    (e1, p1) = _exp_sig(sa) if sa is not None else (0, 1)
    (e2, p2) = _exp_sig(sb) if sb is not None else (0, 1)
    return m.mult_pj(p1, p2) + m.add_pj(max(e1, e2) + 1) + m.mult_pj(width, p1 + p2)


def _scale_apply_um2(sa, sb, width: int, m: CostModel) -> float:
    (e1, p1) = _exp_sig(sa) if sa is not None else (0, 1)
    (e2, p2) = _exp_sig(sb) if sb is not None else (0, 1)
    return m.mult_um2(p1, p2) + m.add_um2(max(e1, e2) + 1) + m.mult_um2(width, p1 + p2)


def mac_energy_pj(a, b, k: int = 1024, model: CostModel | None = None) -> float:
    """Average energy per MAC (pJ) of a length-k dot product in formats a x b."""
    k = _check_dim("k", k)
    if k == 0:
        raise ValueError("k=0 has no MACs; pass k >= 1")
    return sum(dot_product_energy(a, b, k, model).values()) / k


def quantize_energy_pj(n_rows: int, n_cols: int, fmt, model: CostModel | None = None) -> float:
    """Energy (pJ) to quantize an fp32 n_rows x n_cols matrix along n_cols into ``fmt``.

    Per element of an element width b (+2 guard bits):
    * power-of-two block scales (MX): an amax exponent compare E_add(8), a
      shift-and-round E_shift(b + 2, 5) + E_add(b); per block the shared
      exponent E_add(8);
    * other scales (SINT, NVFP4, per-channel): a magnitude compare E_add(31), a
      multiply by the reciprocal scale E_fmul(fp32), the same shift-and-round;
      per block the scale (E_fmul(fp32)) and its reciprocal (3 fp32
      multiplies, Newton-Raphson);
    * a non-block float (fp16): rounding E_add(p) and re-biasing E_add(e);
      a non-block integer: the shift-and-round.
    """
    m = model or CostModel()
    n_rows, n_cols = _check_dim("rows", n_rows), _check_dim("cols", n_cols)
    fmt = get(fmt)
    n = n_rows * n_cols
    if n == 0:
        return 0.0
    if not isinstance(fmt, BlockFormat):
        if isinstance(fmt, FloatFormat):
            e, p = _exp_sig(fmt)
            return n * (m.add_pj(p) + m.add_pj(e))
        return n * (m.shift_pj(fmt.bits + 2, 5) + m.add_pj(fmt.bits))
    b = fmt.element.bits
    round_pj = m.shift_pj(b + 2, 5) + m.add_pj(b)
    blocks = n_rows * (1 if fmt.block_size is None else -(-n_cols // fmt.block_size))
    if fmt.scaling == "mx":
        return n * (m.add_pj(8) + round_pj) + blocks * m.add_pj(8)
    per_block = 4 * m.fp_mult_pj(_FP32)
    return n * (m.add_pj(31) + m.fp_mult_pj(_FP32) + round_pj) + blocks * per_block


def lane_area_um2(a, b, model: CostModel | None = None) -> float:
    """Area (um^2) of one MAC lane of datapath a x b, shared per-chunk units included.

    IEEE pair: one E_fmul unit plus one fp32 adder. Block datapath: multiplier
    (+ exponent adder and alignment shifter for float elements), (B-1)/B tree
    adders at the widths of ``dot_product_energy``, and per chunk of B lanes
    the scale unit, the int->fp32 converter and an fp32 adder, divided by B.
    """
    m = model or CostModel()
    if _ieee_pair(a, b):
        return m.fp_mult_um2(_wider(a, b)) + m.fp_add_um2(_FP32)
    ea, sa, _, _ = _parts(a)
    eb, sb, _, _ = _parts(b)
    B = _chunk_size(a, b, m)
    pa, pb = _product_width(ea), _product_width(eb)
    area = m.mult_um2(pa, pb)
    if isinstance(ea, FloatFormat) or isinstance(eb, FloatFormat):
        area += m.add_um2(max(_exp_sig(ea)[0], _exp_sig(eb)[0]) + 1)
        w1 = worst_case_bits(ea, eb, 1)
        area += m.shift_um2(w1, _levels(max(w1 - pa - pb + 1, 2)))
    tree = sum(adders * m.add_um2(worst_case_bits(ea, eb, leaves)) for adders, leaves in _tree_adders(B))
    wB = worst_case_bits(ea, eb, B)
    per_chunk = m.shift_um2(wB, _levels(wB)) + m.add_um2(8)
    if sa is not None or sb is not None:
        pow2 = all(s is None or s.mantissa_bits == 0 for s in (sa, sb))
        per_chunk += m.add_um2(8) if pow2 else _scale_apply_um2(sa, sb, wB, m)
        per_chunk += m.fp_add_um2(_FP32)
    else:
        per_chunk += m.add_um2(wB + 16)
    return area + (tree + per_chunk) / B


# --- layers and models ------------------------------------------------------
def _datapath(w, a) -> str:
    return f"{get(w).name} x {get(a).name}"


@dataclass
class LayerCost:
    """Cost of one instance of a layer under one configuration (pJ, bits, MACs).

    ``count`` instances of the layer exist in the model; ``model_cost`` totals
    multiply by it.
    """

    name: str
    kind: str
    in_features: int
    out_features: int
    tokens: int
    count: int
    config: str
    rank: int
    macs: int
    macs_by_datapath: dict[str, int]
    main_weight_bits: int
    branch_weight_bits: int
    activation_bits: int
    intermediate_bits: int
    output_bits: int
    compute_pj: dict[str, float]
    memory_pj: dict[str, float]

    @property
    def weight_bits(self) -> int:
        return self.main_weight_bits + self.branch_weight_bits

    @property
    def bits_moved(self) -> int:
        return self.weight_bits + self.activation_bits + self.intermediate_bits + self.output_bits

    @property
    def compute_energy_pj(self) -> float:
        return float(sum(self.compute_pj.values()))

    @property
    def memory_energy_pj(self) -> float:
        return float(sum(self.memory_pj.values()))

    @property
    def energy_pj(self) -> float:
        return self.compute_energy_pj + self.memory_energy_pj

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(weight_bits=self.weight_bits, weight_bytes=self.weight_bits / 8,
                 bits_moved=self.bits_moved, compute_energy_pj=self.compute_energy_pj,
                 memory_energy_pj=self.memory_energy_pj, energy_pj=self.energy_pj)
        return d


def _as_config(config, **kw) -> Config:
    return config if isinstance(config, Config) else parse_config(config, **kw)


def layer_cost(layer, config, *, rank: int | None = None, tokens: int | None = None,
               model: CostModel | None = None, main="mxint4", branch="mxint") -> LayerCost:
    """Cost of one layer instance.

    ``layer`` is a ``hwsim.models.Layer`` or a tuple (name, in, out, tokens);
    ``config`` a ``Config`` or a configuration string (parsed with ``main`` /
    ``branch``). The rank is the config's own, else ``rank``, else 32; a rank
    above min(in, out) is an error. Depthwise layers (``kind="depthwise"``,
    ``kernel`` taps per channel) run on the main datapath with no branch: each
    output is a ``kernel``-long dot product (one partial block), the weights
    are C x kernel quantized along the taps, and x (T x C, quantized along the
    channels) is read once, as if line buffers fed the taps.
    """
    from hwsim.models import Layer, as_layer
    m = model or CostModel()
    cfg = _as_config(config, main=main, branch=branch)
    lay: Layer = as_layer(layer)
    T = lay.tokens if tokens is None else _check_dim("tokens", tokens)
    nin, nout = lay.in_features, lay.out_features
    dp_main = _datapath(cfg.main_weight, cfg.main_act)
    compute: dict[str, float] = dict.fromkeys(
        ("main_mac", "branch_mac", "quantize_x", "requantize_intermediate", "output"), 0.0)
    memory: dict[str, float] = dict.fromkeys(("weights", "activations", "intermediate"), 0.0)
    macs_by: dict[str, int] = {}

    if lay.kind == "depthwise":
        K = lay.kernel
        macs = T * nout * K
        macs_by[dp_main] = macs
        compute["main_mac"] = T * nout * sum(dot_product_energy(cfg.main_weight, cfg.main_act, K, m).values())
        # x is quantized along the channels and read once (line buffers feed the taps)
        compute["quantize_x"] = quantize_energy_pj(T, nout, cfg.main_act, m)
        wbits = matrix_storage_bits(nout, K, cfg.main_weight)
        act_bits = matrix_storage_bits(T, nout, cfg.main_act)
        out_bits = T * nout * m.output_bits
        compute["output"] = quantize_energy_pj(T, nout, _FP16, m)
        memory["weights"] = wbits * m.pj_per_bit(m.weight_level)
        memory["activations"] = (act_bits + out_bits) * m.pj_per_bit(m.activation_level)
        return LayerCost(lay.name, lay.kind, nin, nout, T, lay.count, cfg.name, 0, macs, macs_by,
                         wbits, 0, act_bits, 0, out_bits, compute, memory)

    r = 0
    if cfg.has_branch:
        r = cfg.rank if cfg.rank is not None else (32 if rank is None else rank)
        r = _check_dim("rank", r)
        if r < 1 or r > min(nin, nout):
            raise ValueError(f"rank {r} for layer {lay.name!r} ({nout}x{nin}) is not allowed; "
                             f"it must be 1..min(in, out) = {min(nin, nout)}")
    main_macs = T * nout * nin
    macs_by[dp_main] = main_macs
    compute["main_mac"] = T * nout * sum(dot_product_energy(cfg.main_weight, cfg.main_act, nin, m).values())
    compute["quantize_x"] = quantize_energy_pj(T, nin, cfg.main_act, m)
    main_wbits = matrix_storage_bits(nout, nin, cfg.main_weight)
    act_bits = matrix_storage_bits(T, nin, cfg.main_act)
    out_bits = T * nout * m.output_bits
    compute["output"] = quantize_energy_pj(T, nout, _FP16, m)
    branch_wbits = inter_bits = 0
    if r:
        bw, ba = cfg.branch_weight, cfg.branch_act
        dp_b = _datapath(bw, ba)
        bmacs = T * r * nin + T * nout * r
        macs_by[dp_b] = macs_by.get(dp_b, 0) + bmacs
        compute["branch_mac"] = (T * r * sum(dot_product_energy(bw, ba, nin, m).values())
                                 + T * nout * sum(dot_product_energy(bw, ba, r, m).values()))
        compute["quantize_x"] += quantize_energy_pj(T, nin, ba, m)
        compute["requantize_intermediate"] = quantize_energy_pj(T, r, ba, m)
        compute["output"] += T * nout * m.fp_add_pj(_FP32)
        branch_wbits = branch_storage_bits((nout, nin), r, bw)
        act_bits += matrix_storage_bits(T, nin, ba)
        inter_bits = 2 * matrix_storage_bits(T, r, ba)  # written once, read once
    memory["weights"] = (main_wbits + branch_wbits) * m.pj_per_bit(m.weight_level)
    memory["activations"] = (act_bits + out_bits) * m.pj_per_bit(m.activation_level)
    memory["intermediate"] = inter_bits * m.pj_per_bit(m.intermediate_level)
    return LayerCost(lay.name, lay.kind, nin, nout, T, lay.count, cfg.name, r,
                     main_macs + T * r * nin + T * nout * r,
                     macs_by, main_wbits, branch_wbits, act_bits, inter_bits, out_bits, compute, memory)


def model_cost(layers: Iterable, configs: Iterable = DEFAULT_CONFIGS, *, rank: int = 32,
               equal_memory: bool = False, ref_rank: int = 32, ref_bits: int = 16,
               throughput: int = 4096, model: CostModel | None = None,
               main="mxint4", branch="mxint") -> dict:
    """Cost of a whole model under each configuration.

    Returns ``{"totals": {config: {...}}, "layers": [LayerCost.as_dict(), ...],
    "assumptions": {...}}``. Totals sum ``count`` x the layer values and carry
    ``energy_pj``, ``compute_energy_pj``, ``memory_energy_pj``, ``weight_bytes``,
    ``macs``, ``rank`` (smallest branch rank over linear layers, 0 without a
    branch) and ``rank_max``, the breakdowns, and the MAC array: each datapath
    gets ceil(throughput * its MAC share) lanes rounded up to its chunk size,
    ``area_mm2`` = sum(lanes x lane_area_um2) / 1e6, ``cycles`` = ceil(MACs /
    throughput). With ``equal_memory`` a quantized branch without its own
    rank gets ``equal_memory_rank((out, in), ref_rank, ref_bits, branch
    weight format)`` per layer; an FP16 branch gets ``ref_rank``.
    """
    from hwsim.models import as_layer
    m = model or CostModel()
    if isinstance(throughput, bool) or not isinstance(throughput, int) or throughput < 1:
        raise ValueError(f"throughput={throughput!r} must be an int >= 1 (MACs per cycle)")
    lays = [as_layer(x) for x in layers]
    if not lays:
        raise ValueError("the model has no layers")
    cfgs = [_as_config(c, main=main, branch=branch) for c in configs]
    if not cfgs:
        raise ValueError(f"no configurations given; e.g. {', '.join(DEFAULT_CONFIGS)}")
    names = [c.name for c in cfgs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"configurations {dup} are given more than once")
    rows, totals = [], {}
    for cfg in cfgs:
        lanes_src: dict[str, tuple] = {}
        t = {"config": cfg.name, "main_weight": get(cfg.main_weight).name,
             "main_act": get(cfg.main_act).name,
             "branch_weight": get(cfg.branch_weight).name if cfg.has_branch else None,
             "branch_act": get(cfg.branch_act).name if cfg.has_branch else None,
             "macs": 0, "macs_by_datapath": {}, "weight_bits": 0, "main_weight_bits": 0,
             "branch_weight_bits": 0, "bits_moved": 0, "compute_pj": {}, "memory_pj": {}}
        ranks = []
        for lay in lays:
            r = rank
            if cfg.has_branch and cfg.rank is None and equal_memory and lay.kind == "linear":
                r = ref_rank if cfg.fp16_branch else equal_memory_rank(
                    (lay.out_features, lay.in_features), ref_rank, ref_bits, cfg.branch_weight)
                if r < 1:
                    raise ValueError(f"layer {lay.name!r}: no rank of {get(cfg.branch_weight).name} "
                                     f"fits the equal-memory budget")
            lc = layer_cost(lay, cfg, rank=r, model=m)
            rows.append(lc.as_dict())
            if lay.kind == "linear" and cfg.has_branch:
                ranks.append(lc.rank)
            c = lay.count
            t["macs"] += c * lc.macs
            for k, v in lc.macs_by_datapath.items():
                t["macs_by_datapath"][k] = t["macs_by_datapath"].get(k, 0) + c * v
            if cfg.has_branch:
                lanes_src[_datapath(cfg.branch_weight, cfg.branch_act)] = (cfg.branch_weight, cfg.branch_act)
            lanes_src[_datapath(cfg.main_weight, cfg.main_act)] = (cfg.main_weight, cfg.main_act)
            t["weight_bits"] += c * lc.weight_bits
            t["main_weight_bits"] += c * lc.main_weight_bits
            t["branch_weight_bits"] += c * lc.branch_weight_bits
            t["bits_moved"] += c * lc.bits_moved
            for k, v in lc.compute_pj.items():
                t["compute_pj"][k] = t["compute_pj"].get(k, 0.0) + c * v
            for k, v in lc.memory_pj.items():
                t["memory_pj"][k] = t["memory_pj"].get(k, 0.0) + c * v
        t["rank"] = min(ranks) if ranks else 0
        t["rank_max"] = max(ranks) if ranks else 0
        t["weight_bytes"] = t["weight_bits"] / 8
        t["compute_energy_pj"] = float(sum(t["compute_pj"].values()))
        t["memory_energy_pj"] = float(sum(t["memory_pj"].values()))
        t["energy_pj"] = t["compute_energy_pj"] + t["memory_energy_pj"]
        t["energy_per_mac_pj"] = t["energy_pj"] / t["macs"] if t["macs"] else 0.0
        lanes, area = {}, 0.0
        for dp, n in t["macs_by_datapath"].items():
            if n == 0:
                continue
            w, a = lanes_src[dp]
            B = 1 if _ieee_pair(w, a) else _chunk_size(w, a, m)
            want = -(-throughput * n // t["macs"])
            lanes[dp] = -(-want // B) * B
            area += lanes[dp] * lane_area_um2(w, a, m)
        t["lanes_by_datapath"] = lanes
        t["area_mm2"] = area / 1e6
        t["throughput_macs_per_cycle"] = throughput
        t["cycles"] = -(-t["macs"] // throughput)
        totals[cfg.name] = t
    return {
        "totals": totals,
        "layers": rows,
        "assumptions": {
            "source": HOROWITZ_SOURCE,
            "energy_scale": m.energy_scale, "area_scale": m.area_scale,
            "weight_level": m.weight_level, "activation_level": m.activation_level,
            "intermediate_level": m.intermediate_level, "output_bits": m.output_bits,
            "equal_memory": bool(equal_memory), "ref_rank": ref_rank, "ref_bits": ref_bits,
            "rank": rank, "throughput_macs_per_cycle": throughput,
            "cost_model": dataclasses.asdict(m),
        },
    }
