"""Error-propagation analyzer: per-layer and end-to-end error of a model under W/A configurations.

For a torch model, calibration inputs, evaluation inputs and configurations such
as ``W4A4``, ``W4A4+FP16r32``, ``W4A4+W8A8``, every ``nn.Linear`` (weight W,
out x in) is quantized (``quantize_weight``: RTN for a main-only config,
SVDQuant for an FP16 branch, LoRaQ for a quantized branch) and replaced by a
``analysis.layers.QuantLinear``. Per layer it measures, on the evaluation
inputs (real tokens only when the inputs carry an ``attention_mask``):

* ``weight_error``  = ||W - W_eff||_F / ||W||_F with the effective weight
  W_eff = (Q1(P) + L_q R_q) diag(1/s) (s the smoothing vector, 1 if none);
* ``act_error``     = sqrt(sum ||x - Qa1(x)||^2 / sum ||x||^2) over the layer's
  full-precision inputs x (``branch_act_error`` for the branch input);
* ``local_sqnr_db`` = 10 log10(sum y^2 / sum (y - y_q)^2), y the full-precision
  layer's output and y_q the simulated layer's output on the same FP input;
* ``propagated_sqnr_db``: the same with y_q taken inside the fully quantized
  model (every linear swapped), so errors of earlier layers are included;
* accumulator widths (bits, sign included) of the main GEMM: ``acc_bits_worst``
  (A2Q from the formats and the in-block length), ``acc_bits_l1`` (A2Q's
  l1-norm bound from the weight codes), ``acc_bits_observed`` (largest in-block
  sum on the FP inputs); ``branch_acc_bits_*`` the maxima over the branch GEMMs;
* cost from ``hwsim.cost.layer_cost`` for ``tokens`` tokens: ``energy_pj``,
  ``weight_bits``, ``branch_bits``, ``macs``.

End metrics on the evaluation outputs (rows of the model's output, e.g.
MiniLM's unit sentence embeddings): ``mean_cosine`` / ``min_cosine`` of
cos(e_fp, e_q) per row, and ``top1_agreement``, the fraction of rows i whose
nearest other row j != i (by cosine) is the same in the quantized outputs as in
the full-precision outputs.

A weights-only analysis (``analyze_weights``; a safetensors file without a
runnable model) gives weight error, accumulator bounds and cost, without
activations, propagation or end metrics.

Layer optimizations can be cached in a directory (``cache_dir``): one result
per configuration and layer, written atomically with a completion marker, so
an interrupted run redoes nothing that finished.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

import numfmt
from hwsim.cost import CONFIG_GRAMMAR, Config, layer_cost, parse_config
from numfmt.fileio import write_json_atomic
from analysis.layers import QuantLinear, fp32_matmul, sum_squares

__all__ = [
    "DEFAULT_CONFIGS", "METHODS", "parse_configs", "method_for", "quantize_weight",
    "sqnr_db", "end_metrics", "analyze", "analyze_weights", "analyze_minilm", "LayerCache",
]

DEFAULT_CONFIGS = ("W4A4", "W4A4+FP16r32", "W4A4+W8A8", "W4A4+W6A6", "W4A4+W4A8")
METHODS = ("rtn", "svdquant", "loraq", "lqer", "loftq", "naive")
DEFAULT_TOKENS = 128  # cost per 128-token sequence (MiniLM's input length)
# SVDQuant's smoothing lambda_j = max|X_j|^alpha / max|W_j|^beta: SmoothQuant's
# migration strength alpha = 0.5, beta = 1 - alpha, one point instead of the
# baseline's 5 x 5 grid (25 SVDs a layer) to keep the main job in its budget.
SVDQUANT_GRID = ((0.5,), (0.5,))


# --------------------------------------------------------------------------- configs


NOSMOOTH = "-nosmooth"


def parse_configs(configs, main="mxint4", branch="mxint") -> list[Config]:
    """Parse a comma-separated string or a list of configuration strings.

    A quantized-branch (LoRaQ) configuration may end in ``-nosmooth``
    (``W4A4+W8A8-nosmooth``): the purely data-free variant, without the
    smoothing search that LoRaQ otherwise runs first.
    Raises ``ValueError`` with the grammar for a bad string, and for duplicates.
    """
    if isinstance(configs, str):
        items = [c.strip() for c in configs.split(",") if c.strip()]
    else:
        items = [c if isinstance(c, Config) else str(c).strip() for c in configs]
    if not items:
        raise ValueError(f"no configurations given; grammar: {CONFIG_GRAMMAR}[{NOSMOOTH}]")
    out = []
    for c in items:
        if isinstance(c, Config):
            out.append(c)
            continue
        nosmooth = c.endswith(NOSMOOTH)
        cfg = parse_config(c[:-len(NOSMOOTH)] if nosmooth else c, main=main, branch=branch)
        if nosmooth:
            if not cfg.has_branch or cfg.fp16_branch:
                raise ValueError(f"configuration {c!r}: {NOSMOOTH} applies to a quantized "
                                 "(LoRaQ) branch only, e.g. W4A4+W8A8-nosmooth")
            cfg = dataclasses.replace(cfg, name=cfg.name + NOSMOOTH)
        out.append(cfg)
    names = [c.name for c in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"configurations {dup} are given more than once")
    return out


def smoothed(config: Config, smoothing: bool = True) -> bool:
    """Whether ``config`` runs the smoothing search (SVDQuant always; LoRaQ unless
    ``-nosmooth`` or ``smoothing`` is False; RTN never)."""
    if not config.has_branch:
        return False
    if config.fp16_branch:
        return True
    return smoothing and not config.name.endswith(NOSMOOTH)


def method_for(config: Config) -> str:
    """The default method: rtn without a branch, svdquant for FP16, loraq otherwise."""
    if not config.has_branch:
        return "rtn"
    return "svdquant" if config.fp16_branch else "loraq"


def _fmt_name(f) -> str:
    return numfmt.get(f).name


def quantize_weight(W: np.ndarray, config: Config, *, method: str | None = None, seed: int = 0,
                    steps: int | None = None, activations: np.ndarray | None = None,
                    svdquant_grid=SVDQUANT_GRID, ref_rank: int = 32, smoothing: bool = True,
                    device=None):
    """Quantize one weight (out x in) for ``config`` with ``method`` (default ``method_for``).

    ``activations`` (tokens x in, float32) feed the smoothing search over
    ``svdquant_grid`` = (alphas, betas) (None: the baseline's own grid):
    SVDQuant always smooths when given them; LoRaQ runs the same search first
    and then its data-free optimization on W diag(lambda), unless ``smoothing``
    is False or the configuration ends in ``-nosmooth`` (the paper's pipeline is
    smoothing, then LoRaQ). FP16 branches use rank ``config.rank``, else
    ``ref_rank`` capped at min(out, in) - 1; quantized branches ``config.rank``
    or the equal-memory rank against an FP16 rank-``ref_rank`` branch. Returns
    the ``analysis.loraq`` result. ``device``: LoRaQ's optimization loop runs there
    (``analysis.loraq.optimize(device=)``: the torch backend's quantizers); the
    baselines run on the CPU.
    """
    from analysis import loraq
    from analysis.loraq.baselines import smoothing_search

    method = method or method_for(config)
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not allowed; allowed: {METHODS}")
    main = _fmt_name(config.main_weight)
    W = np.ascontiguousarray(W, dtype=np.float32)
    if method == "rtn" or not config.has_branch:
        return loraq.rtn(W, main=main)
    branch = "fp16" if config.fp16_branch else _fmt_name(config.branch_weight)
    grid = {} if svdquant_grid is None else {"alpha_grid": svdquant_grid[0],
                                             "beta_grid": svdquant_grid[1]}
    fp16_rank = config.rank or max(1, min(ref_rank, min(W.shape) - 1))
    if method == "svdquant":
        return loraq.svdquant(W, main=main, rank=fp16_rank, activations=activations, **grid)
    if method == "loraq":
        # a fixed step budget anneals to zero within it (cosine); None: the optimizer's
        # default, run until its plateau schedule has converged
        kw = {} if steps is None else {"steps": steps, "schedule": "cosine"}

        def run(Ws):
            if device is not None:
                kw["device"] = device
            return loraq.optimize(Ws, main=main, branch=branch, rank=config.rank, seed=seed,
                                  ref_rank=ref_rank, **kw)

        if activations is None or not smoothed(config, smoothing):
            return run(W)
        from analysis.loraq.baselines import ALPHA_GRID, BETA_GRID, svdquant
        from analysis.loraq.checks import as_activations
        from analysis.loraq.common import build_result

        X = as_activations(activations, W.shape[1])
        W64 = W.astype(np.float64)
        alphas = tuple(grid.get("alpha_grid", ALPHA_GRID))
        betas = tuple(grid.get("beta_grid", BETA_GRID))

        def fit(Ws):  # SVDQuant's criterion picks lambda; then LoRaQ fits the smoothed weight
            r = svdquant(Ws, main=main, rank=fp16_rank)
            return r.main, r.left, r.right, r.history

        lam, chosen, _ = (smoothing_search(W64, X, alphas, betas, fit) if len(alphas) * len(betas) > 1
                          else smoothing_search(W64, X, alphas, betas, lambda Ws: None))
        res = run((W64 * lam[None, :]).astype(np.float32))
        return build_result(W64, res.main, res.left, res.right, method="loraq",
                            main_format=res.main_format, branch_format=res.branch_format,
                            omega=res.omega, history=res.history, steps=res.steps,
                            converged=res.converged, smooth=lam, X=X,
                            config=dict(res.config, smoothing=list(chosen)))
    fn = getattr(loraq, method)
    return fn(W, main=main, branch=branch, rank=config.rank)


def effective_weight(result) -> np.ndarray:
    """(Q1(P) + L_q R_q) diag(1/s): the weight the simulated layer applies to x, float64."""
    w = numfmt.dequantize(result.main).astype(np.float64)
    left = getattr(result, "left", None)
    if left is not None and getattr(result, "rank", 1):
        w = w + numfmt.dequantize(left).astype(np.float64) @ numfmt.dequantize(result.right).astype(np.float64)
    smooth = getattr(result, "smooth", None)
    if smooth is not None:
        w = w / np.asarray(smooth, dtype=np.float64)[None, :]
    return w


def weight_error(W: np.ndarray, result) -> float:
    """||W - W_eff||_F / ||W||_F (see ``effective_weight``; the result's ``w_hat`` is that
    matrix rounded to float32 and is used when present)."""
    W = np.asarray(W, dtype=np.float64)
    n = float(np.linalg.norm(W))
    w_hat = getattr(result, "w_hat", None)
    w_eff = effective_weight(result) if w_hat is None else np.asarray(w_hat, dtype=np.float64)
    return float(np.linalg.norm(W - w_eff) / n) if n > 0 else 0.0


# --------------------------------------------------------------------------- caching


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)


class LayerCache:
    """Per-(configuration, layer) results in a directory, each finished one marked done.

    ``<dir>/<config>/<layer>`` is the ``save_result`` stem; ``<stem>.done.json``
    is written (atomically) after it with the settings key, and a result is
    reused only when its marker exists with the same key.
    """

    def __init__(self, directory, key: str = ""):
        self.dir = Path(directory)
        self.key = key

    def stem(self, config: str, layer: str) -> Path:
        return self.dir / _slug(config) / _slug(layer)

    def _marker(self, stem: Path) -> Path:
        return stem.with_name(stem.name + ".done.json")

    def load(self, config: str, layer: str):
        from analysis import loraq
        stem = self.stem(config, layer)
        marker = self._marker(stem)
        if not marker.is_file():
            return None
        try:
            info = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if info.get("key") != self.key:
            return None
        try:
            return loraq.load_result(stem)
        except (OSError, ValueError, KeyError):
            return None

    def save(self, config: str, layer: str, result) -> None:
        from analysis import loraq
        stem = self.stem(config, layer)
        stem.parent.mkdir(parents=True, exist_ok=True)
        loraq.save_result(result, stem)
        write_json_atomic(self._marker(stem), {"key": self.key, "config": config, "layer": layer})

    def load_json(self, config: str, name: str):
        p = self.dir / _slug(config) / (name + ".json")
        if not p.is_file():
            return None
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return d.get("value") if d.get("key") == self.key else None

    def save_json(self, config: str, name: str, value) -> None:
        write_json_atomic(self.dir / _slug(config) / (name + ".json"), {"key": self.key, "value": value})


# --------------------------------------------------------------------------- metrics


def sqnr_db(ref: torch.Tensor | np.ndarray, test: torch.Tensor | np.ndarray) -> float:
    """10 log10(sum ref^2 / sum (ref - test)^2) in dB (float64 sums); inf when equal."""
    r = torch.as_tensor(ref).to(torch.float32)
    t = torch.as_tensor(test).to(torch.float32)
    sig = sum_squares(r)
    noise = sum_squares(r - t)
    if noise == 0.0:
        return math.inf
    if sig == 0.0:
        return -math.inf
    return 10.0 * math.log10(sig / noise)


def end_metrics(fp: np.ndarray, q: np.ndarray) -> dict:
    """Cosine similarity and top-1 nearest-neighbour agreement of two (N, d) output sets.

    ``mean_cosine`` / ``min_cosine`` of cos(fp_i, q_i); ``top1_agreement``: the
    fraction of i whose nearest neighbour argmax_{j != i} cos(x_i, x_j) is the
    same j in q as in fp (None for fewer than 3 rows).
    """
    a = np.asarray(fp, dtype=np.float64).reshape(len(fp), -1)
    b = np.asarray(q, dtype=np.float64).reshape(len(q), -1)
    if a.shape != b.shape:
        raise ValueError(f"output shapes differ: {a.shape} and {b.shape}")

    def unit(x):
        n = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.where(n > 0, n, 1.0)

    ua, ub = unit(a), unit(b)
    cos = np.sum(ua * ub, axis=1)
    out = {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "top1_agreement": None,
           "n": int(len(a))}
    if len(a) >= 3:
        def nn_index(u):
            s = u @ u.T
            np.fill_diagonal(s, -np.inf)
            return np.argmax(s, axis=1)

        out["top1_agreement"] = float(np.mean(nn_index(ua) == nn_index(ub)))
    return out


# --------------------------------------------------------------------------- running models


def _call(model: nn.Module, batch):
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _row_mask(batch) -> torch.Tensor | None:
    if isinstance(batch, Mapping) and "attention_mask" in batch:
        return torch.as_tensor(batch["attention_mask"]).bool()
    return None


def _rows(t: torch.Tensor, mask: torch.Tensor | None, channels_first: bool = False) -> torch.Tensor:
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


def _run(model: nn.Module, batches: Sequence, names: Sequence[str], *, inputs: bool,
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
                cap_in[name].append(_rows(args[0], state["mask"], conv))
            if outputs:
                cap_out[name].append(_rows(out, state["mask"], conv))

        handles.append(mod.register_forward_hook(hook))
    finals = []
    try:
        with torch.inference_mode():
            for batch in batches:
                state["mask"] = _row_mask(batch)
                finals.append(_output_tensor(_call(model, batch)).detach().to(torch.float32))
    finally:
        for h in handles:
            h.remove()
    if per_batch:
        nb = len(finals)
        split = lambda d: [{k: (v[i] if v else None) for k, v in d.items()}  # noqa: E731
                           for i in range(nb)]
        return split(cap_in), split(cap_out), finals
    cat = lambda d: {k: torch.cat(v) if v else None for k, v in d.items()}  # noqa: E731
    rows = [_rows(f, None) for f in finals]
    return cat(cap_in), cat(cap_out), torch.cat(rows) if rows else torch.empty(0)


def _check_batches(batches, what: str) -> list:
    if batches is None:
        raise ValueError(f"{what} inputs are required for a torch model")
    if isinstance(batches, (torch.Tensor, Mapping)):
        batches = [batches]
    batches = list(batches)
    if not batches:
        raise ValueError(f"{what} inputs are empty; give at least one batch")
    return batches


def _run_checked(model, batches, names, what: str, **kw):
    """``_run`` that reports inputs the model cannot take as a ValueError naming their shape."""
    try:
        return _run(model, batches, names, **kw)
    except (RuntimeError, IndexError) as exc:
        shapes = ", ".join(sorted({_describe(b) for b in batches}))
        raise ValueError(f"{what} inputs of shape {shapes} do not fit the model: "
                         f"{str(exc).splitlines()[0]}") from None


def _describe(batch) -> str:
    if isinstance(batch, torch.Tensor):
        return str(tuple(batch.shape))
    if isinstance(batch, Mapping):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        return "(" + ", ".join(_describe(v) for v in batch) + ")"
    return type(batch).__name__


# --------------------------------------------------------------------------- analysis


class _Progress:
    """Adapter: ``progress(done_increment, description)`` or a tqdm-like object or None."""

    def __init__(self, progress):
        self.p = progress

    def step(self, n: int = 1, desc: str | None = None) -> None:
        if self.p is None:
            return
        if callable(getattr(self.p, "update", None)):
            if desc is not None and hasattr(self.p, "set_postfix_str"):
                self.p.set_postfix_str(desc, refresh=False)
            self.p.update(n)
        else:
            self.p(n, desc)


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _gemm_bits(worst: dict, l1: dict, observed: dict) -> dict:
    def bmax(d):
        vals = [v for k, v in d.items() if k != "main" and v is not None]
        return max(vals) if vals else None

    return {
        "acc_bits_worst": worst.get("main"), "acc_bits_l1": l1.get("main"),
        "acc_bits_observed": observed.get("main"),
        "branch_acc_bits_worst": bmax(worst), "branch_acc_bits_l1": bmax(l1),
        "branch_acc_bits_observed": bmax(observed),
    }


def _cost_fields(name: str, shape, cfg: Config, rank: int, tokens: int) -> dict:
    out_f, in_f = shape
    lc = layer_cost((name, in_f, out_f, tokens), cfg, rank=max(rank, 1) if cfg.has_branch else None)
    return {"energy_pj": lc.energy_pj, "compute_energy_pj": lc.compute_energy_pj,
            "memory_energy_pj": lc.memory_energy_pj, "compute_pj": dict(lc.compute_pj),
            "memory_pj": dict(lc.memory_pj), "weight_bits": lc.weight_bits,
            "main_weight_bits": lc.main_weight_bits, "branch_bits": lc.branch_weight_bits,
            "macs": lc.macs}


def _summary(layers: list[dict], main_only_bits: int) -> dict:
    def vals(k):
        return [l[k] for l in layers if l.get(k) is not None and math.isfinite(l[k])]

    def mean(k):
        v = vals(k)
        return float(np.mean(v)) if v else None

    s = {
        "weight_error_mean": mean("weight_error"),
        "weight_error_max": max(vals("weight_error"), default=None),
        "local_sqnr_db_mean": mean("local_sqnr_db"),
        "local_sqnr_db_min": min(vals("local_sqnr_db"), default=None),
        "propagated_sqnr_db_mean": mean("propagated_sqnr_db"),
        "propagated_sqnr_db_min": min(vals("propagated_sqnr_db"), default=None),
        "act_error_mean": mean("act_error"),
        "acc_bits_worst_max": max(vals("acc_bits_worst"), default=None),
        "acc_bits_l1_max": max(vals("acc_bits_l1"), default=None),
        "acc_bits_observed_max": max(vals("acc_bits_observed"), default=None),
    }
    weight_bits = int(sum(l["weight_bits"] for l in layers))
    s["weight_bits"] = weight_bits
    s["memory_overhead_bits"] = weight_bits - int(main_only_bits)
    s["energy_pj"] = float(sum(l["energy_pj"] for l in layers))
    comp: dict[str, float] = {}
    mem: dict[str, float] = {}
    for l in layers:
        for k, v in l["compute_pj"].items():
            comp[k] = comp.get(k, 0.0) + v
        for k, v in l["memory_pj"].items():
            mem[k] = mem.get(k, 0.0) + v
    s["compute_pj"], s["memory_pj"] = comp, mem
    ranks = [l["rank"] for l in layers]
    s["rank_min"], s["rank_max"] = (min(ranks), max(ranks)) if ranks else (0, 0)
    return s


def _clean(x):
    """JSON-safe: non-finite floats become None; numpy scalars become Python numbers."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def _fit_layer(W, cfg, method, seed, steps, acts, ref_rank, smoothing, device=None):
    """One layer's fit: a pure task (module level, so a Dask worker can import it).

    Runs on one torch thread: the optimizer's GEMMs are too small to gain from
    two, and its result bits then do not depend on the machine's thread count.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return quantize_weight(W, cfg, method=method, seed=seed, steps=steps, activations=acts,
                               ref_rank=ref_rank, smoothing=smoothing, device=device)
    finally:
        torch.set_num_threads(threads)


def _optimize_layers(weights: dict[str, np.ndarray], cfg: Config, *, methods, seed, steps,
                     activations, cache: LayerCache | None, progress: _Progress,
                     ref_rank: int = 32, smoothing: bool = True, client=None,
                     device=None) -> dict:
    """Quantize every weight for ``cfg``, loading finished layers from ``cache``.

    The layers left are fitted by ``analysis.cluster.map_layers``: in this
    process without a ``client``, else as Dask tasks (weights and activations
    scattered once); the client saves each result to the cache as it arrives.
    """
    from analysis import cluster

    method = (methods or {}).get(cfg.name) or method_for(cfg)
    results = {}
    todo = []
    for name, W in weights.items():
        res = cache.load(cfg.name, name) if cache is not None else None
        if res is None:
            acts = None if activations is None else activations.get(name)
            wrap = cluster.scatter if client is not None else (lambda v: v)
            todo.append((name, (wrap(W), cfg, method, seed, steps,
                                None if acts is None else wrap(acts), ref_rank, smoothing,
                                device)))
        else:
            results[name] = res
            progress.step(1, f"{cfg.name} {name}")
    if client is None and FIT_THREADS > 1 and len(todo) > 1:
        done = _fit_in_threads(todo)
    else:
        done = cluster.map_layers(_fit_layer, todo, client=client,
                                  priority={n: weights[n].size for n, _ in todo})
    for name, res in done:
        if cache is not None:
            cache.save(cfg.name, name, res)
        results[name] = res
        progress.step(1, f"{cfg.name} {name}")
    return {n: results[n] for n in weights}


# In-process layer fits run on this many threads (the Numba kernels release the GIL and
# torch runs on one thread inside each fit), largest layers first; the bits do not depend
# on it (a test compares 1 and 2 threads).
FIT_THREADS = max(1, min(2, os.cpu_count() or 1))


def _fit_in_threads(todo):
    """Yield (name, result) of ``_fit_layer`` over ``todo`` from a thread pool, as completed."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

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


def _check_ranks(cfgs, shapes: dict) -> None:
    """An explicit branch rank larger than a layer's width is refused, naming the layer."""
    for cfg in cfgs:
        if not (cfg.has_branch and cfg.rank):
            continue
        for n, shp in shapes.items():
            if cfg.rank > min(shp):
                raise ValueError(f"configuration {cfg.name}: rank {cfg.rank} exceeds the width of "
                                 f"layer {n} (out x in = {shp[0]} x {shp[1]}); the rank must be "
                                 f"<= {min(shp)}, or give no r<rank> for the default rank")


def _group_sqnr(fp: list, q: list, groups: list) -> dict:
    """{group: SQNR dB} over the batches of each group (rows of all its batches)."""
    out = {}
    for g in dict.fromkeys(groups):
        idx = [i for i, gi in enumerate(groups) if gi == g]
        out[str(g)] = sqnr_db(torch.cat([fp[i] for i in idx]), torch.cat([q[i] for i in idx]))
    return out


def _agg(by_group: dict | None) -> tuple[float | None, float | None]:
    if not by_group:
        return None, None
    v = [x for x in by_group.values() if x is not None and math.isfinite(x)]
    return (float(np.mean(v)), float(min(v))) if v else (None, None)


def analyze(model: nn.Module, configs=DEFAULT_CONFIGS, calibration=None, evaluation=None, *,
            main="mxint4", branch="mxint", seed: int = 0, steps: int | None = None,
            tokens: int = DEFAULT_TOKENS, mode: str = "fast", methods: dict | None = None,
            cache_dir=None, cache_key: str = "", progress=None, layers: Sequence[str] | None = None,
            groups: Sequence | None = None, end_metric=None, smoothing: bool = True,
            ref_rank: int = 32, client=None, device=None) -> dict:
    """Analyze the quantizable layers of ``model`` under each configuration.

    ``layers``: names of ``nn.Linear`` / 1 x 1 ``nn.Conv2d`` modules (default:
    every one, ``analysis.models.quantizable_layers``).
    ``calibration`` / ``evaluation``: lists of batches, each a tensor (one
    positional input), a tuple (positional inputs) or a dict (keyword inputs;
    an ``attention_mask`` (B, T) restricts token statistics to real tokens).
    Calibration activations feed the smoothing search (SVDQuant, and LoRaQ
    unless ``smoothing`` is False or its configuration ends in ``-nosmooth``);
    every measurement is on the evaluation batches (calibration is used when
    none are given). ``groups``: one label per evaluation batch (a diffusion
    timestep): each layer's local and propagated SQNR is then also given per
    group (``*_by_timestep``) with its mean and worst. ``end_metric``: an
    ``analysis.models.EndMetric`` (default: output cosine and nearest-neighbour
    agreement). ``methods`` maps a configuration name to a method in ``METHODS``.
    ``client``: a Dask client (``analysis.cluster.connect``) for the per-layer
    fits, or None to run them here; the results are the same bits either way.
    ``device`` (e.g. "cuda"): the model, its inputs, the simulated layers (the
    torch backend's quantizers, TF32 off) and LoRaQ's loop run there; None keeps
    today's CPU path (Numba quantizers).
    Returns ``{"configs": {name: {...}}, "layer_names": [...]}`` (see
    ``analysis.report`` for the fields). The model is left unchanged.
    """
    from analysis.models.base import OutputCosine, layer_weight, quantizable_layers

    cfgs = parse_configs(configs, main=main, branch=branch)
    names = list(layers) if layers is not None else quantizable_layers(model)[0]
    if not names:
        raise ValueError("the model has no nn.Linear or 1x1 nn.Conv2d layers to analyze")
    calibration = _check_batches(calibration, "calibration")
    evaluation = _check_batches(evaluation, "evaluation") if evaluation is not None else calibration
    if device is not None:
        import numfmt.torch as nft_

        device = nft_.check_device(device)
        model.to(device)
        calibration = [_to_device(b, device) for b in calibration]
        evaluation = [_to_device(b, device) for b in evaluation]
    if groups is not None and len(groups) != len(evaluation):
        raise ValueError(f"groups has {len(groups)} labels for {len(evaluation)} evaluation batches")
    end_metric = end_metric or OutputCosine()
    prog = _Progress(progress)
    cache = LayerCache(cache_dir, cache_key) if cache_dir is not None else None
    mods = {n: model.get_submodule(n) for n in names}
    weights = {n: layer_weight(mods[n]).to(torch.float32).cpu().numpy().copy() for n in names}
    _check_ranks(cfgs, {n: w.shape for n, w in weights.items()})
    biases = {n: (None if mods[n].bias is None else mods[n].bias.detach().to(torch.float32).clone())
              for n in names}

    def _method(c):
        return (methods or {}).get(c.name) or method_for(c)

    need_acts = any(_method(c) == "svdquant" or (_method(c) == "loraq" and smoothed(c, smoothing))
                    for c in cfgs)
    acts = None
    if need_acts:
        cal_in, _, _ = _run_checked(model, calibration, names, "calibration", inputs=True,
                                    outputs=False)
        acts = {n: cal_in[n].cpu().numpy() for n in names}
        del cal_in
    else:
        _run_checked(model, calibration[:1], [], "calibration", inputs=False, outputs=False)
    fp_in_b, fp_out_b, fp_final_b = _run_checked(model, evaluation, names, "evaluation",
                                                 inputs=True, per_batch=True)
    fp_in = {n: torch.cat([b[n] for b in fp_in_b]) for n in names}
    fp_out = {n: torch.cat([b[n] for b in fp_out_b]) for n in names}
    bounds = {n: np.cumsum([0] + [b[n].shape[0] for b in fp_in_b]) for n in names}
    del fp_in_b
    ref = end_metric.reference(model, fp_final_b)

    out = {"layer_names": names, "configs": {}}
    ref_metrics = getattr(end_metric, "reference_metrics", None)
    if ref_metrics is not None:
        out["reference"] = {"end_metrics": _clean(ref_metrics)}
    for cfg in cfgs:
        done = cache.load_json(cfg.name, "measured") if cache is not None else None
        if done is not None:
            prog.step(len(names) + 1, f"{cfg.name} (cached)")
            out["configs"][cfg.name] = done
            continue
        results = _optimize_layers(weights, cfg, methods=methods, seed=seed, steps=steps,
                                   activations=acts if smoothed(cfg, smoothing) else None,
                                   cache=cache, progress=prog, ref_rank=ref_rank,
                                   smoothing=smoothing, client=client, device=device)
        qmods = {n: _quant_module(mods[n], results[n], cfg, biases[n], mode, n, device)
                 for n in names}
        recs = []
        for n in names:
            q = qmods[n]
            q.collect_stats = True
            with torch.inference_mode():
                yq = q.linear_rows(fp_in[n]) if hasattr(q, "linear_rows") else q(fp_in[n])
            q.collect_stats = False
            measured = {"act_error": q.stats.act_error, "branch_act_error": q.stats.branch_act_error,
                        "local_sqnr_db": sqnr_db(fp_out[n], yq)}
            if groups is not None:
                b = bounds[n]
                parts_fp = [fp_out[n][b[i]:b[i + 1]] for i in range(len(evaluation))]
                parts_q = [yq[b[i]:b[i + 1]] for i in range(len(evaluation))]
                by = _group_sqnr(parts_fp, parts_q, list(groups))
                measured["local_sqnr_db_by_timestep"] = by
                measured["local_sqnr_db_mean_t"], measured["local_sqnr_db_worst_t"] = _agg(by)
            recs.append(_layer_record(n, weights[n], results[n], q, cfg, methods, tokens,
                                      measured, q.stats.acc_bits_observed))
        originals = _swap(model, qmods)
        try:
            with fp32_matmul(device or "cpu"):
                _, q_out_b, q_final_b = _run(model, evaluation, names, inputs=False,
                                             per_batch=True)
                end = end_metric.measure(model, q_final_b, ref)
        finally:
            _swap(model, originals)
        for rec in recs:
            n = rec["name"]
            q_rows = [b[n] for b in q_out_b]
            rec["propagated_sqnr_db"] = sqnr_db(fp_out[n], torch.cat(q_rows))
            if groups is not None:
                b = bounds[n]
                parts_fp = [fp_out[n][b[i]:b[i + 1]] for i in range(len(evaluation))]
                by = _group_sqnr(parts_fp, q_rows, list(groups))
                rec["propagated_sqnr_db_by_timestep"] = by
                rec["propagated_sqnr_db_mean_t"], rec["propagated_sqnr_db_worst_t"] = _agg(by)
        fp_rows = torch.cat([_rows(f, None) for f in fp_final_b])
        q_rows = torch.cat([_rows(f, None) for f in q_final_b])
        _store_entry(cfg, recs, end, sqnr_db(fp_rows, q_rows), cache, out, prog)
    return out


def _quant_module(mod: nn.Module, result, cfg: Config, bias, mode: str, name: str,
                  device=None) -> nn.Module:
    """The simulated quantized replacement of a linear or 1 x 1 conv layer (on ``device``:
    the torch backend's quantizers; None: the CPU path)."""
    kw = {} if device is None else {"device": device, "backend": "torch"}
    cls = QuantConv1x1 if isinstance(mod, nn.Conv2d) else QuantLinear
    return cls.from_result(result, cfg, bias=bias, mode=mode, name=name, **kw)


def _to_device(batch, device):
    """A batch (tensor, tuple or dict) with its tensors moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _swap(model: nn.Module, new: dict) -> dict:
    """Set each named submodule to ``new[name]``; returns the ones replaced."""
    from analysis.layers import _set_submodule

    old = {n: model.get_submodule(n) for n in new}
    for n, m in new.items():
        _set_submodule(model, n, m)
    return old


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


def _layer_record(n, W, result, q, cfg, methods, tokens, measured: dict, observed) -> dict:
    """One layer's row: identity, weight error, the ``measured`` activation fields,
    accumulator widths (worst case, l1 bound, ``observed``) and cost."""
    rec = {"name": n, "shape": list(W.shape),
           "method": (methods or {}).get(cfg.name) or method_for(cfg), "rank": q.rank,
           "weight_error": weight_error(W, result)}
    rec.update(measured)
    rec.update(_gemm_bits(q.acc_bits_worst(), q.acc_bits_l1(), observed))
    rec.update(_cost_fields(n, W.shape, cfg, q.rank, tokens))
    return rec


def _store_entry(cfg, layers, end, output_sqnr, cache, out, prog) -> None:
    """Summarize one configuration's layers, cache it atomically and add it to ``out``."""
    entry = {"config": cfg.name, "method": layers[0]["method"], "formats": _formats(cfg),
             "end_metrics": end, "output_sqnr_db": output_sqnr, "layers": layers}
    entry.update(_summary(layers, sum(l["main_weight_bits"] for l in layers)))
    entry = _clean(entry)
    if cache is not None:
        cache.save_json(cfg.name, "measured", entry)
    out["configs"][cfg.name] = entry
    prog.step(1, f"{cfg.name} measured")


def _formats(cfg: Config) -> dict:
    g = lambda f: None if f is None else numfmt.get(f).name  # noqa: E731
    return {"main_weight": g(cfg.main_weight), "main_act": g(cfg.main_act),
            "branch_weight": g(cfg.branch_weight), "branch_act": g(cfg.branch_act)}


def analyze_weights(weights: Mapping[str, np.ndarray], configs=DEFAULT_CONFIGS, *, main="mxint4",
                    branch="mxint", seed: int = 0, steps: int | None = None,
                    tokens: int = DEFAULT_TOKENS, methods: dict | None = None, cache_dir=None,
                    cache_key: str = "", progress=None, ref_rank: int = 32, client=None) -> dict:
    """Weights-only analysis of every 2-D weight (out x in) in ``weights``.

    Per layer: weight error, accumulator bounds (worst case, l1) and cost; no
    activations, so no activation error, SQNR, observed widths or end metrics
    (they are None). SVDQuant runs without smoothing.
    """
    mats = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()
            if np.asarray(v).ndim == 2 and np.issubdtype(np.asarray(v).dtype, np.floating)}
    if not mats:
        raise ValueError("the weights hold no 2-D floating tensor (out x in) to analyze")
    cfgs = parse_configs(configs, main=main, branch=branch)
    _check_ranks(cfgs, {n: w.shape for n, w in mats.items()})
    prog = _Progress(progress)
    cache = LayerCache(cache_dir, cache_key) if cache_dir is not None else None
    out = {"layer_names": list(mats), "configs": {}}
    for cfg in cfgs:
        done = cache.load_json(cfg.name, "measured") if cache is not None else None
        if done is not None:
            prog.step(len(mats) + 1, f"{cfg.name} (cached)")
            out["configs"][cfg.name] = done
            continue
        results = _optimize_layers(mats, cfg, methods=methods, seed=seed, steps=steps,
                                   activations=None, cache=cache, progress=prog, ref_rank=ref_rank,
                                   client=client)
        layers = []
        for n, W in mats.items():
            q = QuantLinear.from_result(results[n], cfg, name=n)
            layers.append(_layer_record(
                n, W, results[n], q, cfg, methods, tokens,
                {"act_error": None, "branch_act_error": None, "local_sqnr_db": None,
                 "propagated_sqnr_db": None}, {}))
        _store_entry(cfg, layers,
                     {"mean_cosine": None, "min_cosine": None, "top1_agreement": None}, None,
                     cache, out, prog)
    return out


def minilm_inputs(max_sentences: int | None = None, batch_size: int = 16) -> tuple[list, list]:
    """Tokenized calibration and evaluation batches of the shipped sentences.

    ``max_sentences`` keeps the first n of each split (even n for evaluation,
    so paraphrase pairs stay whole).
    """
    from analysis import minilm

    tok = minilm.tokenizer()

    def batches(split, n):
        s = minilm.sentences(split)
        if n is not None:
            s = s[:n]
        return [minilm.tokenize(s[i:i + batch_size], tok=tok) for i in range(0, len(s), batch_size)]

    n_eval = None if max_sentences is None else max(4, max_sentences - max_sentences % 2)
    return batches("calibration", max_sentences), batches("evaluation", n_eval)


def analyze_minilm(configs=DEFAULT_CONFIGS, *, path=None, max_sentences: int | None = None,
                   **kwargs) -> dict:
    """``analyze`` on the built-in all-MiniLM-L6-v2 with its shipped sentence splits."""
    from analysis import minilm

    model = minilm.MiniLM.from_pretrained(path)
    cal, ev = minilm_inputs(max_sentences)
    return analyze(model, configs, cal, ev, **kwargs)


def fingerprint(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over names, shapes, dtypes and bytes of the arrays (sorted by name), hex."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(k.encode())
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


__all__ += ["effective_weight", "weight_error", "minilm_inputs", "fingerprint"]
