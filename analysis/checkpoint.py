"""``save_quantized`` / ``load_quantized``: a quantized model as a safetensors checkpoint.

The format (version ``FORMAT_VERSION``) is layout-neutral, so that another runtime can
read it; docs/checkpoint.md specifies it. A checkpoint is a directory::

    quantization.json      format name and version, the recipe(s), the model's class,
                           per quantized layer its formats, shapes and tensor names,
                           and the SHA-256 of every tensor; written last
    quantized.safetensors  every tensor (safetensors: a JSON header, then raw bytes)
    config.json            the model's own config (diffusers / transformers models)

Per quantized layer ``<name>`` (an ``nn.Linear`` or 1 x 1 ``nn.Conv2d``, out x in):

    <name>.main.codes     uint8: Q1(P)'s element codes, row-major (C order of out x in),
                          bit-packed least significant bit first (two 4-bit codes a
                          byte, the first in the low nibble; 6-bit codes four in three
                          bytes; 8-bit codes one a byte; fp16 codes two bytes, little
                          endian); the last byte is zero-padded
    <name>.main.scales    the block scales, (out, blocks): E8M0 / E4M3 codes as uint8
                          (MX, NVFP4), or the scale values in their own dtype (fp16
                          for SINT)
    <name>.main.tensor_scale   NVFP4's fp32 per-tensor scale, shape (1,)
    <name>.left.*         Q2(L Omega), out x r, the same fields (quantized along r)
    <name>.right.*        Q2(Omega^T R), r x in, the same fields (quantized along in)
    <name>.smooth         float32 (in,): the smoothing divisor s (x is divided by it)
    <name>.bias           float32 (out,)

Every other entry of the model's ``state_dict`` is stored as it is, under its own key
and dtype. Saving is atomic: each file is written to a temporary name and renamed, and
``quantization.json`` comes last, so a directory with it is complete. Loading checks
every tensor's presence, dtype, shape and SHA-256 and names the file and the tensor
that is wrong; files that are not safetensors (pickles included) are refused unread.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

import numfmt
from numfmt.fileio import atomic_path, write_json_atomic
from numfmt.qtensor import QTensor

from analysis.files import read_json, safetensors_kind
from analysis.layers import QuantConv1x1, QuantLinear
from analysis.models.base import is_pointwise_conv
from analysis.quantize import quantized_layers, swap
from analysis.recipe import Recipe

__all__ = ["save_quantized", "load_quantized", "read_checkpoint", "checkpoint_bytes", "FORMAT", "FORMAT_VERSION",
           "MANIFEST", "TENSORS"]

FORMAT = "loraq-quantized"
FORMAT_VERSION = 1
MANIFEST = "quantization.json"
TENSORS = "quantized.safetensors"


# --------------------------------------------------------------------------- saving


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                          ).hexdigest()


def _qt_entry(key: str, q: QTensor, tensors: dict) -> dict:
    fmt = q.format
    if numfmt.get(fmt.name) != fmt:
        raise ValueError(f"format {fmt.name!r} has overridden parameters; only registered "
                         f"formats can be saved (known: {', '.join(numfmt.formats())})")
    tensors[f"{key}.codes"] = torch.from_numpy(q.pack())
    entry = {"format": fmt.name, "shape": list(q.shape), "axis": int(q.axis),
             "element_bits": int(fmt.bits), "codes": f"{key}.codes", "scales": None,
             "tensor_scale": None}
    if q.scales is not None:
        tensors[f"{key}.scales"] = torch.from_numpy(np.ascontiguousarray(q.scales))
        entry["scales"] = f"{key}.scales"
    if q.tensor_scale is not None:
        tensors[f"{key}.tensor_scale"] = torch.tensor([float(q.tensor_scale)],
                                                      dtype=torch.float32)
        entry["tensor_scale"] = f"{key}.tensor_scale"
    return entry


def _model_info(model: nn.Module) -> dict:
    """Which library can rebuild ``model`` from its config (None: ``load_quantized`` needs
    ``model=``)."""
    try:
        import diffusers
        if isinstance(model, diffusers.ModelMixin):
            return {"library": "diffusers", "class": type(model).__name__}
    except ImportError:  # pragma: no cover - diffusers is a dependency
        pass
    try:
        import transformers
        if isinstance(model, transformers.PreTrainedModel):
            return {"library": "transformers", "class": type(model).__name__}
    except ImportError:  # pragma: no cover
        pass
    from analysis.minilm import MiniLM
    if isinstance(model, MiniLM):
        return {"library": "builtin", "class": "minilm"}
    return {"library": None, "class": type(model).__name__}


def _write_config(model: nn.Module, info: dict, out: Path) -> None:
    """The model's own config.json (diffusers: with ``_class_name``), atomically."""
    if info["library"] == "diffusers":
        doc = json.loads(model.to_json_string())
    elif info["library"] == "transformers":
        doc = json.loads(model.config.to_json_string())
    else:
        return
    write_json_atomic(out / "config.json", doc, sort_keys=True)


