"""``loraq formats``: a table of every registered number format.

For each format: storage bits per element including the block-scale overhead,
the largest finite magnitude, the smallest nonzero magnitude, and the SQNR
(dB, 10 log10(sum x^2 / sum (x - q(x))^2)) that ``fake_quantize`` reaches on a
seeded standard-Gaussian tensor (4096 x 4096 by default, quantized along the
last axis). Block formats report their element's range; their dynamic range
is extended by the scale. ``--scale-rule`` picks how MX formats find their shared
exponents (numfmt.SCALE_RULES: floor, the OCP default, ceil, even, rceil; see
docs/scale_rules.md); other formats are unaffected.
"""
from __future__ import annotations

import json
import math

import numpy as np

import numfmt
from numfmt.fileio import write_atomic
from analysis.errors import checks_input


def format_rows(size: int = 4096, seed: int = 0, scale_rule: str = "floor") -> list[dict]:
    """One row per format name (aliases folded), with bits, range and measured SQNR;
    MX formats quantized with ``scale_rule``."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size={size!r} is not allowed; it must be an int >= 1")
    if scale_rule not in numfmt.SCALE_RULES:
        raise ValueError(f"scale_rule={scale_rule!r} is not one of {numfmt.SCALE_RULES}")
    x = np.random.default_rng(seed).standard_normal((size, size), dtype=np.float32)
    power = float(np.sum(x.astype(np.float64) ** 2))
    rows, seen = [], set()
    for name in numfmt.formats():
        fmt = numfmt.get(name)
        if fmt.name in seen:
            continue
        seen.add(fmt.name)
        elem = fmt.element if fmt.kind == "block" else fmt
        if fmt.kind == "float" and not fmt.signed:
            continue  # e8m0 is a scale type: it cannot hold a signed tensor
        if fmt.kind == "block" and fmt.scaling == "mx":
            fmt = numfmt.get(fmt, scale_rule=scale_rule)
        y = numfmt.fake_quantize(x, fmt)
        err = float(np.sum((x.astype(np.float64) - y) ** 2))
        sqnr = math.inf if err == 0 else 10.0 * math.log10(power / err)
        if fmt.kind == "block":
            bpe = fmt.bits_per_element
            kind = {"mx": "MX", "absmax": "scaled int", "nvfp4": "NVFP4"}[fmt.scaling]
            block = "row" if fmt.block_size is None else str(fmt.block_size)
            scale = fmt.scale.name
        else:
            bpe, kind, block, scale = float(fmt.bits), "element", "-", "-"
        unit = 2.0 ** fmt.element_scale_exp if fmt.kind == "block" else 1.0
        rows.append({
            "format": fmt.name,
            "kind": kind,
            "element": elem.name,
            "block": block,
            "scale": scale,
            "bits_per_element": bpe,
            "element_max": elem.max_normal * unit,
            "element_min": (elem.min_subnormal if elem.kind == "float" else 1.0) * unit,
            "sqnr_db": sqnr,
            "scale_rule": fmt.scale_rule if fmt.kind == "block" and fmt.scaling == "mx" else "-",
        })
    return rows


def render(rows: list[dict]) -> str:
    head = (f"{'format':<14}{'kind':<12}{'element':<10}{'block':>6} {'scale':<9}"
            f"{'bits/elem':>10}{'elem max':>12}{'elem min':>12}{'SQNR dB':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['format']:<14}{r['kind']:<12}{r['element']:<10}{r['block']:>6} "
                     f"{r['scale']:<9}{r['bits_per_element']:>10.3f}{r['element_max']:>12.6g}"
                     f"{r['element_min']:>12.4g}{r['sqnr_db']:>9.2f}")
    return "\n".join(lines)


@checks_input  # the work is a function of the arguments alone: its errors are theirs
def run(args) -> int:
    rule = getattr(args, "scale_rule", "floor")
    rows = format_rows(args.size, args.seed, rule)
    print(f"Formats on a seeded standard Gaussian {args.size}x{args.size} float32 tensor "
          f"(seed {args.seed}), quantized along the last axis"
          + (f"; MX scales by the {rule!r} rule:" if rule != "floor" else ":"))
    print(render(rows))
    if args.json:
        write_atomic(args.json, json.dumps(rows, indent=2, allow_nan=True) + "\n")
    return 0


def register(sub) -> None:
    p = sub.add_parser("formats", help="table of every number format (bits, range, SQNR)",
                       description=__doc__)
    p.add_argument("--size", type=int, default=4096, help="tensor side (default 4096)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    p.add_argument("--scale-rule", choices=numfmt.SCALE_RULES, default="floor",
                   help="MX shared-exponent rule: floor (OCP MX v1.0, default), ceil, even, "
                        "rceil (NVIDIA cuBLAS); see docs/scale_rules.md")
    p.set_defaults(func=run)
