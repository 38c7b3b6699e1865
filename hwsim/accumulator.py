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

import numpy as np

from numfmt import decode_table
from numfmt.formats import BlockFormat, FloatFormat, IntFormat, get

__all__ = ["worst_case_bits", "element_of", "width_bits", "element_max_integer", "block_length",
           "integer_values", "l1_bound_bits", "observed_bits", "accumulator_bits", "accumulator_table"]


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


# ---------------------------------------------------------------------------
# data-aware widths and per-layer tables
# ---------------------------------------------------------------------------
# Units: every width below counts the in-block integer sum in product-quantum
# units (integer element values, see hwsim.gemm), sign included:
#     bits(x) = ceil(log2(x + 1)) + 1  = bit_length(x) + 1   for a magnitude bound x.

def width_bits(max_abs) -> int:
    """Signed bits holding every integer of magnitude <= ``max_abs``: ceil(log2(max_abs+1)) + 1."""
    if isinstance(max_abs, float):
        if not math.isfinite(max_abs) or max_abs < 0:
            raise ValueError(f"max_abs={max_abs!r} must be a finite magnitude >= 0")
        return math.ceil(math.log2(max_abs + 1.0)) + 1 if max_abs < 2 ** 52 else (
            int(max_abs).bit_length() + 1)
    max_abs = int(max_abs)
    if max_abs < 0:
        raise ValueError(f"max_abs={max_abs} must be >= 0")
    return max_abs.bit_length() + 1


def element_max_integer(fmt) -> int:
    """Largest |element| of a format in element-quantum units (integers: the code)."""
    elem = element_of(fmt)
    m, qt = _range_and_quantum(elem)
    return int(round(m / qt))


def block_length(a_format, b_format, k: int) -> int:
    """In-block dot-product length L of hwsim.matmul for two formats (see hwsim.gemm)."""
    from hwsim.gemm import sub_block_length
    sizes = []
    for f in (a_format, b_format):
        f = get(f)
        sizes.append(f.block_size if isinstance(f, BlockFormat) else None)
    return sub_block_length(sizes[0], sizes[1], k)


def integer_values(q) -> np.ndarray:
    """Element values of a QTensor in units of its element quantum (exact integers, float64).

    Integer elements give their signed value; float elements their value divided by the
    smallest subnormal, which every element value is a multiple of (NaN / Inf give 0).
    Block scales are left out: they do not change an in-block integer sum.
    """
    elem = element_of(q.format)
    vals = decode_table(elem)[q.codes.astype(np.int64)]
    vals = np.where(np.isfinite(vals), vals, 0.0)
    return vals / _range_and_quantum(elem)[1]


