"""Arguments and helpers that ``loraq report`` and ``loraq quantize`` share.

The model, its inputs and the recipe options are given the same way to both commands,
and read by one function (``load_source``), which checks them before any work starts.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["add_model_argument", "add_recipe_arguments", "add_source_arguments",
           "check_counts", "load_sentences", "load_source", "check_writable", "Bar",
           "check_source_ranks", "smoothing_grid",
           "DEFAULT_STEPS"]

# LoRaQ steps per layer in the report. The optimizer's own default (400) costs
# about 10x the time for a further ~25% lower weight error; 30 keeps the main
# job within its time budget and already beats the FP16 branch (the README, section "The main job").
DEFAULT_STEPS = 30


def add_model_argument(p) -> None:
    p.add_argument("--model", default="dit-digits",
                   help="'dit-digits' (built-in diffusion transformer), 'minilm' (built-in "
                   "all-MiniLM-L6-v2), a diffusers or transformers model directory (config.json + "
                   "safetensors), or a .safetensors file (default: %(default)s)")


def add_recipe_arguments(p) -> None:
    """--seed, --main, --branch, --steps, --no-smoothing, --smoothing-grid, --lr-rule,
    --ref-rank."""
    p.add_argument("--lr-rule", choices=("ours", "paper"), default="ours",
                   help="LoRaQ's Adam step: ours (by branch width on the unit-RMS weight) or "
                   "paper (1e-3 for FP branches, 1e-4 for INT, on the unnormalized weight) "
                   "(default: %(default)s)")
    p.add_argument("--smoothing-grid", default=None, metavar="VALUES",
                   help="choose SVDQuant's smoothing (alpha, beta) per layer from this grid "
                   "(comma-separated values for both, e.g. 0.25,0.5,0.75) on the quantized "
                   "layer's output error, activation quantizer in the loop (the paper's "
                   "search); default: the fixed point alpha = beta = 0.5")
    p.add_argument("--seed", type=int, default=0, help="seed of the optimizer (default: %(default)s)")
    p.add_argument("--main", default="mxint4", help="main weight/activation format or family: "
                   "mxint4, sint4, mxfp4 (default: %(default)s)")
    p.add_argument("--branch", default="mxint", help="branch format family: mxint, sint, mxfp "
                   "(default: %(default)s)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="LoRaQ optimizer steps per "
                   "layer (default: %(default)s; the optimizer alone defaults to 400)")
    p.add_argument("--no-smoothing", action="store_true",
                   help="LoRaQ without the smoothing search (purely data-free); by default LoRaQ "
                   "runs SVDQuant's smoothing first, as the paper does")
    p.add_argument("--ref-rank", type=int, default=None,
                   help="rank of the reference FP16 branch: FP16 configurations without r<rank> "
                   "use it, quantized branches get its memory (default: dit-digits 8, others 32)")


def add_source_arguments(p) -> None:
    """The model source's input options (diffusers inputs, dit-digits sampling, sentences)."""
    p.add_argument("--inputs", default=None, metavar="SAFETENSORS",
                   help="diffusers models: captured transformer inputs (keys latents, timesteps, "
                   "encoder_hidden_states or class_labels, optional encoder_attention_mask; see "
                   "analysis.models.capture); default: seeded Gaussian inputs")
    p.add_argument("--timesteps", type=int, default=None,
                   help="diffusers models without --inputs: scheduler timesteps (default 4)")
    p.add_argument("--samples", type=int, default=None,
                   help="dit-digits: generated digits per configuration (default 256, at most 4096)")
    p.add_argument("--sample-steps", type=int, default=None,
                   help="dit-digits: DPM-Solver++ steps per sample (default 10)")
    p.add_argument("--guidance", type=float, default=None,
                   help="dit-digits: classifier-free guidance scale (default 1: the conditional "
                   "prediction, one pass per step; see the README on why)")
    p.add_argument("--sentences", default=None, metavar="JSON",
                   help="text models: a JSON file {\"calibration\": [...], \"evaluation\": [...]} "
                   "of sentences (default: the shipped splits)")
    p.add_argument("--max-sentences", type=int, default=None,
                   help="use only the first N sentences of each split")


