"""Number formats as data.

A format is a small frozen dataclass holding the spec's parameters; every
derived value (emax, max normal, smallest subnormal, bits per element) is a
property computed from them, never typed in twice.

Element formats
---------------
``FloatFormat``  sign (optional), ``exponent_bits``, ``mantissa_bits``, ``bias``
    and a special-value policy:

    * ``"ieee"``      the all-ones exponent field holds Inf (mantissa 0) and NaN.
    * ``"nan_only"``  no Inf; only the all-ones code S.1..1.1..1 is NaN
                      (OCP FP8 E4M3, E8M0).
    * ``"none"``      every code is a finite number (OCP FP6, FP4).
    * ``"fnuz"``      "finite, NaN, unsigned zero" (AMD MI300's FP8, as ml_dtypes'
                      ``float8_e4m3fnuz`` / ``float8_e5m2fnuz``): no Inf, no negative
                      zero; the code 1.0..0 (0x80, the negative-zero slot) is the single
                      NaN and every other code is a finite number, the all-ones exponent
                      field included. A result that rounds to zero is +0 whatever its sign.

    The value of a code with exponent field E and mantissa field M is
    ``(-1)^S * 2^(E - bias) * (1 + M / 2^m)`` for E >= 1 and the subnormal
    ``(-1)^S * 2^(1 - bias) * (M / 2^m)`` for E = 0. A format without
    subnormals (E8M0) has no zero and reads E = 0 as ``2^(0 - bias)``.

``IntFormat``   a signed two's-complement integer of ``bits`` bits, symmetric
    (``-(2^(b-1) - 1) .. 2^(b-1) - 1``) unless ``full_range`` admits
    ``-2^(b-1)``.

Block formats
-------------
``BlockFormat``  elements sharing one scale per ``block_size`` consecutive
    elements along the quantized axis. ``scaling`` says how the scale is found:

    * ``"mx"``      OCP MX v1.0: an E8M0 power-of-two scale,
                    ``shared_exponent = floor(log2(amax)) - element_emax``.
                    MX integer elements carry an implicit scale
                    ``2^(2 - bits)`` (MXINT8: codes are multiples of 1/64).
                    ``scale_rule`` picks how the shared exponent is found (the
                    definitions of torchao's ``ScaleCalculationMode``; see
                    ``numfmt.core`` and docs/scale_rules.md): ``"floor"`` (OCP, the
                    default), ``"ceil"``, ``"even"``, ``"rceil"`` (NVIDIA cuBLAS).
    * ``"absmax"``  scaled integers (SINT): ``scale = amax / element_max``
                    rounded to nearest-even into ``scale`` (fp16 by default).
                    ``block_size=None`` means one scale for the whole axis.
    * ``"nvfp4"``   NVIDIA's two-level recipe: an FP32 per-tensor scale and an
                    E4M3 scale per block of 16 (see ``numfmt.core``).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass

__all__ = [
    "FloatFormat",
    "IntFormat",
    "BlockFormat",
    "float_format",
    "int_format",
    "get",
    "formats",
    "ROUNDINGS",
    "COMPATS",
    "SCALE_RULES",
]

ROUNDINGS = ("rne", "rna", "rtz", "rup", "rdn", "stochastic")
COMPATS = ("ocp", "microxcaling")
SPECIALS = ("ieee", "nan_only", "none", "fnuz")
SCALINGS = ("mx", "absmax", "nvfp4")
# How an MX block's shared exponent is found (torchao's ScaleCalculationMode names):
# floor is OCP MX v1.0 section 6.3; see numfmt.core's docstring for each definition.
SCALE_RULES = ("floor", "ceil", "even", "rceil")


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point element format (see the module docstring)."""

    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int
    specials: str = "ieee"
    signed: bool = True
    subnormals: bool = True
    saturating: bool = True

    def __post_init__(self) -> None:
        _check_int("exponent_bits", self.exponent_bits, 1, 8)
        _check_int("mantissa_bits", self.mantissa_bits, 0, 23)
        _check_int("bias", self.bias, -1000, 1000)
        if self.specials not in SPECIALS:
            raise ValueError(f"specials={self.specials!r} is not one of {SPECIALS}")
        if self.specials == "ieee" and self.mantissa_bits == 0:
            raise ValueError("specials='ieee' needs at least one mantissa bit (Inf and NaN)")
        if self.specials == "fnuz" and not (self.signed and self.subnormals):
            raise ValueError("specials='fnuz' needs a signed format with subnormals (its NaN "
                             "is the negative-zero code)")
        if self.bits > 32:
            raise ValueError(f"format {self.name!r} has {self.bits} bits; at most 32 are supported")

    kind = "float"

    @property
    def bits(self) -> int:
        """Bits of one element code."""
        return int(self.signed) + self.exponent_bits + self.mantissa_bits

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number."""
        return (1 if self.subnormals else 0) - self.bias

    @property
    def max_exponent_field(self) -> int:
        """Largest exponent field that holds finite numbers."""
        top = (1 << self.exponent_bits) - 1
        if self.specials == "ieee" or (self.specials == "nan_only" and self.mantissa_bits == 0):
            return top - 1
        return top

    @property
    def emax(self) -> int:
        """Exponent of the largest finite number (the element emax of OCP MX)."""
        return self.max_exponent_field - self.bias

    @property
    def max_mantissa_field(self) -> int:
        """Largest mantissa field at the top finite exponent."""
        full = (1 << self.mantissa_bits) - 1
        if self.specials == "nan_only" and self.mantissa_bits > 0:
            return full - 1  # S.1..1.1..1 is NaN
        return full

    @property
    def max_normal(self) -> float:
        """Largest finite magnitude."""
        return math.ldexp(1.0 + self.max_mantissa_field / (1 << self.mantissa_bits), self.emax)

    @property
    def min_normal(self) -> float:
        return math.ldexp(1.0, self.emin)

    @property
    def min_subnormal(self) -> float:
        """Smallest positive magnitude (the smallest normal if there are no subnormals)."""
        if not self.subnormals:
            return self.min_normal
        return math.ldexp(1.0, self.emin - self.mantissa_bits)

    @property
    def has_inf(self) -> bool:
        return self.specials == "ieee"

    @property
    def has_nan(self) -> bool:
        return self.specials != "none"

    @property
    def nan_code(self) -> int:
        """The canonical NaN code (the positive one where there are two), or -1 when the
        format has no NaN. FNUZ formats have one NaN: the negative-zero code 1.0..0."""
        if self.specials == "none":
            return -1
        if self.specials == "fnuz":
            return 1 << (self.bits - 1)
        e_top = ((1 << self.exponent_bits) - 1) << self.mantissa_bits
        return e_top | ((1 << self.mantissa_bits) - 1)

    @property
    def inf_code(self) -> int:
        """The +Inf code, or -1 when the format has no Inf."""
        if self.specials != "ieee":
            return -1
        return ((1 << self.exponent_bits) - 1) << self.mantissa_bits

    @property
    def max_code(self) -> int:
        """Code of +max_normal."""
        return (self.max_exponent_field << self.mantissa_bits) | self.max_mantissa_field

    @property
    def smallest_step(self) -> float:
        """Smallest distance between two representable values."""
        return self.min_subnormal if self.subnormals else self.min_normal * (
            2.0 ** -self.mantissa_bits if self.mantissa_bits else 1.0)


@dataclass(frozen=True)
class IntFormat:
    """A signed two's-complement integer element format."""

    name: str
    bits: int
    full_range: bool = False

    def __post_init__(self) -> None:
        _check_int("bits", self.bits, 2, 16)

    kind = "int"
    signed = True

    @property
    def max_code(self) -> int:
        """Largest integer value."""
        return (1 << (self.bits - 1)) - 1

    @property
    def min_code(self) -> int:
        """Smallest integer value (-max_code unless full_range)."""
        return -(1 << (self.bits - 1)) if self.full_range else -self.max_code

    @property
    def max_normal(self) -> float:
        return float(self.max_code)

    @property
    def emax(self) -> int:
        """Exponent of the largest power of two not above max_code."""
        return self.bits - 2

    @property
    def smallest_step(self) -> float:
        return 1.0

    has_nan = False
    has_inf = False


