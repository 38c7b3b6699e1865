"""``loraq quantize``: a model quantized for a recipe, saved as a checkpoint.

Examples::

    loraq quantize --model dit-digits --configs W4A4+W8A8 --out out/dit-w8a8
    loraq quantize --model path/to/PixArt-Sigma/transformer --inputs captured.safetensors \\
        --configs W4A4+FP16r32 --out out/pixart-svdquant
    loraq quantize --model minilm --configs W4A4,W4A4+W6A6,W4A4+W8A8-lqer --out out/minilm
    loraq quantize --model weights.safetensors --configs W4A4+W8A8 --out out/w   # data-free

It takes every model source that ``loraq report`` takes, with the same calibration
inputs, and writes ``analysis.save_quantized``'s format (docs/checkpoint.md): for one
configuration into ``--out``, for several into ``--out/<configuration>``. A plain
safetensors file is quantized data-free (its 2-D weights; no model config is saved).
Each fitted layer is kept in ``--out/.partial`` until the checkpoint is written, so a
run that is interrupted (even by SIGKILL) resumes where it stopped; a checkpoint already
complete with the same settings is left as it is. Other settings in a non-empty
``--out`` are refused unless ``--force``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

from analysis.commands.common import (Bar, add_model_argument, add_recipe_arguments,
                                      add_source_arguments, check_counts, check_source_ranks,
                                      check_writable, load_source, smoothing_grid)
from analysis.errors import checks_input
from analysis.files import read_json_or_none
from analysis.recipe import GRAMMAR

__all__ = ["register", "run"]

PARTIAL = ".partial"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "quantize", help="quantize a model for a recipe and save it (resumable)",
        description="Quantize every linear layer of a model for each configuration and save "
        "the quantized model (element codes, scales, branch factors, smoothing vectors, the "
        "recipe) as safetensors. Configuration grammar: " + GRAMMAR)
    add_model_argument(p)
    p.add_argument("--configs", required=True,
                   help="comma-separated configurations, e.g. W4A4+W8A8 or W4A4+FP16r32,W4A4")
    p.add_argument("--out", required=True, help="checkpoint directory (created if missing)")
    p.add_argument("--force", action="store_true",
                   help="overwrite a directory that holds another checkpoint")
    add_recipe_arguments(p)
    add_source_arguments(p)
    p.add_argument("--mode", choices=("fast", "exact"), default="fast",
                   help="how the saved layers compute by default (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    from analysis import cluster
    cluster.add_cluster_arguments(p)
    p.set_defaults(func=run)


def _settings(src, recipe, args) -> dict:
    return {"model": src.name, "model_fingerprint": src.fingerprint,
            "calibration": src.calibration_desc, "recipe": recipe.to_dict(), "mode": args.mode,
            "inputs": None if args.inputs is None else _file_hash(args.inputs),
            "sentences": None if args.sentences is None else _file_hash(args.sentences),
            "max_sentences": args.max_sentences, "timesteps": args.timesteps,
            "samples": src.extra.get("samples"),
            "sample_steps": src.extra.get("sample_steps"), "guidance": src.extra.get("guidance")}


def _file_hash(path) -> str:
    from analysis.files import file_sha256
    return file_sha256(path)


def _state(out: Path, settings: dict, force: bool) -> str:
    """'done' (a checkpoint with these settings is there), 'resume' or 'new'; refuses a
    directory with other content unless ``force``."""
    from analysis.checkpoint import MANIFEST

    man = out / MANIFEST
    part = out / PARTIAL / "settings.json"
    if man.is_file():
        old = read_json_or_none(man)
        if isinstance(old, dict) and old.get("provenance") == settings:
            return "done"
    elif part.is_file():
        if read_json_or_none(part) == settings:
            return "resume"
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"output directory {str(out)!r} holds other content (another "
                                  "checkpoint or other settings); pass --force to overwrite it "
                                  "or choose another --out")
        shutil.rmtree(out)
    return "new"


def _prepare(out: Path, settings: dict, force: bool) -> str:
    from numfmt.fileio import write_json_atomic

    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output path {str(out)!r} exists and is not a directory")
    status = _state(out, settings, force)
    if status == "done":
        return status
    try:
        (out / PARTIAL).mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / PARTIAL / "settings.json", settings)
    except PermissionError:
        raise PermissionError(f"output directory {str(out)!r} is not writable") from None
    except OSError as exc:
        raise PermissionError(f"output directory {str(out)!r} cannot be written: "
                              f"{exc.strerror or exc}") from None
    return status


@checks_input
def _read_input(args):
    """Everything the run needs from the user, checked before any work: (source,
    [(recipe, settings, status)], {name: directory}, the cluster)."""
    from analysis import analyzer, cluster
    from analysis.store import slug

    check_counts(args, ("steps", "max_sentences", "ref_rank", "timesteps", "sample_steps"))
    opts = analyzer.AnalysisOptions(main=args.main, branch=args.branch, steps=args.steps,
                                    seed=args.seed, smoothing=not args.no_smoothing,
                                    smoothing_grid=smoothing_grid(args), lr_rule=args.lr_rule)
    analyzer.recipes_for(args.configs, opts)  # the names are checked before any model loads
    out = Path(args.out)
    check_writable(out)
    where = cluster.client_from_args(args)
    src, _ = load_source(args)
    opts = dataclasses.replace(opts, ref_rank=args.ref_rank or src.ref_rank)
    recipes = analyzer.recipes_for(args.configs, opts)
    if src.module is None:  # a weights file: data-free, nothing to smooth with
        recipes = [r.replace(smoothing=None) if r.method == "svdquant" else r for r in recipes]
    for note in check_source_ranks(src, recipes):
        print(note)
    dirs = {r.name: out if len(recipes) == 1 else out / slug(r.name) for r in recipes}
    plan = []
    for r in recipes:
        settings = _settings(src, r, args)
        plan.append((r, settings, _prepare(dirs[r.name], settings, args.force)))
    return src, plan, dirs, where


def run(args) -> int:
    from analysis.checkpoint import checkpoint_bytes, save_quantized
    from analysis.store import LayerStore

    t0 = time.perf_counter()
    src, plan, dirs, where = _read_input(args)
    bar = Bar(sum(len(src.layers) for r, _, st in plan if st != "done"), not args.no_progress,
              desc="loraq quantize")
    try:
        with where as client:
            for r, settings, status in plan:
                d = dirs[r.name]
                if status == "done":
                    print(f"{r.name}: {d} is complete with these settings; nothing to do")
                    continue
                key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
                store = LayerStore(d / PARTIAL, key)
                model, restore = _quantize(src, r, store, bar, client, args)
                save_quantized(model, d, provenance=settings)
                restore()
                shutil.rmtree(d / PARTIAL, ignore_errors=True)
                b = checkpoint_bytes(d)
                print(f"{r.name}: wrote {d} ({b['quantized'] / 2**20:.3f} MiB of quantized "
                      f"codes and scales, {sum(b['files'].values()) / 2**20:.3f} MiB in all)",
                      file=sys.stdout, flush=True)
    finally:
        bar.close()
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


def _quantize(src, recipe, store, bar, client, args):
    """(the source's artifact quantized for ``recipe``, a function that restores the
    source's module); a weights file gives {name: QuantLinear}."""
    import numpy as np

    from analysis.fit import fit_layers
    from analysis.layers import QuantLinear
    from analysis.quantize import quantize_layers, swap

    if src.module is None:
        mats = {k: np.asarray(v, dtype=np.float32) for k, v in src.weights.items()}
        results = fit_layers(mats, recipe, None, store=store, progress=bar, client=client)
        qmods = {}
        for n, res in results.items():
            qmods[n] = QuantLinear.from_result(res, recipe.config, mode=args.mode, name=n)
            qmods[n].recipe = recipe
        return qmods, lambda: None
    originals = {n: src.module.get_submodule(n) for n in src.layers}
    quantize_layers(src.module, recipe, src.calibration, src.layers, mode=args.mode,
                    client=client, store=store, progress=bar)
    model = src.module.get_submodule(src.artifact) if src.artifact else src.module
    return model, lambda: swap(src.module, originals)
