"""``quantize_(model, recipe)``: replace a model's layers by quantized ones, in place.

    import analysis
    analysis.quantize_(model, "W4A4+W8A8", calibration=batches)   # LoRaQ, smoothed first
    analysis.save_quantized(model, "out/w4a4-w8a8")

Every quantizable layer (``nn.Linear``, and 1 x 1 ``nn.Conv2d`` with groups 1) that
``layers`` selects is fitted for the recipe (``analysis.fit``) and replaced by an
``analysis.layers.QuantLinear`` (``QuantConv1x1``) that holds the element codes and
scales (numfmt QTensors), the branch factors and the smoothing vector, and computes

    y = Qa1(x / s) Q1(P)^T + Qa2( Qa2(x / s) R_q^T ) L_q^T + b        (sums in FP32)

Calibration inputs (a list of batches: tensors, tuples or keyword dicts) are needed
only when the recipe smooths (SVDQuant, and LoRaQ unless ``-nosmooth``): the layers'
inputs are captured on them for the smoothing vector. ``Activations`` passes inputs
captured before (one array of rows per layer) instead.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from analysis import runner
from analysis.errors import InputError
from analysis.fit import fit_layers
from analysis.layers import QuantConv1x1, QuantLinear
from analysis.models.base import layer_weight, quantizable_layers
from analysis.recipe import Recipe

__all__ = ["quantize_", "select_layers", "check_ranks", "capped_notes", "capture_activations",
           "Activations", "quantized_modules", "swap"]


class Activations(dict):
    """Calibration inputs captured before: {layer name: (tokens x in) float32 array}."""


def select_layers(model: nn.Module, layers=None) -> list[str]:
    """The names of the quantizable layers that ``layers`` selects.

    ``layers``: None (every ``nn.Linear`` and 1 x 1 ``nn.Conv2d``), a sequence of layer
    names, or a callable ``(name, module) -> bool``. A name that is not a quantizable
    layer of the model is a ValueError naming it.
    """
    names = quantizable_layers(model)[0]
    if layers is None:
        return names
    if callable(layers):
        chosen = [n for n in names if layers(n, model.get_submodule(n))]
        if names and not chosen:
            raise InputError(f"the layers filter selected none of the model's {len(names)} "
                             f"quantizable layers (e.g. {names[:3]})")
        return chosen
    if isinstance(layers, str) or not isinstance(layers, Sequence):
        raise TypeError(f"layers must be None, a list of layer names or a callable "
                        f"(name, module) -> bool, got {type(layers).__name__}")
    if not layers:
        raise InputError("layers is an empty list; give layer names, a callable, or None for "
                         "every quantizable layer")
    known = set(names)
    bad = [n for n in layers if n not in known]
    if bad:
        raise InputError(f"layers {bad[:5]} are not quantizable layers of the model (nn.Linear "
                         f"or 1x1 nn.Conv2d); it has {len(names)}, e.g. {names[:3]}")
    return list(layers)


def check_ranks(recipes: Sequence[Recipe], shapes: Mapping[str, tuple]) -> dict:
    """The layers whose width an explicit branch rank does not fit: {recipe name: (rank,
    [(layer, shape), ...])}. Those layers get rank min(out, in) - 1 (``analysis.fit.branch_rank``), the
    same for every method. A rank that no layer can take is refused, naming the widest."""
    capped = {}
    for r in recipes:
        if not (r.has_branch and r.rank):
            continue
        narrow = [(n, tuple(shp)) for n, shp in shapes.items() if r.rank >= min(shp)]
        if shapes and len(narrow) == len(shapes):
            n, shp = max(narrow, key=lambda x: min(x[1]))
            raise InputError(f"configuration {r.name}: rank {r.rank} exceeds the width of every "
                             f"layer (the widest, {n}, is out x in = {shp[0]} x {shp[1]}: the "
                             f"rank must be < {min(shp)}); give a smaller r<rank>, or none for "
                             "the default rank")
        if narrow:
            capped[r.name] = (r.rank, narrow)
    return capped


def capped_notes(capped: Mapping[str, list]) -> list[str]:
    """One line per recipe whose explicit rank some layers cannot hold (``check_ranks``)."""
    out = []
    for name, (rank, layers) in capped.items():
        n, shp = layers[0]
        out.append(f"{name}: rank {rank} is not below the width of {len(layers)} layer(s) (e.g. "
                   f"{n}, {shp[0]} x {shp[1]}); each of them gets rank min(out, in) - 1, for "
                   "SVDQuant and LoRaQ alike, and records its requested rank (rank_requested)")
    return out


def capture_activations(model: nn.Module, calibration, names: Sequence[str]) -> Activations:
    """Each named layer's inputs on the calibration batches, as (tokens x in) float32 rows."""
    if isinstance(calibration, Activations):
        return calibration
    batches = runner.check_batches(calibration, "calibration")
    cal_in, _, _ = runner.run_checked(model, batches, names, "calibration", inputs=True,
                                      outputs=False)
    return Activations({n: cal_in[n].cpu().numpy() for n in names})


