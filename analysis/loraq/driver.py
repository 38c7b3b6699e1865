"""optimize_model: run a method over every 2-D weight of a model, one file pair per layer.

Layout of ``out_dir``::

    <stem>.safetensors   codes, scales, omega, smooth of one layer   (save_result)
    <stem>.json          formats, metrics, history, config            (written last)
    index.json           layer name -> stem, config and metrics of every finished layer

``stem`` is the weight's name with characters outside [A-Za-z0-9._-] replaced
by "_" (plus 8 hex digits of its SHA-256 when that changed the name, so two
names never share a stem). Every file is written to a temporary name and
renamed, and a layer counts as done only when its JSON exists, so an
interrupted run (Ctrl-C, a killed process) loses at most the layers in flight;
a rerun skips the finished layers. A finished layer is reused only if its
stored config (method, every keyword argument, the weight's shape and the
SHA-256 of its float32 bytes) equals the requested one; otherwise
``optimize_model`` raises ValueError naming the layer and the differing keys,
unless ``overwrite=True``, which recomputes it.

Parallelism: ``processes > 1`` runs layers in a ``spawn`` process pool (safe
with torch and Numba; each worker runs single-threaded, ``threads=1``); results
are identical to ``processes=1`` because every layer is computed the same way in
isolation. The pool is kept for the next call with the same ``processes`` (a
fresh worker spends ~2.5 s importing torch and loading Numba's cache), and is
discarded after an error or an interrupt.
"""
from __future__ import annotations

import atexit
import concurrent.futures as cf
import hashlib
import json
import multiprocessing
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from analysis.loraq import baselines
from analysis.loraq.checks import as_weight, check_int
from analysis.loraq.optimizer import optimize
from analysis.loraq.result import (METHODS, LoRaQResult, load_result, read_meta, save_result,
                                   write_atomic)

__all__ = ["optimize_model", "run_method", "layer_stem", "METHOD_FUNCTIONS"]

METHOD_FUNCTIONS: dict[str, Callable] = {
    "loraq": optimize, "rtn": baselines.rtn, "svdquant": baselines.svdquant,
    "lqer": baselines.lqer, "loftq": baselines.loftq, "naive": baselines.naive}


def _check_method(method) -> Callable:
    if method not in METHOD_FUNCTIONS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    return METHOD_FUNCTIONS[method]


def run_method(W, method: str = "loraq", **kwargs) -> LoRaQResult:
    """Call the named method (``loraq`` -> ``optimize``, or a baseline) on one weight."""
    fn = _check_method(method)
    return fn(W, **kwargs)