ElementFormat = FloatFormat | IntFormat


@dataclass(frozen=True)
class BlockFormat:
    """Elements sharing one scale per block along the quantized axis."""

    name: str
    element: ElementFormat
    block_size: int | None
    scale: FloatFormat
    scaling: str = "mx"
    scale_rule: str = "floor"

    def __post_init__(self) -> None:
        if self.block_size is not None:
            if isinstance(self.block_size, bool) or not isinstance(self.block_size, int):
                raise TypeError(f"block_size must be an int or None, got {self.block_size!r}")
            if self.block_size < 1:
                raise ValueError(f"block_size={self.block_size} is not allowed; it must be >= 1")
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling={self.scaling!r} is not one of {SCALINGS}")
        if not isinstance(self.element, (FloatFormat, IntFormat)):
            raise TypeError(f"element must be a FloatFormat or IntFormat, got {self.element!r}")
        if not isinstance(self.scale, FloatFormat):
            raise TypeError(f"scale must be a FloatFormat, got {self.scale!r}")
        if self.scaling == "mx" and (self.scale.mantissa_bits != 0 or self.scale.signed):
            raise ValueError(
                f"MX scaling needs a power-of-two scale format such as e8m0, got {self.scale.name!r}")
        if self.block_size is None and self.scaling != "absmax":
            raise ValueError("block_size=None (one scale per axis) is only allowed with absmax scaling")
        check_scale_rule(self.scale_rule)
        if self.scale_rule != "floor" and self.scaling != "mx":
            raise ValueError(f"scale_rule={self.scale_rule!r} applies to MX formats (scaling='mx'); "
                             f"{self.name!r} has scaling {self.scaling!r}, whose only rule is "
                             f"'floor' (the default)")
        if isinstance(self.element, FloatFormat) and self.element.specials == "fnuz":
            raise ValueError(f"block format {self.name!r}: FNUZ elements ({self.element.name!r}) "
                             f"are element formats only; block formats take OCP elements")

    kind = "block"

    @property
    def int_full_range(self) -> bool:
        return isinstance(self.element, IntFormat) and self.element.full_range

    @property
    def element_emax(self) -> int:
        """The element's emax in the OCP MX sense (0 for MX integers)."""
        if isinstance(self.element, IntFormat):
            return 0
        return self.element.emax

    @property
    def element_scale_exp(self) -> int:
        """Implicit exponent of MX integer elements: a code c means c * 2^(2 - bits)."""
        if isinstance(self.element, IntFormat) and self.scaling == "mx":
            return 2 - self.element.bits
        return 0

    @property
    def bits_per_element(self) -> float:
        """Storage bits per element including the block's scale (tensor scale excluded)."""
        if self.block_size is None:
            return float(self.element.bits)
        return self.element.bits + self.scale.bits / self.block_size

    @property
    def bits(self) -> int:
        return self.element.bits


