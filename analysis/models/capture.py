"""Capture a diffusers transformer's real inputs from a pipeline run, for ``--inputs``.

    from diffusers import PixArtSigmaPipeline
    from analysis.models.capture import capture_inputs

    pipe = PixArtSigmaPipeline.from_pretrained("path/to/PixArt-Sigma", local_files_only=True)
    capture_inputs(pipe.transformer, "captured.safetensors",
                   lambda: pipe("a red fox in the snow", num_inference_steps=20))
    # then: loraq report --model path/to/PixArt-Sigma/transformer --inputs captured.safetensors

A forward pre-hook on the transformer records every call's ``hidden_states``
(the latents), ``timestep``, ``encoder_hidden_states`` and
``encoder_attention_mask`` (PixArt, SANA) or ``class_labels`` (DiT); the rows
of all calls are concatenated (classifier-free guidance's doubled batches
included) and written atomically to a safetensors file with the keys of
``analysis.models.INPUT_KEYS``. ``every`` keeps only every k-th call (a long
sampling run need not be stored whole); ``max_rows`` caps the rows per call.
"""
from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["capture_inputs"]


def capture_inputs(transformer: torch.nn.Module, path, run, *, every: int = 1,
                   max_rows: int | None = None) -> dict[str, torch.Tensor]:
    """Run ``run()`` with a hook on ``transformer``; write and return the captured tensors."""
    from safetensors.torch import save_file

    from numfmt.fileio import atomic_path

    if not isinstance(every, int) or every < 1:
        raise ValueError(f"every={every!r} must be an int >= 1")
    if max_rows is not None and (not isinstance(max_rows, int) or max_rows < 1):
        raise ValueError(f"max_rows={max_rows!r} must be an int >= 1 or None")
    calls: list[dict] = []
    count = {"n": 0}

    def hook(module, args, kwargs):
        count["n"] += 1
        if (count["n"] - 1) % every:
            return
        x = kwargs.get("hidden_states", args[0] if args else None)
        if x is None:
            raise ValueError("the transformer was called without hidden_states")
        b = x.shape[0] if max_rows is None else min(x.shape[0], max_rows)
        t = kwargs.get("timestep")
        t = torch.as_tensor(t).reshape(-1).expand(x.shape[0]) if t is not None else None
        rec = {"latents": x[:b], "timesteps": None if t is None else t[:b]}
        for key in ("encoder_hidden_states", "encoder_attention_mask", "class_labels"):
            v = kwargs.get(key)
            if v is not None:
                rec[key] = v[:b]
        calls.append({k: v.detach().to("cpu").clone() for k, v in rec.items() if v is not None})

    handle = transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            run()
    finally:
        handle.remove()
    if not calls:
        raise ValueError("run() never called the transformer; nothing was captured")
    keys = set(calls[0])
    out = {k: torch.cat([c[k] for c in calls]).contiguous() for k in keys
           if all(k in c for c in calls)}
    for k in ("latents", "encoder_hidden_states"):
        if k in out:
            out[k] = out[k].to(torch.float32)
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(out, str(tmp))
    return out
