"""``loraq report``: per-layer error, error propagation, accumulator widths and cost of a model.

Examples::

    loraq report                                    # the main job: built-in dit-digits
    loraq report --model minilm --out out/minilm    # the built-in text encoder
    loraq report --model path/to/PixArt-Sigma/transformer --inputs captured.safetensors
    loraq report --model path/to/bert-dir           # a transformers model directory
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

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from analysis.commands.common import (Bar, add_model_argument, add_recipe_arguments,
                                     add_source_arguments, check_counts, check_source_ranks,
                                     check_writable, load_source, smoothing_grid)
from analysis.errors import checks_input
from analysis.files import read_json_or_none
from analysis.recipe import DEFAULT_SMOOTHING, GRAMMAR

__all__ = ["register", "run", "DEFAULT_OUT", "prepare_out_dir"]

DEFAULT_OUT = "out/report"
SETTINGS_VERSION = 1


def register(subparsers) -> None:
    from analysis.analyzer import DEFAULT_TOKENS

    p = subparsers.add_parser(
        "report", help="per-layer error report of a model under W/A configurations (the main job)",
        description="Quantize every linear layer of a model for each configuration (RTN, SVDQuant "
        "FP16 branch, LoRaQ quantized branch), simulate the quantized model and report per-layer "
        "weight / activation / output error, propagated error, accumulator widths, cost and the "
        "end metrics. Configuration grammar: " + GRAMMAR)
    add_model_argument(p)
    p.add_argument("--configs", default=None,
                   help="comma-separated configurations (default: the model's; dit-digits: "
                   "W4A4,W4A4+FP16,W4A4+W8A8,W4A4+W6A6,W4A4+W4A8 and the three -nosmooth; "
                   "others: W4A4,W4A4+FP16r32,W4A4+W8A8,W4A4+W6A6,W4A4+W4A8)")
    p.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    p.add_argument("--force", action="store_true",
                   help="overwrite an output directory that holds a report with other settings")
    add_recipe_arguments(p)
    add_source_arguments(p)
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                   help="tokens per layer for the cost model (default: %(default)s)")
    p.add_argument("--mode", choices=("fast", "exact"), default="fast",
                   help="simulated GEMMs: fake-quantized float (fast) or hwsim.matmul (exact)")
    p.add_argument("--device", default=None,
                   help="torch device for the model, its simulated layers and LoRaQ's loop "
                   "(cpu, cuda, cuda:1); the quantizers then run as plain torch ops, bit-identical "
                   "to the Numba kernels (default: the CPU path with Numba)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    from analysis import cluster
    cluster.add_cluster_arguments(p)
    p.set_defaults(func=run)


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
        old = read_json_or_none(sfile) if sfile.is_file() else None
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


def _hash_file(path) -> str | None:
    from analysis.files import file_sha256

    return None if path is None else file_sha256(path)


def run(args) -> int:
    import torch

    from analysis import analyzer, report
    from analysis.store import LayerStore

    t0 = time.perf_counter()
    src, cfgs, opts, settings, status, where = _read_input(args)
    out = Path(args.out)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    cache_dir = out / "cache"
    counts = _CacheCounter(cache_dir)
    bar = Bar(len(cfgs) * (len(src.layers) + 1), not args.no_progress)
    try:
        with where as client:
            opts = dataclasses.replace(opts, store=LayerStore(cache_dir, key), progress=bar,
                                       client=client)
            if src.module is not None:
                res = analyzer.analyze(src.module, cfgs, src.calibration, src.evaluation, opts)
            else:
                res = analyzer.analyze_weights(src.weights, cfgs, opts)
    finally:
        bar.close()
    settings_out = dict(settings, calibration=src.calibration_desc,
                        evaluation=src.evaluation_desc,
                        end_metric=None if src.end_metric is None else src.end_metric.describe(),
                        skipped_layers=src.skipped, notes=src.notes)
    if "train_info" in src.extra:
        settings_out["model_training"] = src.extra["train_info"]
    results = report.build_results(res, settings_out)
    wall = time.perf_counter() - t0
    computed, cached = counts.finish()
    run_info = {"wall_s": round(wall, 2), "threads": torch.get_num_threads(), "status": status,
                "computed": computed, "cached": cached}
    paths = report.write_report(results, out, run_info)
    _print_summary(results, paths, run_info)
    return 0


@checks_input
def _read_input(args):
    """Everything the run needs from the user, checked before any work: (source, recipes,
    analysis options, settings, the output directory's status, the cluster)."""
    from analysis import analyzer, cluster

    check_counts(args)
    if args.configs:  # checked before any model is loaded
        analyzer.recipes_for(args.configs, analyzer.AnalysisOptions(main=args.main,
                                                                    branch=args.branch))
    check_writable(Path(args.out))
    if args.device is not None:
        import numfmt.torch as nft
        nft.check_device(args.device)  # one line and exit 2 when, e.g., CUDA is absent
    where = cluster.client_from_args(args)  # options checked now; connects on entry
    src, sentences = load_source(args)
    configs = args.configs or ",".join(src.default_configs or analyzer.DEFAULT_CONFIGS)
    ref_rank = args.ref_rank or src.ref_rank
    opts = analyzer.AnalysisOptions(main=args.main, branch=args.branch, steps=args.steps,
                                    ref_rank=ref_rank, seed=args.seed,
                                    smoothing=not args.no_smoothing,
                                    smoothing_grid=smoothing_grid(args), lr_rule=args.lr_rule,
                                    tokens=args.tokens,
                                    mode=args.mode, layers=src.layers, groups=src.groups,
                                    end_metric=src.end_metric, device=args.device)
    cfgs = analyzer.recipes_for(configs, opts)
    grid = opts.smoothing_grid or DEFAULT_SMOOTHING
    src.notes = list(src.notes) + check_source_ranks(src, cfgs)
    cfg_names = [c.name for c in cfgs]
    settings = {
        "version": SETTINGS_VERSION, "model": src.name, "model_kind": src.kind,
        "model_fingerprint": src.fingerprint, "configs": cfg_names, "seed": args.seed,
        "main": args.main, "branch": args.branch, "steps": args.steps,
        "max_sentences": args.max_sentences, "tokens": args.tokens, "mode": args.mode,
        "svdquant_grid": [list(grid.alphas), list(grid.betas)],
        "smoothing": not args.no_smoothing, "ref_rank": ref_rank,
        "inputs": _hash_file(args.inputs), "timesteps": args.timesteps, "device": args.device,
        "sentences": None if sentences is None else hashlib.sha256(
            json.dumps(sentences).encode()).hexdigest(),
    }
    if grid.criterion != DEFAULT_SMOOTHING.criterion:
        settings["smoothing_criterion"] = grid.criterion
    if args.lr_rule != "ours":
        settings["lr_rule"] = args.lr_rule
    for k in ("samples", "sample_steps", "guidance"):
        if k in src.extra:
            settings[k] = src.extra[k]
    status = prepare_out_dir(Path(args.out), settings, args.force)
    return src, cfgs, opts, settings, status, where


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
    drop = {"method", "weight err max", "local SQNR dB", "prop. SQNR dB min"}
    keep = [i for i, h in enumerate(head) if h not in drop]
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in keep]
    print("  ".join(head[i].rjust(w) for i, w in zip(keep, widths)))
    for r in rows:
        print("  ".join(r[i].rjust(w) for i, w in zip(keep, widths)))
    ems = report.present_metrics(results["configs"])
    for h in results.get("headline", []):
        wr = h.get("weight_error_reduction")
        parts = ", ".join(f"{lab} {report._f(h.get(k), f)} vs {report._f(h.get('reference_' + k), f)}"
                          for k, lab, f, _ in ems)
        print(f"{h['config']} vs {h['reference']}: weight error "
              f"{'-' if wr is None else f'{wr:.1%} lower'}" + (f", {parts}" if parts else "")
              + f", memory ratio {report._f(h['memory_ratio'], '{:.3f}')}")
        if h.get("verdicts"):
            labels = {k: lab for k, lab, _, _ in report.END_METRICS}
            print("  verdicts (95 % bootstrap): " + ", ".join(
                f"{labels[k]} {v}" for k, v in h["verdicts"].items()))
    print(f"wrote {paths['md'].parent} (report.md, report.html, results.json, layers.csv, plots/) "
          f"in {run_info['wall_s']:.1f} s; {run_info['computed']} layer optimizations computed, "
          f"{run_info['cached']} loaded from cache")
