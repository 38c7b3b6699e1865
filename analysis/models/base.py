"""The model-source protocol: what the analyzer and ``loraq report`` need from a model.

A ``ModelSource`` supplies five things, and the analyzer uses nothing else:

* ``module``: the torch module (``None`` for a weights-only source);
* ``layers``: the names of its quantizable layers: every ``nn.Linear`` and every
  1 x 1 ``nn.Conv2d`` (groups 1), each quantized as a linear layer with weight
  (out, in). ``skipped`` lists the other parameterized modules (depthwise and
  other convolutions, embeddings, norms) with the reason they stay in full
  precision;
* ``calibration``: input batches for activation statistics (smoothing);
* ``evaluation``: input batches on which every per-layer error is measured,
  with ``groups`` (one label per evaluation batch, e.g. its diffusion timestep,
  or None) so errors can be given per timestep;
* ``end_metric``: an ``EndMetric``: ``reference(module, fp_outputs)`` is called
  once on the full-precision module, ``measure(module, q_outputs, ref)`` on the
  same module with its layers swapped for simulated quantized ones; both get
  the module's outputs on the evaluation batches (a list of tensors, one per
  batch);
* ``artifact``: the submodule a quantized checkpoint holds (a diffusers transformer
  inside a wrapper), or "" for the module itself.

A batch is a tensor (one positional input), a tuple (positional inputs) or a
dict (keyword inputs; an ``attention_mask`` (B, T) restricts token statistics
to real tokens).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from analysis import confidence
from analysis.metrics import db, output_cosine

__all__ = ["ModelSource", "EndMetric", "OutputCosine", "OutputSQNR", "NextTokenKL",
           "quantizable_layers", "is_pointwise_conv", "layer_weight"]


class EndMetric:
    """Compares the quantized model with the full-precision one (see the module docstring)."""

    def reference(self, module: nn.Module, fp_outputs: list[torch.Tensor]) -> Any:
        return fp_outputs

    def measure(self, module: nn.Module, q_outputs: list[torch.Tensor], ref: Any) -> dict:
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__


def _rows(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float64).reshape(t.shape[0], -1).numpy()


class OutputCosine(EndMetric):
    """Cosine of the quantized and full-precision outputs, one vector per row.

    ``per_token=False``: a row is one output (B, ...) flattened (MiniLM's
    sentence embeddings), with top-1 nearest-neighbour agreement across rows;
    ``per_token=True``: a row is one real token's last hidden state (B, T, d),
    masked with the batches' ``attention_mask`` (``masks``).
    """

    def __init__(self, per_token: bool = False, masks: list | None = None):
        self.per_token = per_token
        self.masks = masks

    def describe(self) -> str:
        return ("cosine of the last hidden state per real token (mean / min)" if self.per_token
                else "cosine of the quantized and FP outputs (mean / min) and top-1 "
                     "nearest-neighbour agreement")

    def _stack(self, outs: list[torch.Tensor]) -> np.ndarray:
        if not self.per_token:
            return np.concatenate([_rows(o) for o in outs])
        rows = []
        for i, o in enumerate(outs):
            o = o.detach().cpu().to(torch.float64)
            m = None if self.masks is None else self.masks[i].cpu()
            rows.append((o[m.bool()] if m is not None else o.reshape(-1, o.shape[-1])).numpy())
        return np.concatenate(rows)

    def measure(self, module, q_outputs, ref) -> dict:
        out = output_cosine(self._stack(ref), self._stack(q_outputs))
        if self.per_token:
            out["top1_agreement"] = None
        cos = np.asarray(out["per_sample"]["cosine"])
        if len(cos) >= 2:
            out["mean_cosine_ci"] = confidence.interval(lambda i: cos[i].mean(), len(cos))
        return out


class OutputSQNR(EndMetric):
    """SQNR (dB) of the model's output (a diffusion transformer's predicted noise),
    per group (timestep) and overall: 10 log10(sum y^2 / sum (y - y_q)^2)."""

    def __init__(self, groups: list | None = None):
        self.groups = groups

    def describe(self) -> str:
        return "SQNR of the transformer's output (predicted noise), per timestep and overall"

    def measure(self, module, q_outputs, ref) -> dict:
        sig: dict = {}
        noi: dict = {}
        for i, (r, q) in enumerate(zip(ref, q_outputs)):
            g = "all" if self.groups is None else self.groups[i]
            r64, q64 = r.detach().to(torch.float64), q.detach().to(torch.float64)
            sig[g] = sig.get(g, 0.0) + float(r64.square().sum())
            noi[g] = noi.get(g, 0.0) + float((r64 - q64).square().sum())

        per = {str(g): db(sig[g], noi[g]) for g in sig}
        finite = [v for v in per.values() if math.isfinite(v)]
        return {"output_sqnr_db": db(sum(sig.values()), sum(noi.values())),
                "output_sqnr_db_by_timestep": per if self.groups is not None else None,
                "output_sqnr_db_worst": min(finite) if finite else None}


class NextTokenKL(EndMetric):
    """KL(p_fp || p_q) of the next-token distributions of a causal LM, per real token
    (mean and max, nats), and the agreement of the arg-max next token."""

    def __init__(self, masks: list | None = None):
        self.masks = masks

    def describe(self) -> str:
        return "KL divergence of the next-token distribution (mean / max over real tokens)"

    def measure(self, module, q_outputs, ref) -> dict:
        kls, agree = [], []
        for i, (r, q) in enumerate(zip(ref, q_outputs)):
            lp = torch.log_softmax(r.detach().cpu().to(torch.float64), dim=-1)
            lq = torch.log_softmax(q.detach().cpu().to(torch.float64), dim=-1)
            kl = (lp.exp() * (lp - lq)).sum(-1)
            ag = (lp.argmax(-1) == lq.argmax(-1)).to(torch.float64)
            m = None if self.masks is None else self.masks[i].cpu().bool()
            kls.append((kl[m] if m is not None else kl.reshape(-1)).numpy())
            agree.append((ag[m] if m is not None else ag.reshape(-1)).numpy())
        k, ag = np.concatenate(kls), np.concatenate(agree)
        out = {"kl_mean": float(k.mean()), "kl_max": float(k.max()),
               "top1_agreement": float(ag.mean()), "n": int(k.size)}
        if k.size >= 2:  # over tokens (tokens of one sentence are not independent: optimistic)
            out["kl_mean_ci"] = confidence.interval(lambda i: k[i].mean(), k.size)
            out["top1_agreement_ci"] = confidence.interval(lambda i: ag[i].mean(), k.size)
        return out


def is_pointwise_conv(m: nn.Module) -> bool:
    """A 1 x 1 ``nn.Conv2d`` with groups 1, stride 1, no padding or dilation: a linear map
    over channels at every pixel."""
    return (isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1) and m.groups == 1
            and tuple(m.stride) == (1, 1) and tuple(m.padding) in ((0, 0),)
            and tuple(m.dilation) == (1, 1))


def layer_weight(m: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a quantizable layer (a 1 x 1 conv's kernel reshaped)."""
    w = m.weight.detach()
    return w.reshape(w.shape[0], -1) if isinstance(m, nn.Conv2d) else w


