"""Model sources: the built-in models, users' diffusers / transformers directories, a
safetensors file. ``resolve(spec, ...)`` picks one; each returns a ``ModelSource``.

* ``dit-digits`` (the default): the built-in diffusion transformer
  (``analysis.models.dit_digits``), generation metrics.
* ``minilm``: the built-in all-MiniLM-L6-v2 (transformers' BertModel).
* a directory with ``config.json``:

  - a diffusers transformer (``_class_name`` one of ``DIFFUSERS_CLASSES``),
    loaded with ``<class>.from_pretrained(dir, local_files_only=True,
    use_safetensors=True)``; inputs from ``--inputs`` (see ``INPUT_KEYS``) or
    seeded Gaussian latents and condition sequences at a DPM-Solver++
    scheduler's timesteps; end metric: SQNR of the predicted noise per timestep;
  - a transformers model (``model_type`` in config.json): ``AutoModel`` (an
    encoder) or ``AutoModelForCausalLM`` (an architecture named ``*ForCausalLM``),
    ``from_pretrained(dir, local_files_only=True, use_safetensors=True)``, never
    with remote code; inputs: the directory's tokenizer on the shipped
    sentences; end metric: cosine of the last hidden state (encoder) or the KL
    divergence of the next-token distribution (causal LM).
* a ``.safetensors`` file: all-MiniLM-L6-v2 weights run the full analysis;
  any other weights are analyzed weights-only.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from analysis.files import (PICKLE_SUFFIXES, arrays_sha256, dir_sha256, read_json,
                            require_safetensors)
from analysis.models.base import (ModelSource, NextTokenKL, OutputCosine, OutputSQNR,
                                  quantizable_layers)

__all__ = ["resolve", "DIFFUSERS_CLASSES", "INPUT_KEYS", "BUILTIN", "load_inputs"]

BUILTIN = ("dit-digits", "minilm")
DIFFUSERS_CLASSES = ("PixArtTransformer2DModel", "SanaTransformer2DModel", "DiTTransformer2DModel")
# --inputs file keys (safetensors): N samples, each at its own timestep.
INPUT_KEYS = {
    "latents": "(N, C, H, W) float: the transformer's input latents x_t (C = in_channels)",
    "timesteps": "(N,) int or float: the timestep of each latent",
    "encoder_hidden_states": "(N, L, caption_channels) float: the condition sequence "
                             "(PixArt, SANA)",
    "encoder_attention_mask": "(N, L) 0/1, optional (PixArt, SANA)",
    "class_labels": "(N,) int: class ids (DiT)",
}
DEFAULT_TIMESTEPS = 4
DEFAULT_SAMPLES = 4


def resolve(spec: str, *, inputs: str | None = None, samples: int | None = None,
            sample_steps: int | None = None, max_sentences: int | None = None,
            sentences=None, timesteps: int | None = None, seed: int = 0,
            guidance: float | None = None) -> ModelSource:
    """The ``ModelSource`` for ``--model spec`` (see the module docstring).

    Raises FileNotFoundError / ValueError (one line each) for a missing path, a
    directory without config.json, an unsupported class, a pickle-only
    checkpoint, or a bad ``--inputs`` file.
    """
    _quiet_libraries()
    if inputs is not None and spec in BUILTIN:
        raise ValueError(f"--inputs applies to a diffusers directory, not to the built-in {spec!r}")
    if spec == "dit-digits":
        from analysis.models.dit_digits.source import dit_digits_source
        return dit_digits_source(samples=samples, sample_steps=sample_steps, seed=seed,
                                 guidance=guidance)
    if samples is not None or guidance is not None or sample_steps is not None:
        raise ValueError("--samples, --sample-steps and --guidance apply to the built-in "
                         "dit-digits model only")
    if spec == "minilm":
        from analysis.models.minilm_source import minilm_source
        return minilm_source(max_sentences=max_sentences, sentences=sentences)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"model {spec!r} does not exist; give one of {', '.join(BUILTIN)}, "
                                "a model directory with config.json, or a .safetensors file")
    if path.is_dir():
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise ValueError(f"model directory {spec!r} has no config.json; a diffusers or "
                             "transformers model directory (save_pretrained) is needed")
        cfg = read_json(cfg_path, "model config")
        if not isinstance(cfg, dict):
            raise ValueError(f"{cfg_path} must hold a JSON object")
        _check_safetensors(path)
        cls = cfg.get("_class_name")
        if cls is not None:
            if cls not in DIFFUSERS_CLASSES:
                raise ValueError(f"model class {cls!r} in {cfg_path} is not supported; supported "
                                 f"diffusers classes: {', '.join(DIFFUSERS_CLASSES)} (or a "
                                 "transformers model)")
            if max_sentences is not None or sentences is not None:
                raise ValueError("--sentences / --max-sentences apply to text models only")
            return _diffusers_source(path, cls, cfg, inputs, timesteps, seed)
        if "model_type" in cfg:
            if inputs is not None:
                raise ValueError("--inputs applies to a diffusers directory; a transformers model "
                                 "uses its tokenizer on the shipped sentences")
            return _transformers_source(path, cfg, max_sentences, sentences)
        raise ValueError(f"{cfg_path} names neither a diffusers class (_class_name: one of "
                         f"{', '.join(DIFFUSERS_CLASSES)}) nor a transformers model_type")
    if inputs is not None:
        raise ValueError("--inputs applies to a diffusers model directory")
    return _weights_source(path, spec, max_sentences, sentences)


def _quiet_libraries() -> None:
    """diffusers / transformers log advice (accelerate, dtype casts) to stderr; a command's
    error must stay one line, so only their errors are shown."""
    try:
        from diffusers.utils import logging as dlog
        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
    except ImportError:
        pass
    try:
        from transformers.utils import logging as tlog
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:
        pass


def _check_safetensors(directory: Path) -> None:
    if any(directory.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise ValueError(f"model directory {str(directory)!r} holds only pickled weights "
                         f"({', '.join(pickled[:3])}); they are refused because unpickling can "
                         "run arbitrary code: convert them with save_pretrained("
                         "safe_serialization=True)")
    raise ValueError(f"model directory {str(directory)!r} has no .safetensors weights")


# --------------------------------------------------------------------------- weights file


def _weights_source(path: Path, spec: str, max_sentences, sentences) -> ModelSource:
    from analysis import minilm

    if not path.is_file():
        raise ValueError(f"model path {spec!r} is not a file or a model directory")
    try:
        require_safetensors(path, "model file")
    except ValueError as exc:
        raise ValueError(f"{exc}; allowed: {', '.join(BUILTIN)}, a model directory or a "
                         ".safetensors file") from None
    weights = minilm.load_weights(path)
    try:
        minilm.MiniLM().load_weights(weights, source=spec)
    except ValueError:
        if max_sentences is not None or sentences is not None:
            raise ValueError("--sentences / --max-sentences need a runnable model; "
                             f"{spec!r} is analyzed weights-only") from None
        mats = {k: v for k, v in weights.items() if getattr(v, "ndim", 0) == 2
                and np.issubdtype(v.dtype, np.floating)}
        return ModelSource(name=f"{spec} (weights only)", kind="weights",
                           fingerprint=arrays_sha256(weights), weights=mats,
                           layers=list(mats))
    from analysis.models.minilm_source import minilm_source
    src = minilm_source(max_sentences=max_sentences, sentences=sentences, path=path)
    src.name = f"all-MiniLM-L6-v2 weights from {spec}"
    src.fingerprint = arrays_sha256(weights)
    return src


# --------------------------------------------------------------------------- diffusers


def _diffusers_kwargs(cls: str, cfg: dict, latents, t, cond=None, mask=None, labels=None) -> dict:
    kw = {"hidden_states": latents, "timestep": t, "return_dict": False}
    if cls == "DiTTransformer2DModel":
        kw["class_labels"] = labels
        return kw
    kw["encoder_hidden_states"] = cond
    if mask is not None:
        kw["encoder_attention_mask"] = mask
    if cls == "PixArtTransformer2DModel":
        if cfg.get("use_additional_conditions") or (cfg.get("use_additional_conditions") is None
                                                    and cfg.get("sample_size") == 128):
            b = latents.shape[0]
            h, w = latents.shape[-2:]
            kw["added_cond_kwargs"] = {
                "resolution": torch.tensor([[h * 8.0, w * 8.0]]).repeat(b, 1),
                "aspect_ratio": torch.tensor([[h / w]]).repeat(b, 1)}
        else:
            kw["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    if cls == "SanaTransformer2DModel" and cfg.get("guidance_embeds"):
        kw["guidance"] = torch.full((latents.shape[0],), 4.5)
    return kw


class _Wrapped(torch.nn.Module):
    """Calls a diffusers transformer with a batch dict and returns the output tensor."""

    def __init__(self, model, cls: str, cfg: dict):
        super().__init__()
        self.model = model
        self._cls, self._cfg = cls, cfg

    def forward(self, **batch):
        kw = _diffusers_kwargs(self._cls, self._cfg, batch["latents"], batch["timesteps"],
                               batch.get("encoder_hidden_states"),
                               batch.get("encoder_attention_mask"), batch.get("class_labels"))
        return self.model(**kw)[0]


def _expected_shapes(cls: str, cfg: dict) -> dict:
    c = int(cfg.get("in_channels", 4))
    out = {"latents": ("N", c, "H", "W"), "timesteps": ("N",)}
    if cls == "DiTTransformer2DModel":
        out["class_labels"] = ("N",)
    else:
        cap = cfg.get("caption_channels") or cfg.get("cross_attention_dim")
        out["encoder_hidden_states"] = ("N", "L", int(cap))
    return out


def load_inputs(path: str, cls: str, cfg: dict) -> dict[str, torch.Tensor]:
    """Read and check an ``--inputs`` safetensors file for a diffusers class.

    ValueError names a missing key or a wrong shape with the expected one.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--inputs file {path!r} does not exist")
    try:
        data = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"--inputs file {path!r} is not a safetensors file: {exc}") from None
    exp = _expected_shapes(cls, cfg)
    for key, shape in exp.items():
        if key not in data:
            raise ValueError(f"--inputs file {path!r} lacks key {key!r}: expected "
                             f"{INPUT_KEYS[key]}; shape {shape}")
    lat = data["latents"]
    if lat.dim() != 4 or lat.shape[0] < 2:
        raise ValueError(f"--inputs key 'latents' has shape {tuple(lat.shape)}, expected "
                         f"{exp['latents']} with N >= 2 samples")
    n = int(lat.shape[0])
    patch = int(cfg.get("patch_size") or 1)
    for key, shape in exp.items():
        t = data[key]
        bad = (t.dim() != len(shape) or t.shape[0] != n
               or any(isinstance(s, int) and s != d for s, d in zip(shape, t.shape)))
        if key == "latents" and not bad:
            bad = bool(t.shape[2] % patch or t.shape[3] % patch)
        if bad:
            want = tuple(n if s == "N" else s for s in shape)
            raise ValueError(f"--inputs key {key!r} has shape {tuple(t.shape)}, expected {want}"
                             + (f" with H, W multiples of the patch size {patch}"
                                if key == "latents" else ""))
    if "encoder_attention_mask" in data:
        m = data["encoder_attention_mask"]
        want = (n, data["encoder_hidden_states"].shape[1])
        if tuple(m.shape) != want:
            raise ValueError(f"--inputs key 'encoder_attention_mask' has shape {tuple(m.shape)}, "
                             f"expected {want}")
    return data


