"""Throughput of hwsim.matmul beside NumPy float32 BLAS, and the hardware-numerics figures.

    python -m hwsim.bench [--size 2048] [--slow-size 512] [--threads 2] [--skip-numerics]

Prints, in one run: GMAC/s of hwsim.matmul for mxint8 x mxint8 (exact accumulator),
mxfp4 x mxfp4, mxint4 x mxint8, a saturating 16-bit accumulator and a 14-bit truncating
inter-block accumulator, each beside ``numpy`` float32 ``a @ b.T`` of the same shape
measured in the same run (ratio = hwsim / BLAS). Numba compile time is measured apart
(a first call on a tiny problem). Then the tensor-core models: ``TensorCore.dot``
throughput at K = 32 and a 512^3 FP8 GEMM through the H100 preset (in the table above),
the DeepSeek-V3 reproduction on a FloatAcc and on the H100 FP8 tensor-core preset, and the
W8A8 / W4A8 overflow table (``deepseek_figures``, ``deepseek_tensorcore_figures``,
``overflow_figures``, also used by the tests).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from numfmt.bench import best_time, cpu_name


def _set_threads(n: int) -> None:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)


def _deepseek_operands(m: int, n: int, k: int, seed: int):
    """Yield (label, a, b, exact) of the DeepSeek-V3 reproduction: all-positive mxfp8_e4m3
    operands, half-normal and with massive activations (the first 32 columns x 4096), and
    the exact float64 product of the quantized operands."""
    import numfmt
    rng = np.random.default_rng(seed)
    for label, boost in (("half-normal", 1.0), ("massive activation x4096", 4096.0)):
        x = np.abs(rng.standard_normal((m, k))).astype(np.float32)
        x[:, :32] *= np.float32(boost)
        w = np.abs(rng.standard_normal((n, k))).astype(np.float32)
        a = numfmt.quantize(x, "mxfp8_e4m3", axis=1)
        b = numfmt.quantize(w, "mxfp8_e4m3", axis=1)
        yield (label, a, b,
               numfmt.dequantize(a).astype(np.float64) @ numfmt.dequantize(b).astype(np.float64).T)


def deepseek_figures(m: int = 64, n: int = 64, k: int = 4096, seed: int = 0) -> list[dict]:
    """mxfp8_e4m3 x mxfp8_e4m3, K = 4096, inter-block FloatAcc(13, "rtz") (14 significant
    bits, truncation) with and without promote_every=128, against the exact product of the
    quantized operands (float64 of dequantized values; exact to 1e-16 here).

    Data (all positive, as in DeepSeek-V3's setting where the partial sum grows
    monotonically): "half-normal" |N(0,1)| activations and weights; "massive activation"
    the same with the first block of every activation row scaled by 4096 (the massive
    activations of LLMs), so that the later blocks' terms are about one unit in the last
    place of the 14-bit running sum and truncation drops most of them.
    """
    from hwsim.gemm import FloatAcc, matmul
    rows = []
    for label, a, b, exact in _deepseek_operands(m, n, k, seed):
        row = {"data": label, "m": m, "n": n, "k": k}
        for name, ib in (("fp32", FloatAcc()), ("trunc14", FloatAcc(13, "rtz")),
                         ("trunc14_promote128", FloatAcc(13, "rtz", promote_every=128))):
            rel = np.abs(matmul(a, b, inter_block=ib).out - exact) / np.abs(exact)
            row[f"{name}_mean"] = float(rel.mean())
            row[f"{name}_max"] = float(rel.max())
        row["promote_gain"] = row["trunc14_mean"] / row["trunc14_promote128_mean"]
        rows.append(row)
    return rows


def deepseek_tensorcore_figures(m: int = 64, n: int = 64, k: int = 4096, seed: int = 0,
                                gpus=("H100", "B200")) -> list[dict]:
    """The DeepSeek-V3 reproduction on the tensor-core models: the data of
    ``deepseek_figures`` (mxfp8_e4m3 operands, K = 4096, all positive; half-normal and
    massive activations) through ``hwsim.matmul(a, b, inter_block=tensor_core(gpu,
    "fp8_e4m3"))``: the unit aligns each 32-product chunk to its largest exponent, keeps
    13 fraction bits (H100; B200 keeps 25) and truncates, its FP32 result keeps 14
    significant bits, chained over K; then with promotion to an FP32 register every 128
    elements. Relative error against the exact product of the quantized operands."""
    from hwsim.gemm import matmul
    from hwsim.tensorcore import tensor_core
    rows = []
    for label, a, b, exact in _deepseek_operands(m, n, k, seed):
        for gpu in gpus:
            tc = tensor_core(gpu, "fp8_e4m3")
            row = {"data": label, "gpu": gpu, "m": m, "n": n, "k": k,
                   "significant_bits": tc.significant_bits}
            for name, promote in (("plain", None), ("promote128", 128)):
                out = matmul(a, b, inter_block=tc, promote_every=promote).out
                rel = np.abs(out - exact) / np.abs(exact)
                row[f"{name}_mean"] = float(rel.mean())
                row[f"{name}_max"] = float(rel.max())
            row["promote_gain"] = row["plain_mean"] / max(row["promote128_mean"], 1e-300)
            rows.append(row)
    return rows


def tensorcore_dot_throughput(n: int = 1 << 16, k: int = 32, seed: int = 0,
                               repeat: int = 30) -> dict:
    """GMAC/s of ``TensorCore.dot`` (H100 FP8 preset, n rows of K = 32: one unit
    operation each) beside NumPy float32 row dots (einsum) of the same data, and the
    compile time of a first call."""
    import time

    import numfmt
    from hwsim.tensorcore import tensor_core
    rng = np.random.default_rng(seed)
    tc = tensor_core("H100", "fp8_e4m3")
    a = numfmt.fake_quantize(rng.standard_normal((n, k)).astype(np.float32), "fp8_e4m3")
    b = numfmt.fake_quantize(rng.standard_normal((n, k)).astype(np.float32), "fp8_e4m3")
    t0 = time.perf_counter()
    tc.dot(a[:2], b[:2])
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeat):  # a call is ~2 ms: best and median of many
        t0 = time.perf_counter()
        tc.dot(a, b)
        times.append(time.perf_counter() - t0)
    t_np = best_time(lambda: np.einsum("ik,ik->i", a, b), repeat=repeat)
    macs = float(n) * k
    t_tc = min(times)
    return {"n": n, "k": k, "repeat": repeat, "compile_s": compile_s, "gmacs": macs / t_tc / 1e9,
            "median_gmacs": macs / float(np.median(times)) / 1e9,
            "numpy_gmacs": macs / t_np / 1e9, "ratio": t_np / t_tc}


def overflow_figures(m: int = 64, n: int = 64, k: int = 1024, seed: int = 0) -> list[dict]:
    """W8A8 (mxint8 x mxint8) and W4A8 (mxint8 activations x mxint4 weights) with the
    in-block accumulator below the A2Q bound: overflowing additions and the output's
    norm-wise relative error against the exact accumulator, wrap versus saturate.
    Activations are half-normal (post-GELU-like, mostly positive) so sums grow."""
    import numfmt
    from hwsim.accumulator import l1_bound_bits, worst_case_bits
    from hwsim.gemm import Accumulator, matmul
    rng = np.random.default_rng(seed)
    x = np.abs(rng.standard_normal((m, k))).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32) + 0.5
    rows = []
    for label, bf in (("W8A8", "mxint8"), ("W4A8", "mxint4")):
        a = numfmt.quantize(x, "mxint8", axis=1)
        b = numfmt.quantize(w, bf, axis=1)
        exact = matmul(a, b, prefix_stats=True)
        ref = exact.out.astype(np.float64)
        bound = worst_case_bits("mxint8", bf, 32)
        for P in (exact.acc_bits_needed - 1, exact.acc_bits_needed - 2, exact.acc_bits_needed - 4):
            for ovf in ("wrap", "saturate"):
                r = matmul(a, b, acc=Accumulator(P, ovf))
                err = float(np.linalg.norm(r.out - ref) / np.linalg.norm(ref))
                rows.append({"config": label, "a2q_bound": bound,
                             "l1_bound": int(l1_bound_bits(b, "mxint8")),
                             "needed": exact.acc_bits_needed, "bits": P, "overflow": ovf,
                             "overflow_count": r.overflow_count, "additions": m * n * k,
                             "rel_error": err})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hwsim.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048, help="M = N = K of the fast paths")
    ap.add_argument("--slow-size", type=int, default=512, help="M = N = K of the slow paths")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-numerics", action="store_true")
    args = ap.parse_args(argv)
    _set_threads(args.threads)  # before NumPy / torch load their thread pools
    import numba
    import numfmt
    from hwsim.gemm import Accumulator, FloatAcc, matmul
    from hwsim.tensorcore import tensor_core
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    try:
        import torch
        torch.set_num_threads(args.threads)
    except ImportError:  # torch is not needed here
        pass
    rng = np.random.default_rng(0)
    configs = [
        ("mxint8 x mxint8, exact", "mxint8", "mxint8", {}, args.size),
        ("mxfp4 x mxfp4, exact", "mxfp4", "mxfp4", {}, args.size),
        ("mxint8 x mxint4, exact", "mxint8", "mxint4", {}, args.size),
        ("mxint8 x mxint8, 16-bit saturating", "mxint8", "mxint8",
         {"acc": Accumulator(16, "saturate")}, args.slow_size),
        ("mxfp8_e4m3 x mxfp8_e4m3, 14-bit rtz", "mxfp8_e4m3", "mxfp8_e4m3",
         {"inter_block": FloatAcc(13, "rtz")}, args.slow_size),
        ("fp8_e4m3 x fp8_e4m3, H100 tensor core", "fp8_e4m3", "fp8_e4m3",
         {"inter_block": tensor_core("H100", "fp8_e4m3")}, args.slow_size),
    ]
    print(f"hwsim.matmul throughput; {args.threads} threads (Numba, BLAS, torch); "
          f"cpu: {cpu_name()}")
    print(f"{'configuration':<38} {'size':>6} {'compile s':>9} {'hwsim GMAC/s':>12} "
          f"{'fp32 BLAS GMAC/s':>16} {'ratio':>7}  path")
    for label, fa, fb, kw, s in configs:
        x = rng.standard_normal((s, s)).astype(np.float32)
        w = rng.standard_normal((s, s)).astype(np.float32)
        a = numfmt.quantize(x, fa, axis=1)
        b = numfmt.quantize(w, fb, axis=1)
        tiny_a = numfmt.quantize(x[:4, :64], fa, axis=1)
        tiny_b = numfmt.quantize(w[:4, :64], fb, axis=1)
        compile_s = best_time(lambda: matmul(tiny_a, tiny_b, **kw))
        res = {}
        t_hw = best_time(lambda: res.setdefault("r", matmul(a, b, **kw)), repeat=5)
        xd, wd = numfmt.dequantize(a), numfmt.dequantize(b)
        t_blas = best_time(lambda: xd @ wd.T, repeat=5)
        macs = float(s) ** 3
        print(f"{label:<38} {s:>6} {compile_s:>9.2f} {macs / t_hw / 1e9:>12.2f} "
              f"{macs / t_blas / 1e9:>16.2f} {t_blas / t_hw:>7.3f}  {res['r'].path}")
    r = tensorcore_dot_throughput()
    print(f"\nTensorCore.dot, H100 fp8_e4m3, K={r['k']} (one unit operation per row), "
          f"n={r['n']}: {r['gmacs']:.3f} GMAC/s best of {r['repeat']} (median {r['median_gmacs']:.3f}); "
          f"numpy float32 row dots {r['numpy_gmacs']:.3f} GMAC/s; ratio {r['ratio']:.3f}; "
          f"compile {r['compile_s']:.2f} s")
    if not args.skip_numerics:
        print("\nDeepSeek-V3 reproduction on the tensor-core models: mxfp8_e4m3 x mxfp8_e4m3, "
              "M=N=64, K=4096, relative error vs exact")
        print(f"{'data':<26} {'gpu':<5} {'bits':>4} {'mean':>9} {'max':>9} "
              f"{'+promote128 mean':>17} {'+promote128 max':>16} {'gain':>6}")
        for r in deepseek_tensorcore_figures():
            print(f"{r['data']:<26} {r['gpu']:<5} {r['significant_bits']:>4} "
                  f"{100 * r['plain_mean']:>8.3f}% {100 * r['plain_max']:>8.3f}% "
                  f"{100 * r['promote128_mean']:>16.4f}% {100 * r['promote128_max']:>15.4f}% "
                  f"{r['promote_gain']:>6.1f}")
        print("\nDeepSeek-V3 reproduction: mxfp8_e4m3 x mxfp8_e4m3, M=N=64, K=4096, relative "
              "error vs exact")
        print(f"{'data':<26} {'fp32 max':>10} {'14b rtz mean':>13} {'14b rtz max':>12} "
              f"{'+promote128 mean':>17} {'+promote128 max':>16} {'gain':>6}")
        for r in deepseek_figures():
            print(f"{r['data']:<26} {r['fp32_max']:>10.2e} {100 * r['trunc14_mean']:>12.3f}% "
                  f"{100 * r['trunc14_max']:>11.3f}% {100 * r['trunc14_promote128_mean']:>16.4f}% "
                  f"{100 * r['trunc14_promote128_max']:>15.4f}% {r['promote_gain']:>6.1f}")
        print("\nAccumulator below the A2Q bound: M=N=64, K=1024, half-normal activations")
        print(f"{'config':<6} {'A2Q':>4} {'l1':>4} {'needed':>6} {'P':>4} {'overflow':>9} "
              f"{'overflowed adds':>16} {'rel. error':>11}")
        for r in overflow_figures():
            print(f"{r['config']:<6} {r['a2q_bound']:>4} {r['l1_bound']:>4} {r['needed']:>6} "
                  f"{r['bits']:>4} {r['overflow']:>9} {r['overflow_count']:>16} "
                  f"{r['rel_error']:>11.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
