"""``loraq tensorcore``: the GPU tensor-core presets and what their accumulation costs.

Prints every preset of ``hwsim.tensor_core`` (V100 ... B200; inputs fp16, bf16, tf32,
fp8_e4m3, fp8_e5m2; outputs fp32, fp16) with its block-FMA parameters: products fused per
operation, fraction bits the aligned adder keeps below the largest exponent, fraction
bits of the result, final rounding, lowest anchor exponent. Then, for the FP32-output
presets, the mean relative error of ``TensorCore.dot`` against the exact inner product on
seeded data (rows of |N(0, 1)| values rounded to the input format: all positive, so the
running sum grows, as in DeepSeek-V3's analysis) at K = 32 ... 16384, without and with
promotion to an FP32 register every 128 products, and a log-log plot of the same.
Presets with the same parameters (A2 = A30 = A100, H200 = H100) are computed once.
"""
from __future__ import annotations

import io
import json
import math

import numpy as np

from numfmt.fileio import write_atomic
from analysis.errors import checks_input

DEFAULT_KS = tuple(32 << i for i in range(10))  # 32 .. 16384


def _positive_int_list(text: str) -> list[int]:
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--k {text!r} is not a comma-separated list of integers") from None
    if not vals or any(v < 1 for v in vals):
        raise ValueError(f"--k {text!r}: every K must be an integer >= 1")
    return vals


def preset_rows() -> list[dict]:
    """Every preset's parameters (hwsim.TensorCore.describe())."""
    from hwsim.tensorcore import preset_table
    return [tc.describe() for tc in preset_table()]


def _key(tc) -> tuple:
    d = tc.describe()
    return tuple(v for k, v in d.items() if k not in ("gpu", "source"))


def _selection(rows, inputs, gpus):
    """Checked (inputs, gpus) lists; ValueError names a bad value and lists the allowed."""
    from hwsim.tensorcore import GPUS, INPUTS, _canonical_gpu
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows={rows!r} is not allowed; it must be an int >= 1")
    inputs = list(INPUTS) if inputs is None else [i.strip().lower() for i in inputs]
    bad = [i for i in inputs if i not in INPUTS]
    if bad:
        raise ValueError(f"unknown input format {bad[0]!r}; known: {', '.join(INPUTS)}")
    gpus = list(GPUS) if gpus is None else [_canonical_gpu(g) for g in gpus]
    return inputs, gpus