def _gaussian_inputs(cls: str, cfg: dict, timesteps: int, samples: int, seed: int) -> dict:
    """Seeded N(0, 1) latents and condition sequences at DPM-Solver++'s timesteps."""
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000)
    sched.set_timesteps(timesteps)
    ts = [int(t) for t in sched.timesteps]
    g = torch.Generator().manual_seed(seed)
    c = int(cfg.get("in_channels", 4))
    size = int(cfg.get("sample_size") or 32)
    n = samples * len(ts)
    data = {"latents": torch.randn(n, c, size, size, generator=g),
            "timesteps": torch.tensor(ts).repeat_interleave(samples)}
    if cls == "DiTTransformer2DModel":
        ncls = int(cfg.get("num_embeds_ada_norm") or 1000)
        data["class_labels"] = torch.randint(0, ncls, (n,), generator=g)
    else:
        cap = int(cfg.get("caption_channels") or cfg.get("cross_attention_dim"))
        data["encoder_hidden_states"] = torch.randn(n, 16, cap, generator=g)
    return data


def _split_by_timestep(data: dict, keys) -> tuple[list, list]:
    """(batches, timestep labels): one batch per distinct timestep, in descending order."""
    ts = data["timesteps"]
    batches, groups = [], []
    for t in sorted({float(v) for v in ts.tolist()}, reverse=True):
        idx = (ts.to(torch.float64) == t).nonzero().flatten()
        b = {k: data[k][idx] for k in keys if k in data}
        b["latents"] = b["latents"].to(torch.float32)
        if "encoder_hidden_states" in b:
            b["encoder_hidden_states"] = b["encoder_hidden_states"].to(torch.float32)
        batches.append(b)
        groups.append(int(t) if t == int(t) else t)
    return batches, groups


