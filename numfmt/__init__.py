"""numfmt: bit-exact emulation of MX, scaled-integer, NVFP4 and narrow float formats.

The API is a handful of verbs over NumPy arrays::

    q = numfmt.quantize(x, "mxint8", axis=-1, rounding="rne")   # QTensor
    y = numfmt.dequantize(q)                                     # float32
    y = numfmt.fake_quantize(x, "mxfp4")                         # fused round trip
    c = numfmt.encode(values, "fp8_e4m3"); v = numfmt.decode(c, "fp8_e4m3")

Formats are data (``numfmt.get(name, **overrides)``, ``numfmt.formats()``). MX formats
take a ``scale_rule`` (``SCALE_RULES``: "floor", the OCP default, "ceil", "even",
"rceil"), as an override or as ``quantize(..., scale_rule=...)``.
"""
from numfmt.core import decode, decode_table, dequantize, encode, fake_quantize, quantize
from numfmt.formats import (COMPATS, ROUNDINGS, SCALE_RULES, BlockFormat, FloatFormat, IntFormat,
                            float_format, formats, get, int_format)
from numfmt.qtensor import QTensor

__all__ = [
    "quantize", "dequantize", "fake_quantize", "encode", "decode", "decode_table",
    "get", "formats", "float_format", "int_format",
    "FloatFormat", "IntFormat", "BlockFormat", "QTensor", "ROUNDINGS", "COMPATS", "SCALE_RULES",
]