def save_quantized(model, directory, provenance: dict | None = None) -> Path:
    """Write the quantized ``model`` (after ``quantize_``) to ``directory``; returns it.

    ``model``: an ``nn.Module`` with ``QuantLinear`` layers, or a dict {name: QuantLinear}
    (a weights-only quantization). ``provenance``: JSON-able facts recorded in the
    manifest (``loraq quantize`` records the source and its settings). See the module
    docstring for the layout.
    """
    from safetensors.torch import save_file

    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"checkpoint path {str(out)!r} exists and is not a directory")
    if isinstance(model, dict):
        qlayers, state, info = dict(model), {}, {"library": "weights", "class": None}
    else:
        qlayers = quantized_layers(model)
        prefixes = tuple(n + "." for n in qlayers)
        state = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
        info = _model_info(model)
    if not qlayers:
        raise ValueError("the model holds no quantized layers (QuantLinear); run "
                         "analysis.quantize_(model, recipe) first")
    tensors: dict[str, torch.Tensor] = {}
    layers, recipes = {}, {}
    for name, q in qlayers.items():
        rec = getattr(q, "recipe", None)
        if rec is not None:
            recipes[rec.name] = rec.to_dict()
        layers[name] = {
            "kind": "conv1x1" if isinstance(q, QuantConv1x1) else "linear",
            "in_features": q.in_features, "out_features": q.out_features, "rank": q.rank,
            "mode": q.mode, "recipe": None if rec is None else rec.name,
            "main_act": q.main_act.name,
            "branch_act": None if q.branch_act is None else q.branch_act.name,
            "main": _qt_entry(f"{name}.main", q.main_q, tensors),
            "left": None if not q.rank else _qt_entry(f"{name}.left", q.left_q, tensors),
            "right": None if not q.rank else _qt_entry(f"{name}.right", q.right_q, tensors),
            "smooth": None, "bias": None}
        for part in ("smooth", "bias"):
            t = getattr(q, part)
            if t is not None:
                tensors[f"{name}.{part}"] = t.detach().cpu().to(torch.float32).contiguous()
                layers[name][part] = f"{name}.{part}"
    for k, v in state.items():
        if k in tensors:
            raise ValueError(f"parameter {k!r} collides with a quantized tensor's name")
        tensors[k] = v.detach().cpu().contiguous().clone()
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": info,
                "recipe": next(iter(recipes.values())) if len(recipes) == 1 else None,
                "recipes": recipes, "provenance": provenance, "layers": layers, "unquantized": sorted(state),
                "tensors": {k: {"dtype": str(t.dtype).removeprefix("torch."),
                                "shape": list(t.shape), "sha256": _sha(t)}
                            for k, t in tensors.items()}}
    out.mkdir(parents=True, exist_ok=True)
    if not isinstance(model, dict):
        _write_config(model, info, out)
    with atomic_path(out / TENSORS) as tmp:
        # one metadata entry: safetensors keeps it in a hash map, whose order (and so the
        # file's bytes) would change from run to run with two
        save_file(tensors, str(tmp), metadata={"format": f"{FORMAT}/{FORMAT_VERSION}"})
    write_json_atomic(out / MANIFEST, manifest)
    return out


