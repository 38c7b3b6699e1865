"""``loraq cost``: energy, memory and area of a model's layers per configuration.

Examples::

    loraq cost --model pixart-sigma --configs W4A4,W4A4+FP16r32,W4A4+W8A8 --equal-memory \\
        --json cost.json --csv cost.csv --plot cost.png
    loraq cost --calibration --json calibration.json

The arithmetic lives in ``hwsim.cost`` (energy per action x action counts,
calibrated to Horowitz, ISSCC 2014) and the shapes in ``hwsim.models``; this
module parses arguments, prints a table and writes JSON / CSV / PNG
atomically (temporary name in the same folder, then ``os.replace``).
"""
from __future__ import annotations

import csv
import io
import json

from numfmt import fileio

from hwsim.cost import (CONFIG_GRAMMAR, DEFAULT_CONFIGS, calibration, load_cost_model,
                        model_cost, parse_config)
from hwsim.models import get_model
from analysis.errors import checks_input

__all__ = ["register", "run", "write_atomic", "plot_costs"]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "cost", help="hardware cost (energy, memory, area) of a model per configuration",
        description="Energy (compute and memory), weight storage, bits moved and MAC-array area "
        "of every linear layer under each configuration. Configuration grammar: "
        + CONFIG_GRAMMAR)
    p.add_argument("--model", default="pixart-sigma",
                   help="pixart-sigma, sana-1600m, or a .toml / .json / .safetensors file "
                   "(default: %(default)s)")
    p.add_argument("--resolution", type=int, default=1024, help="image size in px for built-in "
                   "models (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=None,
                   help="image tokens per layer (overrides the model; required for safetensors)")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                   help="comma-separated configurations (default: %(default)s)")
    p.add_argument("--rank", type=int, default=32, help="branch rank when a configuration gives "
                   "none (default: %(default)s)")
    p.add_argument("--equal-memory", action="store_true",
                   help="quantized branches get the rank whose storage equals an FP16 branch of "
                   "--ref-rank (scales included)")
    p.add_argument("--ref-rank", type=int, default=32, help="FP16 reference rank for "
                   "--equal-memory (default: %(default)s)")
    p.add_argument("--main", default="mxint4", help="main format or family: mxint4, sint4, nvfp4, "
                   "mxfp4, ... (default: %(default)s)")
    p.add_argument("--branch", default="mxint", help="branch format family: mxint, sint, mxfp "
                   "(default: %(default)s)")
    p.add_argument("--cost-model", metavar="PATH", default=None,
                   help="TOML / JSON file overriding hwsim.cost.CostModel fields")
    p.add_argument("--tech-scale", type=float, default=None,
                   help="technology scaling factor for every energy (1.0 = 45 nm)")
    p.add_argument("--area-scale", type=float, default=None,
                   help="technology scaling factor for every area (1.0 = 45 nm)")
    p.add_argument("--weight-level", default=None, help="memory the weights are read from: dram, "
                   "sram_<N>kb, sram_<N>mb (default dram)")
    p.add_argument("--activation-level", default=None, help="memory for activations "
                   "(default sram_1mb)")
    p.add_argument("--throughput", type=int, default=4096,
                   help="MACs per cycle the MAC arrays are sized for (default: %(default)s)")
    p.add_argument("--layers", action="store_true", help="also print a per-layer table")
    p.add_argument("--calibration", action="store_true",
                   help="print (and with --json write) model against Horowitz anchors, then stop")
    p.add_argument("--json", metavar="PATH", default=None, help="write results as JSON")
    p.add_argument("--csv", metavar="PATH", default=None, help="write per-layer and total rows as CSV")
    p.add_argument("--plot", metavar="PATH", default=None, help="write a PNG plot")
    p.set_defaults(func=run)


def write_atomic(path, data: bytes | str) -> None:
    """Write ``data`` atomically; the folder must exist (a missing one is a user error)."""
    fileio.write_atomic(path, data, make_parents=False)


def _cost_model(args):
    return load_cost_model(args.cost_model, energy_scale=args.tech_scale,
                           area_scale=args.area_scale, weight_level=args.weight_level,
                           activation_level=args.activation_level)


@checks_input  # the work is a function of the arguments alone: its errors are theirs
def run(args) -> int:
    model = _cost_model(args)
    if args.calibration:
        rows = calibration(model)
        print(f"{'op':<18} {'anchor pJ':>10} {'model pJ':>10} {'error':>8}")
        for r in rows:
            err = r["model_pj"] / r["anchor_pj"] - 1.0
            print(f"{r['op']:<18} {r['anchor_pj']:>10.4g} {r['model_pj']:>10.4g} {err:>+8.1%}")
        print(f"source: {rows[0]['source'].split(':')[0]}")
        if args.json:
            write_atomic(args.json, json.dumps(rows, indent=2) + "\n")
        if args.csv or args.plot:
            raise ValueError("--calibration writes only --json")
        return 0
    if args.tokens is not None and args.tokens < 0:
        raise ValueError(f"--tokens={args.tokens} is negative; it must be >= 0")
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    if not names:
        raise ValueError(f"--configs is empty; grammar: {CONFIG_GRAMMAR}")
    configs = [parse_config(c, main=args.main, branch=args.branch) for c in names]
    layers = get_model(args.model, resolution=args.resolution, tokens=args.tokens)
    result = model_cost(layers, configs, rank=args.rank, equal_memory=args.equal_memory,
                        ref_rank=args.ref_rank, throughput=args.throughput, model=model)
    result["model"] = str(args.model)
    result["resolution"] = args.resolution
    print(format_table(result))
    if args.layers:
        print()
        print(format_layers(result))
    if args.json:
        write_atomic(args.json, json.dumps(result, indent=2) + "\n")
    if args.csv:
        write_atomic(args.csv, to_csv(result))
    if args.plot:
        write_atomic(args.plot, plot_costs(result))
    return 0


