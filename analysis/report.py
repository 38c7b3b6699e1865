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

from numfmt.fileio import write_atomic, write_json_atomic

__all__ = ["build_results", "headline", "write_report", "render_markdown", "render_html",
           "layers_csv", "plots", "CSV_FIELDS"]

CSV_FIELDS = ("config", "name", "out", "in", "method", "rank", "weight_error", "act_error",
              "branch_act_error", "local_sqnr_db", "propagated_sqnr_db", "acc_bits_worst",
              "acc_bits_l1", "acc_bits_observed", "branch_acc_bits_worst", "branch_acc_bits_l1",
              "branch_acc_bits_observed", "weight_bits", "branch_bits", "macs", "energy_pj",
              "compute_energy_pj", "memory_energy_pj")


def _is_fp16(cfg: dict) -> bool:
    return (cfg.get("formats") or {}).get("branch_weight") == "fp16"


def headline(configs: dict) -> list[dict]:
    """Each quantized-branch configuration against the FP16 branch (the first one present).

    Per configuration: its and the reference's mean cosine, weight error mean,
    propagated SQNR mean and memory overhead, the relative weight-error change
    (1 - mine / reference) and the SQNR gain in dB. Empty without an FP16 config.
    """
    ref_name = next((k for k, c in configs.items() if _is_fp16(c)), None)
    if ref_name is None:
        return []
    ref = configs[ref_name]
    rows = []
    for name, c in configs.items():
        if name == ref_name or not (c.get("formats") or {}).get("branch_weight"):
            continue
        row = {"config": name, "reference": ref_name}
        for k in ("weight_error_mean", "propagated_sqnr_db_mean", "local_sqnr_db_mean",
                  "memory_overhead_bits", "energy_pj"):
            row[k] = c.get(k)
            row["reference_" + k] = ref.get(k)
        for k in ("mean_cosine", "min_cosine", "top1_agreement"):
            row[k] = c["end_metrics"].get(k)
            row["reference_" + k] = ref["end_metrics"].get(k)
        we, rwe = c.get("weight_error_mean"), ref.get("weight_error_mean")
        row["weight_error_reduction"] = (1.0 - we / rwe) if we is not None and rwe else None
        ps, rps = c.get("propagated_sqnr_db_mean"), ref.get("propagated_sqnr_db_mean")
        row["propagated_sqnr_gain_db"] = (ps - rps) if ps is not None and rps is not None else None
        mo, rmo = c.get("memory_overhead_bits"), ref.get("memory_overhead_bits")
        row["memory_ratio"] = (mo / rmo) if mo is not None and rmo else None
        rows.append(row)
    return rows


def build_results(analysis: dict, settings: dict) -> dict:
    """results.json's content: settings, layer names, per-config results, headline."""
    return {"settings": settings, "layer_names": analysis["layer_names"],
            "configs": analysis["configs"], "headline": headline(analysis["configs"])}


# --------------------------------------------------------------------------- formatting


def _f(v, fmt="{:.4f}", none="-") -> str:
    if v is None:
        return none
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else "-inf"
    return fmt.format(v)


def _mb(bits) -> str:
    return "-" if bits is None else f"{bits / 8 / 2**20:.3f}"


def _short(name: str) -> str:
    return (name.replace("encoder.layer.", "L").replace("attention.self.", "attn.")
            .replace("attention.output.dense", "attn.out").replace("intermediate.dense", "ffn.up")
            .replace("output.dense", "ffn.down"))


def summary_table(results: dict) -> tuple[list[str], list[list[str]]]:
    head = ["config", "method", "rank", "mean cos", "min cos", "top-1 NN", "weight err mean",
            "weight err max", "local SQNR dB", "prop. SQNR dB mean", "prop. SQNR dB min",
            "overhead MiB", "energy uJ"]
    rows = []
    for name, c in results["configs"].items():
        em = c["end_metrics"]
        rank = (f"{c['rank_min']}" if c["rank_min"] == c["rank_max"]
                else f"{c['rank_min']}-{c['rank_max']}")
        rows.append([name, c["method"], rank, _f(em.get("mean_cosine")), _f(em.get("min_cosine")),
                     _f(em.get("top1_agreement"), "{:.3f}"), _f(c.get("weight_error_mean")),
                     _f(c.get("weight_error_max")), _f(c.get("local_sqnr_db_mean"), "{:.2f}"),
                     _f(c.get("propagated_sqnr_db_mean"), "{:.2f}"),
                     _f(c.get("propagated_sqnr_db_min"), "{:.2f}"), _mb(c.get("memory_overhead_bits")),
                     _f(c["energy_pj"] / 1e6, "{:.1f}")])
    return head, rows


