"""An independent port of Microsoft microxcaling's pure-PyTorch MX quantizer.

Written from reading ``mx/mx_ops.py`` (``_quantize_mx``, ``_shared_exponents``,
``_reshape_to_blocks``), ``mx/elemwise_ops.py`` (``_quantize_elemwise_core``,
``_round_mantissa``) and ``mx/formats.py`` (``_get_format_params``) of
github.com/microsoft/microxcaling, for the configuration numfmt promises to
match: scale_bits = 8, block_size = 32 (any), axes = [-1], shared_exp_method
"max", flush_fp32_subnorms = False, custom_cuda = False, rounding 'nearest',
'even' or 'floor'. Every step is the same torch float32 operation in the same
order as there, because the point is to reproduce its float32 rounding
artefacts (log2f rounding up just below a power of two, the +0.5 carry, the
'even' mask, torch.sign on zeros).
"""
from __future__ import annotations

import torch

FP32_EXPONENT_BIAS = 127
FP32_MIN_NORMAL = 2.0 ** (-FP32_EXPONENT_BIAS + 1)

# elem format -> (ebits, mbits incl. sign and implicit bit, emax, max_norm), as
# microxcaling's _get_format_params computes them (int6 by the int8/int4 pattern).
def format_params(name: str):
    table = {
        "int8": (0, 8, 0), "int6": (0, 6, 0), "int4": (0, 4, 0), "int2": (0, 2, 0),
        "fp8_e5m2": (5, 4, 2 ** 4 - 1), "fp8_e4m3": (4, 5, 2 ** 3),
        "fp6_e3m2": (3, 4, 2 ** 2), "fp6_e2m3": (2, 5, 2 ** 1), "fp4_e2m1": (2, 3, 2 ** 1),
    }
    ebits, mbits, emax = table[name]
    if name == "fp8_e4m3":
        max_norm = 2 ** emax * 1.75
    else:
        max_norm = 2 ** emax * float(2 ** (mbits - 1) - 1) / 2 ** (mbits - 2)
    return ebits, mbits, emax, max_norm


def _round_mantissa(A: torch.Tensor, round: str) -> torch.Tensor:
    if round == "floor":
        return torch.sign(A) * torch.floor(torch.abs(A))
    if round == "nearest":
        return torch.sign(A) * torch.floor(torch.abs(A) + 0.5)
    if round == "even":
        absA = torch.abs(A)
        # 0.5, 2.5, 4.5, ... : the float32 (|A| - 0.5) is an even integer
        mask = ((absA - 0.5) % 2 == torch.zeros_like(A)).type(A.dtype)
        return torch.sign(A) * (torch.floor(absA + 0.5) - mask)
    raise ValueError(f"unknown microxcaling rounding {round!r}")


def _quantize_elemwise_core(A, bits, exp_bits, max_norm, round):
    """saturate_normals=True, allow_denorm=True."""
    out = A
    if exp_bits != 0:
        private_exp = torch.floor(torch.log2(torch.abs(A) + (A == 0).type(A.dtype)))
        min_exp = -(2 ** (exp_bits - 1)) + 2
        private_exp = private_exp.clip(min=min_exp)
        out = out / (2 ** private_exp) * (2 ** (bits - 2))   # _safe_lshift
    else:
        private_exp = None
        out = out * (2 ** (bits - 2))
    out = _round_mantissa(out, round)
    if private_exp is not None:
        out = out / (2 ** (bits - 2)) * (2 ** private_exp)   # _safe_rshift
    else:
        out = out / (2 ** (bits - 2))
    out = torch.clamp(out, min=-max_norm, max=max_norm)
    out[A == float("Inf")] = float("Inf")
    out[A == -float("Inf")] = -float("Inf")
    return out


def quantize_mx(A: torch.Tensor, elem: str, round: str = "nearest", block_size: int = 32,
                scale_bits: int = 8) -> torch.Tensor:
    """Fake-quantize float32 ``A`` along its last axis in blocks of ``block_size``."""
    assert A.dtype == torch.float32
    ebits, mbits, emax, max_norm = format_params(elem)
    shape = A.shape
    L = shape[-1]
    # _reshape_to_blocks: unsqueeze, zero-pad the axis to a multiple, view as tiles
    pad = (-L) % block_size
    if pad:
        A = torch.nn.functional.pad(A, (0, pad), mode="constant")
    padded = A.shape
    A = A.reshape(*padded[:-1], padded[-1] // block_size, block_size)
    # _shared_exponents(method="max", ebits=0)
    shared_exp, _ = torch.max(torch.abs(A), dim=-1, keepdim=True)
    shared_exp = torch.floor(torch.log2(
        shared_exp + FP32_MIN_NORMAL * (shared_exp == 0).type(shared_exp.dtype)))
    shared_exp = shared_exp - emax
    scale_emax = 2 ** (scale_bits - 1) - 1
    shared_exp[shared_exp > scale_emax] = float("NaN")
    shared_exp[shared_exp < -scale_emax] = -scale_emax
    A = A / (2 ** shared_exp)
    A = _quantize_elemwise_core(A, mbits, ebits, max_norm, round)
    A = A * (2 ** shared_exp)
    A = A.reshape(padded)
    if pad:
        A = A[..., :L]
    return A.reshape(shape)


def shared_exponents(A: torch.Tensor, elem: str, block_size: int = 32) -> torch.Tensor:
    """The per-block shared exponent microxcaling uses (NaN for NaN blocks), float32."""
    _, _, emax, _ = format_params(elem)
    L = A.shape[-1]
    pad = (-L) % block_size
    if pad:
        A = torch.nn.functional.pad(A, (0, pad))
    A = A.reshape(*A.shape[:-1], A.shape[-1] // block_size, block_size)
    se, _ = torch.max(torch.abs(A), dim=-1)
    se = torch.floor(torch.log2(se + FP32_MIN_NORMAL * (se == 0).type(se.dtype))) - emax
    se[se > 127] = float("NaN")
    se[se < -127] = -127
    return se
