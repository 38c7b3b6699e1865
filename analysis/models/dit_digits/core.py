"""dit-digits: a real class-conditional diffusion transformer on the handwritten digits.

The network is ``diffusers.PixArtTransformer2DModel``, the class of PixArt-Sigma:
adaLN-single timestep modulation, self-attention, cross-attention to a condition
sequence (fed through the model's caption projection, as PixArt feeds T5
embeddings) and a GELU-tanh feed-forward. It works in pixel space (no VAE) on
scikit-learn's bundled 8 x 8 digits (``sklearn.datasets.load_digits``: 1797 real
images with 17 grey levels 0..16; no download).

Data: pixel value v in 0..16 maps to x = v / 8 - 1 in [-1, 1]. The images are
split by index: every ``HOLDOUT_EVERY``-th image is held out (360 images) for
the classifier's accuracy test; the DiT and the classifier train on the rest.

Conditioning: each class c in 0..9 has a learned condition sequence
``conditions[c]`` of ``COND_TOKENS`` x ``COND_CHANNELS`` (standing in for T5
caption embeddings); row 10 is the null condition used for classifier-free
guidance (the training drops the class to the null row with probability
``P_UNCOND``). The default guidance is g = 1 (the conditional prediction, one
denoiser pass per step): measured on 256 samples, g = 1 / 1.5 / 2 / 3 give the
full-precision model Frechet distances 15.6 / 32.6 / 60.9 / 111.7 (class accuracy
0.969 / 0.996 / 1.000 / 1.000): guidance trades diversity for class fidelity, and at
g = 2 a W4A4 model, whose quantization noise weakens the guidance, scored a lower
distance (42.6) than the full-precision one, so the metric no longer ranked
quantization error. ``--guidance`` sets another scale.

Diffusion: DDPM forward process with PixArt's 1000-step linear beta schedule
(beta from 1e-4 to 0.02), epsilon prediction. Sampling uses a diffusers
``DPMSolverMultistepScheduler`` (DPM-Solver++, order 2, PixArt's sampler) with
classifier-free guidance (g != 1)::

    eps = eps(x_t, t, null) + g * (eps(x_t, t, c) - eps(x_t, t, null))

Sample i of a run uses noise seed ``seed + i`` (its own ``torch.Generator``) and
class ``i mod 10``, so a sample does not depend on the batch it runs in.

Metrics use a small shipped CNN classifier (``DigitClassifier``) trained on the
same training split; its 64-wide penultimate layer gives the features of the
Frechet distance (the FID recipe) and of the feature distance (the LPIPS
stand-in).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "WEIGHTS_DIR", "MODEL_CONFIG", "SCHEDULER_CONFIG", "NUM_CLASSES", "NULL_CLASS",
    "COND_TOKENS", "COND_CHANNELS", "IMAGE_SIZE", "digits", "build_transformer",
    "DigitClassifier", "Denoiser", "sample", "load", "BuiltinMissing", "REBUILD_HINT",
    "DEFAULT_GUIDANCE", "DEFAULT_SAMPLE_STEPS",
]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
REBUILD_HINT = ("rebuild it with `python -m analysis.models.dit_digits train` "
                "(about 45 min on one core), or restore the file from git")
NUM_CLASSES = 10
NULL_CLASS = 10
COND_TOKENS = 4
COND_CHANNELS = 64
IMAGE_SIZE = 8
HOLDOUT_EVERY = 5
P_UNCOND = 0.1
DEFAULT_GUIDANCE = 1.0
DEFAULT_SAMPLE_STEPS = 10

# The transformer: hidden 256 = 4 heads x 64, 6 blocks, 2 x 2 patches (16 tokens).
MODEL_CONFIG = dict(
    num_attention_heads=4, attention_head_dim=64, in_channels=1, out_channels=1,
    num_layers=6, cross_attention_dim=256, sample_size=IMAGE_SIZE, patch_size=2,
    caption_channels=COND_CHANNELS, norm_num_groups=1, activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False,
    norm_eps=1e-6, attention_bias=True, use_additional_conditions=False,
)
# PixArt's training schedule; the DPM-Solver++ sampler is built from the same betas.
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                        beta_schedule="linear", prediction_type="epsilon")


class BuiltinMissing(FileNotFoundError):
    """The built-in model's weights are missing or damaged."""


def digits(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 1, 8, 8) float32 in [-1, 1], labels (N,) int64) of one split.

    ``split``: "train" (1437 images), "holdout" (360, every 5th) or "all" (1797).
    """
    from sklearn.datasets import load_digits

    if split not in ("train", "holdout", "all"):
        raise ValueError(f"split={split!r} is not allowed; allowed: 'train', 'holdout', 'all'")
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    y = torch.tensor(d.target, dtype=torch.int64)
    idx = torch.arange(len(y))
    keep = {"train": idx % HOLDOUT_EVERY != 0, "holdout": idx % HOLDOUT_EVERY == 0,
            "all": torch.ones_like(idx, dtype=torch.bool)}[split]
    return x[keep].contiguous(), y[keep].contiguous()


def build_transformer(seed: int = 0):
    """A freshly initialized ``PixArtTransformer2DModel`` of ``MODEL_CONFIG``."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(**MODEL_CONFIG)


