"""The per-layer and per-configuration records of ``results.json``.

Per layer (``layer_record``): ``weight_error`` = ||W - W_eff||_F / ||W||_F with the
effective weight W_eff = (Q1(P) + L_q R_q) diag(1/s) (s the smoothing vector, 1 if
none); the activation fields that the analyzer measured; accumulator widths (bits, sign
included) of the main GEMM: ``acc_bits_worst`` (A2Q from the formats and the in-block
length), ``acc_bits_l1`` (A2Q's l1-norm bound from the weight codes),
``acc_bits_observed`` (largest in-block sum on the FP inputs), ``branch_acc_bits_*``
the maxima over the branch GEMMs; cost from ``hwsim.cost.layer_cost`` for ``tokens``
tokens (``energy_pj``, ``weight_bits``, ``branch_bits``, ``macs``).
Per configuration (``config_entry``): the layers, their means / extremes, the memory
overhead against the main-only bits, and the energy sums.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

import numfmt
from hwsim.cost import layer_cost

from analysis.metrics import sqnr_db
from analysis.recipe import Recipe

__all__ = ["layer_record", "config_entry", "clean", "group_sqnr", "aggregate",
           "effective_weight", "weight_error", "END_METRICS", "present_metrics", "short_name"]


def effective_weight(result) -> np.ndarray:
    """(Q1(P) + L_q R_q) diag(1/s): the weight the simulated layer applies to x, float64."""
    w = numfmt.dequantize(result.main).astype(np.float64)
    left = getattr(result, "left", None)
    if left is not None and getattr(result, "rank", 1):
        w = w + numfmt.dequantize(left).astype(np.float64) @ numfmt.dequantize(result.right).astype(np.float64)
    smooth = getattr(result, "smooth", None)
    if smooth is not None:
        w = w / np.asarray(smooth, dtype=np.float64)[None, :]
    return w


def weight_error(W: np.ndarray, result) -> float:
    """||W - W_eff||_F / ||W||_F (see ``effective_weight``; the result's ``w_hat`` is that
    matrix rounded to float32 and is used when present)."""
    W = np.asarray(W, dtype=np.float64)
    n = float(np.linalg.norm(W))
    w_hat = getattr(result, "w_hat", None)
    w_eff = effective_weight(result) if w_hat is None else np.asarray(w_hat, dtype=np.float64)
    return float(np.linalg.norm(W - w_eff) / n) if n > 0 else 0.0


def layer_record(n, W, result, q, recipe: Recipe, tokens: int, measured: dict,
                 observed: dict) -> dict:
    """One layer's row: identity, weight error, the ``measured`` activation fields,
    accumulator widths (worst case, l1 bound, ``observed``) and cost."""
    rec = {"name": n, "shape": list(W.shape), "method": recipe.layer_method, "rank": q.rank,
           "weight_error": weight_error(W, result)}
    if recipe.rank is not None and recipe.rank >= min(W.shape):  # capped at min(out, in) - 1
        rec["rank_requested"] = recipe.rank
    cfg = getattr(result, "config", None) or {}
    ab = cfg.get("smoothing") or cfg.get("alpha_beta")
    if ab is not None:  # the (alpha, beta) the layer's smoothing chose
        rec["smoothing_alpha_beta"] = [float(v) for v in ab]
    rec.update(measured)
    rec.update(_gemm_bits(q.acc_bits_worst(), q.acc_bits_l1(), observed))
    rec.update(_cost_fields(n, W.shape, recipe.config, q.rank, tokens))
    return rec


def config_entry(recipe: Recipe, layers: list[dict], end: dict, output_sqnr) -> dict:
    """One configuration's entry of ``results.json``: its layers and their summary
    (JSON-safe, see ``clean``)."""
    formats = {"main_weight": recipe.main_weight, "main_act": recipe.main_act,
               "branch_weight": recipe.branch_weight, "branch_act": recipe.branch_act}
    entry = {"config": recipe.name, "method": layers[0]["method"], "formats": formats,
             "end_metrics": end, "output_sqnr_db": output_sqnr, "layers": layers}
    entry.update(_summary(layers, sum(l["main_weight_bits"] for l in layers)))
    return clean(entry)


def _gemm_bits(worst: dict, l1: dict, observed: dict) -> dict:
    def bmax(d):
        vals = [v for k, v in d.items() if k != "main" and v is not None]
        return max(vals) if vals else None

    return {
        "acc_bits_worst": worst.get("main"), "acc_bits_l1": l1.get("main"),
        "acc_bits_observed": observed.get("main"),
        "branch_acc_bits_worst": bmax(worst), "branch_acc_bits_l1": bmax(l1),
        "branch_acc_bits_observed": bmax(observed),
    }


def _cost_fields(name: str, shape, cfg, rank: int, tokens: int) -> dict:
    """The cost model's fields for the layer's actual ``rank`` (an explicit rank capped at a
    narrow layer's width is costed as capped)."""
    out_f, in_f = shape
    lc = layer_cost((name, in_f, out_f, tokens), dataclasses.replace(cfg, rank=None),
                    rank=max(rank, 1) if cfg.has_branch else None)
    return {"energy_pj": lc.energy_pj, "compute_energy_pj": lc.compute_energy_pj,
            "memory_energy_pj": lc.memory_energy_pj, "compute_pj": dict(lc.compute_pj),
            "memory_pj": dict(lc.memory_pj), "weight_bits": lc.weight_bits,
            "main_weight_bits": lc.main_weight_bits, "branch_bits": lc.branch_weight_bits,
            "macs": lc.macs}


def _summary(layers: list[dict], main_only_bits: int) -> dict:
    def vals(k):
        return [l[k] for l in layers if l.get(k) is not None and math.isfinite(l[k])]

    def mean(k):
        v = vals(k)
        return float(np.mean(v)) if v else None

    s = {
        "weight_error_mean": mean("weight_error"),
        "weight_error_max": max(vals("weight_error"), default=None),
        "local_sqnr_db_mean": mean("local_sqnr_db"),
        "local_sqnr_db_min": min(vals("local_sqnr_db"), default=None),
        "propagated_sqnr_db_mean": mean("propagated_sqnr_db"),
        "propagated_sqnr_db_min": min(vals("propagated_sqnr_db"), default=None),
        "act_error_mean": mean("act_error"),
        "acc_bits_worst_max": max(vals("acc_bits_worst"), default=None),
        "acc_bits_l1_max": max(vals("acc_bits_l1"), default=None),
        "acc_bits_observed_max": max(vals("acc_bits_observed"), default=None),
    }
    weight_bits = int(sum(l["weight_bits"] for l in layers))
    s["weight_bits"] = weight_bits
    s["memory_overhead_bits"] = weight_bits - int(main_only_bits)
    s["energy_pj"] = float(sum(l["energy_pj"] for l in layers))
    comp: dict[str, float] = {}
    mem: dict[str, float] = {}
    for l in layers:
        for k, v in l["compute_pj"].items():
            comp[k] = comp.get(k, 0.0) + v
        for k, v in l["memory_pj"].items():
            mem[k] = mem.get(k, 0.0) + v
    s["compute_pj"], s["memory_pj"] = comp, mem
    ranks = [l["rank"] for l in layers]
    s["rank_min"], s["rank_max"] = (min(ranks), max(ranks)) if ranks else (0, 0)
    return s


def clean(x):
    """JSON-safe: non-finite floats become None; numpy scalars become Python numbers."""
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def group_sqnr(fp: list, q: list, groups: list) -> dict:
    """{group: SQNR dB} over the batches of each group (rows of all its batches)."""
    out = {}
    for g in dict.fromkeys(groups):
        idx = [i for i, gi in enumerate(groups) if gi == g]
        out[str(g)] = sqnr_db(torch.cat([fp[i] for i in idx]), torch.cat([q[i] for i in idx]))
    return out


def aggregate(by_group: dict | None) -> tuple[float | None, float | None]:
    if not by_group:
        return None, None
    v = [x for x in by_group.values() if x is not None and math.isfinite(x)]
    return (float(np.mean(v)), float(min(v))) if v else (None, None)


# End metrics a report can show: (key, column label, format, higher is better).
END_METRICS = (
    ("fid", "FID (clf. features)", "{:.2f}", False),
    ("class_accuracy", "class acc.", "{:.3f}", True),
    ("psnr_db", "PSNR dB vs FP", "{:.2f}", True),
    ("feature_distance", "feature dist. vs FP", "{:.4f}", False),
    ("mean_cosine", "mean cos", "{:.4f}", True),
    ("min_cosine", "min cos", "{:.4f}", True),
    ("top1_agreement", "top-1 agree", "{:.3f}", True),
    ("output_sqnr_db", "output SQNR dB", "{:.2f}", True),
    ("output_sqnr_db_worst", "worst-timestep output SQNR dB", "{:.2f}", True),
    ("kl_mean", "KL mean (nats)", "{:.4g}", False),
    ("kl_max", "KL max (nats)", "{:.4g}", False),
)


def present_metrics(configs: dict, reference: dict | None = None) -> list[tuple]:
    """The END_METRICS that some configuration (or the reference) has a value for."""
    ems = [c.get("end_metrics") or {} for c in configs.values()]
    if reference:
        ems.append(reference.get("end_metrics") or {})
    return [m for m in END_METRICS if any(e.get(m[0]) is not None for e in ems)]


def short_name(name: str) -> str:
    """A layer name shortened for tables and plot axes (b3.attn1.to_q, L2.ffn.up, ...)."""
    name = (name.replace("transformer.transformer_blocks.", "b").replace("model.transformer_blocks.",
                                                                          "b")
            .replace("transformer.", "").replace("model.", ""))
    return (name.replace("encoder.layer.", "L").replace("attention.self.", "attn.")
            .replace("attention.output.dense", "attn.out").replace("intermediate.dense", "ffn.up")
            .replace("output.dense", "ffn.down"))
