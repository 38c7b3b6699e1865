"""Per-layer error reports: results.json, layers.csv, PNG plots, report.md, report.html.

Input is the dict returned by ``analysis.analyzer.analyze`` (or
``analyze_weights``) plus the run's settings; ``build_results`` adds the
headline comparison and ``write_report`` writes every file atomically (temporary
name, then ``os.replace``), so a reader never sees a half-written file.

results.json::

    {"settings": {...},                       # model, configs, seed, formats, ...
     "layer_names": [...],
     "configs": {"W4A4+W8A8": {
         "end_metrics": {"mean_cosine", "min_cosine", "top1_agreement", "n"},
         "memory_overhead_bits",              # weight bits - the main-only bits (same main format)
         "weight_bits", "energy_pj",          # energy for ``tokens`` tokens per layer, summed
         "compute_pj": {...}, "memory_pj": {...},
         "weight_error_mean", "weight_error_max", "local_sqnr_db_mean",
         "propagated_sqnr_db_mean", "propagated_sqnr_db_min", ...,
         "layers": [{"name", "shape", "method", "rank", "weight_error", "act_error",
                     "local_sqnr_db", "propagated_sqnr_db", "acc_bits_worst", "acc_bits_l1",
                     "acc_bits_observed", "branch_acc_bits_*", "energy_pj", ...}]}},
     "headline": [{"config", "reference", ...}]}

The report html is self-contained: the plots are embedded as base64 PNGs.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from pathlib import Path

import numpy as np

from numfmt.fileio import write_atomic, write_json_atomic

from analysis import confidence
from analysis.metrics import psnr_from_mse
from analysis.plots import plots
from analysis.records import END_METRICS, present_metrics, short_name

__all__ = ["build_results", "headline", "verdict_table", "write_report", "render_markdown", "render_html",
           "layers_csv", "plots", "CSV_FIELDS"]

CSV_FIELDS = ("config", "name", "out", "in", "method", "rank", "weight_error", "act_error",
              "branch_act_error", "local_sqnr_db", "propagated_sqnr_db", "acc_bits_worst",
              "acc_bits_l1", "acc_bits_observed", "branch_acc_bits_worst", "branch_acc_bits_l1",
              "branch_acc_bits_observed", "weight_bits", "branch_bits", "macs", "energy_pj",
              "compute_energy_pj", "memory_energy_pj", "local_sqnr_db_mean_t",
              "local_sqnr_db_worst_t", "propagated_sqnr_db_mean_t", "propagated_sqnr_db_worst_t")


def _is_fp16(cfg: dict) -> bool:
    return (cfg.get("formats") or {}).get("branch_weight") == "fp16"


# End metrics with per-sample values: the difference from the reference configuration gets a
# paired bootstrap interval. (metric, per-sample key, statistic of a resample, higher better)
PAIRED = (("class_accuracy", "correct", np.mean, True),
          ("psnr_db", "mse", psnr_from_mse, True),
          ("feature_distance", "feature_distance", np.mean, False),
          ("mean_cosine", "cosine", np.mean, True))


def _verdicts(c: dict, ref: dict, row: dict) -> dict:
    """Per end metric: 'better', 'worse' or 'not resolved' against the reference, from the
    95 % interval of the paired difference (``analysis.confidence``); the FID, which has no
    per-sample value, from its two intervals: resolved only when they do not overlap."""
    pa = (c["end_metrics"].get("per_sample") or {})
    pb = (ref["end_metrics"].get("per_sample") or {})
    out = {}
    for k, key, stat, higher in PAIRED:
        a, b = pa.get(key), pb.get(key)
        if a is None or b is None or len(a) != len(b) or len(a) < 2:
            continue
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        lo, hi = confidence.paired_difference(lambda i: stat(a[i]), lambda i: stat(b[i]), len(a))
        row[k + "_diff_ci"] = [lo, hi]
        out[k] = confidence.verdict(lo, hi, higher)
    fa, fb = c["end_metrics"].get("fid_ci"), ref["end_metrics"].get("fid_ci")
    if fa and fb and None not in fa + fb:
        out["fid"] = ("better" if fa[1] < fb[0] else "worse" if fa[0] > fb[1]
                      else "not resolved")
    return out


def headline(configs: dict) -> list[dict]:
    """Each quantized-branch configuration against the FP16 branch (the first one present).

    Per configuration: its and the reference's end metrics (every key of
    ``END_METRICS`` present), weight error mean, propagated SQNR mean and memory
    overhead, the relative weight-error change (1 - mine / reference) and the
    SQNR gain in dB. Empty without an FP16 config.
    """
    ref_name = next((k for k, c in configs.items() if _is_fp16(c)), None)
    if ref_name is None:
        return []
    ref = configs[ref_name]
    keys = [m[0] for m in present_metrics(configs)]
    for k in ("mean_cosine", "min_cosine", "top1_agreement"):
        if k not in keys:
            keys.append(k)
    rows = []
    for name, c in configs.items():
        if name == ref_name or not (c.get("formats") or {}).get("branch_weight"):
            continue
        row = {"config": name, "reference": ref_name}
        for k in ("weight_error_mean", "propagated_sqnr_db_mean", "local_sqnr_db_mean",
                  "memory_overhead_bits", "energy_pj"):
            row[k] = c.get(k)
            row["reference_" + k] = ref.get(k)
        for k in keys:
            row[k] = c["end_metrics"].get(k)
            row["reference_" + k] = ref["end_metrics"].get(k)
        we, rwe = c.get("weight_error_mean"), ref.get("weight_error_mean")
        row["weight_error_reduction"] = (1.0 - we / rwe) if we is not None and rwe else None
        ps, rps = c.get("propagated_sqnr_db_mean"), ref.get("propagated_sqnr_db_mean")
        row["propagated_sqnr_gain_db"] = (ps - rps) if ps is not None and rps is not None else None
        mo, rmo = c.get("memory_overhead_bits"), ref.get("memory_overhead_bits")
        row["memory_ratio"] = (mo / rmo) if mo is not None and rmo else None
        row["verdicts"] = _verdicts(c, ref, row)
        rows.append(row)
    return rows


def build_results(analysis: dict, settings: dict) -> dict:
    """results.json's content: settings, layer names, the full-precision reference (when the
    end metric has one), per-config results, headline."""
    out = {"settings": settings, "layer_names": analysis["layer_names"]}
    if analysis.get("reference") is not None:
        out["reference"] = analysis["reference"]
    out["configs"] = analysis["configs"]
    out["headline"] = headline(analysis["configs"])
    return out


# --------------------------------------------------------------------------- formatting


def _f(v, fmt="{:.4f}", none="-") -> str:
    if v is None:
        return none
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else "-inf"
    return fmt.format(v)


def _fci(em: dict, k: str, fmt: str) -> str:
    """The metric, with its 95 % interval when it has one: ``17.07 [15.90, 18.41]``."""
    v, ci = em.get(k), em.get(k + "_ci")
    if ci is None or v is None or None in ci:
        return _f(v, fmt)
    return f"{_f(v, fmt)} [{_f(ci[0], fmt)}, {_f(ci[1], fmt)}]"


def verdict_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """Per quantized branch and end metric: the difference from the FP16 branch with its
    paired 95 % bootstrap interval (the FID: both intervals), and the verdict."""
    labels = {k: (lab, f) for k, lab, f, _ in END_METRICS}
    head = ["config", "vs", "metric", "difference [95 % CI]", "verdict"]
    rows = []
    for h in results.get("headline", []):
        for k, v in (h.get("verdicts") or {}).items():
            lab, f = labels[k]
            if k + "_diff_ci" in h:
                d = None if h.get(k) is None or h.get("reference_" + k) is None else (
                    h[k] - h["reference_" + k])
                lo, hi = h[k + "_diff_ci"]
                cell = f"{_f(d, f)} [{_f(lo, f)}, {_f(hi, f)}]"
            else:
                cfg, ref = results["configs"][h["config"]], results["configs"][h["reference"]]
                cell = (f"{_fci(cfg['end_metrics'], k, f)} vs "
                        f"{_fci(ref['end_metrics'], k, f)} (intervals)")
            rows.append([h["config"], h["reference"], lab, cell, v])
    return head, rows


def _mb(bits) -> str:
    return "-" if bits is None else f"{bits / 8 / 2**20:.3f}"


def summary_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """One row per configuration (and a first "full precision" row when the end metric has a
    reference): method, rank, the end metrics present, weight error, SQNR, overhead, energy."""
    ems = present_metrics(results["configs"], results.get("reference"))
    head = (["config", "method", "rank"] + [m[1] for m in ems]
            + ["weight err mean", "weight err max", "local SQNR dB", "prop. SQNR dB mean",
               "prop. SQNR dB min", "overhead MiB", "energy uJ"])
    rows = []
    if results.get("reference"):
        em = results["reference"].get("end_metrics") or {}
        rows.append(["full precision", "-", "-"] + [_fci(em, k, f) for k, _, f, _ in ems]
                    + ["0", "0", "inf", "inf", "inf", "0", "-"])
    for name, c in results["configs"].items():
        em = c["end_metrics"]
        rank = (f"{c['rank_min']}" if c["rank_min"] == c["rank_max"]
                else f"{c['rank_min']}-{c['rank_max']}")
        rows.append([name, c["method"], rank] + [_fci(em, k, f) for k, _, f, _ in ems]
                    + [_f(c.get("weight_error_mean")),
                       _f(c.get("weight_error_max")), _f(c.get("local_sqnr_db_mean"), "{:.2f}"),
                       _f(c.get("propagated_sqnr_db_mean"), "{:.2f}"),
                       _f(c.get("propagated_sqnr_db_min"), "{:.2f}"),
                       _mb(c.get("memory_overhead_bits")),
                       _f(c["energy_pj"] / 1e6, "{:.1f}")])
    return head, rows


def headline_table(results: dict) -> tuple[list[str], list[list[str]]]:
    ems = present_metrics(results["configs"])
    head = ["config", "vs"]
    for _, lab, _, _ in ems:
        head += [lab, "vs " + lab]
    head += ["weight err reduction", "prop. SQNR gain dB", "memory ratio"]
    rows = []
    for h in results.get("headline", []):
        row = [h["config"], h["reference"]]
        for k, _, f, _ in ems:
            row += [_f(h.get(k), f), _f(h.get("reference_" + k), f)]
        rows.append(row + [_f(h["weight_error_reduction"], "{:.1%}"),
                           _f(h["propagated_sqnr_gain_db"], "{:+.2f}"),
                           _f(h["memory_ratio"], "{:.3f}")])
    return head, rows


def timestep_table(results: dict) -> tuple[list[str], list[list[str]]] | None:
    """Per configuration: propagated SQNR mean over layers at each timestep (None without
    timesteps)."""
    first = next(iter(results["configs"].values()))
    if not first["layers"] or first["layers"][0].get("propagated_sqnr_db_by_timestep") is None:
        return None
    ts = list(first["layers"][0]["propagated_sqnr_db_by_timestep"])
    head = ["config"] + [f"t={t}" for t in ts] + ["mean over t", "worst t"]
    rows = []
    for name, c in results["configs"].items():
        per = []
        for t in ts:
            v = [l["propagated_sqnr_db_by_timestep"].get(t) for l in c["layers"]]
            v = [x for x in v if x is not None and math.isfinite(x)]
            per.append(sum(v) / len(v) if v else None)
        ok = [p for p in per if p is not None]
        rows.append([name] + [_f(p, "{:.2f}") for p in per]
                    + [_f(sum(ok) / len(ok) if ok else None, "{:.2f}"),
                       _f(min(ok) if ok else None, "{:.2f}")])
    return head, rows


def skipped_table(results: dict) -> tuple[list[str], list[list[str]]] | None:
    sk = results.get("settings", {}).get("skipped_layers") or []
    if not sk:
        return None
    return (["module", "type", "parameters", "why it stays in full precision"],
            [[d["name"], d["type"], str(d.get("parameters", "")), d["reason"]] for d in sk])


def layer_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """One row per layer, one column group per config: weight error and propagated SQNR."""
    names = list(results["configs"])
    head = ["layer", "shape"]
    for n in names:
        head += [f"{n} w.err", f"{n} local dB", f"{n} prop. dB"]
    rows = []
    first = next(iter(results["configs"].values()))
    for i, lay in enumerate(first["layers"]):
        row = [short_name(lay["name"]), "x".join(str(s) for s in lay["shape"])]
        for n in names:
            L = results["configs"][n]["layers"][i]
            row += [_f(L["weight_error"]), _f(L["local_sqnr_db"], "{:.2f}"),
                    _f(L["propagated_sqnr_db"], "{:.2f}")]
        rows.append(row)
    return head, rows


def acc_table(results: dict) -> tuple[list[str], list[list[str]]]:
    head = ["config", "main worst", "main l1 max", "main observed max", "branch worst",
            "branch l1 max", "branch observed max"]
    rows = []
    for name, c in results["configs"].items():
        def mx(k):
            v = [l[k] for l in c["layers"] if l.get(k) is not None]
            return str(max(v)) if v else "-"
        rows.append([name] + [mx(k) for k in ("acc_bits_worst", "acc_bits_l1", "acc_bits_observed",
                                              "branch_acc_bits_worst", "branch_acc_bits_l1",
                                              "branch_acc_bits_observed")])
    return head, rows


def layers_csv(results: dict) -> str:
    """Per-layer rows of every configuration (``CSV_FIELDS``), as CSV text."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for name, c in results["configs"].items():
        for L in c["layers"]:
            row = dict(L, config=name, out=L["shape"][0], **{"in": L["shape"][1]})
            w.writerow(["" if row.get(k) is None else row.get(k) for k in CSV_FIELDS])
    return buf.getvalue()