def checkpoint_bytes(directory) -> dict:
    """Bytes of a checkpoint by kind: ``quantized`` (the element codes, scales and tensor
    scales of main and branch matrices: what ``hwsim.cost`` counts), ``smooth_bias``,
    ``unquantized`` (other parameters), ``header`` (safetensors' JSON header) and
    ``files`` (the size of each file)."""
    d = Path(directory)
    man = _manifest(d)
    quant, extra = set(), set()
    for L in man["layers"].values():
        for part in ("main", "left", "right"):
            e = L[part]
            if e is not None:
                quant.update(k for k in (e["codes"], e["scales"], e["tensor_scale"]) if k)
        extra.update(k for k in (L["smooth"], L["bias"]) if k)

    def size(keys):
        tot = 0
        for k in keys:
            t = man["tensors"][k]
            tot += math.prod(t["shape"]) * torch.empty(0, dtype=getattr(torch, t["dtype"])
                                                       ).element_size()
        return tot

    files = {p.name: p.stat().st_size for p in sorted(d.iterdir()) if p.is_file()}
    with open(d / TENSORS, "rb") as f:
        header = int.from_bytes(f.read(8), "little") + 8
    return {"quantized": size(quant), "smooth_bias": size(extra),
            "unquantized": size(man["unquantized"]), "header": header, "files": files}


# --------------------------------------------------------------------------- loading


def _manifest(d: Path) -> dict:
    if not d.is_dir():
        raise FileNotFoundError(f"quantized checkpoint {str(d)!r} is not a directory")
    p = d / MANIFEST
    if not p.is_file():
        raise ValueError(f"{str(d)!r} is not a quantized checkpoint: {MANIFEST} is missing "
                         "(save_quantized writes it last; an interrupted save leaves none)")
    man = read_json(p, "the manifest")
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise ValueError(f"{str(p)!r} is not a {FORMAT} manifest")
    if man.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{str(p)!r} has format version {man.get('format_version')!r}; this "
                         f"toolkit reads version {FORMAT_VERSION}")
    for k in ("model", "layers", "tensors", "unquantized", "recipes"):
        if k not in man:
            raise ValueError(f"{str(p)!r} is damaged: its field {k!r} is missing")
    return man


def _read_tensors(d: Path, man: dict) -> dict:
    from safetensors import SafetensorError, safe_open

    p = d / TENSORS
    if not p.is_file():
        raise FileNotFoundError(f"{str(p)!r} is missing")
    if safetensors_kind(p) == "pickle":
        raise ValueError(f"refusing {str(p)!r}: it is a pickle (torch.save), and unpickling can "
                         "run arbitrary code; only safetensors files are read")
    out = {}
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            have = set(f.keys())
            for k, spec in man["tensors"].items():
                if k not in have:
                    raise ValueError(f"{str(p)!r}: tensor {k!r} is missing")
                t = f.get_tensor(k)
                want = (spec["dtype"], list(spec["shape"]))
                got = (str(t.dtype).removeprefix("torch."), list(t.shape))
                if got != want:
                    raise ValueError(f"{str(p)!r}: tensor {k!r} is {got[0]} {got[1]}, the manifest "
                                     f"says {want[0]} {want[1]}")
                if _sha(t) != spec["sha256"]:
                    raise ValueError(f"{str(p)!r}: tensor {k!r} is damaged (its SHA-256 does not "
                                     "match the manifest)")
                out[k] = t
    except SafetensorError as exc:
        raise ValueError(f"{str(p)!r} is damaged or truncated: not a readable safetensors file "
                         f"({str(exc).splitlines()[0]})") from None
    return out


def _qtensor(entry: dict | None, tensors: dict, where: str) -> QTensor | None:
    if entry is None:
        return None
    try:
        fmt = numfmt.get(entry["format"])
        scales = None if entry["scales"] is None else tensors[entry["scales"]].numpy()
        ts = None if entry["tensor_scale"] is None else \
            np.float32(tensors[entry["tensor_scale"]].numpy()[0])
        q = QTensor.unpack(tensors[entry["codes"]].numpy(), fmt, entry["shape"],
                           axis=entry["axis"], scales=scales, tensor_scale=ts)
        q.check_codes()
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"{where}: {exc}") from None
    return q


