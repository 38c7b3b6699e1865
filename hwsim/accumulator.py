"""Accumulator widths for block dot products.

Worst case from the types alone
-------------------------------
Integer elements (A2Q, Colbert et al., ICCV 2023, eq. 8): a dot product of K
products of an N-bit and an M-bit integer never overflows a P-bit signed
accumulator when

    alpha = log2(K) + N + M - 1 - [both inputs signed]
    P     = ceil(alpha + phi(alpha) + 1),   phi(alpha) = log2(1 + 2^-alpha).

(W8A8 with K = 32 gives 21 bits; W4A8 gives 17.)

Float elements: each element is an integer significand times a power of two,
so every product is an integer multiple of the smallest product quantum
q = min_subnormal(a) * min_subnormal(b). The exact fixed-point sum of K products
holds integers up to K * max|a| * max|b| / q, so it needs

    P = ceil(log2(K * max|a| * max|b| / q + 1)) + 1      (the +1 is the sign).

(E2M1 x E2M1 needs 9 bits per product and 14 with K = 32; E4M3 x E4M3 needs
37 and 42.) A float element times an integer element mixes the two: the
integer is a float with quantum 1.
"""
from __future__ import annotations

import math

from numfmt.formats import BlockFormat, FloatFormat, IntFormat, get

__all__ = ["worst_case_bits", "element_of"]


def element_of(fmt):
    """The element format of a block format (an element format is returned as is)."""
    fmt = get(fmt)
    return fmt.element if isinstance(fmt, BlockFormat) else fmt


def _range_and_quantum(elem) -> tuple[float, float]:
    """(largest magnitude, smallest nonzero magnitude step) of an element format, in code units."""
    if isinstance(elem, IntFormat):
        return float(max(elem.max_code, -elem.min_code)), 1.0
    if isinstance(elem, FloatFormat):
        return elem.max_normal, elem.min_subnormal
    raise TypeError(f"not an element format: {elem!r}")


def worst_case_bits(a_format, b_format, k: int) -> int:
    """Accumulator bits (sign included) that no dot product of length ``k`` can overflow.

    ``a_format`` / ``b_format`` are format names or objects (block formats use
    their element format). Integer x integer uses the A2Q bound; any float
    operand uses the exact fixed-point width of the module docstring.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r} is not allowed; the dot-product length must be an int >= 1")
    ea, eb = element_of(a_format), element_of(b_format)
    if isinstance(ea, IntFormat) and isinstance(eb, IntFormat):
        alpha = math.log2(k) + ea.bits + eb.bits - 1 - 1  # both signed
        return math.ceil(alpha + math.log2(1.0 + 2.0 ** -alpha) + 1)
    (ma, qa), (mb, qb) = _range_and_quantum(ea), _range_and_quantum(eb)
    ratio = k * (ma / qa) * (mb / qb)
    return math.ceil(math.log2(ratio + 1.0)) + 1
