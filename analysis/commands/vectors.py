"""``loraq vectors``: RTL test vectors for a block-scaled integer-accumulate GEMM.

Example::

    loraq vectors --a-format mxint8 --b-format mxint4 --m 4 --n 4 --k 128 \\
        --acc-bits 20 --overflow saturate --seed 0 --out vectors/

writes a seeded random case plus edge cases (max codes, a sign swing that
overflows narrow accumulators, zero blocks, a NaN scale) as ``$readmemh``
text files and ``cases.json``, with a README.txt describing the layout. The
expected values come from ``hwsim.matmul`` (see ``hwsim.vectors``).
"""
from __future__ import annotations

from hwsim.gemm import ACC_ROUNDINGS, OVERFLOWS, Accumulator, FloatAcc
from hwsim.vectors import CASE_NAMES, write_vectors
from analysis.errors import checks_input

__all__ = ["register", "run"]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "vectors", help="RTL test vectors (hex, $readmemh) for a block-scaled GEMM",
        description="Write a seeded random case plus edge cases (max codes, sign swing, zero "
        "blocks, NaN scale) of out = a @ b.T as hex element and scale codes, expected float32 "
        "outputs and the in-block accumulator trace, plus cases.json and README.txt.")
    p.add_argument("--a-format", default="mxint8", help="activation format (default: %(default)s)")
    p.add_argument("--b-format", default="mxint4", help="weight format (default: %(default)s)")
    p.add_argument("--m", type=int, default=4, help="rows of a (default: %(default)s)")
    p.add_argument("--n", type=int, default=4, help="rows of b (default: %(default)s)")
    p.add_argument("--k", type=int, default=128, help="reduction length (default: %(default)s)")
    p.add_argument("--acc-bits", type=int, default=None,
                   help="in-block accumulator width, sign included (default: unbounded)")
    p.add_argument("--overflow", default="exact", choices=OVERFLOWS,
                   help="accumulator overflow rule (default: %(default)s)")
    p.add_argument("--mantissa-bits", type=int, default=23,
                   help="inter-block float fraction bits (default: %(default)s = FP32)")
    p.add_argument("--rounding", default="rne", choices=ACC_ROUNDINGS,
                   help="inter-block rounding (default: %(default)s)")
    p.add_argument("--promote-every", type=int, default=None,
                   help="add the partial sum into an FP32 register every N elements of K")
    p.add_argument("--cases", default=",".join(CASE_NAMES),
                   help="comma-separated cases (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.set_defaults(func=run)


@checks_input  # the work is a function of the arguments alone: its errors are theirs
def run(args) -> int:
    acc = Accumulator(args.acc_bits, args.overflow)
    ib = FloatAcc(args.mantissa_bits, args.rounding, args.promote_every)
    cases = tuple(c.strip() for c in args.cases.split(",") if c.strip())
    meta = write_vectors(args.out, args.a_format, args.b_format, args.m, args.n, args.k,
                         seed=args.seed, acc=acc, inter_block=ib, cases=cases)
    print(f"wrote {len(meta['cases'])} cases ({', '.join(c['name'] for c in meta['cases'])}) "
          f"of {meta['a_format']} x {meta['b_format']} M={meta['m']} N={meta['n']} "
          f"K={meta['k']} to {args.out}")
    for c in meta["cases"]:
        print(f"  {c['name']:<12} overflows {c['overflow_count']:>5}  max|acc| "
              f"{c['max_abs_acc']:>10}  bits needed {c['acc_bits_needed']}")
    return 0