def headline_table(results: dict) -> tuple[list[str], list[list[str]]]:
    head = ["config", "vs", "mean cos", "vs mean cos", "min cos", "vs min cos",
            "weight err reduction", "prop. SQNR gain dB", "memory ratio"]
    rows = []
    for h in results.get("headline", []):
        rows.append([h["config"], h["reference"], _f(h["mean_cosine"]), _f(h["reference_mean_cosine"]),
                     _f(h["min_cosine"]), _f(h["reference_min_cosine"]),
                     _f(h["weight_error_reduction"], "{:.1%}"),
                     _f(h["propagated_sqnr_gain_db"], "{:+.2f}"), _f(h["memory_ratio"], "{:.3f}")])
    return head, rows


def layer_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """One row per layer, one column group per config: weight error and propagated SQNR."""
    names = list(results["configs"])
    head = ["layer", "shape"]
    for n in names:
        head += [f"{n} w.err", f"{n} local dB", f"{n} prop. dB"]
    rows = []
    first = next(iter(results["configs"].values()))
    for i, lay in enumerate(first["layers"]):
        row = [_short(lay["name"]), "x".join(str(s) for s in lay["shape"])]
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


def _png(fig) -> bytes:
    buf = io.BytesIO()
    # No date metadata: the same results give the same bytes.
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    import matplotlib.pyplot as plt
    plt.close(fig)
    return buf.getvalue()


