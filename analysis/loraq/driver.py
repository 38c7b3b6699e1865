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

Input: a mapping name -> array (in memory), or the path of a ``.safetensors``
file. For a file, the client reads only its header (names, shapes, dtypes); each
task names its layer and the worker reads that one tensor itself
(``safe_open``, memory-mapped), so no process ever holds more than the tensors
it is working on, and a model larger than one machine's memory can be
optimized. Only floating-point 2-D tensors of a file are layers. To decide
whether a finished layer can be reused, the client reads that layer's tensor
(one at a time) to hash it. In memory, each weight is sent to the cluster once
(``analysis.cluster.scatter``).

Parallelism: every layer is one task of ``analysis.cluster.map_layers`` --
in this process without a client, or a Dask task on ``client`` (a LocalCluster
of ``workers`` processes, or any scheduler; see ``analysis.cluster``). Results
come back to the client, which writes each layer's files as it arrives; a
worker writes nothing, so a lost worker loses nothing (its tasks are rerun
elsewhere by the scheduler). Each task runs single-threaded (``threads=1``)
and each layer is computed in isolation from the same inputs, so the bits are
those of the serial run whatever the number of workers.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from analysis.errors import InputError
from analysis.loraq import METHOD_FUNCTIONS
from analysis.loraq.checks import as_weight, check_int
from analysis.loraq.result import (METHODS, LoRaQResult, load_result, read_meta, save_result,
                                   write_atomic)

__all__ = ["optimize_model", "run_method", "layer_stem", "METHOD_FUNCTIONS", "StoredResults",
           "file_layers", "read_layer"]


