"""Train the built-in dit-digits model and its metric classifier.

    python -m analysis.models.dit_digits train [--steps 2400] [--out DIR]

Writes, into ``DIR`` (default: the shipped ``weights/``), atomically:
``classifier.safetensors``, ``transformer/`` (``save_pretrained``: config.json +
diffusion_pytorch_model.safetensors, the EMA weights rounded to float16; the eval in the log
and info.json ran on the float32 EMA weights), ``conditions.safetensors``
(the EMA condition table) and ``info.json`` (settings, seed, final metrics).
The log goes to stdout (run it with ``nohup ... > DIR/train.log``).

Recipe (seed 0, deterministic on a fixed thread count):
* classifier: AdamW 2e-3, 30 epochs of batch 64 on the training split, with
  light Gaussian pixel noise (sigma 0.1) as augmentation;
* DiT: AdamW (lr 5e-4, betas 0.9/0.99, weight decay 0.01), batch 128 drawn
  with replacement from the training split, 200 warm-up steps then cosine decay
  to 10 %, gradient clipping at 1, EMA of the weights with decay 0.999, the
  class dropped to the null condition with probability 0.1, uniform timesteps
  in 0..999, MSE on the noise.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from analysis.models.dit_digits import core
from analysis import metrics

CLF_EPOCHS = 30


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train_classifier(seed: int = 0) -> core.DigitClassifier:
    torch.manual_seed(seed)
    x, y = core.digits("train")
    xh, yh = core.digits("holdout")
    clf = core.DigitClassifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for ep in range(CLF_EPOCHS):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            b = perm[i:i + 64]
            xb = x[b] + 0.1 * torch.randn(x[b].shape, generator=g)
            loss = torch.nn.functional.cross_entropy(clf(xb), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if ep % 10 == 9 or ep == CLF_EPOCHS - 1:
            with torch.no_grad():
                acc = metrics.class_accuracy(clf(xh), yh)
            _log(f"classifier epoch {ep + 1}: loss {loss.item():.4f}, holdout accuracy {acc:.4f}")
    return clf.eval()


def evaluate(den, clf, n: int = 500, steps: int = core.DEFAULT_SAMPLE_STEPS,
             guidance: float = core.DEFAULT_GUIDANCE) -> dict:
    img, lab = core.sample(den, n, seed=10_000, steps=steps, guidance=guidance)
    real, _ = core.digits("all")
    with torch.no_grad():
        acc = metrics.class_accuracy(clf(img), lab)
        fd = metrics.frechet_distance(clf.features(img), clf.features(real))
    return {"class_accuracy": acc, "fid": fd, "n": n, "steps": steps, "guidance": guidance}


def _save_atomic(den, clf, out: Path, info: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".tmp-"))
    try:
        # the transformer is stored in float16 (14 MB instead of 28); it runs in float32
        copy.deepcopy(den.transformer).half().save_pretrained(str(tmp / core.TRANSFORMER_DIR),
                                                              safe_serialization=True)
        save_file({"conditions": den.conditions.detach().contiguous()},
                  str(tmp / core.CONDITIONS_FILE))
        save_file({k: v.contiguous() for k, v in clf.state_dict().items()},
                  str(tmp / core.CLASSIFIER_FILE))
        (tmp / core.INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        for name in (core.CLASSIFIER_FILE, core.CONDITIONS_FILE, core.INFO_FILE):
            os.replace(tmp / name, out / name)
        old = out / (core.TRANSFORMER_DIR + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if (out / core.TRANSFORMER_DIR).exists():
            os.replace(out / core.TRANSFORMER_DIR, old)
        os.replace(tmp / core.TRANSFORMER_DIR, out / core.TRANSFORMER_DIR)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def train(steps: int = 2400, out: Path | None = None, seed: int = 0, batch: int = 128,
          lr: float = 5e-4, eval_every: int = 400) -> dict:
    out = Path(out) if out is not None else core.WEIGHTS_DIR
    t0 = time.perf_counter()
    _log(f"torch {torch.__version__}, {torch.get_num_threads()} threads, seed {seed}, "
         f"steps {steps}, batch {batch}, lr {lr}")
    clf = train_classifier(seed)
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler(**core.SCHEDULER_CONFIG)
    model = core.Denoiser(core.build_transformer(seed))
    ema = core.Denoiser(core.build_transformer(seed))
    ema.load_state_dict(model.state_dict())
    ema.eval().requires_grad_(False)
    n_par = sum(p.numel() for p in model.transformer.parameters())
    _log(f"PixArtTransformer2DModel {core.MODEL_CONFIG['num_layers']} blocks, hidden "
         f"{core.MODEL_CONFIG['num_attention_heads'] * core.MODEL_CONFIG['attention_head_dim']}, "
         f"{n_par / 1e6:.2f} M parameters")
    x_all, y_all = core.digits("train")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    warm = 200

    def lr_at(s):
        if s < warm:
            return lr * (s + 1) / warm
        p = (s - warm) / max(1, steps - warm)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    g = torch.Generator().manual_seed(seed + 1)
    model.train()
    ema_decay = 0.999
    run_loss = None
    for s in range(steps):
        for pg in opt.param_groups:
            pg["lr"] = lr_at(s)
        idx = torch.randint(0, len(y_all), (batch,), generator=g)
        x0, lab = x_all[idx], y_all[idx].clone()
        drop = torch.rand(batch, generator=g) < core.P_UNCOND
        lab[drop] = core.NULL_CLASS
        t = torch.randint(0, 1000, (batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        xt = noise_sched.add_noise(x0, eps, t)
        loss = torch.nn.functional.mse_loss(model(xt, t, lab), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + s) / (10 + s))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.mul_(d).add_(pm.detach(), alpha=1 - d)
        run_loss = loss.item() if run_loss is None else 0.98 * run_loss + 0.02 * loss.item()
        if s % 100 == 99:
            _log(f"step {s + 1}/{steps}: loss {run_loss:.4f}, lr {lr_at(s):.2e}, "
                 f"{time.perf_counter() - t0:.0f} s")
        if (s + 1) % eval_every == 0 or s + 1 == steps:
            ev = evaluate(ema, clf, n=300)
            _log(f"eval at step {s + 1} (EMA, 300 samples): class accuracy "
                 f"{ev['class_accuracy']:.4f}, Frechet distance {ev['fid']:.3f}")
            info = {"steps_done": s + 1, "steps": steps, "seed": seed, "batch": batch, "lr": lr,
                    "ema_decay": ema_decay, "p_uncond": core.P_UNCOND,
                    "model_config": core.MODEL_CONFIG, "scheduler_config": core.SCHEDULER_CONFIG,
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "eval": ev, "train_seconds": round(time.perf_counter() - t0, 1)}
            _save_atomic(ema, clf, out, info)
            _log(f"saved {out}")
    return info


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m analysis.models.dit_digits")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the DiT and its metric classifier")
    t.add_argument("--steps", type=int, default=2400)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default=None, help="output directory (default: the shipped weights/)")
    a = p.parse_args(argv)
    if a.steps < 1:
        print(f"error: --steps={a.steps} must be >= 1", file=sys.stderr)
        return 2
    train(steps=a.steps, seed=a.seed, out=None if a.out is None else Path(a.out))
    return 0
