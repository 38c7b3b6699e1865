"""The MiniLM study: ``python -m analysis.loraq.study [--out study.json] [--processes 2]``.

On all 36 linear layers of all-MiniLM-L6-v2 (``analysis.minilm.linear_weights``):

* main format mxint4 and sint4; SVDQuant baseline = FP16 rank-32 branch from the
  SVD of W, residual in the main format, no data, ``refine_iters=0``;
* LoRaQ with mxint8, mxint6 and mxint4 branches at equal memory to that FP16
  rank-32 branch (ranks 62, 81, 120 on every MiniLM shape), default settings;
* ablation (mxint4 main, the 12 layers of blocks 0 and 5): rotation learned /
  identity / hadamard per branch, and reference points naive (SVD factors
  quantized, no optimization), lqer, loftq (5 iterations) at the same ranks.

Writes a JSON file (atomically) with every layer's rel_error and steps, and
prints Markdown tables: per (main, branch) the mean and worst ratio
loraq / svdquant and whether LoRaQ wins on every layer.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import time

import numpy as np

__all__ = ["run_study", "summarize", "main"]

BRANCHES = ("mxint8", "mxint6", "mxint4")
MAINS = ("mxint4", "sint4")


ABLATION_BLOCKS = (0, 5)


def _jobs(names, full: bool):
    """Main table first (every layer), then the ablation and the extra baselines on the
    layers of blocks ``ABLATION_BLOCKS`` (12 layers: all six kinds, first and last block)."""
    jobs = []
    for name in names:
        for m in MAINS:
            jobs.append((name, "svdquant", m, "fp16", {}))
            for b in BRANCHES:
                jobs.append((name, "loraq", m, b, {}))
    if full:
        sub = [n for n in names if any(n.startswith(f"encoder.layer.{i}.")
                                       for i in ABLATION_BLOCKS)]
        for name in sub:
            for b in BRANCHES:
                for rot in ("identity", "hadamard"):
                    jobs.append((name, "loraq", "mxint4", b, {"rotation": rot}))
                for meth in ("naive", "lqer", "loftq"):
                    jobs.append((name, meth, "mxint4", b, {}))
    return jobs


def _one(job):
    from analysis.loraq.driver import run_method
    from analysis.minilm import linear_weights

    name, method, main, branch, extra = job
    W = _WEIGHTS.get("w")
    if W is None:
        W = _WEIGHTS["w"] = linear_weights()
    kw = dict(main=main, branch=branch, **extra)
    res = run_method(W[name], method, threads=1, **kw)
    return {"layer": name, "method": method, "main": main, "branch": branch,
            "rotation": extra.get("rotation", "learned" if method == "loraq" else None),
            "rank": res.rank, "rel_error": res.rel_error, "steps": res.steps,
            "converged": res.converged, "bits": res.bits, "seconds": res.seconds}


_WEIGHTS: dict = {}


def run_study(processes: int = 2, layers=None, full: bool = True, progress=None) -> list[dict]:
    from analysis.minilm import linear_weights

    names = list(linear_weights()) if layers is None else list(layers)
    jobs = _jobs(names, full)
    rows = []
    if processes == 1:
        for i, j in enumerate(jobs):
            rows.append(_one(j))
            if progress:
                progress(i + 1, len(jobs), rows)
    else:
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(processes, mp_context=ctx) as ex:
            for i, row in enumerate(ex.map(_one, jobs, chunksize=2)):
                rows.append(row)
                if progress:
                    progress(i + 1, len(jobs), rows)
    return rows


def summarize(rows: list[dict]) -> dict:
    """Ratios loraq / svdquant per (main, branch, rotation) and the steps taken."""
    def err(layer, method, main, branch, rotation=None):
        for r in rows:
            if (r["layer"], r["method"], r["main"], r["branch"]) == (layer, method, main, branch) \
                    and (rotation is None or r["rotation"] == rotation):
                return r
        return None

    layers = list(dict.fromkeys(r["layer"] for r in rows))
    out = {"vs_svdquant": [], "ablation": [], "baselines": []}
    for m in MAINS:
        for b in BRANCHES:
            ratios, steps, ranks = [], [], set()
            for L in layers:
                a, s = err(L, "loraq", m, b, "learned"), err(L, "svdquant", m, "fp16")
                if a and s:
                    ratios.append(a["rel_error"] / s["rel_error"])
                    steps.append(a["steps"])
                    ranks.add(a["rank"])
            if ratios:
                worst = int(np.argmax(ratios))
                out["vs_svdquant"].append({
                    "main": m, "branch": b, "ranks": sorted(ranks), "layers": len(ratios),
                    "mean_ratio": float(np.mean(ratios)), "worst_ratio": float(ratios[worst]),
                    "worst_layer": layers[worst], "best_ratio": float(np.min(ratios)),
                    "wins": int(sum(x < 1 for x in ratios)), "mean_steps": float(np.mean(steps))})
    abl = [L for L in layers if err(L, "loraq", "mxint4", "mxint8", "identity")]
    for b in BRANCHES:
        for rot in ("learned", "identity", "hadamard"):
            e = [err(L, "loraq", "mxint4", b, rot) for L in abl]
            s = [err(L, "svdquant", "mxint4", "fp16") for L in abl]
            pairs = [(x["rel_error"], y["rel_error"]) for x, y in zip(e, s) if x and y]
            if pairs:
                out["ablation"].append({"branch": b, "rotation": rot,
                                        "mean_rel_error": float(np.mean([p[0] for p in pairs])),
                                        "mean_ratio": float(np.mean([p[0] / p[1] for p in pairs])),
                                        "layers": len(pairs)})
        for meth in ("naive", "lqer", "loftq"):
            e = [err(L, meth, "mxint4", b) for L in abl]
            s = [err(L, "svdquant", "mxint4", "fp16") for L in abl]
            pairs = [(x["rel_error"], y["rel_error"]) for x, y in zip(e, s) if x and y]
            if pairs:
                out["baselines"].append({"branch": b, "method": meth,
                                         "mean_rel_error": float(np.mean([p[0] for p in pairs])),
                                         "mean_ratio": float(np.mean([p[0] / p[1] for p in pairs]))})
    sq = {m: [r["rel_error"] for r in rows if r["method"] == "svdquant" and r["main"] == m]
          for m in MAINS}
    out["svdquant_mean_rel_error"] = {m: float(np.mean(v)) for m, v in sq.items() if v}
    return out


def markdown(summary: dict) -> str:
    lines = ["| main | branch | rank | layers won | mean ratio | worst ratio (layer) | "
             "mean steps |", "|---|---|---|---|---|---|---|"]
    for r in summary["vs_svdquant"]:
        lines.append(f"| {r['main']} | {r['branch']} | {','.join(map(str, r['ranks']))} | "
                     f"{r['wins']}/{r['layers']} | {r['mean_ratio']:.3f} | "
                     f"{r['worst_ratio']:.3f} ({r['worst_layer']}) | {r['mean_steps']:.0f} |")
    if summary["ablation"]:
        lines += ["", "| branch | rotation | mean rel. error | mean ratio vs svdquant |",
                  "|---|---|---|---|"]
        for r in summary["ablation"]:
            lines.append(f"| {r['branch']} | {r['rotation']} | {r['mean_rel_error']:.5f} | "
                         f"{r['mean_ratio']:.3f} |")
    if summary["baselines"]:
        lines += ["", "| branch | method | mean rel. error | mean ratio vs svdquant |",
                  "|---|---|---|---|"]
        for r in summary["baselines"]:
            lines.append(f"| {r['branch']} | {r['method']} | {r['mean_rel_error']:.5f} | "
                         f"{r['mean_ratio']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.loraq.study")
    p.add_argument("--out", default="loraq_study.json")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="no ablation / extra baselines")
    p.add_argument("--summarize", metavar="JSON", default=None,
                   help="only print the tables of an existing study JSON (or .partial)")
    args = p.parse_args(argv)
    from analysis.loraq.result import write_atomic

    if args.summarize:
        with open(args.summarize, encoding="utf-8") as f:
            print(markdown(summarize(json.load(f)["rows"])))
        return 0

    t0 = time.perf_counter()
    def progress(i, n, rows):
        print(f"\r{i}/{n}", end="", flush=True)
        if i % 24 == 0:   # partial results, so a stopped study still leaves its rows
            write_atomic(args.out + ".partial", json.dumps({"rows": rows}) + "\n")

    rows = run_study(args.processes, full=not args.quick, progress=progress)
    print()
    summary = summarize(rows)
    doc = {"rows": rows, "summary": summary, "seconds": time.perf_counter() - t0,
           "processes": args.processes, "cpus": os.cpu_count()}
    write_atomic(args.out, json.dumps(doc, indent=1) + "\n")
    print(markdown(summary))
    print(f"{len(rows)} runs in {doc['seconds']:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
