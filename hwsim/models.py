"""Layer shapes of models, for the cost model (shapes only: no weights, no torch).

A model is a list of ``Layer(name, in_features, out_features, tokens, count,
kind, kernel)``: a linear layer y = x W^T with x: tokens x in_features and W:
out_features x in_features, repeated ``count`` times (once per transformer
block). ``kind="depthwise"`` is a depthwise convolution over ``out_features``
channels with ``kernel`` taps each (``in_features`` = ``out_features``).

Built-in models (``BUILTIN``), transformer blocks only (patch embedding,
timestep/caption embedders and the final layer are left out):

* ``pixart-sigma`` -- PixArt-Sigma XL-2, 28 blocks, hidden 1152. Self-attention
  q, k, v, out 1152->1152; cross-attention q, out 1152->1152 over the image
  tokens and k, v 1152->1152 over 300 text tokens; FFN 1152->4608->1152.
  4096 image tokens at 1024 px, 1024 at 512 px (tokens = (px / 16)^2).
* ``sana-1600m`` -- SANA 1600M, 20 blocks, hidden 2240. Linear self-attention
  q, k, v, out 2240->2240; cross-attention q, out 2240->2240 and k, v over 300
  text tokens; GLUMBConv: 1x1 conv 2240->11200, depthwise 3x3 over 11200
  channels, 1x1 conv 5600->2240. 1024 tokens at 1024 px (tokens = (px / 32)^2).

Model files
-----------
TOML or JSON: a table with ``layers``, each ``{name, in, out, tokens}`` plus
optional ``count`` (default 1), ``kind`` ("linear" or "depthwise") and
``kernel``; JSON may also be a bare list of ``[name, in, out, tokens]``.
A ``.safetensors`` file contributes every 2-D tensor of shape (out, in) as a
linear layer named after the tensor, with the ``tokens`` given by the caller
(only the header is read).
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Layer", "as_layer", "BUILTIN", "builtin_model", "load_model", "get_model"]

KINDS = ("linear", "depthwise")


def _int(what: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{what} must be an int, got {v!r}")
    if v < lo:
        raise ValueError(f"{what}={v} is not allowed; it must be >= {lo}")
    return v


@dataclass(frozen=True)
class Layer:
    """One layer's shape (see the module docstring)."""

    name: str
    in_features: int
    out_features: int
    tokens: int
    count: int = 1
    kind: str = "linear"
    kernel: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"layer name must be a non-empty string, got {self.name!r}")
        _int(f"layer {self.name!r}: in", self.in_features, 1)
        _int(f"layer {self.name!r}: out", self.out_features, 1)
        _int(f"layer {self.name!r}: tokens", self.tokens, 0)
        _int(f"layer {self.name!r}: count", self.count, 1)
        _int(f"layer {self.name!r}: kernel", self.kernel, 1)
        if self.kind not in KINDS:
            raise ValueError(f"layer {self.name!r}: kind={self.kind!r} is not one of {KINDS}")
        if self.kind == "depthwise" and self.in_features != self.out_features:
            raise ValueError(f"depthwise layer {self.name!r} needs in == out (channels), got "
                             f"{self.in_features} and {self.out_features}")

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in), the weight's shape."""
        return (self.out_features, self.in_features)


def as_layer(x) -> Layer:
    """A ``Layer`` from a Layer, a (name, in, out, tokens[, count]) sequence or a dict."""
    if isinstance(x, Layer):
        return x
    if isinstance(x, dict):
        known = {"name", "in", "out", "tokens", "count", "kind", "kernel"}
        bad = sorted(set(x) - known)
        if bad:
            raise ValueError(f"layer {x.get('name', x)!r} has unknown keys {bad}; allowed: {sorted(known)}")
        missing = [k for k in ("name", "in", "out", "tokens") if k not in x]
        if missing:
            raise ValueError(f"layer {x.get('name', x)!r} is missing {missing}")
        return Layer(x["name"], x["in"], x["out"], x["tokens"], x.get("count", 1),
                     x.get("kind", "linear"), x.get("kernel", 1))
    if isinstance(x, (list, tuple)) and len(x) in (4, 5):
        return Layer(*x)
    raise ValueError(f"a layer must be (name, in, out, tokens[, count]) or a table with those "
                     f"keys, got {x!r}")


def _attention(h: int, t: int, txt: int, n: int) -> list[Layer]:
    """Self-attention q, k, v, out over t image tokens, then cross-attention whose k and v
    project txt text tokens, all h -> h, in each of n blocks."""
    return [
        Layer("attn1.to_q", h, h, t, n), Layer("attn1.to_k", h, h, t, n),
        Layer("attn1.to_v", h, h, t, n), Layer("attn1.to_out", h, h, t, n),
        Layer("attn2.to_q", h, h, t, n), Layer("attn2.to_k", h, h, txt, n),
        Layer("attn2.to_v", h, h, txt, n), Layer("attn2.to_out", h, h, t, n),
    ]


