"""LoRaQ: data-free optimization of a fully quantized low-rank branch.

The decomposition (Bouquet et al., arXiv 2604.18117), for a weight W (out x in)::

    W ~ W_hat = Q1(P) + Q2(L Omega) Q2(Omega^T R),     P = W - Q2(L Omega) Q2(Omega^T R)

L is out x r, R is r x in, Omega an r x r rotation (Omega Omega^T = I, so before
quantization L Omega Omega^T R = L R), Q1 the main format quantizer along ``in``
and Q2 the branch format quantizer (L Omega along r, Omega^T R along in). The
objective is the reconstruction error of the weight::

    f(L, R, Omega) = || W - Q1(P) - A B ||_F^2,   A = Q2(L Omega),  B = Q2(Omega^T R)

How the gradient passes. Quantizers are piecewise constant, so gradients use the
straight-through estimator (dQ/dx = 1). Through Q2 that is what we do. Through
Q1 it would be useless: with dQ1(P)/dP = 1 the objective reads, to the
estimator, W - (W - AB) - AB = 0, so every gradient with respect to the branch
vanishes identically. Instead the residual's quantized value is held fixed
within a step: at step t we compute A_t, B_t, P_t = W - A_t B_t and
M_t = Q1(P_t) (no gradient), and take an Adam step on

    g_t(L, R, Omega) = || (W - M_t) - A B ||_F^2        (STE through Q2 only),

whose value at the current point equals f exactly (E_t = W - M_t - A_t B_t =
P_t - Q1(P_t), the main format's rounding error of the residual). The gradient
moves the branch towards the part of W the main format currently gets wrong;
M is recomputed from the new branch at the next step, so f is evaluated exactly
at every iterate and the best iterate is returned. In formulas (E = W - M - A B,
Lo = L Omega, Ro = Omega^T R)::

    dg/dA = -2 E B^T,  dg/dB = -2 A^T E           (out x r, r x in)
    dg/dL = (dg/dA) Omega^T,  dg/dR = Omega (dg/dB),  dg/dOmega = L^T dg/dA + R (dg/dB)^T

computed by hand (three GEMMs of out x in x r per step: A B, E B^T, A^T E), and so is
the r x r map Omega = H C, C = cayley(K) = (I - A)^(-1) (I + A) with A = K - K^T, K a
free r x r parameter (the Cayley transform of a skew-symmetric matrix is orthogonal, and
I - A is always invertible; K = 0 gives Omega = H), H = ``hadamard(r)``::

    G_Omega = L^T dg/dA Omega-side = L^T gA + R gB^T,   G_C = H^T G_Omega,
    dC = (I - A)^(-1) dA (C + I)   =>   G_A = (I - A)^(-T) G_C (C + I)^T,
    dg/dK = G_A - G_A^T                                  (``cayley_grad``)

(the tests check both against torch autograd through numfmt's STE). K's step is
``omega_lr`` (0.02) times the factors': on MiniLM a learned rotation moved at
the factors' rate ended *worse* than a fixed one, and starting from Hadamard
rather than I was slightly better (the README, section LoRaQ). The Cayley map was chosen
over matrix_exp because its backward pass is an r x r solve: matrix_exp's
backward cost 7 ms of a 10 ms step on a 384 x 384 layer.
``rotation="identity"`` fixes Omega = I, ``rotation="hadamard"`` fixes Omega = H.

Data-aware variant (``activations`` X, n x in): the error is weighted by the
inputs' second moments H = X^T X / n, f_X = tr(E H E^T) = ||X E^T||_F^2 / n, so
dg/dA = -2 (E H) B^T, dg/dB = -2 A^T (E H); ``weighting="diag"`` keeps only
diag(H) (cheap: no in x in product). The default stays data-free.

Scaling: W is divided by c = 2^round(log2(rms(W))) so the step size ``lr`` is in
units of a unit-RMS weight; multiplying by a power of two commutes exactly with
MX and SINT quantization (barring overflow / underflow of the scale range), so
the final QTensors are computed from the unscaled factors (L c, R) and W.

Initialization: L = U_r S_r^(1/2), R = S_r^(1/2) V_r^T from the top-r SVD of W
(``init="svd"``) or of the main format's error W - Q1(W) (``init="lqer"``); the
SVD of W was better on every MiniLM layer tried (the README, section LoRaQ), so it is the
default.

Schedule and stopping. The objective is piecewise quadratic with a jump wherever a
residual element crosses a rounding boundary, so descent at a fixed step keeps
finding slightly better configurations for as long as it runs; what ends it is a
smaller step. The default ``schedule="plateau"`` lowers the step (lr *= ``lr_decay``,
0.5) whenever the best objective has not improved by a relative ``tol`` (3e-4) for
``patience`` (5) steps, and stops, ``converged``, once the step is below
``min_lr_scale`` (1/8) of ``lr``; ``steps`` (400) only caps the run. Continuing a
converged run (``early_stop=False``: the same rule, with the step still halving on
every plateau) for 5x its steps improved it by 0.5 % on the benchmark matrix, 0.6-1.9 %
on MiniLM layers with an 8-bit branch, 2-9 % with 6- and 4-bit branches (the README,
section LoRaQ). ``schedule="cosine"`` anneals lr * (1 + cos(pi t / steps)) / 2 to
zero over exactly ``steps`` steps, the better choice for a small fixed budget (the
report's 30 steps), and stops early only when the best has not improved by ``tol``
for ``patience`` (there 30) steps; ``"constant"`` keeps lr. ``converged`` is True
when the run stopped by its rule, or when its last ``patience`` steps improved the
best by less than ``tol``.

Device: ``device=None`` (the default) runs on the CPU with numfmt's Numba kernels
writing into NumPy views of the loop's buffers. ``device="cuda"`` (or any torch device)
keeps every tensor of the loop on that device and quantizes with numfmt's plain-torch
backend (bit-identical to the Numba kernels); the r x r Cayley solve then uses
``torch.linalg.solve`` and TF32 is switched off for the GEMMs (``analysis.layers.
fp32_matmul``). ``device="cpu"`` runs that torch path on the CPU: the same bits as the
default (the tests check it), only slower. On a GPU the results equal the CPU ones within
FP32 GEMM reordering.

Determinism: no random numbers are drawn (SVD init, K = 0; ``seed`` seeds
torch for future variants), so a run is bit-identical to the next; ``threads``
(default 1) pins the thread count inside the call, and the tests check that
threads=2 gives the same bits on the test matrix.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
from scipy.linalg import lapack

import numfmt
import numfmt.torch as nft
from analysis.loraq.checks import (ROTATIONS, as_activations, as_weight, check_float,
                                   check_format, check_int)
from analysis.loraq.common import (build_result, quantize_main, resolve_rank, split_factors,
                                   top_svd, with_threads)
from analysis.loraq.result import LoRaQResult
from analysis.layers import fp32_matmul

__all__ = ["optimize", "hadamard", "cayley", "cayley_grad", "step_gradients", "default_lr", "SCHEDULES",
           "INITS", "WEIGHTINGS"]

INITS = ("svd", "lqer")
WEIGHTINGS = ("full", "diag")
SCHEDULES = ("cosine", "plateau", "constant")
DEFAULT_STEPS = 400
# steps without a relative improvement of ``tol`` that count as a plateau: the plateau
# schedule then lowers its step (5); the others stop (30: a cosine schedule must not end
# while its step is still large)
PATIENCE = {"plateau": 5, "cosine": 30, "constant": 30}


def hadamard(r: int) -> np.ndarray:
    """An r x r orthogonal Hadamard-type matrix (float64).

    r a power of two: the Sylvester Hadamard matrix H_r (H_1 = [1],
    H_2k = [[H_k, H_k], [H_k, -H_k]]) divided by sqrt(r). Other r: block
    diagonal of normalized Sylvester blocks, one per set bit of r, largest
    first (62 = 32 + 16 + 8 + 4 + 2), which is orthogonal and mixes the first
    32 columns exactly like H_32. No randomness.
    """
    r = check_int(r, "r", 1)
    out = np.zeros((r, r))
    start = 0
    for bit in reversed(range(r.bit_length())):
        n = 1 << bit
        if not r & n:
            continue
        h = np.ones((1, 1))
        while h.shape[0] < n:
            h = np.block([[h, h], [h, -h]])
        out[start:start + n, start:start + n] = h / math.sqrt(n)
        start += n
    return out


def default_lr(branch: str) -> float:
    """Adam step in units of a unit-RMS weight, by the branch's element width.

    Tuned on MiniLM layers (100-step cosine schedule; the README, section LoRaQ):
    2e-2 for 8-bit and wider branches (fp16 included), 5e-3 for 6- and 7-bit, 2e-3
    for narrower ones; a coarse branch quantizer turns large steps of L, R into
    large jumps of A, B. The paper's 1e-3 / 1e-4 are for unnormalized weights.
    """
    fmt = numfmt.get(branch)
    bits = fmt.element.bits if hasattr(fmt, "element") else fmt.bits
    return 2e-2 if bits >= 8 else (5e-3 if bits >= 6 else 2e-3)


def _padded_rank(r: int) -> int:
    """The rank the loop's GEMMs run at: r rounded up to a multiple of 16 when that adds at
    most r / 16 (62 -> 64: the three out x in x r GEMMs of a step measured 17-24 % faster
    with MKL on one AVX2 core, for 3 % more work); r otherwise."""
    rp = -(-r // 16) * 16
    return rp if (rp - r) * 16 <= r else r


class _Buffers:
    """Arrays reused across the steps of one run (out x in and the factor shapes), each
    a torch tensor and a NumPy view of the same memory: numfmt's kernels write straight
    into them (``fake_quantize(out=)``), so a step allocates nothing large. Allocated by
    torch: 64-byte aligned (MKL's GEMMs writing into NumPy's 16-byte-aligned arrays
    measured 20 % slower)."""

    def __init__(self, out: int, inp: int, r: int, device=None, backend: str = "torch"):
        # device: None for the Numba path; a torch.device for numfmt's torch ``backend``
        # there (no NumPy views: the quantizers write into the tensors through ``out=``)
        self.device, self.backend = device, backend

        def pair(*shape):
            if device is not None:
                return None, torch.empty(shape, dtype=torch.float32, device=device)
            t = torch.empty(shape, dtype=torch.float32)
            return t.numpy(), t
        self.P_np, self.P = pair(out, inp)    # residual P, then E = P - Q1(P) in place
        self.Q_np, self.Q = pair(out, inp)    # Q1(P)
        # _residual_in_blocks: row blocks of about 256 KiB, a scratch block and row sums
        self.block_rows = max(1, min(out, (1 << 18) // (4 * max(inp, 1))))
        self.Qb_np, self.Qb = pair(self.block_rows, inp)
        self.row_sums = torch.empty(out, dtype=torch.float32,
                                    device=device if device is not None else "cpu")
        self.A_np, self.A = pair(out, r)
        self.B_np, self.B = pair(r, inp)


def _fq(x: torch.Tensor, fmt, out_np=None, out=None, backend: str = "torch") -> torch.Tensor:
    """numfmt.fake_quantize along axis 1 (the fused Numba kernel), no gradient; into
    ``out_np`` / its torch view ``out`` when given. With ``out`` but no ``out_np`` (a
    ``_Buffers`` on a device): numfmt.torch's ``backend`` on x's device, into ``out``."""
    if out is not None and out_np is None:
        return nft.fake_quantize(x.detach(), fmt, axis=1, backend=backend, out=out)
    y = numfmt.fake_quantize(x.detach().numpy(), fmt, axis=1, out=out_np)
    return out if out is not None else torch.from_numpy(y)


def _top_svd_on(W: np.ndarray, r: int, dev: torch.device):
    """``analysis.loraq.common.top_svd`` computed on ``dev`` (float64 Gram matrix and
    eigh there; the same steps, signs fixed the same way); returns NumPy arrays. Equal
    to the CPU result within float64 rounding of the eigensolver."""
    Wt = torch.from_numpy(np.asarray(W, dtype=np.float64)).to(dev)
    out, inp = Wt.shape
    wide = out <= inp
    evals, evecs = torch.linalg.eigh(Wt @ Wt.T if wide else Wt.T @ Wt)
    idx = torch.argsort(evals, stable=True).flip(0)[:r]
    S = evals[idx].clamp_min(0.0).sqrt()
    V = evecs[:, idx]
    Sinv = torch.where(S > 0, 1.0 / torch.where(S > 0, S, torch.ones_like(S)),
                       torch.zeros_like(S))
    if wide:
        U, Vt = V, (V.T @ Wt) * Sinv[:, None]
    else:
        Vt, U = V.T.contiguous(), (Wt @ V) * Sinv[None, :]
    sign = torch.sign(U[U.abs().argmax(dim=0), torch.arange(U.shape[1], device=dev)])
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return ((U * sign[None, :]).cpu().numpy(), S.cpu().numpy(),
            (Vt * sign[:, None]).cpu().numpy())


def cayley(K: torch.Tensor) -> torch.Tensor:
    """Omega = (I - A)^(-1) (I + A), A = K - K^T: orthogonal for every square K; K = 0 -> I.

    Differentiable when K requires grad (torch.linalg.solve); otherwise, on the CPU,
    LAPACK's gesv straight from SciPy, which is 5x faster on the r x r systems of the
    optimizer loop; torch.linalg.solve on other devices."""
    eye = torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
    A = K - K.T
    if (K.requires_grad or K.dtype not in (torch.float32, torch.float64)
            or K.device.type != "cpu"):
        return torch.linalg.solve(eye - A, eye + A)
    gesv = lapack.sgesv if K.dtype == torch.float32 else lapack.dgesv
    _, _, x, info = gesv((eye - A).numpy(), (eye + A).numpy())
    if info != 0:  # cannot happen: I - A with A skew-symmetric is invertible
        raise FloatingPointError(f"LAPACK gesv failed (info={info}) in the Cayley transform")
    return torch.from_numpy(np.ascontiguousarray(x))


def cayley_grad(K: torch.Tensor, C: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """d/dK of <G, cayley(K)> for C = cayley(K) (module docstring). Since
    I + A = 2 I - (I - A), C + I = 2 (I - A)^(-1), so G_A = (I - A)^(-T) G (C + I)^T
    = (1/2) (C + I)^T G (C + I)^T: no second solve."""
    eye = torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
    Ci = (C + eye).T
    GA = (Ci @ G @ Ci).mul_(0.5)
    return GA - GA.T


def step_gradients(Wn, L, R, Om, main, branch, H=None, buffers=None):
    """One evaluation of the LoRaQ objective and its gradient (module docstring).

    Wn (out x in), L (out x r), R (r x in), Om (r x r) float32 tensors; Om may
    carry an autograd graph (then ``Lo`` / ``Ro`` below carry it too). H: None,
    an (in,) diagonal or an (in x in) second-moment matrix. Returns
    ``(loss, Lo, Ro, gA, gB)``: loss = ||E||_F^2 (or tr(E H E^T)) with
    E = P - Q1(P), P = Wn - A B, A = Q2(Lo), B = Q2(Ro), Lo = L Om, Ro = Om^T R,
    and gA = dg/dLo = -2 (E H) B^T, gB = dg/dRo = -2 A^T (E H) with Q1(P) held
    fixed and the straight-through estimator through Q2. Then
    dg/dL = gA Om^T, dg/dR = Om gB, and dg/dOm = L^T gA + R gB^T.
    ``buffers`` (a ``_Buffers``): work in place; E then lives in ``buffers.P``.
    """
    Lo, Ro = L.detach() @ Om, Om.T @ R.detach()
    with torch.no_grad():
        if buffers is None:
            A, B = _fq(Lo, branch), _fq(Ro, branch)
            P = torch.addmm(Wn, A, B, alpha=-1.0)
            E = P.sub_(_fq(P, main))              # = P - Q1(P), Q1(P) fixed for this step
        else:
            bk = buffers.backend
            A = _fq(Lo, branch, buffers.A_np, buffers.A, bk)
            B = _fq(Ro, branch, buffers.B_np, buffers.B, bk)
            if H is None and buffers.P_np is not None:  # the CPU loop without data
                loss = _residual_in_blocks(Wn, A, B, main, buffers)
                E = buffers.P
                return loss, Lo, Ro, (E @ B.T).mul_(-2.0), (A.T @ E).mul_(-2.0)
            P = torch.addmm(Wn, A, B, alpha=-1.0, out=buffers.P)
            E = P.sub_(_fq(P, main, buffers.Q_np, buffers.Q, bk))
        G = E if H is None else (E @ H if H.ndim == 2 else E * H)
        loss = _sum_of_products(E, G, None if buffers is None else buffers.Q)
        gA = (G @ B.T).mul_(-2.0)
        gB = (A.T @ G).mul_(-2.0)
    return loss, Lo, Ro, gA, gB


def _residual_in_blocks(Wn, A, B, main, buffers) -> float:
    """P = Wn - A B and E = P - Q1(P) into ``buffers.P``, and loss = sum(E * E), with
    the bits of the whole-matrix step (``buffers=None``): each row of P, of Q1(P) and of E
    depends on that row alone, and each row's sum is the same torch reduction over the
    same values. Block by block of ``buffers.block_rows`` rows, so that P, Q1(P) and E * E
    stay in the core's cache instead of passing through memory as out x in matrices: the
    loop's memory traffic, which two workers on one machine share, drops from about six
    such matrices per step to four. (The gradients stay whole-matrix products: MKL's
    row-block products of E B^T differed in the last bits at 4608 x 1152.)"""
    n = Wn.shape[0]
    rows = buffers.block_rows
    P, P_np, Qb_np, Qb, rs = buffers.P, buffers.P_np, buffers.Qb_np, buffers.Qb, buffers.row_sums
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        q = Qb[:r1 - r0]
        Pb = torch.addmm(Wn[r0:r1], A[r0:r1], B, alpha=-1.0, out=P[r0:r1])
        numfmt.fake_quantize(P_np[r0:r1], main, axis=1, out=Qb_np[:r1 - r0])
        Pb.sub_(q)
        torch.sum(torch.mul(Pb, Pb, out=q), dim=1, out=rs[r0:r1])
    return float(rs.sum())


def _sum_of_products(X, Y, scratch=None) -> float:
    """sum(X * Y) as float, summed row by row, then over rows: the same bits whatever the
    thread count (a whole-tensor torch.sum or torch.dot splits its sum by threads)."""
    prod = torch.mul(X, Y, out=scratch) if scratch is not None else X * Y
    return float(prod.sum(dim=1).sum())


class _Adam:
    """torch.optim.Adam's update (betas 0.9, 0.999, eps 1e-8), in place, for plain
    tensors whose gradients are computed by hand: no autograd, no optimizer state dicts."""

    def __init__(self, params, lrs):
        self.params, self.lrs = params, list(lrs)
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads, scale: float = 1.0) -> None:
        self.t += 1
        bc1 = 1 - 0.9 ** self.t
        bc2_sqrt = (1 - 0.999 ** self.t) ** 0.5
        for p, g, m, v, lr in zip(self.params, grads, self.m, self.v, self.lrs):
            m.lerp_(g, 0.1)
            v.mul_(0.999).addcmul_(g, g, value=0.001)
            denom = (v.sqrt() / bc2_sqrt).add_(1e-8)
            p.addcdiv_(m, denom, value=-(lr * scale) / bc1)


@with_threads
def optimize(W, *, main: str = "mxint4", branch: str = "mxint8", rank=None, ref_rank: int = 32,
             ref_bits: int = 16, rotation: str = "learned", steps=None, lr=None, seed: int = 0,
             activations=None, tol: float = 3e-4, patience: int | None = None,
             init: str = "svd",
             weighting: str = "full", lr_decay: float = 0.5,
             schedule: str = "plateau", omega_lr: float = 0.02, min_lr_scale: float = 1 / 8,
             early_stop: bool = True, device=None, backend: str | None = None) -> LoRaQResult:
    """Optimize a LoRaQ decomposition of W (see the module docstring).

    W           out x in weight (numpy array or torch tensor; float64 internally
                for metrics, float32 in the loop).
    main        Q1, the residual's format (numfmt name), quantized along in.
    branch      Q2, the branch format; "fp16" keeps it unquantized (stored as fp16).
    rank        r; None: ``hwsim.cost.equal_memory_rank(W.shape, ref_rank,
                ref_bits, branch)`` (capped at min(out, in) - 1).
    rotation    "learned" (Omega = H cayley(K), K trained from 0 with step
                ``omega_lr`` * lr, H = ``hadamard(r)``), "identity", "hadamard" (fixed).
    steps       maximum Adam steps (default 400); the schedule's rule stops earlier.
    lr          Adam step, units of a unit-RMS weight (default ``default_lr``).
    schedule    "plateau" (lr *= lr_decay after ``patience`` steps without a relative
                improvement of ``tol``; stop below ``min_lr_scale`` * lr), "cosine"
                (lr * (1 + cos(pi t / steps)) / 2; stop after ``patience`` steps
                without improvement), "constant" (the same stop).
    patience    None: 5 for "plateau", 30 for the others (``PATIENCE``).
    early_stop  False: run all ``steps`` steps (the plateau schedule keeps lowering lr).
    init        "svd" (top-r SVD of W) or "lqer" (SVD of W - Q1(W)).
    weighting   with activations: "full" second-moment matrix or its "diag".
    threads     torch / Numba threads inside the call (default 1; None = as set).
    seed        seeds torch (nothing random is drawn now; kept for variants).
    activations n x in sample of the layer's inputs for the data-aware loss.
    device      None: CPU with the Numba kernels (default); a torch device ("cuda",
                "cuda:1", "cpu"): the loop on that device with numfmt's torch backend
                (module docstring). The returned QTensors are NumPy-backed either way.
    backend     with ``device``: numfmt.torch's "torch" (default, eager) or "compiled"
                (torch.compile'd quantizers: the same bits, fused kernels).
    Returns a LoRaQResult whose ``history`` is the relative error
    ||W - W_hat_t||_F / ||W||_F of each iterate (float32 arithmetic) and whose
    ``rel_error`` is that of the best iterate, recomputed in float64.
    """
    t0 = time.perf_counter()
    W64 = as_weight(W)
    main = check_format(main, "main")
    branch = check_format(branch, "branch")
    if rotation not in ROTATIONS:
        raise ValueError(f"rotation={rotation!r} is not one of {ROTATIONS}")
    if init not in INITS:
        raise ValueError(f"init={init!r} is not one of {INITS}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r} is not one of {WEIGHTINGS}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not one of {SCHEDULES}")
    ref_rank, ref_bits = check_int(ref_rank, "ref_rank", 1), check_int(ref_bits, "ref_bits", 1)
    r = resolve_rank(rank, W64.shape, branch, ref_rank, ref_bits)
    steps = DEFAULT_STEPS if steps is None else check_int(steps, "steps", 0)
    lr = default_lr(branch) if lr is None else check_float(lr, "lr")
    seed = check_int(seed, "seed")
    tol = check_float(tol, "tol", positive=False)
    patience = (PATIENCE[schedule] if patience is None
                else check_int(patience, "patience", 1))
    lr_decay = check_float(lr_decay, "lr_decay")
    omega_lr = check_float(omega_lr, "omega_lr")
    min_lr_scale = check_float(min_lr_scale, "min_lr_scale")
    if not isinstance(early_stop, bool):
        raise TypeError(f"early_stop must be True or False, got {early_stop!r}")
    if lr_decay > 1:
        raise ValueError(f"lr_decay={lr_decay} must be in (0, 1]")
    X = as_activations(activations, W64.shape[1])
    dev = None if device is None else nft.check_device(device)
    if backend is not None:
        if dev is None:
            raise ValueError(f"backend={backend!r} applies to a device run; pass device= "
                             f"too (the default path uses the Numba kernels)")
        if backend not in ("torch", "compiled"):
            raise ValueError(f"backend={backend!r} is not one of ('torch', 'compiled')")
    with fp32_matmul(dev if dev is not None else "cpu"):
        return _optimize(W64, X, t0, dev, backend or "torch", main, branch, r, rotation,
                         steps, lr, seed, tol, patience, init, weighting, lr_decay, schedule,
                         omega_lr, min_lr_scale, early_stop)


def _optimize(W64, X, t0, dev, backend, main, branch, r, rotation, steps, lr, seed, tol,
              patience, init, weighting, lr_decay, schedule, omega_lr, min_lr_scale,
              early_stop) -> LoRaQResult:
    """The body of ``optimize`` after its checks; ``dev`` None (Numba on the CPU) or a
    torch.device (the torch backend there)."""
    config = {"method": "loraq", "main": main, "branch": branch, "rank": r,
              "rotation": rotation, "steps": steps, "lr": lr, "seed": seed, "tol": tol,
              "patience": patience, "init": init, "lr_decay": lr_decay, "schedule": schedule,
              "omega_lr": omega_lr, "min_lr_scale": min_lr_scale, "early_stop": early_stop,
              "weighting": None if X is None else weighting,
              "activations": None if X is None else list(X.shape)}
    if dev is not None:
        config["device"] = str(dev)
        if backend != "torch":
            config["backend"] = backend
    torch.manual_seed(seed)

    rms = math.sqrt(float(np.mean(np.square(W64))))
    c = 2.0 ** round(math.log2(rms)) if rms > 0 else 1.0
    Wn = torch.from_numpy((W64 / c).astype(np.float32))
    if dev is not None:
        Wn = Wn.to(dev)
    # on an accelerator the initial SVD runs there too (``_top_svd_on``); on the CPU the
    # torch path keeps ``top_svd`` so that device="cpu" gives the default's bits
    svd = top_svd if dev is None or dev.type == "cpu" else (
        lambda M, k: _top_svd_on(M, k, dev))
    if init == "svd":
        U, S, Vt = svd(W64 / c, r)
    else:
        E0 = W64 / c - numfmt.fake_quantize(W64 / c, main, axis=1).astype(np.float64)
        U, S, Vt = svd(E0, r)
    L0, R0 = split_factors(U, S, Vt)
    # L and R live in one flat tensor (and so do their gradients): one Adam update for both.
    # They carry rp - r >= 0 extra zero columns / rows (``_padded_rank``): with Omega padded
    # by an identity block, the padding stays exactly zero (its gradients are zero, and
    # zeros quantize to zeros without changing any scale: a partial block behaves as if
    # zero-padded), while the GEMMs run on a rank MKL handles faster.
    n_out, n_in = Wn.shape
    rp = _padded_rank(r)
    flat = torch.zeros(n_out * rp + rp * n_in, dtype=torch.float32, device=dev)
    gflat = torch.empty_like(flat)
    L, R = flat[:n_out * rp].view(n_out, rp), flat[n_out * rp:].view(rp, n_in)
    gL, gR = gflat[:n_out * rp].view(n_out, rp), gflat[n_out * rp:].view(rp, n_in)
    L[:, :r] = torch.from_numpy(L0.astype(np.float32)).to(flat.device)
    R[:r] = torch.from_numpy(R0.astype(np.float32)).to(flat.device)
    Om_pad = torch.eye(rp, dtype=torch.float32, device=dev)
    fixed = (torch.eye(r, device=dev) if rotation == "identity"
             else torch.from_numpy(hadamard(r).astype(np.float32)).to(flat.device))
    params, lrs = [flat], [lr]
    K = None
    if rotation == "learned":
        K = torch.zeros((r, r), dtype=torch.float32, device=dev)
        params.append(K)
        lrs.append(lr * omega_lr)
    H = None
    if X is not None:
        Xs = torch.from_numpy(X / math.sqrt(X.shape[0]))
        H = ((Xs.T @ Xs).to(torch.float32) if weighting == "full"
             else (Xs * Xs).sum(0).to(torch.float32))
        H = H / (H.diagonal().mean() if weighting == "full" else H.mean()).clamp_min(1e-30)
        H = H.to(flat.device)
    opt = _Adam(params, lrs)
    buffers = _Buffers(n_out, n_in, rp, dev, backend)

    norm2 = _sum_of_products(Wn, Wn if H is None else (Wn @ H if H.ndim == 2 else Wn * H))
    history: list[float] = []
    best = (math.inf, None)
    since_best, run, scale = 0, 0, 1.0
    converged = steps == 0
    for step in range(steps + 1):
        C = cayley(K) if K is not None else None
        Om_r = fixed @ C if K is not None else fixed
        if rp > r:
            Om_pad[:r, :r] = Om_r
            Om = Om_pad
        else:
            Om = Om_r
        loss, Lo, Ro, gA, gB = step_gradients(Wn, L, R, Om, main, branch, H, buffers)
        history.append(math.sqrt(max(loss, 0.0) / max(norm2, 1e-300)))
        if loss < best[0] * (1 - tol):
            since_best = 0
        else:
            since_best += 1
        if loss < best[0]:
            best = (loss, (Lo[:, :r], Ro[:r], Om_r))  # fresh tensors every step: no copy
        if schedule == "plateau":
            if since_best >= patience:       # a plateau: lower the step, count afresh
                scale *= lr_decay
                since_best = 0
                if scale < min_lr_scale and early_stop:
                    converged = True
                    break
        elif since_best >= patience and early_stop:
            converged = True
            break
        if step == steps:
            # converged: the last ``patience`` steps improved the best by less than tol.
            converged = since_best > 0 and (len(history) <= patience or min(
                history[-patience:]) ** 2 >= min(history[:-patience]) ** 2 * (1 - tol))
            break
        if schedule == "cosine":
            scale = 0.5 * (1 + math.cos(math.pi * step / steps))
        run += 1
        torch.mm(gA, Om.T, out=gL)
        torch.mm(Om, gB, out=gR)
        grads = [gflat]
        if K is not None:
            # d/dOmega of <gA, L Omega> + <gB, Omega^T R> at fixed gA, gB, through Cayley to K
            grads.append(cayley_grad(K, C, fixed.T @ (L.T @ gA + R @ gB.T)[:r, :r]))
        opt.step(grads, scale)

    Lo, Ro, Om = best[1]
    Lo, Ro, Om = Lo.cpu(), Ro.cpu(), Om.cpu()  # (no-ops on the CPU)
    left = numfmt.quantize(np.ascontiguousarray(Lo.numpy() * np.float32(c)), branch, axis=1)
    right = numfmt.quantize(np.ascontiguousarray(Ro.numpy()), branch, axis=1)
    q = quantize_main(W64, left, right, main)
    return build_result(W64, q, left, right, method="loraq", main_format=main,
                        branch_format=branch, omega=Om.numpy(), history=history, steps=run,
                        converged=converged, X=X, t0=t0, config=config)
