"""Fitting one layer, or every layer, for a recipe: the one method dispatch.

``fit_weight(W, recipe, activations)`` quantizes one weight W (out x in) as the
recipe says and returns an ``analysis.loraq.LoRaQResult``:

* ``none``: round to nearest, W_hat = Q1(W);
* ``svdquant``: an FP16 branch of rank ``rank`` (or ``ref_rank``, capped at
  min(out, in) - 1) on the smoothed weight W diag(lambda) when the recipe smooths and
  activations are given (lambda chosen over the recipe's (alpha, beta) grid by the
  output error);
* ``loraq``: the same smoothing search first (scored with SVDQuant's FP16 fit, as the
  paper's pipeline runs it), then LoRaQ's data-free optimization of W diag(lambda);
  without smoothing, of W itself. ``steps`` None runs the optimizer's own schedule to
  convergence; an int anneals to zero within that many steps (cosine);
* ``lqer``, ``loftq``, ``naive``: the data-free baselines with a quantized branch.

``fit_layers`` fits every weight of a model for one recipe: finished layers come from a
``LayerStore``, the rest run in this process (threads) or as Dask tasks
(``analysis.cluster.map_layers``); each result is stored as it arrives. Every fit runs
on one torch thread, so the bits do not depend on the thread or worker count.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import numpy as np
import torch

import numfmt
from numfmt.formats import FloatFormat
from analysis import cluster, loraq, smoothing
from analysis.loraq.baselines import smoothing_search, svdquant
from analysis.loraq.checks import as_activations
from analysis.loraq.common import build_result
from analysis.recipe import DEFAULT_SMOOTHING, Recipe

__all__ = ["fit_weight", "fit_layers", "fp16_rank", "branch_rank", "paper_lr", "Progress",
           "FIT_THREADS"]

# In-process layer fits run on this many threads (the Numba kernels release the GIL and
# torch runs on one thread inside each fit), largest layers first; the bits do not depend
# on it (a test compares 1 and 2 threads).
FIT_THREADS = max(1, min(2, os.cpu_count() or 1))


def branch_rank(recipe: Recipe, shape) -> int | None:
    """The explicit rank for a layer of ``shape``, capped at min(out, in) - 1 (the same for
    every method); None when the recipe gives none (the method's rank rule applies)."""
    return None if recipe.rank is None else max(1, min(recipe.rank, min(shape) - 1))


def fp16_rank(recipe: Recipe, shape) -> int:
    """The rank of an FP16 (SVDQuant) branch: explicit (capped), else ``ref_rank`` capped at
    min(out, in) - 1."""
    return branch_rank(recipe, shape) or max(1, min(recipe.ref_rank, min(shape) - 1))


def fit_weight(W, recipe: Recipe, activations=None, device=None):
    """One layer's fit for ``recipe`` (see the module docstring). ``activations``
    (tokens x in) are used only when the recipe smooths. ``device``: LoRaQ's loop runs
    there (numfmt's torch backend); the baselines run on the CPU."""
    W = np.ascontiguousarray(W, dtype=np.float32)
    main = recipe.main_weight
    if recipe.method == "none":
        return loraq.METHOD_FUNCTIONS["rtn"](W, main=main)
    sm = recipe.smoothing
    acts = activations if sm is not None else None
    grid = sm or DEFAULT_SMOOTHING
    rank = fp16_rank(recipe, W.shape)
    if acts is not None and grid.criterion == "output":
        return _fit_output_smoothed(W, recipe, acts, rank, device)
    if recipe.method == "svdquant":
        return loraq.METHOD_FUNCTIONS["svdquant"](W, main=main, rank=rank, activations=acts,
                                                  alpha_grid=grid.alphas, beta_grid=grid.betas)
    branch = recipe.branch_weight
    if recipe.method != "loraq":
        return loraq.METHOD_FUNCTIONS[recipe.method](W, main=main, branch=branch,
                                                     rank=branch_rank(recipe, W.shape),
                                                     ref_rank=recipe.ref_rank)
    kw = {} if recipe.steps is None else {"steps": recipe.steps, "schedule": "cosine"}
    if recipe.lr is not None:
        kw["lr"] = recipe.lr
    elif recipe.lr_rule == "paper":
        kw["lr"] = paper_lr(W, branch)
    if device is not None:
        kw["device"] = device

    def run(Ws):
        return loraq.METHOD_FUNCTIONS["loraq"](Ws, main=main, branch=branch,
                                               rank=branch_rank(recipe, Ws.shape),
                                               seed=recipe.seed, ref_rank=recipe.ref_rank, **kw)

    if acts is None:
        return run(W)
    X = as_activations(acts, W.shape[1])
    W64 = W.astype(np.float64)

    def fit(Ws):  # SVDQuant's criterion picks lambda; then LoRaQ fits the smoothed weight
        r = svdquant(Ws, main=main, rank=rank)
        return r.main, r.left, r.right, r.history

    lam, chosen, _ = smoothing_search(W64, X, grid.alphas, grid.betas,
                                      fit if not grid.fixed else (lambda Ws: None))
    return _smoothed(W64, run((W64 * lam[None, :]).astype(np.float32)), lam, X, chosen)


def _smoothed(W64, res, lam, X, chosen):
    """The result of a fit of W diag(lambda), restated for W itself: w_hat, the errors and
    the output error against W, the smoothing vector, and the chosen (alpha, beta)."""
    return build_result(W64, res.main, res.left, res.right, method=res.method,
                        main_format=res.main_format, branch_format=res.branch_format,
                        omega=res.omega, history=res.history, steps=res.steps,
                        converged=res.converged, smooth=lam, X=X,
                        config=dict(res.config, smoothing=list(chosen)))


def paper_lr(W, branch: str) -> float:
    """The paper's Adam step (1e-3 for an FP branch format, 1e-4 for INT) on the unnormalized
    weight, in the optimizer's units. The optimizer works on W / c (c = 2^round(log2 rms W))
    and on factors L R of that; factors of W itself are sqrt(c) times larger, and Adam's
    step is in the parameter's units, so the step there is the paper's divided by sqrt(c)."""
    fmt = numfmt.get(branch)
    elem = getattr(fmt, "element", fmt)
    lr = 1e-3 if isinstance(elem, FloatFormat) else 1e-4
    rms = math.sqrt(float(np.mean(np.square(np.asarray(W, dtype=np.float64)))))
    c = 2.0 ** round(math.log2(rms)) if rms > 0 else 1.0
    return lr / math.sqrt(c)


def _fit_output_smoothed(W, recipe: Recipe, acts, rank: int, device=None):
    """SVDQuant or LoRaQ on W diag(lambda), lambda from ``analysis.smoothing.search`` (the
    quantized layer's output MSE, activation quantizer in the loop)."""
    X = as_activations(acts, W.shape[1])
    W64 = W.astype(np.float64)
    sm = recipe.smoothing
    lam, chosen, _ = smoothing.search(W64, X, sm.alphas, sm.betas,
                                      smoothing.smoothing_rank(recipe, W.shape),
                                      recipe.main_weight, recipe.main_act)
    Ws = (W64 * lam[None, :]).astype(np.float32)
    if recipe.method == "svdquant":
        res = loraq.METHOD_FUNCTIONS["svdquant"](Ws, main=recipe.main_weight, rank=rank)
    else:
        res = fit_weight(Ws, recipe.replace(smoothing=None), None, device=device)
    return _smoothed(W64, res, lam, X, chosen)


def _fit_layer(W, recipe, acts, device=None):
    """One layer's fit: a pure task (module level, so a Dask worker can import it), on
    one torch thread: the optimizer's GEMMs are too small to gain from two, and its
    result bits then do not depend on the machine's thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fit_weight(W, recipe, acts, device=device)
    finally:
        torch.set_num_threads(threads)


class Progress:
    """Adapter: ``progress(done_increment, description)``, a tqdm-like object, or None."""

    def __init__(self, progress):
        self.p = progress.p if isinstance(progress, Progress) else progress

    def step(self, n: int = 1, desc: str | None = None) -> None:
        if self.p is None:
            return
        if callable(getattr(self.p, "update", None)):
            if desc is not None and hasattr(self.p, "set_postfix_str"):
                self.p.set_postfix_str(desc, refresh=False)
            self.p.update(n)
        else:
            self.p(n, desc)


def fit_layers(weights: dict, recipe: Recipe, activations: dict | None = None, *, store=None,
               progress=None, client=None, device=None, keep_w_hat: bool = True) -> dict:
    """{name: result} for every weight (see the module docstring), in ``weights``' order.

    ``activations`` maps a layer name to its calibration inputs (tokens x in);
    ``store``: a ``LayerStore``; ``client``: a Dask client or None. ``keep_w_hat=False``
    drops each result's float32 reconstruction once it is stored (a model-sized copy in
    all; ``load_result`` recomputes it from the codes).
    """
    prog = Progress(progress)
    results, todo = {}, []
    wrap = cluster.scatter if client is not None else (lambda v: v)
    for name, W in weights.items():
        res = store.load(recipe, name) if store is not None else None
        if res is None:
            acts = None if activations is None else activations.get(name)
            todo.append((name, (wrap(W), recipe, None if acts is None else wrap(acts), device)))
        else:
            results[name] = res
            if not keep_w_hat:
                res.w_hat = None
            prog.step(1, f"{recipe.name} {name}")
    if client is None and FIT_THREADS > 1 and len(todo) > 1:
        done = _fit_in_threads(todo)
    else:
        done = cluster.map_layers(_fit_layer, todo, client=client,
                                  priority={n: weights[n].size for n, _ in todo})
    for name, res in done:
        if store is not None:
            store.save(recipe, name, res)
        if not keep_w_hat:
            res.w_hat = None
        results[name] = res
        prog.step(1, f"{recipe.name} {name}")
    return {n: results[n] for n in weights}


def _fit_in_threads(todo):
    """Yield (name, result) of ``_fit_layer`` over ``todo`` from a thread pool, as completed."""
    order = sorted(todo, key=lambda item: -item[1][0].size)
    prev = torch.get_num_threads()
    torch.set_num_threads(1)  # set once here: the fits never race on the global setting
    try:
        with ThreadPoolExecutor(FIT_THREADS) as ex:
            futs = {ex.submit(_fit_layer, *args): name for name, args in order}
            pending = set(futs)
            try:
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in finished:
                        yield futs[f], f.result()
            finally:
                for f in pending:
                    f.cancel()
    finally:
        torch.set_num_threads(prev)
