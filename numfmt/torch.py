"""numfmt on torch tensors on any device, with a straight-through-estimator autograd path.

``fake_quantize(t, fmt, ...)`` returns a tensor bit-identical to the NumPy
``numfmt.fake_quantize`` of the same data (float32 result cast back to the
input's dtype), on the input's device. Its gradient is the straight-through
estimator: d out / d in = 1 everywhere (values that saturate included), which is
what quantization-aware optimizers such as LoRaQ use in their inner loop.

Two implementations compute the same bits (the tests compare them on every format,
rounding mode and compat mode):

* ``backend="numba"``: the Numba kernels of ``numfmt.core`` (CPU tensors only);
* ``backend="torch"``: plain torch tensor operations (``numfmt._torch_backend``),
  on whatever device the tensor lives, run eagerly (one kernel per operation);
* ``backend="compiled"``: the same functions of block formats through
  ``torch.compile`` (fused kernels: Triton on a GPU, C++ on the CPU), compiled on the
  first call per format, mode, seed and shape (seconds to a minute), with IEEE division
  and no flushing of subnormals (``_COMPILE_OPTIONS``). Meant for GPUs:
  ``scripts/device_check`` compares its CUDA kernels with Numba. On the CPU Inductor
  builds C++ with -fno-signed-zeros, so the sign of a zero is not guaranteed there (the
  tests check one format on the CPU; use Numba or "torch" for CPU work). Element
  formats run eagerly.

``backend=None`` (the default) takes Numba for CPU tensors and torch elsewhere.
``quantize`` returns the same NumPy-backed ``QTensor`` as ``numfmt.quantize`` (codes
and scales are copied to the host); ``dequantize(q, device=...)`` decodes on a device.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from numfmt import _torch_backend as TB
from numfmt import core
from numfmt.formats import COMPATS, BlockFormat, IntFormat, get
from numfmt.qtensor import QTensor

__all__ = ["quantize", "fake_quantize", "dequantize", "BACKENDS", "resolve_backend",
           "check_device"]

BACKENDS = ("numba", "torch", "compiled")


def resolve_backend(backend, device) -> str:
    """The implementation that runs for tensors on ``device``: ``backend`` checked, or
    (None) "numba" on CPU and "torch" elsewhere."""
    dev = torch.device(device)
    if backend is None:
        return "numba" if dev.type == "cpu" else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS} (or None: Numba on "
                         f"CPU, torch elsewhere)")
    if backend == "numba" and dev.type != "cpu":
        raise ValueError(f"backend='numba' runs on CPU tensors; got a tensor on {dev} "
                         f"(use backend='torch' or None)")
    return backend


def check_device(device) -> torch.device:
    """``torch.device(device)``, checked: a ValueError naming the device for a malformed
    name, or for a CUDA / MPS device that this torch build or machine does not have."""
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str):
        try:
            dev = torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"device={device!r} is not a torch device name such as 'cpu', "
                             f"'cuda' or 'cuda:1' ({e})") from None
    else:
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(dev)!r} requested but CUDA is not available here "
                             f"(torch {torch.__version__}: torch.cuda.is_available() is False)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={str(dev)!r} requested but only "
                             f"{torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={str(dev)!r} requested but MPS is not available here")
    return dev


def _check_tensor(t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(t).__name__}; "
                        f"use numfmt.quantize / fake_quantize for NumPy arrays")
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.float()  # exact
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"expected a floating tensor (float16, bfloat16, float32, float64), "
                        f"got dtype {t.dtype}")
    return t


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _check_args(fmt, rounding, compat, seed, ndim):
    fmt = get(fmt)
    mode = core._check_rounding(rounding, seed)
    if compat not in COMPATS:
        raise ValueError(f"compat={compat!r} is not one of {COMPATS}")
    if compat == "microxcaling":
        if not isinstance(fmt, BlockFormat) or fmt.scaling != "mx":
            raise ValueError(f"compat='microxcaling' applies to MX formats, not {fmt.name!r}")
        if rounding not in core._MICROXCALING_MODES:
            raise ValueError(f"compat='microxcaling' supports rounding "
                             f"{core._MICROXCALING_MODES} (its 'even', 'nearest', 'floor'), "
                             f"not {rounding!r}")
        core.check_microxcaling_rule(fmt)
    return fmt, mode, 0 if seed is None else int(seed)


def _check_element_input(x: torch.Tensor, fmt) -> None:
    """The element-format refusals of ``numfmt.encode`` (one host sync each)."""
    if x.numel() == 0:
        return
    if isinstance(fmt, IntFormat):
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            raise ValueError(f"{float(x[bad][0])} cannot be encoded in integer format "
                             f"{fmt.name!r}")
        return
    if not fmt.has_nan and bool(torch.isnan(x).any()):
        raise ValueError(f"NaN cannot be encoded in {fmt.name!r}, which has no NaN")
    if not fmt.signed:
        bad = torch.signbit(x) & (x != 0)
        if bool(bad.any()):
            raise ValueError(f"{float(x[bad][0])} cannot be encoded in unsigned format "
                             f"{fmt.name!r}")


def _rows(x: torch.Tensor, ax: int):
    """x with the quantized axis last, as a contiguous (rows, L) tensor, and that shape."""
    xm = x.reshape(1) if x.ndim == 0 else torch.movedim(x, ax, -1)
    moved = xm.shape
    L = moved[-1]
    return xm.contiguous().reshape(-1, L) if L else xm.reshape(0, 0), tuple(moved)


@functools.lru_cache(maxsize=None)
def _compiled_blocks(fmt, mode: int, compat: str, seed: int, want_codes: bool):
    """``_torch_backend.quantize_blocks`` for one (format, mode, compat, seed) through
    torch.compile (made once, compiled on first call per shape)."""
    def run(x2):
        return TB.quantize_blocks(x2, fmt, mode, compat, seed, want_codes, fast=False)
    return torch.compile(run, options=_COMPILE_OPTIONS)


# Inductor settings that keep IEEE semantics in generated GPU code: Triton's float32 "/"
# is an approximate division (div.full.f32) unless division_rounding asks for div_rn;
# subnormals must not be flushed; no contraction of products into FMAs (harmless for
# this arithmetic, where every product feeding an addition is exact, but not needed).
_COMPILE_OPTIONS = {"eager_numerics.division_rounding": True,
                    "eager_numerics.disable_ftz": True,
                    "emulate_precision_casts": True}


def _torch_run(x: torch.Tensor, fmt, ax: int, mode: int, compat: str, seed: int,
               want_codes: bool, compiled: bool = False):
    """The torch implementation. want_codes: (codes int64, scales, tensor_scale, moved
    shape, nblk) on x's device; else the float32 fake-quantized tensor of x's shape."""
    if not isinstance(fmt, BlockFormat):
        _check_element_input(x, fmt)
        codes = TB.encode(x, fmt, mode, seed) if x.numel() else torch.zeros(
            x.shape, dtype=torch.int64, device=x.device)
        return codes if want_codes else TB.decode(codes, fmt)
    if compat == "microxcaling":
        x = x.to(torch.float32)
    x2, moved = _rows(x, ax)
    rows, L = (x2.shape if x2.numel() else (int(np.prod(moved[:-1])), moved[-1]))
    bs = L if fmt.block_size is None else fmt.block_size
    nblk = -(-L // bs) if bs else 0
    if x2.numel() == 0:
        if not want_codes:
            return torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        ts = torch.tensor(1.0, dtype=torch.float32) if fmt.scaling == "nvfp4" else None
        sdt = torch.float64 if fmt.scaling == "absmax" else torch.int64
        return (torch.zeros(moved, dtype=torch.int64, device=x.device),
                torch.zeros(moved[:-1] + (nblk,), dtype=sdt, device=x.device), ts, moved, nblk)
    if compiled:
        res = _compiled_blocks(fmt, mode, compat, seed, want_codes)(x2)
    else:
        res = TB.quantize_blocks(x2, fmt, mode, compat, seed, want_codes)
    if want_codes:
        codes, scales, ts = res
        return codes.reshape(moved), scales.reshape(moved[:-1] + (nblk,)), ts, moved, nblk
    y = res.reshape(moved)
    return y.reshape(()) if x.ndim == 0 else torch.movedim(y, -1, ax)


def _fake(x: torch.Tensor, fmt, axis, rounding, compat, seed, backend) -> torch.Tensor:
    """float32 fake-quantized x (x already float32/float64) on x's device."""
    bk = resolve_backend(backend, x.device)
    if bk == "numba":
        return torch.from_numpy(core.fake_quantize(_to_numpy(x), fmt, axis=axis,
                                                   rounding=rounding, compat=compat, seed=seed))
    fmt, mode, seed = _check_args(fmt, rounding, compat, seed, x.ndim)
    ax = core._check_axis(axis, x.ndim)
    return _torch_run(x.detach(), fmt, ax, mode, compat, seed, want_codes=False,
                      compiled=bk == "compiled")


