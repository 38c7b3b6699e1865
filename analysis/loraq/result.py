"""LoRaQResult: one layer's decomposition W ~ Q1(P) + Q2(L Omega) Q2(Omega^T R), and its files.

A result holds the three quantized matrices as numfmt QTensors::

    main   Q1(P)             out x in   quantized along in  (axis 1)
    left   Q2(L Omega)       out x r    quantized along r   (axis 1)
    right  Q2(Omega^T R)     r x in     quantized along in  (axis 1)

and the reconstruction, computed in float64 and cast to float32 once::

    w_hat = ( dequantize(main) + dequantize(left) @ dequantize(right) ) / smooth[None, :]

(``smooth`` is None except for SVDQuant with activations; then the stored
matrices approximate W diag(smooth) and a layer computes
y = (x / smooth) @ (main + left right)^T, which equals x @ w_hat^T.)

``bits`` = main.bits + left.bits + right.bits: every element code and every
block scale (and NVFP4's 32-bit tensor scale). Omega is folded into the two
factors and is not stored separately; the smoothing vector is folded into the
previous layer by SVDQuant and is not counted either.

Files (``save_result(result, stem)``): ``stem.safetensors`` with the codes,
scales, omega and smooth arrays, and ``stem.json`` with the formats, metrics,
history and the config that produced the result. Both are written to a
temporary name and renamed; the JSON is written last, so a stem whose JSON
exists is complete.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import numfmt
from numfmt.fileio import atomic_path, write_atomic
from numfmt.qtensor import QTensor

__all__ = ["LoRaQResult", "METHODS", "save_result", "load_result", "reconstruct",
           "write_atomic", "FILE_VERSION"]

METHODS = ("loraq", "rtn", "svdquant", "lqer", "loftq", "naive")
FILE_VERSION = 1


@dataclass(eq=False)
class LoRaQResult:
    """One layer's quantized decomposition and its metrics (see the module docstring).

    ``history``    relative Frobenius error ||W - w_hat_t||_F / ||W||_F of the
                   iterate at each step (optimizers) or iteration (loftq,
                   svdquant refinement); empty for one-shot methods.
    ``rel_error``  ||W - w_hat||_F / ||W||_F of the returned result, float64.
    ``output_rel_error``  ||X (W - w_hat)^T||_F / ||X W^T||_F when activations
                   X were given, else None.
    ``config``     the arguments that produced the result (JSON-able), used by
                   the model driver to decide whether a stored layer can be reused.
    """

    main: QTensor
    left: QTensor | None
    right: QTensor | None
    omega: np.ndarray | None
    rank: int
    w_hat: np.ndarray
    bits: int
    history: list[float]
    rel_error: float
    method: str
    main_format: str
    branch_format: str | None
    steps: int = 0
    converged: bool = True
    smooth: np.ndarray | None = None
    output_rel_error: float | None = None
    seconds: float = 0.0
    config: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.main.shape)

    @property
    def bits_per_weight(self) -> float:
        """Storage bits divided by out * in."""
        out, inp = self.shape
        return self.bits / (out * inp)

    def metrics(self) -> dict:
        """The scalar facts about the result, JSON-able."""
        return {"method": self.method, "shape": list(self.shape), "rank": int(self.rank),
                "main_format": self.main_format, "branch_format": self.branch_format,
                "bits": int(self.bits), "bits_per_weight": self.bits_per_weight,
                "rel_error": float(self.rel_error),
                "output_rel_error": (None if self.output_rel_error is None
                                     else float(self.output_rel_error)),
                "steps": int(self.steps), "converged": bool(self.converged),
                "seconds": float(self.seconds)}

    def __repr__(self) -> str:
        return (f"LoRaQResult(method={self.method!r}, shape={self.shape}, main={self.main_format!r},"
                f" branch={self.branch_format!r}, rank={self.rank}, rel_error={self.rel_error:.5g},"
                f" bits={self.bits}, steps={self.steps})")


def reconstruct(main: QTensor, left: QTensor | None, right: QTensor | None,
                smooth: np.ndarray | None = None) -> np.ndarray:
    """w_hat = (dequantize(main) + dequantize(left) @ dequantize(right)) / smooth, float64 -> float32."""
    import torch

    w = numfmt.dequantize(main).astype(np.float64)
    if left is not None:  # torch: honours the caller's thread limit (NumPy's BLAS does not)
        w += (torch.from_numpy(numfmt.dequantize(left).astype(np.float64))
              @ torch.from_numpy(numfmt.dequantize(right).astype(np.float64))).numpy()
    if smooth is not None:
        w /= np.asarray(smooth, dtype=np.float64)[None, :]
    return w.astype(np.float32)


def rel_error(W: np.ndarray, w_hat: np.ndarray) -> float:
    W = np.asarray(W, dtype=np.float64)
    d = (W - w_hat.astype(np.float64)).ravel()
    return float(np.sqrt(np.sum(np.square(d))) / max(np.sqrt(np.sum(np.square(W))), 1e-300))


# --- files ------------------------------------------------------------------
def _format_name(fmt) -> str:
    name = fmt.name
    if numfmt.get(name) != fmt:
        raise ValueError(f"format {name!r} has overridden parameters; only registered formats "
                         f"can be saved (known: {', '.join(numfmt.formats())})")
    return name


def _qt_arrays(prefix: str, q: QTensor | None, arrays: dict, meta: dict) -> None:
    if q is None:
        meta[prefix] = None
        return
    arrays[f"{prefix}.codes"] = np.ascontiguousarray(q.codes)
    if q.scales is not None:
        arrays[f"{prefix}.scales"] = np.ascontiguousarray(q.scales)
    meta[prefix] = {"format": _format_name(q.format), "axis": int(q.axis),
                    "shape": list(q.shape),
                    "tensor_scale": None if q.tensor_scale is None else float(q.tensor_scale)}


def _qt_from(prefix: str, arrays: dict, meta: dict) -> QTensor | None:
    m = meta.get(prefix)
    if m is None:
        return None
    ts = None if m["tensor_scale"] is None else np.float32(m["tensor_scale"])
    return QTensor(arrays[f"{prefix}.codes"], arrays.get(f"{prefix}.scales"),
                   numfmt.get(m["format"]), int(m["axis"]), tuple(m["shape"]), tensor_scale=ts)


def save_result(result: LoRaQResult, path_stem) -> tuple[Path, Path]:
    """Write ``<stem>.safetensors`` (arrays) then ``<stem>.json`` (formats, metrics, history).

    Both atomically (temporary name + ``os.replace``); returns the two paths.
    """
    from safetensors.numpy import save_file

    if not isinstance(result, LoRaQResult):
        raise TypeError(f"save_result expects a LoRaQResult, got {type(result).__name__}")
    stem = Path(path_stem)
    if not stem.parent.is_dir():
        raise FileNotFoundError(f"folder {str(stem.parent)!r} does not exist")
    arrays: dict[str, np.ndarray] = {}
    qmeta: dict = {}
    for prefix in ("main", "left", "right"):
        _qt_arrays(prefix, getattr(result, prefix), arrays, qmeta)
    if result.omega is not None:
        arrays["omega"] = np.ascontiguousarray(result.omega, dtype=np.float32)
    if result.smooth is not None:
        arrays["smooth"] = np.ascontiguousarray(result.smooth, dtype=np.float32)
    st_path = stem.with_name(stem.name + ".safetensors")
    js_path = stem.with_name(stem.name + ".json")
    with atomic_path(st_path, make_parents=False) as tmp:
        save_file(arrays, str(tmp))
    doc = {"version": FILE_VERSION, "metrics": result.metrics(), "quantized": qmeta,
           "history": [float(h) for h in result.history], "config": result.config}
    write_atomic(js_path, json.dumps(doc, indent=1) + "\n")
    return st_path, js_path


def read_meta(path_stem) -> dict:
    """The JSON document of a saved result (metrics, config, history)."""
    stem = Path(path_stem)
    js_path = stem.with_name(stem.name + ".json")
    with open(js_path, encoding="utf-8") as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or doc.get("version") != FILE_VERSION:
        raise ValueError(f"{str(js_path)!r} is not a LoRaQ result file of version {FILE_VERSION}")
    return doc


def load_result(path_stem) -> LoRaQResult:
    """Read a result written by ``save_result``; w_hat is recomputed from the codes."""
    from safetensors.numpy import load_file

    stem = Path(path_stem)
    doc = read_meta(stem)
    arrays = load_file(str(stem.with_name(stem.name + ".safetensors")))
    qmeta, m = doc["quantized"], doc["metrics"]
    main, left, right = (_qt_from(p, arrays, qmeta) for p in ("main", "left", "right"))
    smooth = arrays.get("smooth")
    return LoRaQResult(main=main, left=left, right=right, omega=arrays.get("omega"),
                       rank=int(m["rank"]), w_hat=reconstruct(main, left, right, smooth),
                       bits=int(m["bits"]), history=list(doc["history"]),
                       rel_error=float(m["rel_error"]), method=m["method"],
                       main_format=m["main_format"], branch_format=m["branch_format"],
                       steps=int(m["steps"]), converged=bool(m["converged"]), smooth=smooth,
                       output_rel_error=m["output_rel_error"], seconds=float(m["seconds"]),
                       config=doc["config"])