def smoothing_grid(args):
    """The ``Smoothing`` of ``--smoothing-grid`` (None without it)."""
    if getattr(args, "smoothing_grid", None) is None:
        return None
    from analysis.recipe import Smoothing

    try:
        vals = tuple(float(v) for v in args.smoothing_grid.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--smoothing-grid={args.smoothing_grid!r} must be comma-separated "
                         "numbers >= 0, e.g. 0.25,0.5,0.75") from None
    if not vals:
        raise ValueError("--smoothing-grid is empty; give numbers >= 0, e.g. 0.25,0.5,0.75")
    return Smoothing(vals, vals, "output")


def check_counts(args, names=("steps", "max_sentences", "tokens", "ref_rank", "timesteps",
                              "sample_steps")) -> None:
    """Every given count option is >= 1."""
    for name in names:
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')}={v} must be >= 1")


def load_source(args):
    """The ``ModelSource`` the arguments name (``analysis.models.resolve``)."""
    from analysis.models import resolve

    sentences = None
    if args.sentences is not None:
        if args.model in ("dit-digits",):
            raise ValueError("--sentences applies to text models only")
        sentences = load_sentences(args.sentences)
    src = resolve(args.model, inputs=args.inputs, samples=args.samples,
                  sample_steps=args.sample_steps, max_sentences=args.max_sentences,
                  sentences=sentences, timesteps=args.timesteps, guidance=args.guidance)
    return src, sentences


def load_sentences(path) -> tuple[list[str], list[str]]:
    """(calibration, evaluation) sentences from a JSON file; ValueError when malformed."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"sentences file {str(p)!r} does not exist")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"sentences file {str(p)!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not all(k in data for k in ("calibration", "evaluation")):
        raise ValueError(f"sentences file {str(p)!r} must be an object with 'calibration' and "
                         "'evaluation' lists of sentences")
    out = []
    for split in ("calibration", "evaluation"):
        v = data[split]
        if not isinstance(v, list) or not all(isinstance(s, str) and s.strip() for s in v):
            raise ValueError(f"sentences file {str(p)!r}: {split!r} must be a list of non-empty "
                             f"strings (a 1-D list), got {type(v).__name__}")
        out.append(v)
    if len(out[0]) < 1:
        raise ValueError(f"sentences file {str(p)!r}: 'calibration' needs at least 1 sentence")
    if len(out[1]) < 3:
        raise ValueError(f"sentences file {str(p)!r}: 'evaluation' needs at least 3 sentences "
                         "(nearest-neighbour agreement)")
    return out[0], out[1]


def check_writable(out: Path) -> None:
    """Refuse an output path that cannot become a directory, before any work is done."""
    p = out
    while not p.exists() and p.parent != p:
        p = p.parent
    if p.exists() and not p.is_dir():
        raise PermissionError(f"output directory {str(out)!r} cannot be written: "
                              f"{str(p)!r} is a file")


class Bar:
    def __init__(self, total: int, enabled: bool, desc: str = "loraq report"):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit="layer", file=sys.stderr,
                            dynamic_ncols=True, mininterval=0.5)

    def update(self, n=1):
        if self.bar is not None:
            self.bar.update(n)

    def set_postfix_str(self, s, refresh=False):
        if self.bar is not None:
            self.bar.set_postfix_str(s, refresh=refresh)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def check_source_ranks(src, recipes) -> list[str]:
    """Before any work: refuse an explicit rank that no layer of the source can take (one
    line naming the widest layer); returns a note for each recipe whose rank is capped on
    some narrow layers (``analysis.quantize.check_ranks``)."""
    from analysis.models.base import layer_weight
    from analysis.quantize import capped_notes, check_ranks

    if src.module is not None:
        shapes = {n: tuple(layer_weight(src.module.get_submodule(n)).shape) for n in src.layers}
    else:
        shapes = {k: v.shape for k, v in src.weights.items() if getattr(v, "ndim", 0) == 2}
    return capped_notes(check_ranks(recipes, shapes))