def quantized_modules(model: nn.Module, names: Sequence[str], results: Mapping, recipe: Recipe,
                      mode: str = "fast", device=None) -> dict:
    """{name: QuantLinear or QuantConv1x1} built from each layer's fitted result (the layer's
    own bias, float32); ``device``: the torch backend's quantizers there."""
    kw = {} if device is None else {"device": device, "backend": "torch"}
    out = {}
    for n in names:
        mod = model.get_submodule(n)
        bias = None if mod.bias is None else mod.bias.detach().to(torch.float32).clone()
        cls = QuantConv1x1 if isinstance(mod, nn.Conv2d) else QuantLinear
        out[n] = cls.from_result(results[n], recipe.config, bias=bias, mode=mode, name=n, **kw)
        out[n].recipe = recipe
    return out


def swap(model: nn.Module, new: Mapping[str, nn.Module]) -> dict:
    """Set each named submodule to ``new[name]``; returns the modules replaced."""
    old = {n: model.get_submodule(n) for n in new}
    for n, m in new.items():
        parent_name, _, child = n.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, m)
    return old


def layer_weights(model: nn.Module, names: Sequence[str]) -> dict:
    """{name: (out x in) float32 NumPy array of the layer's weight}: a view of the parameter
    when it is already float32 on the CPU (no model-sized copy; nothing writes to it), else a
    converted copy."""
    return {n: np.ascontiguousarray(layer_weight(model.get_submodule(n)).to(torch.float32)
                                    .cpu().numpy()) for n in names}


def quantize_(model: nn.Module, recipe, calibration=None, layers=None, *, mode: str = "fast",
              device=None, client=None, store=None, progress=None) -> nn.Module:
    """Quantize ``model`` in place for ``recipe`` and return it (see the module docstring).

    ``recipe``: a ``Recipe`` or a configuration name (``W4A4``, ``W4A4+FP16``,
    ``W4A4+W8A8``, ``W4A4+W8A8-nosmooth``, ``...r64``; MXINT families, ``ref_rank`` 32).
    ``layers``: which layers (``select_layers``). ``mode``: ``fast`` (fake-quantized
    float GEMMs) or ``exact`` (``hwsim.matmul``). ``device``: the layers and LoRaQ's loop
    run there. ``client``: a Dask client for the per-layer fits. ``store``: a
    ``LayerStore`` that keeps each fitted layer, so an interrupted call resumes.
    ``progress``: a callable ``(n, description)`` or a tqdm-like bar.
    """
    quantize_layers(model, Recipe.parse(recipe), calibration, select_layers(model, layers),
                    mode=mode, device=device, client=client, store=store, progress=progress)
    return model


def quantize_layers(model: nn.Module, recipe: Recipe, calibration, names: Sequence[str], *,
                    mode="fast", device=None, client=None, store=None, progress=None) -> dict:
    """``quantize_`` on the named layers; returns {name: the fitted ``LoRaQResult``, without
    its ``w_hat``}."""
    if not names:
        raise ValueError("the model has no nn.Linear or 1x1 nn.Conv2d layers to quantize")
    weights = layer_weights(model, names)
    check_ranks([recipe], {n: w.shape for n, w in weights.items()})
    acts = None
    if recipe.smoothing is not None:
        if calibration is None:
            raise InputError(f"recipe {recipe.name} smooths (SVDQuant's lambda from activations): "
                             "give calibration inputs, or use a recipe without smoothing "
                             "(e.g. W4A4+W8A8-nosmooth)")
        acts = capture_activations(model, calibration, names)
    # w_hat (a float32 copy of each layer) is not needed to build the modules: dropped as the
    # layers arrive, it does not add a model-sized copy to the peak
    results = fit_layers(weights, recipe, acts, store=store, progress=progress, client=client,
                         device=device, keep_w_hat=False)
    swap(model, quantized_modules(model, names, results, recipe, mode, device))
    return results


def quantized_layers(model: nn.Module) -> dict:
    """{name: QuantLinear} of every quantized layer in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


__all__ += ["layer_weights", "quantize_layers", "quantized_layers"]