def error_rows(ks=DEFAULT_KS, rows: int = 64, seed: int = 0, promote: int = 128,
               inputs=None, gpus=None) -> list[dict]:
    """Mean and max relative error of each distinct FP32-output preset at each K, without
    and with promotion every ``promote`` products (K a multiple of the FMA size or not:
    the last chunk is short)."""
    from hwsim.tensorcore import preset_table, round_to_input
    inputs, gpus = _selection(rows, inputs, gpus)
    kmax = max(ks)
    rng = np.random.default_rng(seed)
    base_a = np.abs(rng.standard_normal((rows, kmax)))
    base_b = np.abs(rng.standard_normal((rows, kmax)))
    data = {}
    seen = {}
    out = []
    for tc in preset_table():
        if tc.output_format != "fp32" or tc.input_format not in inputs or tc.gpu not in gpus:
            continue
        key = _key(tc)
        if key in seen:
            seen[key]["same_as"].append(tc.gpu)
            continue
        if tc.input_format not in data:
            a = round_to_input(base_a, tc.input_format)
            b = round_to_input(base_b, tc.input_format)
            prods = a.astype(np.float64) * b  # exact: products of narrow floats
            exact = {k: np.array([math.fsum(x) for x in prods[:, :k]]) for k in ks}
            data[tc.input_format] = (a, b, exact)
        a, b, exacts = data[tc.input_format]
        row = {"gpu": tc.gpu, "inputs": tc.input_format, "same_as": [],
               "significant_bits": tc.significant_bits, "alignment_bits": tc.alignment_bits,
               "fma_size": tc.fma_size, "k": list(ks), "plain_mean": [], "plain_max": [],
               "promoted_mean": [], "promoted_max": [], "promote_every": None}
        p = promote if promote % tc.fma_size == 0 else tc.fma_size * -(-promote // tc.fma_size)
        row["promote_every"] = p
        for k in ks:
            ak, bk, exact = a[:, :k], b[:, :k], exacts[k]
            for name, pe in (("plain", None), ("promoted", p)):
                rel = np.abs(tc.dot(ak, bk, promote_every=pe) - exact) / exact
                row[f"{name}_mean"].append(float(rel.mean()))
                row[f"{name}_max"].append(float(rel.max()))
        seen[key] = row
        out.append(row)
    return out


def render_presets(rows: list[dict]) -> str:
    head = (f"{'gpu':<5} {'inputs':<9} {'out':<4} {'fma':>4} {'extra':>5} {'F':>3} "
            f"{'result':>6} {'round':<5} {'min anchor':>10} {'carry':>5}  source")
    lines = [head, "-" * len(head)]
    for r in rows:
        ma = "-" if r["min_anchor_exponent"] is None else str(r["min_anchor_exponent"])
        src = r["source"].split("models/")[-1].split(";")[0]
        lines.append(f"{r['gpu']:<5} {r['inputs']:<9} {r['output']:<4} {r['fma_size']:>4} "
                     f"{r['extra_alignment_bits']:>5} {r['alignment_bits']:>3} "
                     f"{r['result_mantissa_bits'] + 1:>6} {r['rounding']:<5} {ma:>10} "
                     f"{r['carry_bits']:>5}  {src}")
    lines.append("fma: products per operation; extra: alignment bits beyond FP32's 23; F: "
                 "fraction bits kept below the largest exponent (products and addend are "
                 "truncated there); result: significant bits of the rounded result; carry: "
                 "carry bits an exact adder needs (modelled as present)")
    return "\n".join(lines)


def render_errors(rows: list[dict]) -> str:
    if not rows:
        return "(no FP32-output preset selected)"
    ks = rows[0]["k"]
    head = f"{'preset':<24} {'bits':>4} {'mode':<10}" + "".join(f"{k:>9}" for k in ks)
    lines = [head, "-" * len(head)]
    for r in rows:
        name = r["gpu"] + ("=" + "=".join(r["same_as"]) if r["same_as"] else "")
        name = f"{name} {r['inputs']}"
        for mode, label in (("plain", "chained"), ("promoted", f"promote{r['promote_every']}")):
            vals = "".join(f"{v:>9.2e}" for v in r[f"{mode}_mean"])
            lines.append(f"{name:<24} {r['significant_bits']:>4} {label:<10}{vals}")
    return "\n".join(lines)


def plot_png(rows: list[dict]) -> bytes:
    """Log-log plot of the mean relative error against K (PNG bytes)."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 6))
    cmap = plt.get_cmap("tab20")
    for i, r in enumerate(rows):
        c = cmap(i % 20)
        name = r["gpu"] + ("=" + "=".join(r["same_as"]) if r["same_as"] else "")
        ax.loglog(r["k"], r["plain_mean"], "-o", ms=3, color=c,
                  label=f"{name} {r['inputs']} ({r['significant_bits']} bits)")
        ax.loglog(r["k"], r["promoted_mean"], "--", color=c, alpha=0.6)
    ax.set_xlabel("K (inner-product length)")
    ax.set_ylabel("mean relative error vs exact (zero errors not drawn)")
    ax.set_title("Tensor-core accumulation error on |N(0,1)| data "
                 "(solid: chained in the unit; dashed: FP32 promotion every 128)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


@checks_input  # the work is a function of the arguments alone: its errors are theirs
def run(args) -> int:
    ks = _positive_int_list(args.k)
    gpus = args.gpus.split(",") if args.gpus else None
    inputs = args.inputs.split(",") if args.inputs else None
    _selection(args.rows, inputs, gpus)  # bad options fail before any output
    presets = preset_rows()
    print("Tensor-core presets (Khattak & Mikaitis' measured block-FMA parameters):")
    print(render_presets(presets))
    errs = error_rows(ks, rows=args.rows, seed=args.seed, inputs=inputs, gpus=gpus)
    print(f"\nMean relative error against the exact inner product, {args.rows} rows of "
          f"|N(0,1)| rounded to the input format (seed {args.seed}), FP32 output:")
    print(render_errors(errs))
    if args.out:
        write_atomic(args.out, plot_png(errs))
        print(f"\nplot: {args.out}")
    if args.json:
        write_atomic(args.json, json.dumps({"presets": presets, "errors": errs}, indent=2) + "\n")
    return 0


def register(sub) -> None:
    p = sub.add_parser("tensorcore", help="GPU tensor-core presets and their accumulation "
                       "error at K = 32 .. 16384", description=__doc__)
    p.add_argument("--k", default=",".join(str(k) for k in DEFAULT_KS),
                   help="comma-separated inner-product lengths (default 32,64,...,16384)")
    p.add_argument("--rows", type=int, default=64, help="inner products per K (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpus", help="comma-separated GPUs (default: all)")
    p.add_argument("--inputs", help="comma-separated input formats (default: all)")
    p.add_argument("--out", metavar="PNG", default="tensorcore_error.png",
                   help="plot file, written atomically (default tensorcore_error.png; '' for "
                        "none)")
    p.add_argument("--json", metavar="PATH", help="also write presets and errors as JSON")
    p.set_defaults(func=run)