# --------------------------------------------------------------------------- plots


def _md_table(head, rows) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(head, rows) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _sections(results: dict, images: dict[str, bytes], run_info: dict | None):
    """The report as [(heading, [blocks])]: blocks are ('p', text), ('table', (head, rows)), ('img', name)."""
    s = results["settings"]
    cfgs = results["configs"]
    ems = present_metrics(cfgs, results.get("reference"))
    weights_only = not ems
    intro = [("p", f"Model: {s.get('model')}. Configurations: {', '.join(cfgs)}. Main format "
                   f"{s.get('main')}, branch family {s.get('branch')}, seed {s.get('seed')}; "
                   f"reference FP16 branch rank {s.get('ref_rank', 32)} (FP16 configurations "
                   "without r<rank> use it; quantized branches get its memory); "
                   f"cost for {s.get('tokens')} tokens per layer (hwsim.cost, Horowitz 45 nm).")]
    if not weights_only:
        sm = ("LoRaQ runs SVDQuant's smoothing search first (the paper's pipeline) except "
              "configurations ending in -nosmooth" if s.get("smoothing", True)
              else "LoRaQ runs without smoothing (--no-smoothing: purely data-free)")
        grid = s.get("svdquant_grid") or [[0.5], [0.5]]
        how = (f"(alpha, beta) chosen per layer from alpha in {grid[0]}, beta in {grid[1]} on "
               "the quantized layer's output MSE, its activation quantizer and the smoothing "
               "rank's SVD branch in the loop" if s.get("smoothing_criterion") == "output"
               else f"the fixed point alpha = {grid[0]}, beta = {grid[1]}"
               if len(grid[0]) * len(grid[1]) == 1 else
               f"(alpha, beta) from alpha in {grid[0]}, beta in {grid[1]}")
        intro.append(("p", f"Per-layer errors are measured on the evaluation inputs "
                           f"({s.get('evaluation')}); calibration inputs ({s.get('calibration')}) "
                           f"feed the smoothing ({how}): SVDQuant always smooths; {sm}. "
                           f"End metric: {s.get('end_metric') or 'output cosine'}."))
        if s.get("model_training"):
            mt = s["model_training"]
            ev = mt.get("eval") or {}
            intro.append(("p", f"The model was trained for {mt.get('steps_done')} steps (seed "
                               f"{mt.get('seed')}); at the end of training, {ev.get('n')} EMA "
                               f"samples ({ev.get('steps')} steps, guidance {ev.get('guidance')}) "
                               f"gave class accuracy {_f(ev.get('class_accuracy'), '{:.3f}')} "
                               f"and Frechet distance {_f(ev.get('fid'), '{:.2f}')}."))
    else:
        intro.append(("p", "Weights-only analysis: no activations, so no SQNR, activation error, "
                           "observed accumulator widths or end metrics."))
    for note in s.get("notes") or []:
        intro.append(("p", "Note: " + note))
    if run_info:
        intro.append(("p", f"This run: {run_info.get('wall_s', 0):.1f} s wall on "
                           f"{run_info.get('threads')} torch threads; layer optimizations "
                           f"computed {run_info.get('computed', 0)}, loaded from cache "
                           f"{run_info.get('cached', 0)}."))
    secs = [("Settings", intro)]
    hl = headline_table(results)
    if hl[1]:
        text = []
        hms = present_metrics(cfgs)
        for h in results["headline"]:
            parts = [f"{lab} {_f(h.get(k), f)} vs {_f(h.get('reference_' + k), f)}"
                     for k, lab, f, _ in hms]
            text.append(f"{h['config']} vs {h['reference']} at memory ratio "
                        f"{_f(h['memory_ratio'], '{:.3f}')}: mean weight error "
                        f"{_f(h['weight_error_mean'])} vs {_f(h['reference_weight_error_mean'])} "
                        f"({_f(h['weight_error_reduction'], '{:.1%}')} lower)"
                        + ("" if weights_only else
                           f", mean propagated SQNR {_f(h['propagated_sqnr_gain_db'], '{:+.2f}')} dB"
                           + (", " + ", ".join(parts) if parts else "")) + ".")
        refs = []
        if results.get("reference"):
            em = results["reference"]["end_metrics"]
            refs.append("full precision: " + ", ".join(
                f"{lab} {_f(em.get(k), f)}" for k, lab, f, _ in hms if em.get(k) is not None))
        for name, c in cfgs.items():
            if not (c.get("formats") or {}).get("branch_weight"):
                refs.append(f"{name} (round to nearest, no branch): " + ", ".join(
                    f"{lab} {_f(c['end_metrics'].get(k), f)}" for k, lab, f, _ in hms))
        if refs and not weights_only:
            text.append("References: " + "; ".join(refs) + ".")
        vt = verdict_table(results)
        if vt[1]:
            text.append("Verdicts: a difference is 'better' or 'worse' when its 95 % paired "
                        "bootstrap interval (1000 resamples of the samples, seed 0) excludes "
                        "zero, else 'not resolved'; the FID has no per-sample value, so its "
                        "verdict needs the two 95 % intervals not to overlap.")
        secs.append(("Headline: fully quantized branches vs the FP16 branch",
                     [("table", hl)] + [("p", t) for t in text]
                     + ([("table", vt)] if vt[1] else [])))
    secs.append(("Summary per configuration", [
        ("table", summary_table(results)),
        ("p", "overhead: weight storage (scales included) above the main-only layer with the same "
              "main format; energy: compute + memory of one pass, summed over layers.")]))
    if "samples.png" in images:
        secs.append(("Generated digits", [("img", "samples.png")]))
    tt = timestep_table(results)
    if tt is not None:
        secs.append(("Propagated SQNR per timestep (mean over layers, dB)", [
            ("table", tt), ("p", "Each layer's SQNR is measured on the evaluation trajectory's "
                                 "inputs at each timestep; the heatmap below shows every layer.")]))
    plots_ = [("img", n) for n in images if n != "samples.png"]
    secs.append(("Plots", plots_))
    secs.append(("Accumulator widths (bits, sign included, in-block)", [
        ("table", acc_table(results)),
        ("p", "worst: A2Q from the formats alone; l1: A2Q's bound from the stored weight codes "
              "(any input); observed: the widest in-block sum on the evaluation inputs.")]))
    secs.append(("Per-layer errors", [("table", layer_table(results))]))
    sk = skipped_table(results)
    if sk is not None:
        secs.append(("Modules left in full precision", [("table", sk)]))
    return secs