class _FakeQuantizeSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fmt, axis, rounding, compat, seed, backend):
        return _fake(_check_tensor(x), fmt, axis, rounding, compat, seed, backend).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None, None, None


def _check_out(out, x: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.device != x.device:
        raise ValueError(f"x is on {x.device} but out is on {out.device}; put both on one "
                         f"device")
    if out.dtype != x.dtype:
        raise TypeError(f"out must have x's dtype {x.dtype}, got {out.dtype}")
    if tuple(out.shape) != tuple(x.shape):
        raise ValueError(f"out has shape {tuple(out.shape)}; it must have x's shape "
                         f"{tuple(x.shape)}")
    if not out.is_contiguous():
        raise ValueError("out must be a contiguous tensor")


def fake_quantize(x: torch.Tensor, fmt, *, axis: int = -1, rounding: str = "rne",
                  compat: str = "ocp", seed: int | None = None, backend: str | None = None,
                  out: torch.Tensor | None = None,
                  scale_rule: str | None = None) -> torch.Tensor:
    """Fake-quantize a tensor on its device; differentiable with the straight-through
    estimator. Returns float32 values cast to x's dtype.

    backend  None: Numba for CPU tensors, torch elsewhere; "torch" forces the torch
             implementation (any device); "compiled" the same through torch.compile;
             "numba" the Numba kernels (CPU only). All give the same bits.
    out      an optional contiguous tensor of x's shape, dtype and device to write the
             result into (and return); it may be x itself. Not with autograd.
    scale_rule  MX shared-exponent rule (``numfmt.SCALE_RULES``; None: the format's own,
             "floor" by default), as in ``numfmt.quantize``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}; "
                        f"use numfmt.fake_quantize for NumPy arrays")
    fmt = core.with_scale_rule(fmt, scale_rule)
    if out is not None:
        _check_out(out, x)
        if x.requires_grad and torch.is_grad_enabled():
            raise ValueError("out= cannot be used on a tensor that requires grad")
    if x.requires_grad and torch.is_grad_enabled():
        return _FakeQuantizeSTE.apply(x, fmt, axis, rounding, compat, seed, backend)
    y = _fake(_check_tensor(x), fmt, axis, rounding, compat, seed, backend)
    if out is not None:
        return out.copy_(y)
    return y.to(x.dtype)


def quantize(x: torch.Tensor, fmt, *, axis: int = -1, rounding: str = "rne",
             compat: str = "ocp", seed: int | None = None,
             backend: str | None = None, scale_rule: str | None = None) -> QTensor:
    """Quantize a tensor (computed on its device); returns the same NumPy-backed QTensor
    as ``numfmt.quantize``, its codes and scales copied to the host. ``scale_rule`` as
    in ``numfmt.quantize``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}; "
                        f"use numfmt.quantize for NumPy arrays")
    fmt = core.with_scale_rule(fmt, scale_rule)
    t = _check_tensor(x)
    bk = resolve_backend(backend, t.device)
    if bk == "numba":
        return core.quantize(_to_numpy(t), fmt, axis=axis, rounding=rounding, compat=compat,
                             seed=seed)
    fmt, mode, seed = _check_args(fmt, rounding, compat, seed, t.ndim)
    ax = core._check_axis(axis, t.ndim)
    shape = tuple(t.shape)
    if not isinstance(fmt, BlockFormat):
        codes = _torch_run(t.detach(), fmt, ax, mode, compat, seed, want_codes=True)
        return QTensor(_codes_np(codes, fmt.bits), None, fmt, ax, shape)
    codes, scales, ts, moved, nblk = _torch_run(t.detach(), fmt, ax, mode, compat, seed,
                                                want_codes=True, compiled=bk == "compiled")
    codes = _codes_np(codes, fmt.element.bits)
    if fmt.scaling == "absmax":
        scales = scales.cpu().numpy().astype(core._SCALE_DTYPES[fmt.scale.name])
    else:
        scales = scales.to(torch.uint8).cpu().numpy()
    codes = np.moveaxis(codes, -1, ax) if len(shape) else codes
    scales = np.moveaxis(scales, -1, ax) if len(shape) else scales
    return QTensor(np.ascontiguousarray(codes).reshape(shape), np.ascontiguousarray(scales),
                   fmt, ax, shape,
                   tensor_scale=None if ts is None else np.float32(ts.cpu().numpy()))


