"""Simulated quantized linear layers: a drop-in ``nn.Linear`` for a W/A configuration.

A layer ``y = x W^T + b`` (x: T x in, W: out x in) quantized with a LoRaQ /
SVDQuant / RTN result for a configuration such as ``W4A4+W8A8`` computes::

    x~  = x / s                                  (s: per-input-channel smoothing, 1 if none)
    y   = Qa1(x~) Q1(P)^T                         main path, T x out
        + Qa2( Qa2(x~) R_q^T ) L_q^T             branch: R_q = Q2(Omega^T R) r x in,
                                                 L_q = Q2(L Omega) out x r
        + b                                      all sums in FP32

``Qa1`` / ``Qa2`` quantize activations per token along the reduction axis (the
input features for the first GEMMs, the rank for the second branch GEMM) to the
main / branch activation format; ``Q1(P)``, ``R_q``, ``L_q`` are the stored
QTensors of the result, quantized along their reduction axis too. An FP16
branch (SVDQuant) rounds x~ and x~ R^T to fp16 and keeps R, L in fp16.

Two modes compute the same arithmetic:

* ``"fast"``: fake-quantized operands (``numfmt.torch.fake_quantize``, bit
  identical to quantize + dequantize) and float32 GEMMs (torch / BLAS);
* ``"exact"``: the quantized GEMMs run through ``hwsim.matmul`` with the
  chosen in-block ``Accumulator`` (exact, wrap or saturate at P bits) and the
  inter-block float accumulator, as a MAC array computes them.

With unlimited accumulators the two differ only by FP32 summation order.

Device: ``device=`` puts the layer's buffers on any torch device (or move the layer
with ``.to(device)``); ``forward`` then runs where the buffers are, and refuses an
input on another device with a ValueError naming both. Activations are quantized by
``numfmt.torch`` (``backend=None``: the Numba kernels on the CPU, its plain-torch
implementation elsewhere -- the same bits; ``backend="torch"`` forces the latter on the
CPU too). The float32 GEMMs run with TF32 off (``fp32_matmul``): a simulated FP32
accumulation must not round its operands to 10 mantissa bits behind the model's back.
``"exact"`` mode quantizes on the device and runs ``hwsim.matmul`` on the CPU.

Statistics (``stats=True``): per call, the activation quantization error
||x - Qa(x)||^2 and ||x||^2 summed over all tokens (main and branch inputs), and
the observed in-block accumulator width: the largest |sum over one block of
integer products| (in product-quantum units) over every block, token and
output, as ``bits = ceil(log2(max + 1)) + 1`` (sign included). Data-free
bounds live beside it: ``acc_bits_worst`` (A2Q from the formats alone) and
``acc_bits_l1`` (A2Q's l1-norm bound from the stored weight codes).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

import numfmt
import numfmt.torch as nft
from numfmt.formats import FloatFormat
from hwsim.accumulator import block_length, l1_bound_bits, observed_bits, worst_case_bits

from analysis.metrics import sum_squares

__all__ = ["QuantLinear", "QuantConv1x1", "LayerStats", "fp32_matmul", "MODES"]

MODES = ("fast", "exact")


@contextlib.contextmanager
def fp32_matmul(device):
    """Inside the block, float32 matrix products on a CUDA ``device`` use IEEE float32
    arithmetic, not TF32 (``torch.set_float32_matmul_precision("highest")``, restored
    after). TF32 rounds each operand to 10 mantissa bits inside the GEMM: in a simulated
    layer that is an unmodelled extra quantization, and CUDA results would no longer
    match the CPU ones within FP32 reordering. A no-op on other devices."""
    if torch.device(device).type != "cuda":
        yield
        return
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


@dataclass
class LayerStats:
    """Running statistics of one simulated layer (sums over every token seen).

    ``act_err2`` / ``act_norm2``: sum of ||x - Qa1(x)||^2 and ||x||^2 (main
    path input); ``branch_act_err2`` / ``branch_act_norm2`` the same for the
    branch input; ``acc_bits_observed`` per GEMM (``main``, ``branch_in``,
    ``branch_out``), the maximum over calls; ``tokens`` rows seen.
    """

    act_err2: float = 0.0
    act_norm2: float = 0.0
    branch_act_err2: float = 0.0
    branch_act_norm2: float = 0.0
    acc_bits_observed: dict = field(default_factory=dict)
    tokens: int = 0

    @property
    def act_error(self) -> float | None:
        """Relative activation quantization error of the main path, sqrt(err2 / norm2)."""
        return math.sqrt(self.act_err2 / self.act_norm2) if self.act_norm2 > 0 else None

    @property
    def branch_act_error(self) -> float | None:
        return (math.sqrt(self.branch_act_err2 / self.branch_act_norm2)
                if self.branch_act_norm2 > 0 else None)

    def note_bits(self, gemm: str, bits: int) -> None:
        self.acc_bits_observed[gemm] = max(int(bits), self.acc_bits_observed.get(gemm, 0))


def _as_fmt(f):
    return None if f is None else numfmt.get(f)


def _is_ieee(f) -> bool:
    return isinstance(f, FloatFormat)


class QuantLinear(nn.Module):
    """Simulated quantized replacement of an ``nn.Linear`` (see the module docstring).

    Parameters
    ----------
    main : QTensor, out x in along axis 1 -- Q1(P) (or RTN of W for W4A4).
    main_act : activation format of the main path (mxint4, sint4, mxfp4, ...).
    left, right : QTensors Q2(L Omega) (out x r, axis 1) and Q2(Omega^T R)
        (r x in, axis 1), or None for no branch.
    branch_act : activation format of the branch (fp16 for an FP16 branch).
    bias : float tensor (out,) or None.
    smooth : per-input-channel divisor s (in,) or None; the weights already hold
        W diag(s).
    mode : "fast" or "exact"; ``acc`` / ``inter_block`` are passed to
        ``hwsim.matmul`` in exact mode.
    device : torch device of the layer's buffers and its computation (None: CPU);
        ``.to(device)`` moves a built layer the same way.
    backend : ``numfmt.torch`` backend of the activation quantizers: None (Numba on
        the CPU, plain torch elsewhere), "torch" (plain torch on every device, CPU
        included) or "compiled" (the same through torch.compile); all give the same bits.
    """

    def __init__(self, main, main_act, *, left=None, right=None, branch_act=None, bias=None,
                 smooth=None, mode: str = "fast", acc=None, inter_block=None, name: str = "",
                 device=None, backend: str | None = None):
        super().__init__()
        if (left is None) != (right is None):
            raise ValueError("give both left and right for a branch, or neither")
        if left is not None and branch_act is None:
            raise ValueError("a branch needs branch_act (its activation format)")
        out_f, in_f = main.shape
        if left is not None:
            if left.shape[0] != out_f or right.shape[1] != in_f or left.shape[1] != right.shape[0]:
                raise ValueError(f"branch shapes left {left.shape} and right {right.shape} do not "
                                 f"fit main {main.shape}")
        self.name = name
        self.recipe = None  # the analysis.Recipe it was quantized with, when known
        self.in_features, self.out_features = in_f, out_f
        self.main_q, self.left_q, self.right_q = main, left, right
        self.main_act = _as_fmt(main_act)
        self.branch_act = _as_fmt(branch_act)
        self.rank = 0 if left is None else int(left.shape[1])
        self.register_buffer("weight", torch.from_numpy(numfmt.dequantize(main)))
        if left is not None:
            self.register_buffer("left", torch.from_numpy(numfmt.dequantize(left)))
            self.register_buffer("right", torch.from_numpy(numfmt.dequantize(right)))
        else:
            self.left = self.right = None
        self.register_buffer("bias", None if bias is None else
                             torch.as_tensor(bias, dtype=torch.float32).detach().clone())
        self.register_buffer("smooth", None if smooth is None else
                             torch.as_tensor(np.asarray(smooth, dtype=np.float32)).clone())
        self.mode = mode
        self.acc = acc
        self.inter_block = inter_block
        self.collect_stats = False
        self.stats = LayerStats()
        self._check_mode()
        self.backend = backend
        dev = torch.device("cpu") if device is None else nft.check_device(device)
        nft.resolve_backend(backend, dev)  # a bad name or numba off the CPU fails here
        if device is not None:
            self.to(dev)

    def _check_mode(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not allowed; allowed: {MODES}")

    @classmethod
    def from_result(cls, result, config, *, bias=None, mode: str = "fast", acc=None,
                    inter_block=None, name: str = "", device=None,
                    backend: str | None = None) -> "QuantLinear":
        """Build from a LoRaQ-style result (``main``, ``left``, ``right``, ``smooth``) and a
        ``hwsim.cost.Config`` (its ``main_act`` / ``branch_act`` formats)."""
        left = getattr(result, "left", None)
        right = getattr(result, "right", None)
        has_branch = left is not None and getattr(result, "rank", 1) and config.has_branch
        return cls(result.main, config.main_act,
                   left=left if has_branch else None, right=right if has_branch else None,
                   branch_act=config.branch_act if has_branch else None, bias=bias,
                   smooth=getattr(result, "smooth", None), mode=mode, acc=acc,
                   inter_block=inter_block, name=name, device=device, backend=backend)

    def extra_repr(self) -> str:
        br = f", rank={self.rank}, branch_act={self.branch_act.name}" if self.rank else ""
        return (f"in={self.in_features}, out={self.out_features}, main={self.main_q.format.name}, "
                f"main_act={self.main_act.name}{br}, mode={self.mode}")

    # -- data-free accumulator bounds ---------------------------------------
    def acc_bits_worst(self) -> dict:
        """A2Q worst case per GEMM from the formats alone (in-block length)."""
        out = {"main": worst_case_bits(self.main_q.format, self.main_act,
                                       block_length(self.main_q.format, self.main_act, self.in_features))}
        if self.rank and not _is_ieee(self.branch_act):
            out["branch_in"] = worst_case_bits(self.right_q.format, self.branch_act, block_length(
                self.right_q.format, self.branch_act, self.in_features))
            out["branch_out"] = worst_case_bits(self.left_q.format, self.branch_act, block_length(
                self.left_q.format, self.branch_act, self.rank))
        return out

    def acc_bits_l1(self) -> dict:
        """A2Q's l1-norm bound per GEMM from the stored weight codes."""
        out = {"main": l1_bound_bits(self.main_q, self.main_act)}
        if self.rank and not _is_ieee(self.branch_act):
            out["branch_in"] = l1_bound_bits(self.right_q, self.branch_act)
            out["branch_out"] = l1_bound_bits(self.left_q, self.branch_act)
        return out

    # -- forward -------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"layer {self.name or ''} expects {self.in_features} input features, "
                             f"got input of shape {tuple(x.shape)}")
        dev = self.weight.device
        if x.device != dev:
            raise ValueError(f"layer {self.name or ''} is on {dev} but its input is on "
                             f"{x.device}; move one of them (QuantLinear(device=...) or "
                             f".to(device))")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.float32)
        if self.smooth is not None:
            x2 = x2 / self.smooth
        with fp32_matmul(dev):
            if self.mode == "fast":
                y = self._fast(x2)
            else:
                y = self._exact(x2)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def _note_act(self, x2: torch.Tensor, xq: torch.Tensor, branch: bool) -> None:
        err = sum_squares(x2 - xq)
        nrm = sum_squares(x2)
        if branch:
            self.stats.branch_act_err2 += err
            self.stats.branch_act_norm2 += nrm
        else:
            self.stats.act_err2 += err
            self.stats.act_norm2 += nrm

    def _qdq(self, x: torch.Tensor, fmt):
        """(fake-quantized x, its QTensor when statistics are on, else None)."""
        if self.collect_stats and not _is_ieee(fmt):
            q = nft.quantize(x, fmt, axis=-1, backend=self.backend)
            # == fake_quantize bit for bit
            return nft.dequantize(q, device=x.device, backend=self.backend), q
        return nft.fake_quantize(x, fmt, axis=-1, backend=self.backend), None

    def _fast(self, x2: torch.Tensor) -> torch.Tensor:
        st = self.collect_stats
        xm, qm = self._qdq(x2, self.main_act)
        y = xm @ self.weight.T
        if st:
            self.stats.tokens += x2.shape[0]
            self._note_act(x2, xm, False)
            if qm is not None:
                self.stats.note_bits("main", observed_bits(qm, self.main_q))
        if self.rank:
            xb, qb = self._qdq(x2, self.branch_act)
            h = xb @ self.right.T
            hq, qh = self._qdq(h, self.branch_act)
            y = y + hq @ self.left.T
            if st:
                self._note_act(x2, xb, True)
                if qb is not None:
                    self.stats.note_bits("branch_in", observed_bits(qb, self.right_q))
                    self.stats.note_bits("branch_out", observed_bits(qh, self.left_q))
        return y

    def _gemm(self, a, b, gemm: str) -> torch.Tensor:
        """a (M x K) @ b (N x K)^T through hwsim.matmul; float32 GEMM for an IEEE (fp16) pair."""
        dev = self.weight.device
        if _is_ieee(a.format) and _is_ieee(b.format):
            # fp16 x fp16 products are exact in fp32; tensor-core style fp32 accumulation.
            if dev.type == "cpu":
                return torch.from_numpy(numfmt.dequantize(a)) @ torch.from_numpy(numfmt.dequantize(b)).T
            return (nft.dequantize(a, device=dev, backend=self.backend)
                    @ nft.dequantize(b, device=dev, backend=self.backend).T)
        import hwsim
        kw = {}
        if self.acc is not None:
            kw["acc"] = self.acc
        if self.inter_block is not None:
            kw["inter_block"] = self.inter_block
        res = hwsim.matmul(a, b, **kw)
        if self.collect_stats and getattr(res, "acc_bits_needed", None) is not None:
            self.stats.note_bits(gemm, res.acc_bits_needed)
        return torch.from_numpy(np.asarray(res.out, dtype=np.float32)).to(dev)

    def _exact(self, x2: torch.Tensor) -> torch.Tensor:
        st = self.collect_stats
        bk, dev = self.backend, x2.device
        xq = nft.quantize(x2, self.main_act, axis=-1, backend=bk)
        if st:
            self.stats.tokens += x2.shape[0]
            self._note_act(x2, nft.dequantize(xq, device=dev, backend=bk), False)
        y = self._gemm(xq, self.main_q, "main")
        if self.rank:
            xb = nft.quantize(x2, self.branch_act, axis=-1, backend=bk)
            if st:
                self._note_act(x2, nft.dequantize(xb, device=dev, backend=bk), True)
            h = self._gemm(xb, self.right_q, "branch_in")
            hq = nft.quantize(h, self.branch_act, axis=-1, backend=bk)
            y = y + self._gemm(hq, self.left_q, "branch_out")
        return y


class QuantConv1x1(QuantLinear):
    """A simulated quantized 1 x 1 convolution: ``QuantLinear`` over channels at each pixel.

    Input and output are (B, C, H, W); ``linear_rows`` takes (pixels, C) rows.
    """

    channels_first = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"layer {self.name} is a 1x1 convolution and expects (B, C, H, W) "
                             f"input, got shape {tuple(x.shape)}")
        b, c, h, w = x.shape
        y = super().forward(x.permute(0, 2, 3, 1).reshape(-1, c))
        return y.reshape(b, h, w, -1).permute(0, 3, 1, 2)

    def linear_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return super().forward(rows)
