"""Benchmark of the LoRaQ optimizer: ``python -m analysis.bench``.

1. A seeded 1152 x 4608 matrix (PixArt-Sigma's FFN shape; N(0, 0.02^2) entries
   with 8 outlier input channels scaled by 25), mxint4 main, mxint8 branch at
   equal memory to an FP16 rank-32 branch (rank 62). In the same run: one
   ``torch.linalg.svd`` of the same matrix (full_matrices=False, float32), then
   ``optimize`` with its defaults, then ``optimize`` with 5x as many steps (no
   early stop). Printed: the times, time(optimize) / time(svd), and
   error(default) / error(5x steps) - 1 (the "converged within 1%" test).
2. All 36 MiniLM linear layers x 3 branch formats (mxint8, mxint6, mxint4),
   mxint4 main, through ``optimize_model`` with ``--processes`` workers.

Numba compile / cache load is timed apart (a warm-up call first). Threads:
``--threads`` (default 2) for torch and Numba in part 1, the SVD included.
Nothing is asserted; the script prints measurements and their ratios.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

__all__ = ["bench_matrix", "main"]


def bench_matrix(seed: int = 0, shape=(1152, 4608), outliers: int = 8,
                 outlier_scale: float = 25.0) -> np.ndarray:
    """The seeded test weight: N(0, 0.02^2) float32, ``outliers`` input columns x scale."""
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    cols = rng.choice(shape[1], outliers, replace=False)
    W[:, cols] *= np.float32(outlier_scale)
    return W


def _matrix_part(threads: int, steps: int | None, factor: int) -> None:
    from analysis.loraq import optimize
    from analysis.loraq.common import limit_threads
    from analysis.loraq.optimizer import DEFAULT_STEPS

    t = time.perf_counter()
    optimize(bench_matrix(shape=(64, 256)), rank=4, steps=2, threads=threads)
    print(f"warm-up (Numba compile / cache load, torch init): {time.perf_counter() - t:.2f} s")
    W = bench_matrix()
    print(f"matrix 1152 x 4608, mxint4 main, mxint8 branch, {threads} thread(s), "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs visible")
    with limit_threads(threads):
        t = time.perf_counter()
        torch.linalg.svd(torch.from_numpy(W), full_matrices=False)
        t_svd = time.perf_counter() - t
    print(f"torch.linalg.svd (float32, full_matrices=False): {t_svd:.2f} s")
    n = DEFAULT_STEPS if steps is None else steps
    t = time.perf_counter()
    res = optimize(W, steps=n, threads=threads)
    t_opt = time.perf_counter() - t
    print(f"optimize, {res.steps} steps (rank {res.rank}): {t_opt:.2f} s, rel_error "
          f"{res.rel_error:.5f}; time / svd = {t_opt / t_svd:.2f}x (goal <= 8x)")
    from analysis.loraq import svdquant
    sq = svdquant(W, threads=threads)
    print(f"svdquant (FP16 rank 32, no data): rel_error {sq.rel_error:.5f}; "
          f"loraq / svdquant = {res.rel_error / sq.rel_error:.3f}")
    if factor > 1:
        t = time.perf_counter()
        long = optimize(W, steps=factor * max(res.steps, 1), early_stop=False, threads=threads)
        t_long = time.perf_counter() - t
        gap = res.rel_error / long.rel_error - 1
        print(f"optimize, {long.steps} steps ({factor}x): {t_long:.2f} s, rel_error "
              f"{long.rel_error:.5f}; default / {factor}x - 1 = {gap:+.2%} (goal <= 1%)")


def _minilm_part(processes: int, formats) -> None:
    from analysis.loraq.driver import optimize_model
    from analysis.minilm import linear_weights

    weights = linear_weights()
    total = 0.0
    for branch in formats:
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            res = optimize_model(weights, d, method="loraq", branch=branch, processes=processes)
            dt = time.perf_counter() - t
        total += dt
        errs = np.array([r.rel_error for r in res.values()])
        print(f"MiniLM 36 layers, branch {branch}: {dt:.1f} s, mean rel_error {errs.mean():.5f}")
    print(f"MiniLM 36 layers x {len(formats)} branch formats, {processes} process(es): "
          f"{total:.1f} s (goal <= 60 s)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.bench", description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="steps of the default run")
    p.add_argument("--factor", type=int, default=5, help="the long run has factor x steps")
    p.add_argument("--skip-matrix", action="store_true")
    p.add_argument("--skip-minilm", action="store_true")
    args = p.parse_args(argv)
    try:
        load = os.getloadavg()
        print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    except OSError:
        pass
    if not args.skip_matrix:
        _matrix_part(args.threads, args.steps, args.factor)
    if not args.skip_minilm:
        _minilm_part(args.processes, ("mxint8", "mxint6", "mxint4"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