def format_table(result: dict) -> str:
    """The totals as a Markdown table (energies in mJ, weights in MiB, area in mm^2)."""
    totals = result["totals"]
    base = next(iter(totals.values()))["energy_pj"]
    head = ("| config | rank | weights MiB | GMACs | compute mJ | memory mJ | energy mJ | "
            "vs first | pJ/MAC | area mm2 |")
    lines = [head, "|" + "---|" * 10]
    for name, t in totals.items():
        rank = str(t["rank"]) if t["rank"] == t["rank_max"] else f"{t['rank']}-{t['rank_max']}"
        lines.append(
            f"| {name} | {rank} | {t['weight_bytes'] / 2**20:.1f} | {t['macs'] / 1e9:.1f} | "
            f"{t['compute_energy_pj'] / 1e9:.1f} | {t['memory_energy_pj'] / 1e9:.1f} | "
            f"{t['energy_pj'] / 1e9:.1f} | {t['energy_pj'] / base:.3f} | "
            f"{t['energy_per_mac_pj']:.3f} | {t['area_mm2']:.2f} |")
    return "\n".join(lines)


def format_layers(result: dict) -> str:
    lines = ["| config | layer | count | out x in | tokens | rank | GMACs | energy uJ |",
             "|" + "---|" * 8]
    for r in result["layers"]:
        lines.append(f"| {r['config']} | {r['name']} | {r['count']} | {r['out_features']}x"
                     f"{r['in_features']} | {r['tokens']} | {r['rank']} | {r['macs'] / 1e9:.3f} | "
                     f"{r['energy_pj'] / 1e6:.1f} |")
    return "\n".join(lines)


_CSV_FIELDS = ("config", "layer", "kind", "count", "in_features", "out_features", "tokens", "rank",
               "macs", "weight_bits", "bits_moved", "compute_energy_pj", "memory_energy_pj",
               "energy_pj")


def to_csv(result: dict) -> str:
    """One row per (configuration, layer instance) plus a TOTAL row per configuration."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(_CSV_FIELDS)
    for r in result["layers"]:
        w.writerow([r["config"], r["name"], r["kind"], r["count"], r["in_features"],
                    r["out_features"], r["tokens"], r["rank"], r["macs"], r["weight_bits"],
                    r["bits_moved"], r["compute_energy_pj"], r["memory_energy_pj"], r["energy_pj"]])
    for name, t in result["totals"].items():
        w.writerow([name, "TOTAL", "", 1, "", "", "", t["rank"], t["macs"], t["weight_bits"],
                    t["bits_moved"], t["compute_energy_pj"], t["memory_energy_pj"], t["energy_pj"]])
    return buf.getvalue()


def plot_costs(result: dict) -> bytes:
    """PNG bytes: stacked energy breakdown per configuration, and weight memory against energy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    totals = result["totals"]
    names = list(totals)
    parts = [("main_mac", "compute", "main MACs"), ("branch_mac", "compute", "branch MACs"),
             ("quantize_x", "compute", "quantize x"),
             ("requantize_intermediate", "compute", "requantize xR^T"),
             ("output", "compute", "output add/round"), ("weights", "memory", "weight memory"),
             ("activations", "memory", "activation memory"),
             ("intermediate", "memory", "intermediate memory")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    bottom = [0.0] * len(names)
    for key, group, label in parts:
        vals = [totals[n][f"{group}_pj"].get(key, 0.0) / 1e9 for n in names]
        ax1.bar(names, vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax1.set_ylabel("energy (mJ)")
    ax1.set_title(f"{result.get('model', 'model')}: energy per forward pass")
    ax1.tick_params(axis="x", rotation=30)
    ax1.set_ylim(0, max(bottom) * 1.45 if max(bottom) > 0 else 1.0)
    ax1.legend(fontsize=7, ncol=3, loc="upper center")
    for n in names:
        t = totals[n]
        ax2.scatter(t["weight_bytes"] / 2**20, t["energy_pj"] / 1e9)
        ax2.annotate(n, (t["weight_bytes"] / 2**20, t["energy_pj"] / 1e9), fontsize=7,
                     xytext=(3, 3), textcoords="offset points")
    ax2.set_xlabel("weight memory (MiB, scales included)")
    ax2.set_ylabel("energy (mJ)")
    ax2.set_title("weight memory against energy")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
