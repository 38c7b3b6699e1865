"""Error-propagation analyzer: per-layer and end-to-end error of a model under recipes.

For each recipe, ``analyze`` means quantize, measure, restore: the model's quantizable
layers are fitted (``analysis.fit``, the one method dispatch) and replaced by
``analysis.layers.QuantLinear`` modules (``analysis.quantize``), measured, and the
originals put back. Per layer it measures, on the evaluation inputs (real tokens only
when the inputs carry an ``attention_mask``):

* ``weight_error`` and the accumulator and cost fields of ``analysis.records``;
* ``act_error`` = sqrt(sum ||x - Qa1(x)||^2 / sum ||x||^2) over the layer's
  full-precision inputs x (``branch_act_error`` for the branch input);
* ``local_sqnr_db`` = 10 log10(sum y^2 / sum (y - y_q)^2), y the full-precision
  layer's output and y_q the quantized layer's output on the same FP input;
* ``propagated_sqnr_db``: the same with y_q taken inside the fully quantized
  model (every selected layer swapped), so errors of earlier layers are included;
  per group (a diffusion timestep) too when ``groups`` are given.

End metrics come from an ``analysis.models.EndMetric`` (default: output cosine and
top-1 nearest-neighbour agreement of the model's output rows).

A weights-only analysis (``analyze_weights``; a safetensors file without a runnable
model) gives weight error, accumulator bounds and cost, without activations,
propagation or end metrics.

With a ``LayerStore``, every fitted layer and every measured configuration is kept, so
an interrupted run redoes nothing that finished.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from analysis import runner
from analysis.fit import Progress, fit_layers
from analysis.layers import QuantLinear, fp32_matmul
from analysis.metrics import sqnr_db
from analysis.models.base import OutputCosine
from analysis.quantize import (capture_activations, check_ranks, layer_weights,
                               quantized_modules, select_layers, swap)
from analysis.recipe import DEFAULT_SMOOTHING, Recipe, parse_recipes
from analysis.records import aggregate, clean, config_entry, group_sqnr, layer_record

__all__ = ["DEFAULT_CONFIGS", "DEFAULT_TOKENS", "AnalysisOptions", "recipes_for", "analyze",
           "analyze_weights"]

DEFAULT_CONFIGS = ("W4A4", "W4A4+FP16r32", "W4A4+W8A8", "W4A4+W6A6", "W4A4+W4A8")
DEFAULT_TOKENS = 128  # cost per 128-token sequence (MiniLM's input length)


@dataclass(frozen=True)
class AnalysisOptions:
    """Settings of an analysis beyond the model, the recipes and the inputs.

    Configuration names are parsed with ``main`` / ``branch`` (format families),
    ``steps``, ``ref_rank``, ``seed``, ``smoothing`` (False: LoRaQ recipes do not
    smooth, i.e. ``-nosmooth``; SVDQuant always smooths) and ``smoothing_grid`` (a
    ``Smoothing``; None: the fixed point alpha = beta = 0.5). ``tokens``: tokens per layer
    for the cost model. ``mode``: ``fast`` or ``exact`` GEMMs. ``layers``: which layers
    (``analysis.quantize.select_layers``). ``groups``: one label per evaluation batch
    (a timestep). ``end_metric``: an ``EndMetric``. ``store``: a ``LayerStore``.
    ``progress``: a callable or a tqdm-like bar. ``client``: a Dask client for the fits.
    ``device``: the model, its inputs, the quantized layers and LoRaQ's loop run there.
    """

    main: str = "mxint4"
    branch: str = "mxint"
    steps: int | None = None
    ref_rank: int = 32
    seed: int = 0
    smoothing: bool = True
    smoothing_grid: object = None
    lr_rule: str = "ours"
    tokens: int = DEFAULT_TOKENS
    mode: str = "fast"
    layers: object = None
    groups: Sequence | None = None
    end_metric: object = None
    store: object = None
    progress: object = None
    client: object = None
    device: object = None


def recipes_for(configs, options: AnalysisOptions | None = None) -> list[Recipe]:
    """Recipes from names (parsed with the options, see ``AnalysisOptions``) or recipes."""
    o = options or AnalysisOptions()
    out = parse_recipes(configs, main=o.main, branch=o.branch, ref_rank=o.ref_rank,
                        smoothing=o.smoothing_grid or DEFAULT_SMOOTHING, steps=o.steps,
                        seed=o.seed)
    if not o.smoothing:
        out = [r.replace(smoothing=None) if r.method == "loraq" else r for r in out]
    if o.lr_rule != "ours":
        out = [r.replace(lr_rule=o.lr_rule) if r.method == "loraq" else r for r in out]
    return out


def _measure_local(q: QuantLinear, x: torch.Tensor, y_fp: torch.Tensor, bounds, groups):
    """Statistics and the local SQNR of one quantized layer fed the FP model's input."""
    q.collect_stats = True
    with torch.inference_mode():
        yq = q.linear_rows(x) if hasattr(q, "linear_rows") else q(x)
    q.collect_stats = False
    measured = {"act_error": q.stats.act_error, "branch_act_error": q.stats.branch_act_error,
                "local_sqnr_db": sqnr_db(y_fp, yq)}
    if groups is not None:
        parts_fp = [y_fp[bounds[i]:bounds[i + 1]] for i in range(len(groups))]
        parts_q = [yq[bounds[i]:bounds[i + 1]] for i in range(len(groups))]
        by = group_sqnr(parts_fp, parts_q, list(groups))
        measured["local_sqnr_db_by_timestep"] = by
        measured["local_sqnr_db_mean_t"], measured["local_sqnr_db_worst_t"] = aggregate(by)
    return measured


