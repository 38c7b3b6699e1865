"""``loraq report``: per-layer error, error propagation, accumulator widths and cost of a model.

Examples::

    loraq report                                    # the main job: built-in MiniLM, default configs
    loraq report --configs W4A4,W4A4+W8A8 --out out/small
    loraq report --model weights.safetensors --out out/w   # MiniLM weights: full analysis;
                                                    # any other safetensors: weights only

The output directory gets report.md, report.html (self-contained), results.json,
layers.csv, plots/*.png, settings.json, run.json and cache/ (one optimized
layer per configuration, written atomically with a completion marker). A rerun
with the same settings resumes: finished layers are loaded, not redone. A
directory holding a report with other settings is refused unless ``--force``
(which clears its cache).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from hwsim.cost import CONFIG_GRAMMAR

__all__ = ["register", "run", "DEFAULT_OUT", "resolve_model", "prepare_out_dir"]

DEFAULT_OUT = "out/report"
# LoRaQ steps per layer in the report. The optimizer's own default (400) costs
# about 10x the time for a further ~25% lower weight error; 30 keeps the main
# job within its time budget and already beats the FP16 branch (the README, section "The main job").
DEFAULT_STEPS = 30
SETTINGS_VERSION = 1


def register(subparsers) -> None:
    from analysis.analyzer import DEFAULT_CONFIGS, DEFAULT_TOKENS

    p = subparsers.add_parser(
        "report", help="per-layer error report of a model under W/A configurations (the main job)",
        description="Quantize every linear layer of a model for each configuration (RTN, SVDQuant "
        "FP16 branch, LoRaQ quantized branch), simulate the quantized model and report per-layer "
        "weight / activation / output error, propagated error, accumulator widths, cost and the "
        "end metric. Configuration grammar: " + CONFIG_GRAMMAR)
    p.add_argument("--model", default="minilm", help="'minilm' (built-in all-MiniLM-L6-v2) or a "
                   ".safetensors file (default: %(default)s)")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                   help="comma-separated configurations (default: %(default)s)")
    p.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    p.add_argument("--force", action="store_true",
                   help="overwrite an output directory that holds a report with other settings")
    p.add_argument("--seed", type=int, default=0, help="seed of the optimizer (default: %(default)s)")
    p.add_argument("--main", default="mxint4", help="main weight/activation format or family: "
                   "mxint4, sint4, mxfp4 (default: %(default)s)")
    p.add_argument("--branch", default="mxint", help="branch format family: mxint, sint, mxfp "
                   "(default: %(default)s)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="LoRaQ optimizer steps per "
                   "layer (default: %(default)s; the optimizer alone defaults to 400)")
    p.add_argument("--sentences", default=None, metavar="JSON",
                   help="MiniLM inputs: a JSON file {\"calibration\": [...], \"evaluation\": [...]} "
                   "of sentences (default: the shipped splits)")
    p.add_argument("--max-sentences", type=int, default=None,
                   help="use only the first N sentences of each split")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                   help="tokens per layer for the cost model (default: %(default)s)")
    p.add_argument("--mode", choices=("fast", "exact"), default="fast",
                   help="simulated GEMMs: fake-quantized float (fast) or hwsim.matmul (exact)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


# --------------------------------------------------------------------------- inputs


def _sniff(path: Path) -> str:
    """'safetensors', 'pickle' (a torch checkpoint: zip or bare pickle) or 'other'."""
    from analysis.minilm import _is_safetensors

    if _is_safetensors(path):
        return "safetensors"
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04" or head[:1] == b"\x80":
        return "pickle"
    return "other"


def resolve_model(spec: str) -> dict:
    """``{"kind": "minilm"|"weights", "path", "weights", "fingerprint", "name"}`` for --model.

    Raises FileNotFoundError / ValueError for a missing path, a pickled
    checkpoint (refused: unpickling can run code) or a non-safetensors file.
    """
    from analysis import minilm
    from analysis.analyzer import fingerprint

    if spec == "minilm":
        path = minilm.model_dir() / minilm.WEIGHTS_FILE
        return {"kind": "minilm", "path": None, "name": "all-MiniLM-L6-v2 (built-in)",
                "fingerprint": _file_hash(path)}
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"model path {spec!r} does not exist; give 'minilm' or a "
                                ".safetensors file")
    if not path.is_file():
        raise ValueError(f"model path {spec!r} is not a file; give 'minilm' or a .safetensors file")
    kind = _sniff(path)
    if kind == "pickle":
        raise ValueError(f"refusing {spec!r}: it is a pickled (torch) checkpoint, and unpickling "
                         "can run arbitrary code; convert it to .safetensors "
                         "(safetensors.torch.save_file(state_dict, 'model.safetensors'))")
    if kind != "safetensors":
        raise ValueError(f"model file {spec!r} is not safetensors (no valid safetensors header); "
                         "allowed: 'minilm' or a .safetensors file")
    weights = minilm.load_weights(path)
    try:
        m = minilm.MiniLM()
        m.load_weights(weights, source=spec)
        kind = "minilm"
    except ValueError:
        kind = "weights"
    return {"kind": kind, "path": str(path), "weights": weights,
            "name": (f"all-MiniLM-L6-v2 weights from {spec}" if kind == "minilm" else f"{spec} (weights only)"),
            "fingerprint": fingerprint(weights)}


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


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


# --------------------------------------------------------------------------- output dir


def prepare_out_dir(out: Path, settings: dict, force: bool) -> str:
    """Create / check the output directory; returns 'new', 'resume' or 'forced'.

    A directory with settings.json equal to ``settings`` is resumed; other
    settings, or a non-empty directory without settings.json, are refused with
    FileExistsError unless ``force`` (then cache/ and the report files go).
    """
    from numfmt.fileio import write_json_atomic

    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output path {str(out)!r} exists and is not a directory")
    status = "new"
    sfile = out / "settings.json"
    if out.is_dir() and any(out.iterdir()):
        old = None
        if sfile.is_file():
            try:
                old = json.loads(sfile.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                old = None
        if old == settings:
            status = "resume"
        elif not force:
            if old is None:
                raise FileExistsError(f"output directory {str(out)!r} is not empty and holds no "
                                      "report settings; pass --force to use it anyway or choose "
                                      "another --out")
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise FileExistsError(f"output directory {str(out)!r} holds a report with other "
                                  f"settings (differing: {', '.join(diff)}); pass --force to "
                                  "overwrite it or choose another --out")
        else:
            status = "forced"
            shutil.rmtree(out / "cache", ignore_errors=True)
            for name in ("results.json", "run.json", "report.md", "report.html", "layers.csv"):
                try:
                    (out / name).unlink()
                except FileNotFoundError:
                    pass
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except PermissionError:
        raise PermissionError(f"output directory {str(out)!r} is not writable") from None
    except OSError as exc:
        raise PermissionError(f"output directory {str(out)!r} cannot be written: "
                              f"{exc.strerror or exc}") from None
    if status != "resume":
        write_json_atomic(sfile, settings)
    return status


# --------------------------------------------------------------------------- run


class _Bar:
    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc="loraq report", unit="layer", file=sys.stderr,
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


def run(args) -> int:
    import torch

    from analysis import analyzer, report

    t0 = time.perf_counter()
    for name in ("steps", "max_sentences", "tokens"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')}={v} must be >= 1")
    cfgs = analyzer.parse_configs(args.configs, main=args.main, branch=args.branch)
    cfg_names = [c.name for c in cfgs]
    model_info = resolve_model(args.model)
    sentences = None
    if args.sentences is not None:
        if model_info["kind"] != "minilm":
            raise ValueError("--sentences applies to the MiniLM model only")
        sentences = load_sentences(args.sentences)
    settings = {
        "version": SETTINGS_VERSION, "model": model_info["name"], "model_kind": model_info["kind"],
        "model_fingerprint": model_info["fingerprint"], "configs": cfg_names, "seed": args.seed,
        "main": args.main, "branch": args.branch, "steps": args.steps,
        "max_sentences": args.max_sentences, "tokens": args.tokens, "mode": args.mode,
        "svdquant_grid": [list(g) for g in analyzer.SVDQUANT_GRID],
        "sentences": None if sentences is None else hashlib.sha256(
            json.dumps(sentences).encode()).hexdigest(),
    }
    out = Path(args.out)
    status = prepare_out_dir(out, settings, args.force)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    cache_dir = out / "cache"

    kw = dict(main=args.main, branch=args.branch, seed=args.seed, steps=args.steps,
              tokens=args.tokens, cache_dir=cache_dir, cache_key=key)
    counts = _CacheCounter(cache_dir)
    if model_info["kind"] == "minilm":
        from analysis import minilm
        model = minilm.MiniLM.from_pretrained(model_info["path"])
        if sentences is None:
            cal, ev = analyzer.minilm_inputs(args.max_sentences)
            n_cal, n_ev = (len(minilm.sentences("calibration")), len(minilm.sentences("evaluation")))
            if args.max_sentences:
                n_cal = min(n_cal, args.max_sentences)
                n_ev = min(n_ev, max(4, args.max_sentences - args.max_sentences % 2))
        else:
            c, e = sentences
            if args.max_sentences:
                c, e = c[:args.max_sentences], e[:max(3, args.max_sentences)]
            tok = minilm.tokenizer()
            cal = [minilm.tokenize(c[i:i + 16], tok=tok) for i in range(0, len(c), 16)]
            ev = [minilm.tokenize(e[i:i + 16], tok=tok) for i in range(0, len(e), 16)]
            n_cal, n_ev = len(c), len(e)
        n_layers = len(model.linear_names())
        bar = _Bar(len(cfgs) * (n_layers + 1), not args.no_progress)
        try:
            res = analyzer.analyze(model, cfgs, cal, ev, mode=args.mode, progress=bar, **kw)
        finally:
            bar.close()
        settings_out = dict(settings, calibration=f"{n_cal} sentences",
                            evaluation=f"{n_ev} sentences")
    else:
        mats = {k: v for k, v in model_info["weights"].items() if getattr(v, "ndim", 0) == 2}
        bar = _Bar(len(cfgs) * (len(mats) + 1), not args.no_progress)
        try:
            res = analyzer.analyze_weights(model_info["weights"], cfgs, progress=bar, **kw)
        finally:
            bar.close()
        settings_out = dict(settings)
    results = report.build_results(res, settings_out)
    wall = time.perf_counter() - t0
    computed, cached = counts.finish()
    run_info = {"wall_s": round(wall, 2), "threads": torch.get_num_threads(), "status": status,
                "computed": computed, "cached": cached}
    paths = report.write_report(results, out, run_info)
    _print_summary(results, paths, run_info)
    return 0


class _CacheCounter:
    """Counts layer results already cached before the run and those written during it."""

    def __init__(self, cache_dir: Path):
        self.dir = cache_dir
        self.before = self._markers()

    def _markers(self) -> set:
        return set(self.dir.rglob("*.done.json")) if self.dir.is_dir() else set()

    def finish(self) -> tuple[int, int]:
        after = self._markers()
        return len(after - self.before), len(self.before & after)


def _print_summary(results: dict, paths: dict, run_info: dict) -> None:
    from analysis import report

    head, rows = report.summary_table(results)
    keep = [0, 2, 3, 4, 5, 6, 9, 11, 12]
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in keep]
    print("  ".join(head[i].rjust(w) for i, w in zip(keep, widths)))
    for r in rows:
        print("  ".join(r[i].rjust(w) for i, w in zip(keep, widths)))
    for h in results.get("headline", []):
        wr = h.get("weight_error_reduction")
        print(f"{h['config']} vs {h['reference']}: weight error "
              f"{'-' if wr is None else f'{wr:.1%} lower'}, mean cosine "
              f"{report._f(h['mean_cosine'])} vs {report._f(h['reference_mean_cosine'])}, memory "
              f"ratio {report._f(h['memory_ratio'], '{:.3f}')}")
    print(f"wrote {paths['md'].parent} (report.md, report.html, results.json, layers.csv, plots/) "
          f"in {run_info['wall_s']:.1f} s; {run_info['computed']} layer optimizations computed, "
          f"{run_info['cached']} loaded from cache")
