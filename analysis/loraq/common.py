"""Shared arithmetic: truncated SVD, factor splitting, quantizing a branch, building results."""
from __future__ import annotations

import contextlib
import functools
import inspect
import time

import numba
import numpy as np
import torch

import numfmt
from analysis.loraq.checks import check_rank
from analysis.loraq.result import LoRaQResult, reconstruct, rel_error

__all__ = ["limit_threads", "with_threads", "mm", "fro", "top_svd", "split_factors", "quantize_branch", "quantize_main", "build_result",
           "resolve_rank", "output_rel_error"]


@contextlib.contextmanager
def limit_threads(n: int | None):
    """Run torch and Numba with ``n`` threads inside the block, restoring them after.

    Why: numfmt's Numba kernels (OpenMP pool) and torch / NumPy BLAS (their own
    pools) oversubscribe a 2-core machine; measured here a loftq run took 7.9 s
    with default threading and 0.3 s single-threaded. n=None leaves them as set.
    """
    if n is None:
        yield
        return
    old_t, old_n = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(n)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        torch.set_num_threads(old_t)
        numba.set_num_threads(old_n)


def with_threads(fn):
    """Give ``fn`` a keyword ``threads`` (default 1; None = leave torch/Numba as set) and
    run its body under ``limit_threads(threads)``."""
    @functools.wraps(fn)
    def wrapper(*args, threads=1, **kwargs):
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                    or threads < 1):
            raise ValueError(f"threads={threads!r} must be an int >= 1 or None")
        with limit_threads(threads):
            return fn(*args, **kwargs)

    sig = inspect.signature(fn)
    params = list(sig.parameters.values()) + [
        inspect.Parameter("threads", inspect.Parameter.KEYWORD_ONLY, default=1)]
    wrapper.__signature__ = sig.replace(parameters=params)
    return wrapper


def mm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b in float64 through torch (honours ``limit_threads``; NumPy's BLAS does not)."""
    return (torch.from_numpy(np.asarray(a, dtype=np.float64))
            @ torch.from_numpy(np.asarray(b, dtype=np.float64))).numpy()


def fro(a: np.ndarray) -> float:
    """Frobenius norm in float64."""
    return float(torch.linalg.vector_norm(torch.from_numpy(np.asarray(a, dtype=np.float64))))


def top_svd(W: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The top-r singular triplets of W (float64): W ~ U diag(S) Vt, S descending.

    Computed from the eigendecomposition of the Gram matrix of W's smaller side
    (G = W W^T if out <= in, else W^T W; numpy eigh, LAPACK syevd) in float64:
    the top singular values are sqrt(eigenvalues) and the other side's vectors
    are W^T U / S. Squaring loses relative precision only for singular values
    below ~1e-8 * S_max, far below the ranks kept here, and it is several times
    faster than a full SVD of a wide matrix. Signs are fixed (largest |entry| of
    each U column positive) so the result is deterministic.
    """
    W = np.asarray(W, dtype=np.float64)
    out, inp = W.shape
    wide = out <= inp
    Wt = torch.from_numpy(W)
    G = Wt @ Wt.T if wide else Wt.T @ Wt
    evals, evecs = torch.linalg.eigh(G)
    evals, evecs = evals.numpy(), evecs.numpy()
    idx = np.argsort(evals, kind="stable")[::-1][:r]
    S = np.sqrt(np.maximum(evals[idx], 0.0))
    V = evecs[:, idx]
    Sinv = np.where(S > 0, 1.0 / np.where(S > 0, S, 1.0), 0.0)
    if wide:
        U = V
        Vt = mm(U.T, W) * Sinv[:, None]
    else:
        Vt = np.ascontiguousarray(V.T)
        U = mm(W, V) * Sinv[None, :]
    sign = np.sign(U[np.argmax(np.abs(U), axis=0), np.arange(U.shape[1])])
    sign[sign == 0] = 1.0
    return U * sign[None, :], S, Vt * sign[:, None]


def split_factors(U, S, Vt) -> tuple[np.ndarray, np.ndarray]:
    """L = U diag(sqrt S) (out x r), R = diag(sqrt S) Vt (r x in): L R = U diag(S) Vt."""
    rs = np.sqrt(S)
    return U * rs[None, :], Vt * rs[:, None]


def quantize_branch(L, R, branch: str):
    """Q2(L) along r and Q2(R) along in (axis 1 of each); returns two QTensors."""
    return (numfmt.quantize(np.ascontiguousarray(L), branch, axis=1),
            numfmt.quantize(np.ascontiguousarray(R), branch, axis=1))


def branch_product(left, right) -> np.ndarray:
    """dequantize(left) @ dequantize(right) in float64."""
    return mm(numfmt.dequantize(left), numfmt.dequantize(right))


def quantize_main(W, left, right, main: str, smooth_w=None):
    """Q1(P), P = W - Q2(L) Q2(R) (float64 product) quantized along in."""
    P = np.asarray(W, dtype=np.float64)
    if left is not None:
        P = P - branch_product(left, right)
    return numfmt.quantize(P, main, axis=1)


def resolve_rank(rank, shape, branch: str, ref_rank: int, ref_bits: int) -> int:
    """``rank`` checked, or (None) the equal-memory rank of ``branch`` against an
    unquantized ref_bits branch of rank ref_rank, capped at min(out, in) - 1."""
    if rank is not None:
        return check_rank(rank, shape)
    from hwsim.cost import equal_memory_rank

    r = equal_memory_rank(tuple(int(s) for s in shape), ref_rank, ref_bits, branch)
    r = min(r, min(shape) - 1)
    if r < 1:
        raise ValueError(f"branch={branch!r} does not fit even rank 1 in the memory of a "
                         f"{ref_bits}-bit rank-{ref_rank} branch of a {shape[0]} x {shape[1]} "
                         f"weight; pass rank= explicitly or raise ref_rank")
    return r


def output_rel_error(W, w_hat, X) -> float | None:
    """||X (W - w_hat)^T||_F / ||X W^T||_F (float64), or None without X."""
    if X is None:
        return None
    W = np.asarray(W, dtype=np.float64)
    D = W - w_hat.astype(np.float64)
    return fro(mm(X, D.T)) / max(fro(mm(X, W.T)), 1e-300)


def build_result(W, main, left, right, *, method, main_format, branch_format, omega=None,
                 history=(), steps=0, converged=True, smooth=None, X=None, t0=None,
                 config=None) -> LoRaQResult:
    w_hat = reconstruct(main, left, right, smooth)
    bits = main.bits + (0 if left is None else left.bits + right.bits)
    rank = 0 if left is None else int(left.shape[1])
    if omega is None and left is not None:
        omega = np.eye(rank, dtype=np.float32)
    return LoRaQResult(main=main, left=left, right=right,
                       omega=None if omega is None else np.asarray(omega, dtype=np.float32),
                       rank=rank, w_hat=w_hat, bits=int(bits), history=[float(h) for h in history],
                       rel_error=rel_error(W, w_hat), method=method, main_format=main_format,
                       branch_format=branch_format if left is not None else None,
                       steps=int(steps), converged=bool(converged),
                       smooth=None if smooth is None else np.asarray(smooth, dtype=np.float32),
                       output_rel_error=output_rel_error(W, w_hat, X),
                       seconds=0.0 if t0 is None else time.perf_counter() - t0,
                       config=dict(config or {}))
