"""Baselines with the LoRaQ result type: rtn, svdquant, lqer, loftq, naive.

Notation: W (out x in) the weight, Q1 the main format quantizer along ``in``,
Q2 the branch format quantizer (L along r, R along in), SVD_r(M) = U_r S_r V_r^T
the top-r truncated SVD, split as L = U_r S_r^(1/2), R = S_r^(1/2) V_r^T.

    rtn       W_hat = Q1(W)                                      (no branch, rank 0)
    naive     L, R = SVD_r(W);      W_hat = Q1(W - Q2(L)Q2(R)) + Q2(L)Q2(R)
    svdquant  the same with an FP16 branch (rank 32 by default) on the smoothed
              weight W diag(lambda) when activations are given; refine_iters > 0
              alternates  L, R = SVD_r(W - Q1(W - L R))  (Li et al. 2025, sec. 4)
    lqer      L, R = SVD_r(W - Q1(W)) (ZeroQuant-V2 LoRC / LQER);
              W_hat = Q1(W - Q2(L)Q2(R)) + Q2(L)Q2(R)
    loftq     Q_0 = Q1(W); for t = 1..iters: L, R = SVD_r(W - Q_{t-1}),
              Q_t = Q1(W - Q2(L)Q2(R)); the best iterate is returned (Li et al., LoftQ)

Every method's main matrix is Q1 of *its own* residual P = W - branch, so
w_hat = Q1(P) + branch for all of them (lqer's classic form keeps Q1(W) as the
main matrix; quantizing the actual residual is never worse in practice and gives
all methods the same structure). With ``rank=None`` lqer, loftq and naive take
the equal-memory rank of their branch format against an FP16 rank-32 branch.
Every function takes ``threads`` (default 1): torch and Numba run with that
many threads inside the call (see ``common.limit_threads``).
"""
from __future__ import annotations

import time

import numpy as np

import numfmt
from analysis.loraq.checks import (as_activations, as_weight, check_format, check_int,
                                   check_rank)
from analysis.loraq.common import (branch_product, build_result, fro, mm, with_threads, quantize_branch, quantize_main, resolve_rank,
                                   split_factors, top_svd)
from analysis.loraq.result import LoRaQResult

__all__ = ["rtn", "svdquant", "smoothing_vector", "smoothing_search", "lqer", "loftq", "naive", "ALPHA_GRID", "BETA_GRID"]

ALPHA_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
BETA_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


def _err(W, main, left, right) -> float:
    w = numfmt.dequantize(main).astype(np.float64)
    if left is not None:
        w += branch_product(left, right)
    return fro(W - w) / max(fro(W), 1e-300)


@with_threads
def rtn(W, *, main: str = "mxint4") -> LoRaQResult:
    """Round-to-nearest: W_hat = Q1(W), no branch."""
    t0 = time.perf_counter()
    W = as_weight(W)
    main = check_format(main, "main")
    q = numfmt.quantize(W, main, axis=1)
    return build_result(W, q, None, None, method="rtn", main_format=main, branch_format=None,
                        t0=t0, config={"method": "rtn", "main": main})


def _lowrank_then_residual(W, L, R, main, branch):
    left, right = quantize_branch(L, R, branch)
    return quantize_main(W, left, right, main), left, right


def _checked(W, main, branch, rank, ref_rank, ref_bits):
    """Validate the common arguments; returns (W float64, main, branch, rank)."""
    W = as_weight(W)
    main, branch = check_format(main, "main"), check_format(branch, "branch")
    return W, main, branch, resolve_rank(rank, W.shape, branch, ref_rank, ref_bits)


def _svd_baseline(method, W, main, branch, rank, ref_rank, ref_bits, *, of_error):
    """Top-r SVD of W (naive) or of Q1's error W - Q1(W) (lqer), factors in Q2,
    residual W - Q2(L) Q2(R) in Q1; no optimization."""
    t0 = time.perf_counter()
    W, main, branch, r = _checked(W, main, branch, rank, ref_rank, ref_bits)
    target = W - numfmt.fake_quantize(W, main, axis=1).astype(np.float64) if of_error else W
    L, R = split_factors(*top_svd(target, r))
    q, left, right = _lowrank_then_residual(W, L, R, main, branch)
    return build_result(W, q, left, right, method=method, main_format=main, branch_format=branch,
                        t0=t0, config={"method": method, "main": main, "branch": branch,
                                       "rank": r})


@with_threads
def naive(W, *, main: str = "mxint4", branch: str = "mxint8", rank=None, ref_rank: int = 32,
          ref_bits: int = 16) -> LoRaQResult:
    """SVD_r(W) factors quantized with Q2, residual with Q1; no optimization."""
    return _svd_baseline("naive", W, main, branch, rank, ref_rank, ref_bits, of_error=False)


@with_threads
def lqer(W, *, main: str = "mxint4", branch: str = "mxint8", rank=None, ref_rank: int = 32,
         ref_bits: int = 16) -> LoRaQResult:
    """SVD_r of the main format's error W - Q1(W), factors in Q2, residual re-quantized."""
    return _svd_baseline("lqer", W, main, branch, rank, ref_rank, ref_bits, of_error=True)


def _alternate(W, q, main, branch, r, iters, history):
    """LoftQ / SVDQuant refinement: branch = Q2(SVD_r(W - Q1-part)), main = Q1(W - branch).

    Starts from main QTensor ``q`` (or Q1(W) when None); returns the best
    (error, main, left, right) seen and appends every iterate's error to history.
    """
    best = None
    Q = (numfmt.fake_quantize(W, main, axis=1) if q is None else numfmt.dequantize(q))
    for _ in range(iters):
        L, R = split_factors(*top_svd(W - Q.astype(np.float64), r))
        qm, left, right = _lowrank_then_residual(W, L, R, main, branch)
        e = _err(W, qm, left, right)
        history.append(e)
        if best is None or e < best[0]:
            best = (e, qm, left, right)
        Q = numfmt.dequantize(qm)
    return best