def _codes_np(codes: torch.Tensor, bits: int) -> np.ndarray:
    if bits <= 8:
        return codes.to(torch.uint8).cpu().numpy()
    return codes.cpu().numpy().astype(core._code_dtype(bits))


def dequantize(q: QTensor, *, device=None, backend: str | None = None) -> torch.Tensor:
    """A QTensor's values as a float32 tensor on ``device`` (default CPU), bit-identical
    to ``numfmt.dequantize``. On CPU the Numba kernels run unless backend="torch"."""
    if not isinstance(q, QTensor):
        raise TypeError(f"dequantize expects a QTensor, got {type(q).__name__}")
    dev = torch.device("cpu" if device is None else device)
    if resolve_backend(backend, dev) == "numba":
        return torch.from_numpy(core.dequantize(q))
    q.validate()
    fmt = q.format
    if not isinstance(fmt, BlockFormat):
        codes = torch.from_numpy(q.codes.astype(np.int64)).to(dev)
        if q.codes.size and (int(q.codes.max()) >> fmt.bits):
            raise ValueError(f"codes must lie in 0..{(1 << fmt.bits) - 1} for {fmt.name!r}")
        return TB.decode(codes, fmt)
    q.check_codes()
    ax = q.axis
    shape = q.shape
    cm = q.codes.reshape(1) if not shape else np.moveaxis(q.codes, ax, -1)
    moved = cm.shape
    L = moved[-1]
    if cm.size == 0:
        return torch.zeros(shape, dtype=torch.float32, device=dev)
    codes = torch.from_numpy(np.ascontiguousarray(cm).astype(np.int64)).to(dev).reshape(-1, L)
    sm = np.moveaxis(q.scales.reshape(q.scales.shape or (1,)), ax, -1)
    if fmt.scaling == "absmax":
        scales = torch.from_numpy(np.ascontiguousarray(sm).astype(np.float64))
    else:
        scales = torch.from_numpy(np.ascontiguousarray(sm).astype(np.int64))
    scales = scales.to(dev).reshape(codes.shape[0], -1)
    out = TB.dequantize_blocks(codes, scales, fmt, q.tensor_scale, L).reshape(moved)
    return out.reshape(()) if not shape else torch.movedim(out, -1, ax).contiguous()
