"""Compile Numba's on-disk cache (cache=True) for the kernels the tools and the tests use.

    python scripts/warm_cache.py a      # numfmt's MX kernels, then hwsim's
    python scripts/warm_cache.py b      # numfmt's other kernels (SINT, NVFP4, elements),
                                        # then hwsim.tensorcore's

``scripts/setup`` runs the two groups in two processes at once (about 140 s each cold on
the 2-core project machine, instead of paying the compiles one after another inside the
tests). No kernel is compiled by both groups, so the two processes never write the same
cache index file; hwsim's operands are therefore built from codes, not by quantizing.
A kernel compiles once per argument type (float32 / float64 input, code widths), so
small inputs of each type are enough.
"""
from __future__ import annotations

import sys
import time

import numpy as np


def _inputs():
    x = np.random.default_rng(0).standard_normal((3, 70))
    return [x.astype(np.float32), x]


def _mx_kernels() -> None:
    import numfmt
    for x in _inputs():
        for fmt in ("mxint8", "mxfp8_e4m3"):
            for xs in (x[:, :64], x):                 # constant 32-block loops and general ones
                for rounding in ("rne", "rtz"):       # vectorized routines and the reference loop
                    numfmt.dequantize(numfmt.quantize(xs, fmt, rounding=rounding))
                    numfmt.fake_quantize(xs, fmt, rounding=rounding)
        if x.dtype == np.float32:
            numfmt.fake_quantize(x, "mxint8", compat="microxcaling")


def _operand(fmt_name: str, rows: int, k: int, rng):
    """A QTensor of random codes and scales (no numfmt kernel runs)."""
    import numfmt
    fmt = numfmt.get(fmt_name)
    codes = rng.integers(0, 1 << fmt.element.bits, (rows, k)).astype(np.uint8)
    nblk = -(-k // fmt.block_size)
    if fmt.scaling == "mx":
        scales = rng.integers(120, 134, (rows, nblk)).astype(np.uint8)
    else:
        scales = rng.uniform(0.01, 0.1, (rows, nblk)).astype(np.float16)
    return numfmt.QTensor(codes, scales, fmt, 1, (rows, k))


def _hwsim_kernels() -> None:
    import hwsim
    rng = np.random.default_rng(1)
    q = {f: _operand(f, 5, 64, rng) for f in ("mxint8", "mxint4", "mxfp8_e4m3", "mxfp8_e5m2",
                                              "sint8")}
    A, F = hwsim.Accumulator, hwsim.FloatAcc
    for a, b in (("mxint8", "mxint8"), ("mxfp8_e4m3", "mxfp8_e4m3"), ("sint8", "sint8"),
                 ("mxfp8_e5m2", "mxfp8_e5m2")):
        for ib in (F(), F(11, "rtz"), F(23, "rne", promote_every=64)):
            hwsim.matmul(q[a], q[b], inter_block=ib)
    for a, b, acc in (("mxint8", "mxint4", A(12, "saturate")), ("mxint8", "mxint8", A(16, "wrap")),
                      ("mxfp8_e4m3", "mxfp8_e4m3", A(30, "saturate")),
                      ("mxfp8_e4m3", "mxfp8_e5m2", A(60, "wrap"))):
        for ib in (F(), F(11, "rtz")):
            hwsim.matmul(q[a], q[b], acc=acc, inter_block=ib)


def _other_numfmt_kernels() -> None:
    import numfmt
    for x in _inputs():
        for fmt in ("sint4", "nvfp4", "int8_channel"):
            for rounding in ("rne", "rtz"):
                numfmt.dequantize(numfmt.quantize(x, fmt, rounding=rounding))
                numfmt.fake_quantize(x, fmt, rounding=rounding)
        for elem in ("fp8_e4m3", "int4", "fp16"):
            numfmt.decode(numfmt.encode(x, elem), elem)


def _tensorcore_kernels() -> None:
    """hwsim.tensorcore: the operand decoder and the dot / GEMM row kernels (one
    signature each: float32 values in, whatever the unit), through the public calls; the
    E4M3 codes are decoded by numfmt's table kernel, which group b compiles anyway."""
    import hwsim
    import numfmt
    rng = np.random.default_rng(2)
    tc = hwsim.tensor_core("H100", "fp8_e4m3")
    codes = rng.integers(0, 0x7F, (4, 64)).astype(np.uint8)   # finite E4M3 (no NaN)
    vals = numfmt.decode(codes, "fp8_e4m3")
    tc.dot(vals, vals[::-1].copy())
    q = numfmt.QTensor(codes, None, numfmt.get("fp8_e4m3"), 1, (4, 64))
    hwsim.matmul(q, q, inter_block=tc)


# hwsim.tensorcore goes with b: a (MX and hwsim.gemm kernels) is the longer group.
GROUPS = {"a": (_mx_kernels, _hwsim_kernels),
          "b": (_other_numfmt_kernels, _tensorcore_kernels)}

if __name__ == "__main__":
    names = sys.argv[1:] or list(GROUPS)
    unknown = [n for n in names if n not in GROUPS]
    if unknown:
        sys.exit(f"unknown group(s) {unknown}; allowed: {sorted(GROUPS)}")
    for name in names:
        t = time.perf_counter()
        for fn in GROUPS[name]:
            fn()
        print(f"Numba cache, group {name}: compiled (or loaded) in {time.perf_counter() - t:.1f} s")
