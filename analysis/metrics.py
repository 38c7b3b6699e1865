"""Metrics: SQNR, output cosine, generation metrics, and content hashes (one home each).

* ``sum_squares(t)``: sum of t^2 (float32 sums along the last axis, added in float64);
* ``sqnr_db(ref, test)`` = 10 log10(sum ref^2 / sum (ref - test)^2) in dB; +inf when
  equal, -inf for a zero reference; ``db(signal, noise)`` the same from two sums;
* ``output_cosine(fp, q)``: cosine of two (N, d) output sets row by row (mean / min) and
  top-1 nearest-neighbour agreement;

Generation metrics (NumPy or torch arrays in, Python floats out):

* ``frechet_distance(f1, f2)``: the FID recipe on two feature sets (N x d)::

      FD = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))

  with sample means mu and unbiased covariances S, computed in float64; the
  matrix square root is scipy's ``sqrtm`` (its tiny imaginary part from
  rounding is dropped).
* ``psnr_db(ref, test, peak)``: 10 log10(peak^2 / MSE) over all pixels; +inf
  when the images are equal. Images in [-1, 1] have peak-to-peak range 2.
* ``feature_distance(f_ref, f_test)``: mean over samples of the Euclidean
  distance between unit-normalized feature vectors of the same sample (the
  LPIPS recipe: compare normalized deep features, here the classifier's).
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["sum_squares", "sqnr_db", "db", "output_cosine", "frechet_distance", "psnr_db",
           "psnr_from_mse", "feature_distance", "feature_distances", "class_accuracy"]


def sum_squares(t: torch.Tensor) -> float:
    """sum of t^2: float32 sums along the last axis, added up in float64."""
    t = t.reshape(-1, t.shape[-1]) if t.dim() else t.reshape(1, 1)
    return float(torch.linalg.vector_norm(t, dim=-1).double().square().sum())


def db(signal: float, noise: float) -> float:
    """10 log10(signal / noise) in dB: +inf for zero noise, -inf for a zero signal."""
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def sqnr_db(ref, test) -> float:
    """10 log10(sum ref^2 / sum (ref - test)^2) in dB (float32 rows, float64 sums)."""
    r = torch.as_tensor(ref).to(torch.float32)
    t = torch.as_tensor(test).to(torch.float32)
    return db(sum_squares(r), sum_squares(r - t))


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def output_cosine(fp, q) -> dict:
    """Cosine similarity and top-1 nearest-neighbour agreement of two (N, d) output sets.

    ``mean_cosine`` / ``min_cosine`` of cos(fp_i, q_i); ``top1_agreement``: the
    fraction of i whose nearest neighbour argmax_{j != i} cos(x_i, x_j) is the
    same j in q as in fp (None for fewer than 3 rows).
    """
    a = np.asarray(fp, dtype=np.float64).reshape(len(fp), -1)
    b = np.asarray(q, dtype=np.float64).reshape(len(q), -1)
    if a.shape != b.shape:
        raise ValueError(f"output shapes differ: {a.shape} and {b.shape}")

    ua, ub = _unit(a), _unit(b)
    cos = np.sum(ua * ub, axis=1)
    out = {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "top1_agreement": None,
           "n": int(len(a)), "per_sample": {"cosine": [float(c) for c in cos]}}
    if len(a) >= 3:
        def nn_index(u):
            s = u @ u.T
            np.fill_diagonal(s, -np.inf)
            return np.argmax(s, axis=1)

        out["top1_agreement"] = float(np.mean(nn_index(ua) == nn_index(ub)))
    return out


def _as2d(f, name: str) -> np.ndarray:
    a = np.asarray(f.detach().cpu().numpy() if hasattr(f, "detach") else f, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f"{name} must be (N, d) features with N >= 2, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} holds non-finite values")
    return a


def frechet_distance(f1, f2) -> float:
    """Frechet distance between Gaussians fitted to two (N, d) feature sets."""
    from scipy import linalg

    a, b = _as2d(f1, "f1"), _as2d(f2, "f2")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: {a.shape[1]} and {b.shape[1]}")
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.all(np.isfinite(covmean)):  # singular product: regularize, as the FID code does
        off = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
    covmean = np.real(covmean)
    fd = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
    return max(fd, 0.0)


def psnr_db(ref, test, peak: float = 2.0) -> float:
    """PSNR of ``test`` against ``ref`` (same shape) in dB; inf when identical."""
    r = np.asarray(ref.detach().cpu().numpy() if hasattr(ref, "detach") else ref, dtype=np.float64)
    t = np.asarray(test.detach().cpu().numpy() if hasattr(test, "detach") else test,
                   dtype=np.float64)
    if r.shape != t.shape:
        raise ValueError(f"image shapes differ: {r.shape} and {t.shape}")
    mse = float(np.mean((r - t) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(peak * peak / mse)


def psnr_from_mse(mse, peak: float = 2.0) -> float:
    """PSNR dB from per-sample MSEs of equal-size images: 10 log10(peak^2 / mean MSE)."""
    m = float(np.mean(mse))
    return math.inf if m == 0 else 10.0 * math.log10(peak * peak / m)


def feature_distances(f_ref, f_test) -> np.ndarray:
    """||u_i - v_i|| of unit-normalized features of the same samples, per sample (N,)."""
    a, b = _as2d(f_ref, "f_ref"), _as2d(f_test, "f_test")
    if a.shape != b.shape:
        raise ValueError(f"feature shapes differ: {a.shape} and {b.shape}")
    return np.linalg.norm(_unit(a) - _unit(b), axis=1)


def feature_distance(f_ref, f_test) -> float:
    """Mean ||u_i - v_i|| of unit-normalized features of the same samples (0 when equal)."""
    return float(np.mean(feature_distances(f_ref, f_test)))


def class_accuracy(logits, labels) -> float:
    """Fraction of rows whose argmax equals the requested label."""
    lg = np.asarray(logits.detach().cpu().numpy() if hasattr(logits, "detach") else logits)
    lb = np.asarray(labels.detach().cpu().numpy() if hasattr(labels, "detach") else labels)
    if lg.ndim != 2 or lg.shape[0] != lb.shape[0]:
        raise ValueError(f"logits {lg.shape} and labels {lb.shape} do not match")
    return float(np.mean(np.argmax(lg, axis=1) == lb))
