"""``loraq optimize``: LoRaQ (or a baseline) over every linear weight of a model.

Examples::

    loraq optimize --out runs/minilm-w8                      # built-in MiniLM, mxint8 branch
    loraq optimize --weights model.safetensors --out runs/m --branch mxint6 --workers 2
    loraq optimize --weights /shared/model.safetensors --out runs/m --scheduler tcp://10.0.0.5:8786
    loraq optimize --method svdquant --out runs/minilm-svdq

Each layer's result is written atomically to ``--out`` as it finishes
(``<layer>.safetensors`` + ``<layer>.json``, then ``index.json``); rerunning the
same command skips finished layers, so an interrupted run resumes where it
stopped. A layer stored with different settings is an error unless
``--overwrite``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from analysis.errors import reading_input

__all__ = ["register", "run"]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "optimize", help="quantize every linear weight with LoRaQ or a baseline (resumable)",
        description="Run LoRaQ (W ~ Q1(P) + Q2(L Omega) Q2(Omega^T R)) or a baseline over "
        "every 2-D weight of the built-in MiniLM or a safetensors file, writing one result "
        "per layer to --out; a rerun skips finished layers.")
    p.add_argument("--weights", default="minilm",
                   help="'minilm' (the 36 linear layers of the built-in all-MiniLM-L6-v2) or "
                   "a .safetensors file (every 2-D tensor) (default: %(default)s)")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--method", default="loraq",
                   help="loraq, svdquant, lqer, loftq, naive, rtn (default: %(default)s)")
    p.add_argument("--main", default="mxint4", help="main format Q1 (default: %(default)s)")
    p.add_argument("--branch", default=None, help="branch format Q2 (default mxint8; fp16 for "
                   "svdquant)")
    p.add_argument("--rank", type=int, default=None, help="branch rank (default: equal memory "
                   "to an FP16 rank --ref-rank branch; svdquant: 32)")
    p.add_argument("--ref-rank", type=int, default=32, help="FP16 reference rank for equal "
                   "memory (default: %(default)s)")
    p.add_argument("--rotation", default="learned", help="loraq: learned, identity, hadamard "
                   "(default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="loraq: maximum Adam steps")
    p.add_argument("--lr", type=float, default=None, help="loraq: Adam step size")
    p.add_argument("--seed", type=int, default=0, help="loraq: seed (default: %(default)s)")
    p.add_argument("--device", default=None, help="loraq: torch device of the optimizer loop, "
                   "e.g. cuda, cuda:1 (numfmt's torch backend there; default: CPU with the "
                   "Numba kernels)")
    p.add_argument("--iters", type=int, default=None, help="loftq iterations / svdquant "
                   "refinement iterations")
    p.add_argument("--processes", type=int, default=None, help=argparse.SUPPRESS)  # old --workers
    p.add_argument("--overwrite", action="store_true",
                   help="recompute layers stored with different settings")
    p.add_argument("--quiet", action="store_true", help="no per-layer lines")
    from analysis.cluster import add_cluster_arguments
    add_cluster_arguments(p)
    p.set_defaults(func=run)


def _load(spec: str):
    if spec == "minilm":
        from analysis.minilm import linear_weights
        return linear_weights()
    path = Path(spec)
    if path.suffix != ".safetensors":
        raise ValueError(f"--weights {spec!r} must be 'minilm' or a .safetensors file (torch "
                         f"pickles are not read here)")
    if not path.is_file():
        raise FileNotFoundError(f"--weights file {spec!r} does not exist")
    return path  # read tensor by tensor by whoever fits the layer


def _kwargs(args) -> dict:
    m = args.method
    kw: dict = {"main": args.main}
    if getattr(args, "device", None) is not None:
        if m != "loraq":
            raise ValueError(f"--device applies to --method loraq, not {m!r}")
        import numfmt.torch as nft
        nft.check_device(args.device)  # e.g. cuda requested where there is none: one line
        kw["device"] = args.device
    if m == "rtn":
        extra = [k for k in ("branch", "rank", "steps", "lr", "iters")
                 if getattr(args, k) is not None]
        if extra:
            raise ValueError(f"--method rtn takes no {', '.join('--' + e for e in extra)}")
        return kw
    if args.branch is not None:
        kw["branch"] = args.branch
    if args.rank is not None:
        kw["rank"] = args.rank
    if m in ("loraq", "lqer", "loftq", "naive"):
        kw["ref_rank"] = args.ref_rank
    if m == "loraq":
        kw.update(rotation=args.rotation, seed=args.seed)
        if args.steps is not None:
            kw["steps"] = args.steps
        if args.lr is not None:
            kw["lr"] = args.lr
    elif args.steps is not None or args.lr is not None:
        raise ValueError(f"--steps/--lr apply to --method loraq, not {m!r}")
    if args.iters is not None:
        if m == "loftq":
            kw["iters"] = args.iters
        elif m == "svdquant":
            kw["refine_iters"] = args.iters
        else:
            raise ValueError(f"--iters applies to loftq and svdquant, not {m!r}")
    return kw


def run(args) -> int:
    from analysis.loraq.driver import METHOD_FUNCTIONS, optimize_model
    from analysis.loraq.result import METHODS

    with reading_input():
        if args.method not in METHOD_FUNCTIONS:
            raise ValueError(f"--method {args.method!r} is not one of {', '.join(METHODS)}")
        kw = _kwargs(args)
        from analysis import cluster
        if args.processes is not None:
            if args.workers is not None:
                raise ValueError("give --workers (--processes is its older name), not both")
            args.workers = args.processes
        where = cluster.client_from_args(args)  # checks the options; connects on entry
        weights = _load(args.weights)
    t0 = time.perf_counter()

    def progress(name, res, done, total):
        if not args.quiet:
            print(f"[{done:>3}/{total}] {name:<48} rank {res.rank:>4}  rel_error "
                  f"{res.rel_error:.5f}  {res.bits_per_weight:.3f} bit/w  steps {res.steps}",
                  flush=True)

    with where as client:
        if not args.quiet:
            print(f"layers run {cluster.describe(client)}", flush=True)
        optimize_model(weights, args.out, method=args.method, client=client,
                       progress=progress, overwrite=args.overwrite, **kw)
    index = json.loads((Path(args.out) / "index.json").read_text(encoding="utf-8"))
    layers = list(index["layers"].values())
    errs = [m["rel_error"] for m in layers]
    bits = sum(m["bits"] for m in layers)
    n = sum(m["shape"][0] * m["shape"][1] for m in layers)
    results = layers
    print(f"{len(results)} layers, mean rel_error {sum(errs) / len(errs):.5f}, "
          f"{bits / n:.3f} bits/weight, {time.perf_counter() - t0:.1f} s -> {args.out}",
          file=sys.stdout)
    return 0