def _check_method(method) -> Callable:
    if method not in METHOD_FUNCTIONS:
        raise InputError(f"method={method!r} is not one of {METHODS}")
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


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def file_layers(path) -> dict[str, tuple[int, int]]:
    """name -> (out, in) of every floating-point 2-D tensor of a safetensors file (header only)."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file {str(p)!r} does not exist")
    try:
        with safe_open(str(p), framework="pt") as f:
            out = {}
            for name in f.keys():
                sl = f.get_slice(name)
                shape = tuple(sl.get_shape())
                if len(shape) == 2 and sl.get_dtype() in FLOAT_DTYPES:
                    out[name] = shape
            return out
    except SafetensorError as exc:
        raise InputError(f"{str(p)!r} is not a readable safetensors file: {exc}") from None


def read_layer(path, name: str) -> np.ndarray:
    """One tensor of a safetensors file as a finite float32 array (memory-mapped read)."""
    import torch
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        t = f.get_tensor(name)
    return as_weight(t.to(torch.float32), f"weights[{name!r}]").astype(np.float32)


def _layer_task(name: str, W, path, activations, method: str, kwargs: dict, request):
    """One layer, on a worker (or here): returns its LoRaQResult with the request recorded.

    ``W`` is the float32 weight, or None to read layer ``name`` from the file
    ``path``; then ``request`` is computed here and ``w_hat`` is dropped from
    the result (the client does not keep it; ``load_result`` recomputes it).
    """
    kw = dict(kwargs)
    if activations is not None:
        kw["activations"] = activations
    if W is None:
        W = read_layer(path, name)
        request = _request(name, W, method, kw)
    kw.setdefault("threads", 1)
    res = run_method(W, method, **kw)
    res.config = dict(res.config, request=request)
    if path is not None:
        res.w_hat = None
    return res


class StoredResults(Mapping):
    """name -> LoRaQResult, each read from ``out_dir`` when asked for (none kept in memory).

    ``metrics[name]`` holds the scalar metrics of every layer without reading arrays.
    """

    def __init__(self, out_dir, stems: dict[str, str], metrics: dict[str, dict]):
        self.out_dir = Path(out_dir)
        self._stems = dict(stems)
        self.metrics = dict(metrics)

    def __getitem__(self, name: str) -> LoRaQResult:
        return load_result(self.out_dir / self._stems[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._stems)

    def __len__(self) -> int:
        return len(self._stems)


def optimize_model(weights, out_dir, *, method: str = "loraq", client=None,
                   workers: int | None = None, processes: int | None = None,
                   progress: Callable | None = None, overwrite: bool = False,
                   **kwargs) -> Mapping[str, LoRaQResult]:
    """Run ``method`` over every 2-D weight in ``weights``; results saved in ``out_dir``.

    weights     name -> array (numpy or torch): arrays that are not 2-D
                (biases, LayerNorm) are skipped, 2-D ones must be finite; or the
                path of a .safetensors file (str or Path), read tensor by tensor
                by the workers (see the module docstring).
    out_dir     folder (created if missing) for the per-layer files.
    method      "loraq" (``optimize``) or a baseline name; ``kwargs`` go to it,
                except ``activations``, a mapping name -> (n x in) array whose
                entries go to their layers.
    client      a ``distributed.Client`` (``analysis.cluster.connect``) to run the
                layers on, or None.
    workers     without ``client``: a LocalCluster of this many worker processes
                for this call (``analysis.cluster.connect(workers=...)``); None or
                1 = in this process. ``processes`` is its older name.
    progress    called as progress(name, result, done, total) after each layer
                (also for layers loaded from disk), in completion order. For a
                file input ``result.w_hat`` is None for layers computed now.
    overwrite   recompute layers whose stored config differs instead of raising.
    Returns name -> LoRaQResult in the order of ``weights``: a dict for an
    in-memory mapping, a ``StoredResults`` (read from disk on access) for a file.
    """
    from analysis import cluster

    _check_method(method)
    if processes is not None:
        if workers is not None:
            raise ValueError("give workers= or its older name processes=, not both")
        workers = check_int(processes, "processes", 1)
    if client is not None and workers is not None:
        raise ValueError(f"give client= or workers={workers}, not both")
    # checks workers= now; starts a LocalCluster only if a layer is left to compute
    where = cluster.connect(workers=workers) if client is None else nullcontext(client)
    if "threads" in kwargs:
        raise ValueError("optimize_model runs each layer with threads=1; use workers= or a "
                         "client for parallelism")
    path = None
    if isinstance(weights, (str, os.PathLike)):
        path = Path(weights)
        if path.suffix != ".safetensors":
            raise InputError(f"weights={str(path)!r} must be a .safetensors file or a mapping "
                             f"name -> array")
        shapes = file_layers(path)
        todo = dict.fromkeys(shapes)
    elif isinstance(weights, Mapping):
        # Validate everything first (bad input fails before any work).
        todo = {}
        for name, W in weights.items():
            if getattr(W, "ndim", None) != 2:
                continue
            todo[name] = as_weight(W, f"weights[{name!r}]").astype(np.float32)
        shapes = {name: W.shape for name, W in todo.items()}
    else:
        raise TypeError(f"weights must be a mapping name -> array or a .safetensors path, got "
                        f"{type(weights).__name__}")
    if not todo:
        raise InputError("weights has no 2-D arrays to quantize")
    for name in todo:
        layer_stem(name)  # names must be non-empty strings
    acts = kwargs.pop("activations", None)
    if acts is not None:
        if not isinstance(acts, Mapping):
            raise TypeError("optimize_model takes activations as a mapping layer name -> "
                            f"(n x in) array, got {type(acts).__name__}")
        unknown = sorted(set(acts) - set(todo))
        if unknown:
            raise InputError(f"activations given for unknown layers {unknown[:5]}")
        from analysis.loraq.checks import as_activations
        acts = {k: as_activations(v, shapes[k][1]) for k, v in acts.items()}
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

    metrics: dict[str, dict] = {}
    results: dict[str, LoRaQResult] = {}
    finished_here: list[str] = []
    items = []
    for name in todo:
        stem = out / stems[name]
        kw = dict(kwargs)
        layer_acts = None if acts is None else acts.get(name)
        if (stem.with_name(stem.name + ".json")).exists():
            W = todo[name] if path is None else read_layer(path, name)
            request = _request(name, W, method, dict(kw, **(
                {} if layer_acts is None else {"activations": layer_acts})))
            del W
            doc = read_meta(stem)
            stored = doc.get("config", {}).get("request")
            if stored == request:
                metrics[name] = doc["metrics"]
                if path is None:
                    results[name] = load_result(stem)
                finished_here.append(name)
                continue
            if not overwrite:
                diff = sorted(k for k in set(request) | set(stored or {})
                              if (stored or {}).get(k) != request.get(k))
                raise InputError(f"{str(stem)!r} holds layer {name!r} computed with a different "
                                 f"config (differs in {diff}); use overwrite=True (--overwrite) "
                                 f"or another output folder")
        if path is None:
            request = _request(name, todo[name], method, dict(kw, **(
                {} if layer_acts is None else {"activations": layer_acts})))
            args = (name, cluster.scatter(todo[name]), None, None, method, kw, request)
        else:
            args = (name, None, str(path), None, method, kw, None)
        if layer_acts is not None:
            args = args[:3] + (cluster.scatter(layer_acts),) + args[4:]
        items.append((name, args))
    total, done = len(todo), 0
    for name in finished_here:
        done += 1
        if progress is not None:
            progress(name, results[name] if path is None else load_result(out / stems[name]),
                     done, total)

    # largest layers first, so that no worker is left with a big one at the end
    priority = {name: shapes[name][0] * shapes[name][1] for name, _ in items}
    with (where if items else nullcontext(None)) as c:
        for name, res in cluster.map_layers(_layer_task, items, client=c, priority=priority):
            save_result(res, out / stems[name])  # atomic; the JSON last
            metrics[name] = res.metrics()
            if path is None:
                results[name] = res
            done += 1
            if progress is not None:
                progress(name, res, done, total)
    index = {"method": method, "layers": {
        name: {"stem": stems[name], **metrics[name]} for name in todo},
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_atomic(out / "index.json", json.dumps(index, indent=1) + "\n")
    if path is None:
        return {name: results[name] for name in todo}
    return StoredResults(out, stems, {name: metrics[name] for name in todo})

