"""QTensor: element codes, block scales and the format they belong to."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from numfmt.formats import BlockFormat, FloatFormat, IntFormat, get

__all__ = ["QTensor"]


@dataclass(frozen=True, eq=False)
class QTensor:
    """A quantized tensor.

    ``codes``   one code per element, in the original shape (uint8 for <= 8-bit
                elements; two's complement in the low bits for integers).
    ``scales``  per-block scales: the original shape with the quantized axis
                replaced by the number of blocks. E8M0 / E4M3 codes as uint8
                (MX, NVFP4) or the scale values in their own dtype (fp16 for
                SINT, fp32 for per-channel). None for element formats.
    ``format``  the numfmt format; ``axis`` the quantized axis (non-negative);
    ``shape``   the original shape; ``tensor_scale`` NVFP4's fp32 s_enc
                (decoded = element * block_scale / tensor_scale).
    """

    codes: np.ndarray
    scales: np.ndarray | None
    format: FloatFormat | IntFormat | BlockFormat
    axis: int
    shape: tuple
    tensor_scale: np.float32 | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        self.validate()

    # -- consistency ---------------------------------------------------------
    def expected_scale_shape(self) -> tuple | None:
        fmt = self.format
        if not isinstance(fmt, BlockFormat):
            return None
        shape = self.shape or (1,)
        L = shape[self.axis]
        bs = L if fmt.block_size is None else fmt.block_size
        nblk = -(-L // bs) if bs else 0
        return shape[:self.axis] + (nblk,) + shape[self.axis + 1:]

    def validate(self) -> None:
        """Raise ValueError/TypeError when codes, scales and format disagree."""
        if not isinstance(self.format, (FloatFormat, IntFormat, BlockFormat)):
            raise TypeError(f"format must be a numfmt format, got {self.format!r}")
        if not isinstance(self.codes, np.ndarray) or self.codes.dtype.kind != "u":
            raise TypeError("codes must be an unsigned integer ndarray")
        if self.codes.shape != self.shape:
            raise ValueError(f"codes have shape {self.codes.shape} but the tensor shape is "
                             f"{self.shape}")
        if not 0 <= self.axis < max(len(self.shape), 1):
            raise ValueError(f"axis={self.axis} is out of range for shape {self.shape}")
        expected = self.expected_scale_shape()
        if expected is None:
            if self.scales is not None:
                raise ValueError(f"element format {self.format.name!r} takes no scales")
            return
        if not isinstance(self.scales, np.ndarray):
            raise TypeError(f"block format {self.format.name!r} needs a scales ndarray")
        if self.scales.shape != expected:
            raise ValueError(f"scales have shape {self.scales.shape} but {self.format.name!r} "
                             f"with block_size {self.format.block_size} along axis {self.axis} "
                             f"of shape {self.shape} needs {expected}")
        if self.format.scaling == "nvfp4" and self.tensor_scale is None:
            raise ValueError("an nvfp4 QTensor needs its fp32 tensor_scale")

    def check_codes(self) -> None:
        """Raise ValueError when a code does not fit the element's bits (one pass over the
        codes, so it is left out of ``validate``: readers that index a decode table call
        it before they do)."""
        fmt = self.format
        bits = (fmt.element if isinstance(fmt, BlockFormat) else fmt).bits
        c = self.codes
        if c.size and bits < 8 * c.itemsize and int(c.max()) >> bits:
            flat = c.reshape(-1)
            i = int(np.argmax(flat >> bits != 0))
            where = tuple(int(k) for k in np.unravel_index(i, c.shape))
            raise ValueError(f"code {int(flat[i]):#x} at index {where} does not fit the "
                             f"{bits}-bit elements of {fmt.name!r} (codes must lie in "
                             f"0..{(1 << bits) - 1})")

    # -- storage -------------------------------------------------------------
    @property
    def element_bits(self) -> int:
        return self.format.bits

    @property
    def bits(self) -> int:
        """Total storage bits: element codes + block scales (+ 32 for a tensor scale)."""
        n = int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1
        total = n * self.format.bits
        if isinstance(self.format, BlockFormat):
            total += int(self.scales.size) * self.format.scale.bits
            if self.tensor_scale is not None:
                total += 32
        return total

    def pack(self) -> np.ndarray:
        """Element codes densely bit-packed, LSB first (two 4-bit codes a byte, 6-bit codes
        four in three bytes), in C order of ``shape``. Returns a uint8 array."""
        self.check_codes()
        return pack_codes(self.codes.reshape(-1), self.format.bits)

    @classmethod
    def unpack(cls, packed, format, shape, *, axis: int = -1, scales=None,
               tensor_scale=None) -> "QTensor":
        """Rebuild a QTensor from ``pack()``'s bytes plus its scales."""
        fmt = get(format)
        shape = tuple(int(s) for s in shape)
        n = math.prod(shape) if shape else 1
        codes = unpack_codes(np.asarray(packed, dtype=np.uint8), fmt.bits, n)
        nd = max(len(shape), 1)
        if not -nd <= axis < nd:
            raise ValueError(f"axis={axis} is out of range for shape {shape}")
        return cls(codes.reshape(shape), scales, fmt, axis % nd, shape, tensor_scale)

    def __repr__(self) -> str:
        return (f"QTensor(format={self.format.name!r}, shape={self.shape}, axis={self.axis}, "
                f"bits={self.bits})")


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes of ``bits`` bits each into bytes, least significant bit first."""
    codes = np.asarray(codes).reshape(-1)
    if bits == 8:
        return codes.astype(np.uint8)
    shifts = np.arange(bits, dtype=np.uint32)
    bitmat = ((codes.astype(np.uint32)[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(bitmat.reshape(-1), bitorder="little")


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of ``pack_codes``: ``count`` codes of ``bits`` bits each."""
    dtype = np.uint8 if bits <= 8 else (np.uint16 if bits <= 16 else np.uint32)
    need = -(-count * bits // 8)
    if packed.size < need:
        raise ValueError(f"packed data has {packed.size} bytes; {count} codes of {bits} bits "
                         f"need {need}")
    if bits == 8:
        return packed[:count].copy()
    bitarr = np.unpackbits(packed[:need], bitorder="little")[: count * bits]
    weights = (np.uint32(1) << np.arange(bits, dtype=np.uint32))
    return (bitarr.reshape(count, bits).astype(np.uint32) @ weights).astype(dtype)