def _pixart(t: int) -> list[Layer]:
    txt, h, n = 300, 1152, 28
    return _attention(h, t, txt, n) + [
        Layer("ff.fc1", h, 4 * h, t, n), Layer("ff.fc2", 4 * h, h, t, n),
    ]


def _sana(t: int) -> list[Layer]:
    txt, h, n = 300, 2240, 20
    return _attention(h, t, txt, n) + [
        Layer("ff.conv_inverted", h, 5 * h, t, n),
        Layer("ff.conv_depth", 5 * h, 5 * h, t, n, "depthwise", 9),
        Layer("ff.conv_point", 5 * h // 2, h, t, n),
    ]


# name -> (layers from image tokens, latent pixels per token side)
BUILTIN = {"pixart-sigma": (_pixart, 16), "sana-1600m": (_sana, 32)}
_ALIASES = {"pixart": "pixart-sigma", "pixart-sigma-xl-2": "pixart-sigma", "sana": "sana-1600m",
            "sana-1600": "sana-1600m", "sana1600m": "sana-1600m"}


def builtin_model(name: str, resolution: int = 1024, tokens: int | None = None) -> list[Layer]:
    """Layers of a built-in model at ``resolution`` px (a multiple of 32, >= 32).

    ``tokens`` overrides the image-token count (text tokens stay 300).
    """
    key = _ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
    if key not in BUILTIN:
        raise ValueError(f"unknown model {name!r}; built-in models: {sorted(BUILTIN)}, or a "
                         ".toml / .json / .safetensors file")
    _int("resolution", resolution, 32)
    if resolution % 32:
        raise ValueError(f"resolution={resolution} must be a multiple of 32 px")
    build, patch = BUILTIN[key]
    t = (resolution // patch) ** 2 if tokens is None else _int("tokens", tokens, 0)
    return build(t)


def load_model(path, tokens: int | None = None) -> list[Layer]:
    """Layers from a TOML / JSON model file or a safetensors file (see the module docstring).

    ``tokens`` is required for safetensors and, when given, overrides the
    tokens of every layer of a TOML / JSON file.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model file {str(p)!r} does not exist")
    if tokens is not None:
        _int("tokens", tokens, 0)
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        if tokens is None:
            raise ValueError(f"model file {str(p)!r} is a safetensors file: give the token count "
                             "(--tokens)")
        return _from_safetensors(p, tokens)
    try:
        text = p.read_text(encoding="utf-8")
        if suffix == ".toml":
            import tomllib
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ValueError(f"model file {str(p)!r} must end in .toml, .json or .safetensors")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"model file {str(p)!r} is malformed: {exc}") from None
    except Exception as exc:
        if type(exc).__name__ == "TOMLDecodeError":
            raise ValueError(f"model file {str(p)!r} is malformed: {exc}") from None
        raise
    entries = data.get("layers") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"model file {str(p)!r} must hold a non-empty list 'layers' of "
                         "{name, in, out, tokens} entries")
    layers = []
    for i, e in enumerate(entries):
        try:
            lay = as_layer(e)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"model file {str(p)!r}, layer {i}: {exc}") from None
        if tokens is not None:
            lay = Layer(lay.name, lay.in_features, lay.out_features, tokens, lay.count, lay.kind,
                        lay.kernel)
        layers.append(lay)
    return layers


def _from_safetensors(p: Path, tokens: int) -> list[Layer]:
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"safetensors file {str(p)!r} is malformed: shorter than 8 bytes")
        (n,) = struct.unpack("<Q", head)
        size = p.stat().st_size
        if n > size - 8 or n > 100 * 1024 * 1024:
            raise ValueError(f"safetensors file {str(p)!r} is malformed: header length {n} exceeds "
                             f"the file ({size} bytes)")
        blob = f.read(n)
    try:
        header = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"safetensors file {str(p)!r} is malformed: {exc}") from None
    if not isinstance(header, dict):
        raise ValueError(f"safetensors file {str(p)!r} is malformed: the header is not a table")
    layers = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        shape = meta.get("shape") if isinstance(meta, dict) else None
        if not isinstance(shape, list):
            raise ValueError(f"safetensors file {str(p)!r} is malformed: tensor {name!r} has no shape")
        if len(shape) == 2 and all(isinstance(d, int) and d >= 1 for d in shape):
            layers.append(Layer(name, shape[1], shape[0], tokens))
    if not layers:
        raise ValueError(f"safetensors file {str(p)!r} has no 2-D tensors to cost")
    return layers


def get_model(spec, resolution: int = 1024, tokens: int | None = None) -> list[Layer]:
    """A built-in model name or a path to a model file."""
    s = str(spec)
    if s.lower().endswith((".toml", ".json", ".safetensors")) or Path(s).is_file():
        return load_model(s, tokens)
    return builtin_model(s, resolution, tokens)