def _build_model(d: Path, info: dict) -> nn.Module:
    lib, cls = info.get("library"), info.get("class")
    if lib == "diffusers":
        import diffusers
        c = getattr(diffusers, str(cls), None)
        if not (isinstance(c, type) and issubclass(c, diffusers.ModelMixin)):
            raise ValueError(f"{str(d / MANIFEST)!r}: {cls!r} is not a diffusers model class")
        return c.from_config(c.load_config(str(d), local_files_only=True))
    if lib == "transformers":
        import transformers
        cfg = transformers.AutoConfig.from_pretrained(str(d), local_files_only=True,
                                                      trust_remote_code=False)
        c = getattr(transformers, str(cls), None)
        if not (isinstance(c, type) and issubclass(c, transformers.PreTrainedModel)):
            raise ValueError(f"{str(d / MANIFEST)!r}: {cls!r} is not a transformers model class")
        return c(cfg)
    if lib == "builtin" and cls == "minilm":
        from analysis.minilm import MiniLM
        return MiniLM()
    raise ValueError(f"{str(d)!r} holds a {cls!r} model that cannot be rebuilt from a config; "
                     "pass model= (a module of the same architecture)")


def _check_target(model: nn.Module, name: str, L: dict, where: str) -> None:
    try:
        m = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{where}: the model has no layer {name!r}") from None
    shape = (m.out_features, m.in_features) if isinstance(m, (nn.Linear, QuantLinear)) else (
        (m.out_channels, m.in_channels) if is_pointwise_conv(m) else None)
    if shape != (L["out_features"], L["in_features"]):
        raise ValueError(f"{where}: layer {name!r} of the model is {type(m).__name__} "
                         f"{shape}, the checkpoint holds out x in = {L['out_features']} x "
                         f"{L['in_features']}")


def load_quantized(directory, model: nn.Module | None = None, *, mode: str | None = None):
    """The quantized model of a checkpoint written by ``save_quantized``.

    ``model``: None (rebuild it from ``config.json``: a diffusers or transformers class,
    never remote code, or the built-in MiniLM) or a module of the same architecture,
    whose layers are replaced and whose other parameters are overwritten. A weights-only
    checkpoint gives {name: QuantLinear}. ``mode``: ``fast`` / ``exact`` (default: as
    saved). Errors name the file and the tensor.
    """
    d = Path(directory)
    man, tensors, qmods = read_checkpoint(d, mode)
    info = man["model"]
    if info.get("library") == "weights":
        return qmods
    model = _build_model(d, info) if model is None else model
    for name, L in man["layers"].items():
        _check_target(model, name, L, str(d / TENSORS))
    swap(model, qmods)
    prefixes = tuple(n + "." for n in qmods)
    expected = {k for k in model.state_dict() if not k.startswith(prefixes)}
    stored = set(man["unquantized"])
    if expected != stored:
        miss, extra = sorted(expected - stored), sorted(stored - expected)
        raise ValueError(f"{str(d / TENSORS)!r} does not fit the model: "
                         + (f"tensor {miss[0]!r} is missing ({len(miss)} in all)" if miss else
                            f"tensor {extra[0]!r} belongs to no parameter of the model "
                            f"({len(extra)} in all)"))
    model.load_state_dict({k: tensors[k] for k in stored}, strict=False, assign=True)
    return model.eval()


def read_checkpoint(directory, mode: str | None = None) -> tuple[dict, dict, dict]:
    """(manifest, {key: tensor}, {layer name: QuantLinear}) of a checkpoint, every tensor
    checked (presence, dtype, shape, SHA-256) and every layer rebuilt."""
    d = Path(directory)
    man = _manifest(d)
    tensors = _read_tensors(d, man)
    recipes = {}
    for n, r in man["recipes"].items():
        try:
            recipes[n] = Recipe.from_dict(r)
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"{str(d / MANIFEST)!r}: recipe {n!r} is damaged: {exc}") from None
    qmods = {}
    for name, L in man["layers"].items():
        where = f"{str(d / TENSORS)!r}, layer {name!r}"
        main, left, right = (_qtensor(L[p], tensors, f"{where} ({p})")
                             for p in ("main", "left", "right"))
        cls = QuantConv1x1 if L["kind"] == "conv1x1" else QuantLinear
        try:
            q = cls(main, L["main_act"], left=left, right=right, branch_act=L["branch_act"],
                    bias=None if L["bias"] is None else tensors[L["bias"]],
                    smooth=None if L["smooth"] is None else tensors[L["smooth"]].numpy(),
                    mode=mode or L["mode"], name=name)
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"{where}: {exc}") from None
        q.recipe = recipes.get(L["recipe"])
        qmods[name] = q
    return man, tensors, qmods