def _blocks(v: np.ndarray, L: int) -> np.ndarray:
    """(rows, K) -> (rows, blocks, L), a partial last block padded with zeros."""
    rows, K = v.shape
    nb = -(-K // L) if K else 0
    if nb * L - K:
        v = np.pad(v, ((0, 0), (0, nb * L - K)))
    return v.reshape(rows, nb, L)


def l1_bound_bits(weights, act_format, *, per_channel: bool = False):
    """A2Q's data-aware bound from the actual quantized weights.

    For output channel n and block j of length L (hwsim.matmul's in-block length),
    every activation x in ``act_format`` satisfies

        |sum_k W[n,k] x[k]| <= ||W[n, block j]||_1 * max|x|      (integer units),

    so ``bits = width_bits(max_j ||W[n, j]||_1 * max|x|)``. ``weights`` is a
    QTensor (N x K along axis 1; any format, NVFP4 included). Returns the largest width
    over channels, or an int array of N widths with ``per_channel=True``.
    """
    N, K = weights.shape
    L = block_length(act_format, weights.format, K)
    xmax = element_max_integer(act_format)
    w = _blocks(np.abs(integer_values(weights)), L)
    l1 = w.sum(axis=2).max(axis=1) if w.size else np.zeros(N)
    widths = np.array([width_bits(int(v) * xmax) for v in l1], dtype=np.int64)
    if per_channel:
        return widths
    return int(widths.max()) if widths.size else width_bits(0)


def observed_bits(activations, weights, *, prefix: bool = False) -> int:
    """Bits the in-block sums of ``activations @ weights.T`` actually needed (exact
    accumulator): the width of the largest |block sum|, or of the largest |prefix| in
    index order with ``prefix=True`` (what a saturating accumulator must hold; that one
    runs hwsim.matmul).

    The block sums are exact: they are formed in float32 while the worst case fits in 24
    bits, else in float64 (53 bits; wider sums go through hwsim.matmul's integers).
    """
    a, b = activations, weights
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"activations are {a.shape} and weights {b.shape}; their K (axis 1) "
                         "must agree")
    K = a.shape[1]
    L = block_length(a.format, b.format, K)
    worst = worst_case_bits(a.format, b.format, L)
    if prefix or worst > 53:
        from hwsim.gemm import matmul
        return matmul(a, b, prefix_stats=prefix).acc_bits_needed
    if a.shape[0] == 0 or b.shape[0] == 0:
        return width_bits(0)
    dt = np.float32 if worst <= 24 else np.float64
    av = _blocks(integer_values(a), L).astype(dt).transpose(1, 0, 2)   # blocks x M x L
    bv = _blocks(integer_values(b), L).astype(dt).transpose(1, 2, 0)   # blocks x L x N
    best = 0.0
    step = max(1, (1 << 24) // max(a.shape[0] * b.shape[0], 1))  # bound the temporary
    for j in range(0, av.shape[0], step):
        part = np.matmul(av[j:j + step], bv[j:j + step])
        best = max(best, float(part.max()), -float(part.min()))
    return width_bits(int(best))


def accumulator_bits(a_format, b_format, k: int, *, weights=None, activations=None,
                     prefix: bool = False) -> dict:
    """Accumulator widths (sign included) for an (M x K) @ (N x K)^T block GEMM.

    Returns a dict with ``block_length`` L and
    ``worst_case``  from the types alone over one block of L (A2Q / exact fixed point),
    ``l1_bound``    A2Q's bound from the quantized ``weights`` (QTensor N x K), if given,
    ``observed``    what ``activations`` (QTensor M x K) x ``weights`` needed, if both given.
    """
    L = block_length(a_format, b_format, k)
    row = {"block_length": L, "worst_case": worst_case_bits(a_format, b_format, L)}
    if weights is not None:
        row["l1_bound"] = l1_bound_bits(weights, a_format)
        if activations is not None:
            row["observed"] = observed_bits(activations, weights, prefix=prefix)
    elif activations is not None:
        raise ValueError("activations need weights: give weights= too")
    return row


def accumulator_table(layers, act_format, *, weight_format=None, activations=None,
                      prefix: bool = False) -> list[dict]:
    """One row per layer: name, shape, formats, block length, worst-case, A2Q l1 and
    observed accumulator bits.

    ``layers``: mapping or list of ``(name, weights)`` where weights is a QTensor
    (N x K along axis 1) or a float array (quantized here to ``weight_format``).
    ``activations``: optional mapping name -> QTensor (M x K, along axis 1) in
    ``act_format``; rows without one have ``observed = None``.
    """
    from numfmt import quantize
    from numfmt.qtensor import QTensor
    items = list(layers.items()) if isinstance(layers, dict) else list(layers)
    acts = activations or {}
    rows = []
    for entry in items:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
            raise TypeError(f"each layer must be a (name, weights) pair, got {entry!r}")
        name, w = entry
        if not isinstance(w, QTensor):
            if weight_format is None:
                raise ValueError(f"layer {name!r}: float weights need weight_format=")
            w = quantize(np.asarray(w, dtype=np.float32), weight_format, axis=1)
        N, K = w.shape
        res = accumulator_bits(act_format, w.format, K, weights=w,
                               activations=acts.get(name), prefix=prefix)
        rows.append({"layer": name, "out_features": N, "in_features": K,
                     "a_format": get(act_format).name, "b_format": w.format.name,
                     "block_length": res["block_length"], "worst_case_bits": res["worst_case"],
                     "l1_bound_bits": res["l1_bound"], "observed_bits": res.get("observed")})
    return rows