class DigitClassifier(nn.Module):
    """CNN on 8 x 8 digits: conv 32, conv 64 (stride 2), 64-wide penultimate, 10 logits."""

    FEATURES = 64

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.GELU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.GELU(),
            nn.Flatten(), nn.Linear(64 * 4 * 4, self.FEATURES), nn.GELU())
        self.head = nn.Linear(self.FEATURES, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, 64) of images (N, 1, 8, 8) in [-1, 1]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class Denoiser(nn.Module):
    """The transformer plus the learned condition table: eps(x_t, t, class).

    ``conditions`` (11, COND_TOKENS, COND_CHANNELS): rows 0..9 are the classes,
    row 10 the null condition.
    """

    def __init__(self, transformer, conditions: torch.Tensor | None = None):
        super().__init__()
        self.transformer = transformer
        if conditions is None:
            conditions = torch.randn(NUM_CLASSES + 1, COND_TOKENS, COND_CHANNELS) * 0.5
        self.conditions = nn.Parameter(conditions.clone())

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cond = self.conditions[labels]
        return self.transformer(x, encoder_hidden_states=cond, timestep=t,
                                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                                return_dict=False)[0]


def make_scheduler(steps: int):
    """DPM-Solver++ (order 2) with ``steps`` steps on the training betas."""
    from diffusers import DPMSolverMultistepScheduler

    s = DPMSolverMultistepScheduler(**SCHEDULER_CONFIG, algorithm_type="dpmsolver++",
                                    solver_order=2)
    s.set_timesteps(steps)
    return s


def initial_noise(n: int, seed: int) -> torch.Tensor:
    """(n, 1, 8, 8) standard normal noise; row i from its own generator seeded ``seed + i``."""
    out = torch.empty(n, 1, IMAGE_SIZE, IMAGE_SIZE)
    for i in range(n):
        g = torch.Generator().manual_seed(int(seed) + i)
        out[i] = torch.randn(1, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    return out


def sample(denoiser: Denoiser, n: int, *, seed: int = 0, steps: int = DEFAULT_SAMPLE_STEPS,
           guidance: float = DEFAULT_GUIDANCE, batch: int = 256, labels=None,
           on_step=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate ``n`` digits: (images (n, 1, 8, 8) float32 clipped to [-1, 1], labels (n,)).

    ``labels`` defaults to ``i mod 10``. ``on_step(step_index, timestep)`` is
    called before each denoiser evaluation (the analyzer uses it to tag
    activations with their timestep).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} samples: must be an int >= 1")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r}: must be an int >= 1")
    labels = (torch.arange(n) % NUM_CLASSES) if labels is None else torch.as_tensor(labels)
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    noise = initial_noise(n, seed)
    out = torch.empty_like(noise)
    dev = next(iter(denoiser.parameters())).device  # the noise is drawn on the CPU, always
    with torch.inference_mode():
        for start in range(0, n, batch):
            sl = slice(start, min(n, start + batch))
            x = noise[sl].clone().to(dev)
            lab = labels[sl].to(dev)
            m = x.shape[0]
            null = torch.full((m,), NULL_CLASS, dtype=torch.int64, device=dev)
            sched = make_scheduler(steps)
            for k, t in enumerate(sched.timesteps):
                if on_step is not None:
                    on_step(k, int(t))
                if guidance == 1.0:  # the guided prediction is the conditional one
                    tt = torch.full((m,), int(t), dtype=torch.int64, device=dev)
                    e = denoiser(x, tt, lab)
                else:
                    tt = torch.full((2 * m,), int(t), dtype=torch.int64, device=dev)
                    eps = denoiser(torch.cat([x, x]), tt, torch.cat([lab, null]))
                    e_c, e_u = eps[:m], eps[m:]
                    e = e_u + guidance * (e_c - e_u)
                x = sched.step(e, t, x, return_dict=False)[0]
            out[sl] = x.cpu()
    return out.clamp(-1.0, 1.0), labels


# --------------------------------------------------------------------------- files

TRANSFORMER_DIR = "transformer"
CONDITIONS_FILE = "conditions.safetensors"
CLASSIFIER_FILE = "classifier.safetensors"
INFO_FILE = "info.json"


def load(directory: str | Path | None = None) -> tuple[Denoiser, DigitClassifier, dict]:
    """(denoiser, classifier, info) from the shipped weights (or ``directory``).

    Raises ``BuiltinMissing`` (a FileNotFoundError) with the rebuild command
    when a file is missing or damaged.
    """
    from diffusers import PixArtTransformer2DModel
    from safetensors.torch import load_file

    d = Path(directory) if directory is not None else WEIGHTS_DIR
    need = [d / TRANSFORMER_DIR / "config.json",
            d / TRANSFORMER_DIR / "diffusion_pytorch_model.safetensors",
            d / CONDITIONS_FILE, d / CLASSIFIER_FILE, d / INFO_FILE]
    for p in need:
        if not p.is_file():
            raise BuiltinMissing(f"the built-in dit-digits model file {p} is missing; {REBUILD_HINT}")
    try:
        # stored in float16 (half the size); computed in float32
        tr = PixArtTransformer2DModel.from_pretrained(str(d / TRANSFORMER_DIR),
                                                      local_files_only=True, use_safetensors=True,
                                                      torch_dtype=torch.float32)
        cond = load_file(str(d / CONDITIONS_FILE))["conditions"]
        clf = DigitClassifier()
        clf.load_state_dict(load_file(str(d / CLASSIFIER_FILE)))
        info = json.loads((d / INFO_FILE).read_text(encoding="utf-8"))
    except BuiltinMissing:
        raise
    except Exception as exc:  # damaged safetensors / json / shapes
        raise BuiltinMissing(f"the built-in dit-digits weights in {d} are damaged "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                             f"{REBUILD_HINT}") from None
    tr.eval()
    clf.eval()
    den = Denoiser(tr, cond).eval()
    return den, clf, info