def plots(results: dict) -> dict[str, bytes]:
    """PNG bytes of the four plots, keyed by file name (matplotlib Agg)."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    cfgs = results["configs"]
    out = {}
    has_prop = any(l.get("propagated_sqnr_db") is not None for c in cfgs.values() for l in c["layers"])
    key = "propagated_sqnr_db" if has_prop else "weight_error"

    # 1. per-layer propagated SQNR (or weight error for a weights-only analysis)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for name, c in cfgs.items():
        ys = [l.get(key) for l in c["layers"]]
        ax.plot(range(len(ys)), [math.nan if y is None else y for y in ys], marker="o", ms=3, label=name)
    first = next(iter(cfgs.values()))
    ax.set_xticks(range(len(first["layers"])))
    ax.set_xticklabels([_short(l["name"]) for l in first["layers"]], rotation=90, fontsize=6)
    ax.set_ylabel("propagated SQNR (dB)" if has_prop else "relative weight error")
    ax.set_title("Per-layer " + ("propagated SQNR inside the quantized model" if has_prop
                                 else "weight error"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out["per_layer_sqnr.png" if has_prop else "per_layer_weight_error.png"] = _png(fig)

    # 2. Pareto: error vs memory overhead
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, c in cfgs.items():
        x = (c.get("memory_overhead_bits") or 0) / 8 / 2**20
        axes[0].scatter([x], [c.get("weight_error_mean")], s=40)
        axes[0].annotate(name, (x, c.get("weight_error_mean") or 0), fontsize=7)
        em = c["end_metrics"].get("mean_cosine")
        y2 = em if em is not None else c.get("weight_error_max")
        axes[1].scatter([x], [y2], s=40)
        axes[1].annotate(name, (x, y2 or 0), fontsize=7)
    axes[0].set_xlabel("weight memory overhead vs main-only (MiB)")
    axes[0].set_ylabel("mean relative weight error")
    axes[1].set_xlabel("weight memory overhead vs main-only (MiB)")
    axes[1].set_ylabel("mean cosine to FP output" if has_prop else "max relative weight error")
    for a in axes:
        a.grid(alpha=0.3)
    fig.suptitle("Error against memory overhead (lower-left / upper-left is better)")
    fig.tight_layout()
    out["pareto.png"] = _png(fig)

    # 3. accumulator-width histogram
    fig, ax = plt.subplots(figsize=(8, 4))
    series = {}
    for name, c in cfgs.items():
        for k, lab in (("acc_bits_observed", "main observed"), ("branch_acc_bits_observed", "branch observed"),
                       ("acc_bits_l1", "main l1 bound"), ("branch_acc_bits_l1", "branch l1 bound")):
            v = [l[k] for l in c["layers"] if l.get(k) is not None]
            if v and ("observed" in k or not has_prop):
                series[f"{name} {lab}"] = v
    worst = sorted({l[k] for c in cfgs.values() for l in c["layers"]
                    for k in ("acc_bits_worst", "branch_acc_bits_worst") if l.get(k) is not None})
    if series:
        lo = min(min(v) for v in series.values())
        hi = max([max(v) for v in series.values()] + worst)
        bins = [b - 0.5 for b in range(lo, hi + 2)]
        ax.hist(list(series.values()), bins=bins, label=list(series), histtype="bar")
    for w in worst:
        ax.axvline(w, color="k", ls="--", lw=0.8)
    ax.set_xlabel("in-block accumulator bits (dashed: A2Q worst case of the formats)")
    ax.set_ylabel("layers")
    ax.set_title("Accumulator widths per layer")
    ax.legend(fontsize=6)
    fig.tight_layout()
    out["accumulator_bits.png"] = _png(fig)

    # 4. energy breakdown
    fig, ax = plt.subplots(figsize=(8, 4))
    comps = []
    for c in cfgs.values():
        for part in ("compute_pj", "memory_pj"):
            for k in c[part]:
                if (part, k) not in comps:
                    comps.append((part, k))
    names = list(cfgs)
    bottom = [0.0] * len(names)
    for part, k in comps:
        vals = [c[part].get(k, 0.0) / 1e6 for c in cfgs.values()]
        if not any(vals):
            continue
        ax.bar(names, vals, bottom=bottom, label=f"{part[:-3]}: {k}")
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("energy (uJ)")
    tokens = results.get("settings", {}).get("tokens")
    ax.set_title(f"Energy per model pass ({tokens} tokens per layer, Horowitz 45 nm)")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out["energy.png"] = _png(fig)
    return out


# --------------------------------------------------------------------------- documents


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
    weights_only = all(c["end_metrics"].get("mean_cosine") is None for c in cfgs.values())
    intro = [("p", f"Model: {s.get('model')}. Configurations: {', '.join(cfgs)}. Main format "
                   f"{s.get('main')}, branch family {s.get('branch')}, seed {s.get('seed')}; "
                   f"cost for {s.get('tokens')} tokens per layer (hwsim.cost, Horowitz 45 nm).")]
    if not weights_only:
        intro.append(("p", f"Per-layer errors are measured on the evaluation inputs "
                           f"({s.get('evaluation')}); calibration inputs ({s.get('calibration')}) "
                           "only feed SVDQuant's smoothing. End metrics compare the quantized "
                           "model's outputs with the full-precision model's: mean / min cosine "
                           "and top-1 nearest-neighbour agreement."))
    else:
        intro.append(("p", "Weights-only analysis: no activations, so no SQNR, activation error, "
                           "observed accumulator widths or end metrics."))
    if run_info:
        intro.append(("p", f"This run: {run_info.get('wall_s', 0):.1f} s wall on "
                           f"{run_info.get('threads')} torch threads; layer optimizations "
                           f"computed {run_info.get('computed', 0)}, loaded from cache "
                           f"{run_info.get('cached', 0)}."))
    secs = [("Settings", intro)]
    hl = headline_table(results)
    if hl[1]:
        text = []
        for h in results["headline"]:
            text.append(f"{h['config']} vs {h['reference']} at memory ratio "
                        f"{_f(h['memory_ratio'], '{:.3f}')}: mean weight error "
                        f"{_f(h['weight_error_mean'])} vs {_f(h['reference_weight_error_mean'])} "
                        f"({_f(h['weight_error_reduction'], '{:.1%}')} lower)"
                        + ("" if weights_only else
                           f", mean propagated SQNR {_f(h['propagated_sqnr_gain_db'], '{:+.2f}')} dB, "
                           f"mean cosine {_f(h['mean_cosine'])} vs {_f(h['reference_mean_cosine'])}, "
                           f"min cosine {_f(h['min_cosine'])} vs {_f(h['reference_min_cosine'])}") + ".")
        secs.append(("Headline: fully quantized branches vs the FP16 branch",
                     [("table", hl)] + [("p", t) for t in text]))
    secs.append(("Summary per configuration", [
        ("table", summary_table(results)),
        ("p", "overhead: weight storage (scales included) above the main-only layer with the same "
              "main format; energy: compute + memory of one pass, summed over layers.")]))
    plots_ = [("img", n) for n in images]
    secs.append(("Plots", plots_))
    secs.append(("Accumulator widths (bits, sign included, in-block)", [
        ("table", acc_table(results)),
        ("p", "worst: A2Q from the formats alone; l1: A2Q's bound from the stored weight codes "
              "(any input); observed: the widest in-block sum on the evaluation inputs.")]))
    secs.append(("Per-layer errors", [("table", layer_table(results))]))
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