Format = ElementFormat | BlockFormat


def check_scale_rule(rule) -> str:
    """``rule`` if it is one of SCALE_RULES, else a ValueError naming it and the allowed ones."""
    if not isinstance(rule, str) or rule not in SCALE_RULES:
        raise ValueError(f"scale_rule={rule!r} is not one of {SCALE_RULES}")
    return rule


def _check_int(what: str, value, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{what}={value} is out of range; allowed {lo}..{hi}")


def float_format(exponent_bits: int, mantissa_bits: int, *, bias: int | None = None,
                 specials: str = "ieee", saturating: bool = True, signed: bool = True,
                 subnormals: bool = True, name: str | None = None) -> FloatFormat:
    """Any binary float: exponent bits 1..8, mantissa bits 0..23 (the default bias is 2^(e-1) - 1)."""
    _check_int("exponent_bits", exponent_bits, 1, 8)
    _check_int("mantissa_bits", mantissa_bits, 0, 23)
    if bias is None:
        bias = (1 << (exponent_bits - 1)) - 1
    if name is None:
        name = f"fp{int(signed) + exponent_bits + mantissa_bits}_e{exponent_bits}m{mantissa_bits}"
        if bias != (1 << (exponent_bits - 1)) - 1:
            name += f"_b{bias}"
    return FloatFormat(name, exponent_bits, mantissa_bits, bias, specials, signed, subnormals,
                       saturating)


def int_format(bits: int, *, full_range: bool = False, name: str | None = None) -> IntFormat:
    """Any signed integer of 2..16 bits, symmetric unless full_range."""
    _check_int("bits", bits, 2, 16)
    return IntFormat(name or f"int{bits}", bits, full_range)


# --- the registry -----------------------------------------------------------
_E4M3 = FloatFormat("fp8_e4m3", 4, 3, 7, "nan_only")
_E5M2 = FloatFormat("fp8_e5m2", 5, 2, 15, "ieee")
_E3M2 = FloatFormat("fp6_e3m2", 3, 2, 3, "none")
_E2M3 = FloatFormat("fp6_e2m3", 2, 3, 1, "none")
_E2M1 = FloatFormat("fp4_e2m1", 2, 1, 1, "none")
_E8M0 = FloatFormat("e8m0", 8, 0, 127, "nan_only", signed=False, subnormals=False)
_FP16 = FloatFormat("fp16", 5, 10, 15, "ieee")
_BF16 = FloatFormat("bf16", 8, 7, 127, "ieee")
_FP32 = FloatFormat("fp32", 8, 23, 127, "ieee")
_TF32 = FloatFormat("tf32", 8, 10, 127, "ieee")  # NVIDIA TensorFloat-32: FP32 range, 10 bits
# AMD CDNA3 (MI300) FP8: bias one above OCP's, no Inf, no -0, 0x80 the single NaN
# (the formats of ml_dtypes' float8_e4m3fnuz / float8_e5m2fnuz and LLVM's Float8E4M3FNUZ).
_E4M3FNUZ = FloatFormat("fp8_e4m3fnuz", 4, 3, 8, "fnuz")
_E5M2FNUZ = FloatFormat("fp8_e5m2fnuz", 5, 2, 16, "fnuz")

_REGISTRY: dict[str, Format] = {}


def _register(fmt: Format, *aliases: str) -> None:
    for key in (fmt.name, *aliases):
        _REGISTRY[key] = fmt


for _f in (_E4M3, _E5M2, _E3M2, _E2M3, _E2M1, _E8M0, _FP16, _BF16, _FP32, _TF32, _E4M3FNUZ,
           _E5M2FNUZ):
    _register(_f)
_register(IntFormat("int8", 8))
_register(IntFormat("int4", 4))
_register(IntFormat("int2", 2))
for _elem, _n in ((_E4M3, "mxfp8_e4m3"), (_E5M2, "mxfp8_e5m2"), (_E3M2, "mxfp6_e3m2"),
                  (_E2M3, "mxfp6_e2m3"), (_E2M1, "mxfp4_e2m1")):
    _register(BlockFormat(_n, _elem, 32, _E8M0, "mx"), *(("mxfp4",) if _n == "mxfp4_e2m1" else ()))
for _b in (8, 6, 4):
    _register(BlockFormat(f"mxint{_b}", IntFormat(f"int{_b}", _b), 32, _E8M0, "mx"))
    _register(BlockFormat(f"sint{_b}", IntFormat(f"int{_b}", _b), 64, _FP16, "absmax"))
_register(BlockFormat("nvfp4", _E2M1, 16, _E4M3, "nvfp4"))
_register(BlockFormat("int8_channel", IntFormat("int8", 8), None, _FP32, "absmax"))

_ELEMENT_OVERRIDES = ("saturating",)
_BLOCK_OVERRIDES = ("block_size", "scale", "int_full_range", "element", "scale_rule")


def formats() -> list[str]:
    """The registered format names (aliases included), sorted."""
    return sorted(_REGISTRY)


def get(name, **overrides) -> Format:
    """Look up a format by name, optionally overriding parameters.

    Block formats take ``block_size`` (int >= 1, or None for absmax formats),
    ``scale`` (a float format or its name), ``int_full_range`` (MX/SINT
    integer elements may use code -2^(b-1)) and, for MX formats, ``scale_rule``
    (one of SCALE_RULES; "floor" is OCP's and the default). Float element formats take
    ``saturating``. A format object is returned unchanged (with overrides
    applied).
    """
    if isinstance(name, (FloatFormat, IntFormat, BlockFormat)):
        fmt = name
    elif isinstance(name, str):
        key = name.strip().lower()
        if key not in _REGISTRY:
            close = difflib.get_close_matches(key, _REGISTRY, n=5, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown format {name!r}{hint} (known: {', '.join(formats())})")
        fmt = _REGISTRY[key]
    else:
        raise TypeError(f"a format must be a name or a format object, got {type(name).__name__}")
    if not overrides:
        return fmt
    allowed = _BLOCK_OVERRIDES if isinstance(fmt, BlockFormat) else (
        _ELEMENT_OVERRIDES if isinstance(fmt, FloatFormat) else ("full_range",))
    bad = sorted(set(overrides) - set(allowed))
    if bad:
        raise ValueError(f"cannot override {bad} of {fmt.name!r}; allowed: {list(allowed)}")
    if isinstance(fmt, BlockFormat):
        changes = {}
        if "block_size" in overrides:
            changes["block_size"] = overrides["block_size"]
        if "scale" in overrides:
            changes["scale"] = get(overrides["scale"])
        if "element" in overrides:
            changes["element"] = get(overrides["element"])
        if "scale_rule" in overrides:
            changes["scale_rule"] = check_scale_rule(overrides["scale_rule"])
        elem = changes.get("element", fmt.element)
        if "int_full_range" in overrides:
            if not isinstance(elem, IntFormat):
                raise ValueError(f"int_full_range applies to integer elements; {fmt.name!r} has "
                                 f"{elem.name!r}")
            elem = dataclasses.replace(elem, full_range=bool(overrides["int_full_range"]))
            changes["element"] = elem
        return dataclasses.replace(fmt, **changes)
    return dataclasses.replace(fmt, **overrides)