def layer_stem(name: str) -> str:
    """A file-name-safe stem for a weight name (see the module docstring)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"weight names must be non-empty strings, got {name!r}")
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "_"
    if safe != name:
        safe += "-" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]
    return safe


def _fingerprint(W: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(W, dtype=np.float32).tobytes()).hexdigest()


def _jsonable(v):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, np.ndarray):
        return {"array_sha256": hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest(),
                "shape": list(v.shape)}
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    raise TypeError(f"keyword argument value {v!r} cannot be recorded in a layer config")


def _request(name, W, method, kwargs) -> dict:
    return {"layer": name, "method": method, "shape": list(W.shape),
            "weight_sha256": _fingerprint(W), "kwargs": _jsonable(kwargs)}


def _work(args):
    """Worker: compute one layer and write its files; returns (name, stem, metrics)."""
    name, W, method, kwargs, stem, request = args
    kwargs = dict(kwargs)
    kwargs.setdefault("threads", 1)
    res = run_method(W, method, **kwargs)
    res.config = dict(res.config, request=request)
    save_result(res, stem)
    return name, res


_POOLS: dict[int, cf.ProcessPoolExecutor] = {}


def _pool(processes: int) -> cf.ProcessPoolExecutor:
    """The kept ``spawn`` pool of ``processes`` workers (made on first use)."""
    ex = _POOLS.get(processes)
    if ex is None:
        ex = _POOLS[processes] = cf.ProcessPoolExecutor(
            max_workers=processes, mp_context=multiprocessing.get_context("spawn"))
    return ex


def _discard_pool(processes: int) -> None:
    ex = _POOLS.pop(processes, None)
    if ex is not None:
        ex.shutdown(wait=False, cancel_futures=True)


@atexit.register
def _close_pools() -> None:
    for n in list(_POOLS):
        ex = _POOLS.pop(n)
        ex.shutdown(wait=True, cancel_futures=True)


def optimize_model(weights: Mapping[str, object], out_dir, *, method: str = "loraq",
                   processes: int = 1, progress: Callable | None = None,
                   overwrite: bool = False, **kwargs) -> dict[str, LoRaQResult]:
    """Run ``method`` over every 2-D weight in ``weights``; results saved in ``out_dir``.

    weights     name -> array (numpy or torch); arrays that are not 2-D
                (biases, LayerNorm) are skipped; 2-D ones must be finite.
    out_dir     folder (created if missing) for the per-layer files.
    method      "loraq" (``optimize``) or a baseline name; ``kwargs`` go to it,
                except ``activations``, a mapping name -> (n x in) array whose
                entries go to their layers.
    processes   layers computed in parallel (spawned processes); 1 = in this process.
    progress    called as progress(name, result, done, total) after each layer
                (also for layers loaded from disk).
    overwrite   recompute layers whose stored config differs instead of raising.
    Returns name -> LoRaQResult in the order of ``weights``.
    """
    _check_method(method)
    processes = check_int(processes, "processes", 1)
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must be a mapping name -> array, got {type(weights).__name__}")
    if "threads" in kwargs:
        raise ValueError("optimize_model runs each layer with threads=1; use processes=")
    # Validate everything first (bad input fails before any work).
    todo = {}
    for name, W in weights.items():
        if getattr(W, "ndim", None) != 2:
            continue
        todo[name] = as_weight(W, f"weights[{name!r}]").astype(np.float32)
    if not todo:
        raise ValueError("weights has no 2-D arrays to quantize")
    acts = kwargs.pop("activations", None)
    if acts is not None:
        if not isinstance(acts, Mapping):
            raise TypeError("optimize_model takes activations as a mapping layer name -> "
                            f"(n x in) array, got {type(acts).__name__}")
        unknown = sorted(set(acts) - set(todo))
        if unknown:
            raise ValueError(f"activations given for unknown layers {unknown[:5]}")
        from analysis.loraq.checks import as_activations
        acts = {k: as_activations(v, todo[k].shape[1]) for k, v in acts.items()}
    stems = {name: layer_stem(name) for name in todo}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Probe the arguments on a tiny matrix so a bad keyword fails before any work.
    probe = np.linspace(-1, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    probe_kwargs = {k: v for k, v in kwargs.items() if k != "rank"}
    if method == "loraq":
        probe_kwargs["steps"] = 0
    if method != "rtn":
        probe_kwargs["rank"] = 2
    run_method(probe, method, **probe_kwargs)

    results: dict[str, LoRaQResult] = {}
    jobs = []
    for name, W in todo.items():
        stem = out / stems[name]
        kw = dict(kwargs)
        if acts is not None and name in acts:
            kw["activations"] = acts[name]
        request = _request(name, W, method, kw)
        if (stem.with_name(stem.name + ".json")).exists():
            stored = read_meta(stem).get("config", {}).get("request")
            if stored == request:
                results[name] = load_result(stem)
                continue
            if not overwrite:
                diff = sorted(k for k in set(request) | set(stored or {})
                              if (stored or {}).get(k) != request.get(k))
                raise ValueError(f"{str(stem)!r} holds layer {name!r} computed with a different "
                                 f"config (differs in {diff}); use overwrite=True (--overwrite) "
                                 f"or another output folder")
        jobs.append((name, W, method, kw, str(stem), request))
    total, done = len(todo), 0
    for name in todo:
        if name in results:
            done += 1
            if progress is not None:
                progress(name, results[name], done, total)

    def finished(name, res):
        nonlocal done
        results[name] = res
        done += 1
        if progress is not None:
            progress(name, res, done, total)

    if processes == 1 or len(jobs) <= 1:
        for job in jobs:
            finished(*_work(job))
    else:
        ex = _pool(processes)
        # largest layers first, so that no worker is left with a big one at the end
        order = sorted(jobs, key=lambda job: -job[1].size)
        futures = [ex.submit(_work, job) for job in order]
        try:
            for fut in cf.as_completed(futures):
                finished(*fut.result())
        except BaseException:
            _discard_pool(processes)
            raise
    ordered = {name: results[name] for name in todo}
    index = {"method": method, "layers": {
        name: {"stem": stems[name], **res.metrics()} for name, res in ordered.items()},
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_atomic(out / "index.json", json.dumps(index, indent=1) + "\n")
    return ordered