def quantizable_layers(module: nn.Module) -> tuple[list[str], list[dict]]:
    """(names of every nn.Linear and 1 x 1 Conv2d, [{name, type, reason}] of the rest).

    The rest are modules that own parameters but are not quantized here:
    other convolutions (depthwise, k x k, patch embeddings), embeddings, norms.
    """
    names, skipped = [], []
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear) or is_pointwise_conv(m):
            names.append(name)
            continue
        own = [p for p in m.parameters(recurse=False)]
        if not own:
            continue
        t = type(m).__name__
        if isinstance(m, nn.Conv2d):
            k = "x".join(str(v) for v in m.kernel_size)
            why = ("depthwise convolution" if m.groups > 1 and m.groups == m.in_channels
                   else f"{k} convolution" + (f", groups {m.groups}" if m.groups > 1 else ""))
            reason = why + ": not a linear layer; kept in full precision"
        elif isinstance(m, (nn.Conv1d, nn.Conv3d, nn.ConvTranspose2d)):
            reason = "convolution other than 1x1: kept in full precision"
        elif isinstance(m, nn.Embedding):
            reason = "embedding (a table lookup, no GEMM): kept in full precision"
        elif "Norm" in t:
            reason = "normalization: kept in full precision"
        else:
            pn = [n for n, _ in m.named_parameters(recurse=False)]
            what = ("adaLN scale/shift table (added to the modulation, no GEMM)"
                    if pn == ["scale_shift_table"] else "parameters " + ", ".join(pn)
                    + " outside a linear layer")
            reason = what + ": kept in full precision"
        skipped.append({"name": name or "(root)", "type": t, "reason": reason,
                        "parameters": int(sum(p.numel() for p in own))})
    return names, skipped


@dataclass
class ModelSource:
    """A model and its inputs, as the analyzer sees it (see the module docstring)."""

    name: str
    kind: str
    fingerprint: str
    module: nn.Module | None = None
    layers: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    calibration: list = field(default_factory=list)
    evaluation: list = field(default_factory=list)
    groups: list | None = None
    end_metric: EndMetric | None = None
    weights: dict | None = None
    notes: list[str] = field(default_factory=list)
    calibration_desc: str = ""
    evaluation_desc: str = ""
    ref_rank: int = 32
    default_configs: tuple = ()
    extra: dict = field(default_factory=dict)
    # the submodule that is the model a user takes away (``loraq quantize`` saves it):
    # "" for the module itself; "transformer" when the module wraps a diffusers transformer
    artifact: str = ""