def _diffusers_source(path: Path, cls: str, cfg: dict, inputs, timesteps, seed) -> ModelSource:
    import diffusers

    data = None
    if inputs is not None:
        if timesteps is not None:
            raise ValueError("--timesteps applies to generated inputs; an --inputs file brings "
                             "its own timesteps")
        data = load_inputs(inputs, cls, cfg)  # checked before the model is loaded
    model_cls = getattr(diffusers, cls)
    try:
        model = model_cls.from_pretrained(str(path), local_files_only=True, use_safetensors=True,
                                          torch_dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, TypeError) as exc:
        raise ValueError(f"{cls}.from_pretrained({str(path)!r}) failed: "
                         f"{str(exc).splitlines()[0][:300]}") from None
    model = model.to(torch.float32).eval().requires_grad_(False)
    keys = ("latents", "timesteps", "encoder_hidden_states", "encoder_attention_mask",
            "class_labels")
    notes = []
    if data is not None:
        n = data["latents"].shape[0]
        idx = torch.arange(n)
        cal = {k: v[idx % 2 == 0] for k, v in data.items()}
        ev = {k: v[idx % 2 == 1] for k, v in data.items()}
        cal_b, _ = _split_by_timestep(cal, keys)
        ev_b, groups = _split_by_timestep(ev, keys)
        desc = f"captured inputs from {inputs}"
        cal_desc = f"{len(idx[::2])} captured samples (even indices)"
        ev_desc = f"{len(idx[1::2])} captured samples (odd indices) at {len(groups)} timesteps"
    else:
        nt = DEFAULT_TIMESTEPS if timesteps is None else timesteps
        if not isinstance(nt, int) or nt < 1:
            raise ValueError(f"--timesteps={nt!r} must be an int >= 1")
        cal_b, _ = _split_by_timestep(_gaussian_inputs(cls, cfg, nt, DEFAULT_SAMPLES, seed), keys)
        ev_b, groups = _split_by_timestep(
            _gaussian_inputs(cls, cfg, nt, DEFAULT_SAMPLES, seed + 1), keys)
        desc = "seeded Gaussian latents and condition sequences"
        notes.append(f"No --inputs file was given: the inputs are seeded Gaussian latents and "
                     f"condition sequences (N(0, 1)) at {nt} DPM-Solver++ timesteps, not a "
                     "pipeline's real activations; capture real ones with "
                     "analysis.models.capture.capture_inputs for representative errors.")
        cal_desc = f"{DEFAULT_SAMPLES} Gaussian samples x {nt} timesteps (seed {seed})"
        ev_desc = f"{DEFAULT_SAMPLES} Gaussian samples x {nt} timesteps (seed {seed + 1})"
    wrapped = _Wrapped(model, cls, cfg).eval()
    names, skipped = quantizable_layers(wrapped)
    return ModelSource(
        name=f"{cls} from {path}", kind="diffusers", fingerprint=dir_sha256(path),
        module=wrapped, layers=names, skipped=skipped, calibration=cal_b, evaluation=ev_b,
        groups=groups, end_metric=OutputSQNR(groups), notes=notes,
        calibration_desc=cal_desc, evaluation_desc=ev_desc,
        extra={"inputs": desc}, artifact="model")