def analyze(model: nn.Module, configs=DEFAULT_CONFIGS, calibration=None, evaluation=None,
            options: AnalysisOptions | None = None) -> dict:
    """Analyze the quantizable layers of ``model`` under each configuration.

    ``configs``: recipes or configuration names. ``calibration`` / ``evaluation``:
    lists of batches (a tensor, a tuple of positional inputs, or a dict of keyword
    inputs; an ``attention_mask`` (B, T) restricts token statistics to real tokens).
    Calibration activations feed the smoothing of the recipes that smooth; every
    measurement is on the evaluation batches (the calibration ones when none are given).
    Returns ``{"configs": {name: {...}}, "layer_names": [...]}`` (see ``analysis.report``
    for the fields). The model is left unchanged.
    """
    o = options or AnalysisOptions()
    recipes = recipes_for(configs, o)
    names = select_layers(model, o.layers)
    if not names:
        raise ValueError("the model has no nn.Linear or 1x1 nn.Conv2d layers to analyze")
    calibration = runner.check_batches(calibration, "calibration")
    evaluation = (runner.check_batches(evaluation, "evaluation") if evaluation is not None
                  else calibration)
    device = o.device
    if device is not None:
        import numfmt.torch as nft

        device = nft.check_device(device)
        model.to(device)
        calibration = [runner.to_device(b, device) for b in calibration]
        evaluation = [runner.to_device(b, device) for b in evaluation]
    groups = o.groups
    if groups is not None and len(groups) != len(evaluation):
        raise ValueError(f"groups has {len(groups)} labels for {len(evaluation)} evaluation batches")
    end_metric = o.end_metric or OutputCosine()
    prog = Progress(o.progress)
    weights = layer_weights(model, names)
    check_ranks(recipes, {n: w.shape for n, w in weights.items()})
    acts = None
    if any(r.smoothing is not None for r in recipes):
        acts = capture_activations(model, calibration, names)
    else:  # the inputs are still checked against the model, on one batch
        runner.run_checked(model, calibration[:1], [], "calibration", inputs=False, outputs=False)
    fp_in_b, fp_out_b, fp_final_b = runner.run_checked(model, evaluation, names, "evaluation",
                                                       inputs=True, per_batch=True)
    fp_in = {n: torch.cat([b[n] for b in fp_in_b]) for n in names}
    fp_out = {n: torch.cat([b[n] for b in fp_out_b]) for n in names}
    bounds = {n: np.cumsum([0] + [b[n].shape[0] for b in fp_in_b]) for n in names}
    del fp_in_b
    ref = end_metric.reference(model, fp_final_b)

    out = {"layer_names": names, "configs": {}}
    ref_metrics = getattr(end_metric, "reference_metrics", None)
    if ref_metrics is not None:
        out["reference"] = {"end_metrics": clean(ref_metrics)}
    store = o.store
    for recipe in recipes:
        done = store.load_json(recipe, "measured") if store is not None else None
        if done is not None:
            prog.step(len(names) + 1, f"{recipe.name} (cached)")
            out["configs"][recipe.name] = done
            continue
        results = fit_layers(weights, recipe, acts if recipe.smoothing is not None else None,
                             store=store, progress=prog, client=o.client, device=device)
        qmods = quantized_modules(model, names, results, recipe, o.mode, device)
        recs = []
        for n in names:
            q = qmods[n]
            measured = _measure_local(q, fp_in[n], fp_out[n], bounds[n], groups)
            recs.append(layer_record(n, weights[n], results[n], q, recipe, o.tokens, measured,
                                     q.stats.acc_bits_observed))
        originals = swap(model, qmods)
        try:
            with fp32_matmul(device or "cpu"):
                _, q_out_b, q_final_b = runner.run_model(model, evaluation, names, inputs=False,
                                                         per_batch=True)
                end = end_metric.measure(model, q_final_b, ref)
        finally:
            swap(model, originals)
        for rec in recs:
            n = rec["name"]
            q_rows = [b[n] for b in q_out_b]
            rec["propagated_sqnr_db"] = sqnr_db(fp_out[n], torch.cat(q_rows))
            if groups is not None:
                b = bounds[n]
                parts_fp = [fp_out[n][b[i]:b[i + 1]] for i in range(len(evaluation))]
                by = group_sqnr(parts_fp, q_rows, list(groups))
                rec["propagated_sqnr_db_by_timestep"] = by
                rec["propagated_sqnr_db_mean_t"], rec["propagated_sqnr_db_worst_t"] = aggregate(by)
        fp_rows = torch.cat([runner.rows(f, None) for f in fp_final_b])
        q_rows = torch.cat([runner.rows(f, None) for f in q_final_b])
        _finish(recipe, recs, end, sqnr_db(fp_rows, q_rows), store, out, prog)
    return out