def render_markdown(results: dict, images: dict[str, bytes], run_info: dict | None = None,
                    plot_dir: str = "plots") -> str:
    out = ["# Per-layer quantization error report", ""]
    for head, blocks in _sections(results, images, run_info):
        out += [f"## {head}", ""]
        for kind, v in blocks:
            if kind == "p":
                out += [v, ""]
            elif kind == "table":
                out += [_md_table(*v), ""]
            else:
                out += [f"![{v}]({plot_dir}/{v})", ""]
    return "\n".join(out)


def render_html(results: dict, images: dict[str, bytes], run_info: dict | None = None) -> str:
    css = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
           "table{border-collapse:collapse;font-size:12px;margin:1em 0}"
           "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
           "th{background:#eee}td:first-child{text-align:left}img{max-width:100%}")
    out = ["<!DOCTYPE html><html><head><meta charset='utf-8'>",
           "<title>Per-layer quantization error report</title>", f"<style>{css}</style></head><body>",
           "<h1>Per-layer quantization error report</h1>"]
    for head, blocks in _sections(results, images, run_info):
        out.append(f"<h2>{html.escape(head)}</h2>")
        for kind, v in blocks:
            if kind == "p":
                out.append(f"<p>{html.escape(v)}</p>")
            elif kind == "table":
                out.append(_html_table(*v))
            else:
                b64 = base64.b64encode(images[v]).decode("ascii")
                out.append(f"<p><img alt='{html.escape(v)}' src='data:image/png;base64,{b64}'></p>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(results: dict, out_dir, run_info: dict | None = None) -> dict[str, Path]:
    """Write results.json, layers.csv, plots/*.png, report.md and report.html into ``out_dir``.

    Every file is written atomically; results.json holds no timing, so the same
    settings give the same file. ``run_info`` (wall time, cache counts) goes to
    run.json and the report text. Returns ``{kind: path}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    images = plots(results)
    for name, data in images.items():
        paths[name] = write_atomic(out_dir / "plots" / name, data)
    paths["csv"] = write_atomic(out_dir / "layers.csv", layers_csv(results))
    paths["md"] = write_atomic(out_dir / "report.md", render_markdown(results, images, run_info))
    paths["html"] = write_atomic(out_dir / "report.html", render_html(results, images, run_info))
    if run_info is not None:
        paths["run"] = write_json_atomic(out_dir / "run.json", run_info)
    # results.json last: its presence means the report is complete.
    paths["json"] = write_atomic(out_dir / "results.json",
                                      json.dumps(results, indent=1, allow_nan=False) + "\n")
    return paths
