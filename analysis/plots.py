"""The report's plots, as PNG bytes (matplotlib's Agg backend, no date metadata, so the same
results give the same bytes): per-layer SQNR, error against memory overhead, accumulator
widths, energy, the layer x timestep heatmap, the picture grid of generated digits, and the
distribution of the smoothing points the layers chose."""
from __future__ import annotations

import io
import math

from analysis.records import present_metrics, short_name

__all__ = ["plots"]


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
    ax.set_xticklabels([short_name(l["name"]) for l in first["layers"]], rotation=90, fontsize=6)
    ax.set_ylabel("propagated SQNR (dB)" if has_prop else "relative weight error")
    ax.set_title("Per-layer " + ("propagated SQNR inside the quantized model" if has_prop
                                 else "weight error"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out["per_layer_sqnr.png" if has_prop else "per_layer_weight_error.png"] = _png(fig)

    # 2. Pareto: error vs memory overhead
    ems = present_metrics(cfgs)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, c in cfgs.items():
        x = (c.get("memory_overhead_bits") or 0) / 8 / 2**20
        axes[0].scatter([x], [c.get("weight_error_mean")], s=40)
        axes[0].annotate(name, (x, c.get("weight_error_mean") or 0), fontsize=7)
        em = c["end_metrics"].get(ems[0][0]) if ems else None
        y2 = em if em is not None else c.get("weight_error_max")
        axes[1].scatter([x], [y2], s=40)
        axes[1].annotate(name, (x, y2 or 0), fontsize=7)
    axes[0].set_xlabel("weight memory overhead vs main-only (MiB)")
    axes[0].set_ylabel("mean relative weight error")
    axes[1].set_xlabel("weight memory overhead vs main-only (MiB)")
    axes[1].set_ylabel(ems[0][1] if ems else "max relative weight error")
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

    # 5. layer x timestep heatmaps of the propagated SQNR, one panel per configuration
    first_l = first["layers"][0] if first["layers"] else {}
    if first_l.get("propagated_sqnr_db_by_timestep"):
        ts = list(first_l["propagated_sqnr_db_by_timestep"])
        n = len(cfgs)
        cols = min(4, n)
        rows_ = -(-n // cols)
        fig, axes = plt.subplots(rows_, cols, figsize=(3.2 * cols, 0.12 * len(first["layers"]) * rows_ + 1.5),
                                 squeeze=False)
        vals = [[[l["propagated_sqnr_db_by_timestep"].get(t) for t in ts] for l in c["layers"]]
                for c in cfgs.values()]
        flat = [v for m in vals for r in m for v in r if v is not None and math.isfinite(v)]
        lo, hi = (min(flat), max(flat)) if flat else (0.0, 1.0)
        for i, (name, m) in enumerate(zip(cfgs, vals)):
            ax = axes[i // cols][i % cols]
            arr = [[math.nan if v is None else v for v in r] for r in m]
            im = ax.imshow(arr, aspect="auto", cmap="viridis", vmin=lo, vmax=hi,
                           interpolation="nearest")
            ax.set_title(name, fontsize=8)
            ax.set_xticks(range(len(ts)))
            ax.set_xticklabels(ts, rotation=90, fontsize=5)
            ax.set_yticks(range(len(first["layers"])))
            ax.set_yticklabels([short_name(l["name"]) for l in first["layers"]] if i % cols == 0
                               else [], fontsize=3.5)
            ax.set_xlabel("timestep", fontsize=7)
        for j in range(n, rows_ * cols):
            axes[j // cols][j % cols].axis("off")
        fig.colorbar(im, ax=axes, shrink=0.6, label="propagated SQNR (dB)")
        fig.suptitle("Per-layer propagated SQNR at each timestep (layer x timestep)")
        out["timestep_heatmap.png"] = _png(fig)

    # 6. picture grid: the full-precision model and each configuration, same seeds
    ref = (results.get("reference") or {}).get("end_metrics") or {}
    if ref.get("grid_uint8") is not None:
        panels = [("full precision", ref["grid_uint8"])] + [
            (name, c["end_metrics"].get("grid_uint8")) for name, c in cfgs.items()
            if c["end_metrics"].get("grid_uint8") is not None]
        k = len(panels[0][1])
        fig, axes = plt.subplots(len(panels), k, figsize=(0.55 * k + 1.6, 0.6 * len(panels) + 0.4),
                                 squeeze=False)
        for r, (name, imgs) in enumerate(panels):
            for j in range(k):
                ax = axes[r][j]
                ax.imshow(imgs[j], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if j == 0:
                    ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
        fig.suptitle("Generated digits: same noise seeds and classes (class = column mod 10)",
                     fontsize=9)
        fig.subplots_adjust(left=0.2, wspace=0.05, hspace=0.08)
        out["samples.png"] = _png(fig)
    ab = _smoothing_points(cfgs)
    if ab:
        out["smoothing_alpha_beta.png"] = _smoothing_plot(plt, ab)
    return out


def _smoothing_points(cfgs: dict) -> dict:
    """{config: [(alpha, beta) per smoothed layer]} when the layers chose more than one point
    (a searched smoothing); {} for a fixed point or none."""
    pts = {n: [tuple(l["smoothing_alpha_beta"]) for l in c["layers"]
               if l.get("smoothing_alpha_beta") is not None] for n, c in cfgs.items()}
    pts = {n: p for n, p in pts.items() if p}
    return pts if len({q for p in pts.values() for q in p}) > 1 else {}


def _smoothing_plot(plt, pts: dict) -> bytes:
    """Per configuration: how many layers chose each (alpha, beta) of the grid."""
    grid = sorted({q for p in pts.values() for q in p})
    alphas, betas = sorted({a for a, _ in grid}), sorted({b for _, b in grid})
    fig, axes = plt.subplots(1, len(pts), figsize=(2.6 * len(pts) + 0.6, 2.8), squeeze=False)
    for ax, (name, p) in zip(axes[0], pts.items()):
        counts = [[sum(1 for q in p if q == (a, b)) for a in alphas] for b in betas]
        ax.imshow(counts, cmap="Blues", origin="lower")
        for i, row in enumerate(counts):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas], fontsize=7)
        ax.set_yticks(range(len(betas)), [f"{b:g}" for b in betas], fontsize=7)
        ax.set_xlabel("alpha", fontsize=8)
        ax.set_ylabel("beta", fontsize=8)
        ax.set_title(name, fontsize=8)
    fig.suptitle("Smoothing (alpha, beta) chosen per layer (layer counts)", fontsize=9)
    fig.tight_layout()
    return _png(fig)


# --------------------------------------------------------------------------- documents