def _finish(recipe, layers, end, output_sqnr, store, out, prog) -> None:
    """Summarize one configuration, store it atomically and add it to ``out``."""
    entry = config_entry(recipe, layers, end, output_sqnr)
    if store is not None:
        store.save_json(recipe, "measured", entry)
    out["configs"][recipe.name] = entry
    prog.step(1, f"{recipe.name} measured")


def analyze_weights(weights: Mapping[str, np.ndarray], configs=DEFAULT_CONFIGS,
                    options: AnalysisOptions | None = None) -> dict:
    """Weights-only analysis of every 2-D floating weight (out x in) in ``weights``.

    Per layer: weight error, accumulator bounds (worst case, l1) and cost; no
    activations, so no activation error, SQNR, observed widths or end metrics
    (they are None). Nothing is smoothed: there are no activations.
    """
    o = options or AnalysisOptions()
    mats = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()
            if np.asarray(v).ndim == 2 and np.issubdtype(np.asarray(v).dtype, np.floating)}
    if not mats:
        raise ValueError("the weights hold no 2-D floating tensor (out x in) to analyze")
    recipes = recipes_for(configs, o)
    check_ranks(recipes, {n: w.shape for n, w in mats.items()})
    prog = Progress(o.progress)
    out = {"layer_names": list(mats), "configs": {}}
    for recipe in recipes:
        done = o.store.load_json(recipe, "measured") if o.store is not None else None
        if done is not None:
            prog.step(len(mats) + 1, f"{recipe.name} (cached)")
            out["configs"][recipe.name] = done
            continue
        results = fit_layers(mats, recipe, None, store=o.store, progress=prog, client=o.client)
        layers = []
        for n, W in mats.items():
            q = QuantLinear.from_result(results[n], recipe.config, name=n)
            layers.append(layer_record(
                n, W, results[n], q, recipe, o.tokens,
                {"act_error": None, "branch_act_error": None, "local_sqnr_db": None,
                 "propagated_sqnr_db": None}, {}))
        _finish(recipe, layers, {"mean_cosine": None, "min_cosine": None, "top1_agreement": None},
                None, o.store, out, prog)
    return out

