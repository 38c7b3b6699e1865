"""LoRaQ's Adam step: our rule against the paper's, on the shipped weight matrices.

    python -m analysis.lr_study [--layers N]

For every linear weight of the built-in MiniLM (36) and dit-digits (66), LoRaQ is fitted
with each rule (``analysis.recipe.LR_RULES``: ``ours`` = ``default_lr`` by branch width on
the unit-RMS weight; ``paper`` = 1e-3 for FP branches, 1e-4 for INT, on the unnormalized
weight, ``analysis.fit.paper_lr``) for an MXINT8 and an MXFP8 branch, at 30 steps (the
report's budget, cosine schedule) and at convergence (the optimizer's own plateau schedule,
at most 400 steps), without smoothing. It prints the mean relative weight error
||W - W_hat||_F / ||W||_F per model, branch, budget and rule, the paired per-layer
difference (paper - ours) with its 95 % bootstrap interval over layers, and the steps run.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from analysis import confidence
from analysis.fit import fit_weight
from analysis.recipe import Recipe

__all__ = ["main", "weights"]


def weights() -> dict:
    """{model: {layer: (out x in) float32}} of the two built-in models."""
    from analysis.models.base import layer_weight, quantizable_layers
    from analysis.models.dit_digits import core
    from analysis.minilm import linear_weights

    den = core.load()[0]
    names = quantizable_layers(den)[0]
    dit = {n: layer_weight(den.get_submodule(n)).to(torch.float32).numpy().copy() for n in names}
    return {"minilm": linear_weights(), "dit-digits": dit}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.lr_study", description=__doc__)
    p.add_argument("--layers", type=int, default=None, help="the first N layers of each model")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = []
    for model, mats in weights().items():
        ref = 8 if model == "dit-digits" else 32
        items = list(mats.items())[:args.layers]
        for branch in ("W4A4+W8A8-nosmooth",):
            for family in ("mxint", "mxfp"):
                for steps in (30, None):
                    err, nsteps = {}, {}
                    for rule in ("ours", "paper"):
                        r = Recipe.parse(branch, branch=family, ref_rank=ref, steps=steps)
                        r = r.replace(lr_rule=rule)
                        res = [fit_weight(W, r) for _, W in items]
                        err[rule] = np.array([x.rel_error for x in res])
                        nsteps[rule] = int(np.mean([x.steps for x in res]))
                    d = err["paper"] - err["ours"]
                    lo, hi = confidence.interval(lambda i: d[i].mean(), len(d))
                    rows.append((model, family + "8", "30" if steps else "converged",
                                 err["ours"].mean(), err["paper"].mean(), d.mean(), lo, hi,
                                 nsteps["ours"], nsteps["paper"]))
                    print(f"{model:10s} {family}8 {'30 steps' if steps else 'converged':9s} "
                          f"ours {err['ours'].mean():.5f} ({nsteps['ours']} steps)  paper "
                          f"{err['paper'].mean():.5f} ({nsteps['paper']} steps)  paper - ours "
                          f"{d.mean():+.5f} [{lo:+.5f}, {hi:+.5f}]  "
                          f"{confidence.verdict(lo, hi, higher_is_better=False)} for the paper",
                          flush=True)
    print(f"{time.perf_counter() - t0:.0f} s, 1 thread", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
