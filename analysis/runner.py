"""Running a model on input batches while capturing its layers' inputs and outputs.

A batch is a tensor (one positional input), a tuple (positional inputs) or a dict
(keyword inputs; an ``attention_mask`` (B, T) restricts token rows to real tokens).
Captured tensors are flattened to rows (tokens x features, float32): a 1 x 1
convolution's (B, C, H, W) tensors give one row per pixel.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from analysis.errors import InputError

__all__ = ["run_model", "check_batches", "run_checked", "to_device", "rows", "call"]


def call(model: nn.Module, batch):
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _row_mask(batch) -> torch.Tensor | None:
    if isinstance(batch, Mapping) and "attention_mask" in batch:
        return torch.as_tensor(batch["attention_mask"]).bool()
    return None


def rows(t: torch.Tensor, mask: torch.Tensor | None, channels_first: bool = False) -> torch.Tensor:
    """Flatten (..., F) to rows, keeping only rows where ``mask`` (B, T) is set.

    ``channels_first``: a 1 x 1 convolution's (B, C, H, W) tensor, one row per pixel.
    """
    t = t.detach().to(torch.float32)
    if channels_first and t.dim() == 4:
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])
    if mask is not None and t.dim() == 3 and tuple(t.shape[:2]) == tuple(mask.shape):
        return t[mask]
    return t.reshape(-1, t.shape[-1])


def _output_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, Mapping):
        for v in out.values():
            if isinstance(v, torch.Tensor):
                return v
    raise TypeError(f"the model's output must be a tensor (or a tuple / dict holding one), got "
                    f"{type(out).__name__}")


def run_model(model: nn.Module, batches: Sequence, names: Sequence[str], *, inputs: bool,
         outputs: bool = True, per_batch: bool = False):
    """Run ``batches``; capture each named layer's input / output rows and the model outputs.

    Returns (inputs, outputs, finals): with ``per_batch`` each is a list per
    batch ({name: rows} dicts and output tensors); else concatenated rows and
    the finals flattened to rows and concatenated.
    """
    cap_in: dict[str, list] = {n: [] for n in names}
    cap_out: dict[str, list] = {n: [] for n in names}
    state = {"mask": None}
    handles = []
    for name in names:
        mod = model.get_submodule(name)
        conv = isinstance(mod, nn.Conv2d) or getattr(mod, "channels_first", False)

        def hook(m, args, out, name=name, conv=conv):
            if inputs:
                cap_in[name].append(rows(args[0], state["mask"], conv))
            if outputs:
                cap_out[name].append(rows(out, state["mask"], conv))

        handles.append(mod.register_forward_hook(hook))
    finals = []
    try:
        with torch.inference_mode():
            for batch in batches:
                state["mask"] = _row_mask(batch)
                finals.append(_output_tensor(call(model, batch)).detach().to(torch.float32))
    finally:
        for h in handles:
            h.remove()
    if per_batch:
        nb = len(finals)
        split = lambda d: [{k: (v[i] if v else None) for k, v in d.items()}  # noqa: E731
                           for i in range(nb)]
        return split(cap_in), split(cap_out), finals
    cat = lambda d: {k: torch.cat(v) if v else None for k, v in d.items()}  # noqa: E731
    flat = [rows(f, None) for f in finals]
    return cat(cap_in), cat(cap_out), torch.cat(flat) if flat else torch.empty(0)


def check_batches(batches, what: str) -> list:
    if batches is None:
        raise InputError(f"{what} inputs are required for a torch model")
    if isinstance(batches, (torch.Tensor, Mapping)):
        batches = [batches]
    batches = list(batches)
    if not batches:
        raise InputError(f"{what} inputs are empty; give at least one batch")
    return batches


def run_checked(model, batches, names, what: str, **kw):
    """``run_model`` that reports inputs the model cannot take as a ValueError naming their shape."""
    try:
        return run_model(model, batches, names, **kw)
    except (RuntimeError, IndexError) as exc:
        shapes = ", ".join(sorted({_describe(b) for b in batches}))
        raise InputError(f"{what} inputs of shape {shapes} do not fit the model: "
                         f"{str(exc).splitlines()[0]}") from None


def _describe(batch) -> str:
    if isinstance(batch, torch.Tensor):
        return str(tuple(batch.shape))
    if isinstance(batch, Mapping):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        return "(" + ", ".join(_describe(v) for v in batch) + ")"
    return type(batch).__name__


def to_device(batch, device):
    """A batch (tensor, tuple or dict) with its tensors moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