@with_threads
def loftq(W, *, main: str = "mxint4", branch: str = "mxint8", rank=None, iters: int = 5,
          ref_rank: int = 32, ref_bits: int = 16) -> LoRaQResult:
    """Alternating Q1 and SVD (LoftQ), ``iters`` alternations, best iterate kept."""
    t0 = time.perf_counter()
    W, main, branch, r = _checked(W, main, branch, rank, ref_rank, ref_bits)
    iters = check_int(iters, "iters", 1)
    history: list[float] = []
    _, q, left, right = _alternate(W, None, main, branch, r, iters, history)
    return build_result(W, q, left, right, method="loftq", main_format=main,
                        branch_format=branch, history=history, steps=iters, t0=t0,
                        config={"method": "loftq", "main": main, "branch": branch, "rank": r,
                                "iters": iters})


def _grid(values, what):
    vals = tuple(float(v) for v in values)
    if not vals or not all(np.isfinite(v) and v >= 0 for v in vals):
        raise ValueError(f"{what}={values!r} must be a non-empty sequence of finite numbers >= 0")
    return vals


@with_threads
def smoothing_vector(W, X, alpha: float, beta: float) -> np.ndarray:
    """SVDQuant's per-input-channel smoothing lambda_j = max_n |X_nj|^alpha / max_o |W_oj|^beta.

    Channels whose activation or weight maximum is 0 get lambda_j = 1. The
    vector is rounded to float32 (as it is stored) and returned as float64.
    """
    xmax = np.abs(X).max(axis=0)
    wmax = np.abs(W).max(axis=0)
    lam = np.ones(np.asarray(W).shape[1])
    ok = (xmax > 0) & (wmax > 0)
    lam[ok] = xmax[ok] ** alpha / wmax[ok] ** beta
    return lam.astype(np.float32).astype(np.float64)


def smoothing_search(W, X, alphas, betas, fit):
    """SVDQuant's smoothing search: (lambda, (alpha, beta), fit's result) with the smallest
    output error ||X W^T - X W_hat^T||_F over the grid.

    ``fit(W')`` returns (main QTensor, left, right, history) for the smoothed
    weight W' = W diag(lambda); W_hat = (Q1 + L R) diag(1 / lambda). A one-point
    grid skips the error evaluation.
    """
    W = np.asarray(W, dtype=np.float64)
    ref = fro(mm(X, W.T)) if len(alphas) * len(betas) > 1 else 1.0
    best = None
    for a in alphas:
        for b in betas:
            lam = smoothing_vector(W, X, a, b)
            res = fit(W * lam[None, :])
            if len(alphas) * len(betas) == 1:
                return lam, (a, b), res
            q, left, right = res[:3]
            w = numfmt.dequantize(q).astype(np.float64) + branch_product(left, right)
            err = fro(mm(X, (W - w / lam[None, :]).T)) / max(ref, 1e-300)
            if best is None or err < best[0]:
                best = (err, lam, (a, b), res)
    return best[1], best[2], best[3]


@with_threads
def svdquant(W, *, main: str = "mxint4", branch: str = "fp16", rank: int = 32,
             refine_iters: int = 0, activations=None, alpha_grid=ALPHA_GRID,
             beta_grid=BETA_GRID) -> LoRaQResult:
    """SVDQuant: top-r SVD branch kept in FP16, residual quantized with Q1.

    With ``activations`` X (n x in), the weight is smoothed first: per input
    channel j, lambda_j = max_n |X_nj|^alpha / max_o |W_oj|^beta (channels with
    a zero maximum get lambda_j = 1), W' = W diag(lambda), and the layer divides
    its input by lambda. alpha in ``alpha_grid`` and beta in ``beta_grid`` are
    chosen by the smallest output error ||X W^T - X W_hat^T||_F, W_hat =
    W_hat' diag(1/lambda). ``refine_iters`` > 0 alternates SVD_r(W' - Q1(W' - L R))
    that many times, keeping the iterate with the smallest error of the
    (smoothed) weight.
    """
    t0 = time.perf_counter()
    W = as_weight(W)
    main, branch = check_format(main, "main"), check_format(branch, "branch")
    rank = check_rank(rank, W.shape)
    refine_iters = check_int(refine_iters, "refine_iters", 0)
    X = as_activations(activations, W.shape[1])
    alphas, betas = _grid(alpha_grid, "alpha_grid"), _grid(beta_grid, "beta_grid")

    def fit(Ws):
        L, R = split_factors(*top_svd(Ws, rank))
        q, left, right = _lowrank_then_residual(Ws, L, R, main, branch)
        hist = [_err(Ws, q, left, right)]
        if refine_iters:
            best = _alternate(Ws, q, main, branch, rank, refine_iters, hist)
            if best[0] < hist[0]:
                _, q, left, right = best
        return q, left, right, hist

    if X is None:
        q, left, right, hist = fit(W)
        smooth, chosen = None, None
    else:
        smooth, chosen, (q, left, right, hist) = smoothing_search(W, X, alphas, betas, fit)
    return build_result(W, q, left, right, method="svdquant", main_format=main,
                        branch_format=branch, history=hist, steps=refine_iters, smooth=smooth,
                        X=X, t0=t0,
                        config={"method": "svdquant", "main": main, "branch": branch,
                                "rank": rank, "refine_iters": refine_iters,
                                "alpha_beta": None if chosen is None else list(chosen)})
