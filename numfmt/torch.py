"""numfmt on CPU torch tensors, with a straight-through-estimator autograd path.

``fake_quantize(t, fmt, ...)`` returns a tensor bit-identical to the NumPy
``numfmt.fake_quantize`` of the same data (float32 result cast back to the
input's dtype). Its gradient is the straight-through estimator: d out / d in = 1
everywhere (values that saturate included), which is what quantization-aware
optimizers such as LoRaQ use in their inner loop.
"""
from __future__ import annotations

import numpy as np
import torch

from numfmt import core
from numfmt.qtensor import QTensor

__all__ = ["quantize", "fake_quantize", "dequantize"]


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"numfmt.torch runs on CPU tensors; got device {t.device}")
    if t.dtype == torch.bfloat16 or t.dtype == torch.float16:
        t = t.float()
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"expected a floating tensor, got dtype {t.dtype}")
    return t.detach().contiguous().numpy()


class _FakeQuantizeSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fmt, axis, rounding, compat, seed):
        y = core.fake_quantize(_to_numpy(x), fmt, axis=axis, rounding=rounding, compat=compat,
                               seed=seed)
        return torch.from_numpy(y).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None, None


def fake_quantize(x: torch.Tensor, fmt, *, axis: int = -1, rounding: str = "rne",
                  compat: str = "ocp", seed: int | None = None) -> torch.Tensor:
    """Fake-quantize a CPU tensor; differentiable with the straight-through estimator."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}; "
                        f"use numfmt.fake_quantize for NumPy arrays")
    if x.requires_grad:
        return _FakeQuantizeSTE.apply(x, fmt, axis, rounding, compat, seed)
    y = core.fake_quantize(_to_numpy(x), fmt, axis=axis, rounding=rounding, compat=compat,
                           seed=seed)
    return torch.from_numpy(y).to(x.dtype)


def quantize(x: torch.Tensor, fmt, *, axis: int = -1, rounding: str = "rne",
             compat: str = "ocp", seed: int | None = None) -> QTensor:
    """Quantize a CPU tensor; returns the same NumPy-backed QTensor as ``numfmt.quantize``."""
    return core.quantize(_to_numpy(x), fmt, axis=axis, rounding=rounding, compat=compat, seed=seed)


def dequantize(q: QTensor) -> torch.Tensor:
    """A QTensor's values as a float32 CPU tensor."""
    return torch.from_numpy(core.dequantize(q))
