"""SVDQuant's smoothing, chosen per layer on the quantized layer's output error.

For a layer y = x W^T (W: out x in) and calibration activations X (n x in), each grid
point (alpha, beta) gives SVDQuant's per-input-channel vector

    lambda_j = max_n |X_nj|^alpha / max_o |W_oj|^beta       (1 where a maximum is 0)

and the smoothed layer W' = W diag(lambda), which sees x' = x / lambda. Its quantized
output, with the activation quantizer in the loop and the smoothing rank's SVD branch:

    L R  = SVD_r(W')                          (the top-r part, kept in FP16, as SVDQuant's)
    y_q  = Qa1(X / lambda) Q1(W' - L R)^T + fp16(X / lambda) (L R)^T

and the criterion is the output MSE ||X W^T - y_q||_F^2 over the calibration rows. The
point with the smallest one is chosen (ties: the first in grid order). Q1 and Qa1 are the
recipe's main weight and activation formats, each quantized along the input channels.

The smoothing rank r is the configuration's branch rank for SVDQuant; for a quantized
branch it is the FP16 rank of the same memory: ``ref_rank`` at the equal-memory rank, and
in proportion for an explicit rank (twice the equal-memory rank: twice ``ref_rank``), as
the paper raises the smoothing rank with the LoRaQ rank. A search depends only on the
layer, its activations, the main formats, the grid and r: configurations that share them
choose the same point (each runs its own search; on dit-digits all of them together cost
3.7 s of the report).

The criterion of ``analysis.loraq.baselines.smoothing_search`` (the weight-only one) has
no activation quantizer: it scores ||X (W - W_hat)^T|| with X unquantized.
"""
from __future__ import annotations

import numpy as np

import numfmt
from analysis.loraq.baselines import smoothing_vector
from analysis.loraq.common import mm, split_factors, top_svd

__all__ = ["output_mse", "search", "smoothing_rank"]


def _fq(x: np.ndarray, fmt: str) -> np.ndarray:
    """Fake-quantized x along its last axis, float64."""
    return numfmt.fake_quantize(np.ascontiguousarray(x, dtype=np.float32), fmt,
                                axis=-1).astype(np.float64)


def output_mse(W, X, lam, rank: int, main: str, main_act: str) -> float:
    """||X W^T - y_q||_F^2 / (n * out) of the smoothed, quantized layer (module docstring)."""
    W = np.asarray(W, dtype=np.float64)
    X = np.asarray(X, dtype=np.float64)
    Ws = W * lam[None, :]
    L, R = split_factors(*top_svd(Ws, rank))
    LR = mm(L, R)
    P = _fq(Ws - LR, main)
    Xs = X / lam[None, :]
    y_q = mm(_fq(Xs, main_act), P.T) + mm(Xs.astype(np.float16).astype(np.float64), LR.T)
    d = mm(X, W.T) - y_q
    return float(np.mean(d * d))


def search(W, X, alphas, betas, rank: int, main: str, main_act: str):
    """(lambda, (alpha, beta), {(alpha, beta): output MSE}) of the grid's best point."""
    W = np.asarray(W, dtype=np.float64)
    X = np.asarray(X, dtype=np.float64)
    scores, best = {}, None
    for a in alphas:
        for b in betas:
            lam = smoothing_vector(W, X, a, b)
            mse = output_mse(W, X, lam, rank, main, main_act)
            scores[(float(a), float(b))] = mse
            if best is None or mse < best[0]:
                best = (mse, lam, (float(a), float(b)))
    return best[1], best[2], scores


def smoothing_rank(recipe, shape) -> int:
    """The rank of the SVD branch in the search's loop (module docstring)."""
    from hwsim.cost import equal_memory_rank

    cap = max(1, min(shape) - 1)
    if recipe.method == "svdquant":
        r = recipe.rank or recipe.ref_rank
    elif recipe.rank is None:
        r = recipe.ref_rank
    else:
        eq = equal_memory_rank(tuple(int(s) for s in shape), recipe.ref_rank, 16,
                               recipe.branch_weight)
        r = max(1, round(recipe.ref_rank * recipe.rank / max(eq, 1)))
    return max(1, min(r, cap))