# --------------------------------------------------------------------------- transformers


def _transformers_source(path: Path, cfg: dict, max_sentences, sentences) -> ModelSource:
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    if cfg.get("auto_map"):
        raise ValueError(f"{path / 'config.json'} needs remote code (auto_map); it is never run: "
                         "only model types built into transformers are supported")
    archs = cfg.get("architectures") or []
    causal = any(str(a).endswith("ForCausalLM") or str(a).endswith("LMHeadModel") for a in archs)
    loader = AutoModelForCausalLM if causal else AutoModel
    try:
        model = loader.from_pretrained(str(path), local_files_only=True, use_safetensors=True,
                                       trust_remote_code=False, torch_dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise ValueError(f"transformers could not load {str(path)!r} ({cfg.get('model_type')}): "
                         f"{str(exc).splitlines()[0][:300]}") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"model directory {str(path)!r} has no usable tokenizer (tokenizer.json "
                         f"or tokenizer files): {str(exc).splitlines()[0][:200]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    model = model.to(torch.float32).eval().requires_grad_(False)
    cal_s, ev_s = _sentences(max_sentences, sentences)
    maxlen = min(64, int(getattr(model.config, "max_position_embeddings", 64) or 64))

    def batches(ss):
        out = []
        for i in range(0, len(ss), 16):
            enc = tok(ss[i:i + 16], padding=True, truncation=True, max_length=maxlen,
                      return_tensors="pt")
            b = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
            out.append(b)
        return out

    cal_b, ev_b = batches(cal_s), batches(ev_s)
    masks = [b["attention_mask"] for b in ev_b]
    names, skipped = quantizable_layers(model)
    metric = NextTokenKL(masks) if causal else OutputCosine(per_token=True, masks=masks)
    return ModelSource(
        name=f"{type(model).__name__} ({cfg.get('model_type')}) from {path}",
        kind="transformers", fingerprint=dir_sha256(path), module=model, layers=names,
        skipped=skipped, calibration=cal_b, evaluation=ev_b, end_metric=metric,
        calibration_desc=f"{len(cal_s)} sentences", evaluation_desc=f"{len(ev_s)} sentences",
        extra={"causal_lm": causal})


def _sentences(max_sentences, sentences) -> tuple[list[str], list[str]]:
    from analysis import minilm

    if sentences is not None:
        c, e = sentences
    else:
        c, e = minilm.sentences("calibration"), minilm.sentences("evaluation")
    if max_sentences is not None:
        c, e = c[:max_sentences], e[:max(3, max_sentences)]
    return list(c), list(e)
