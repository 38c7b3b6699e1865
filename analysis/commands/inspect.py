"""``loraq inspect DIR``: check a quantized checkpoint and say what it holds.

Every tensor is read and checked (presence, dtype, shape, SHA-256) and every quantized
layer rebuilt, as ``analysis.load_quantized`` does; a damaged, truncated or pickled
file is one line naming the file and the tensor, exit code 2. Then it prints the
model's class, the recipe, the layers with their formats and ranks, and the bytes by
kind (``analysis.checkpoint.checkpoint_bytes``).
"""
from __future__ import annotations

from analysis.errors import checks_input

__all__ = ["register", "run"]


def register(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="check a quantized checkpoint and list its contents",
                              description=__doc__.split("\n\n")[1])
    p.add_argument("checkpoint", help="a directory written by loraq quantize / save_quantized")
    p.add_argument("--layers", action="store_true", help="list every layer")
    p.set_defaults(func=run)


@checks_input  # the work is a function of the arguments alone: its errors are theirs
def run(args) -> int:
    from analysis.checkpoint import checkpoint_bytes, read_checkpoint

    man, _, qmods = read_checkpoint(args.checkpoint)
    info = man["model"]
    print(f"{args.checkpoint}: {man['format']} version {man['format_version']}, model "
          f"{info.get('class') or '(weights only)'} ({info.get('library') or 'no config'})")
    for name, r in man["recipes"].items():
        sm = r["smoothing"]
        print(f"recipe {name}: main {r['main_weight']}/{r['main_act']}, method {r['method']}"
              + (f", branch {r['branch_weight']}/{r['branch_act']}" if r["branch_weight"] else "")
              + (f", smoothing alpha {sm['alphas']} beta {sm['betas']}" if sm else ""))
    ranks = [q.rank for q in qmods.values()]
    print(f"{len(qmods)} quantized layers, ranks {min(ranks)}-{max(ranks)}; "
          f"{len(man['unquantized'])} other tensors stored as they are")
    if args.layers:
        for name, q in qmods.items():
            print(f"  {name}: {q.out_features} x {q.in_features}, {q.main_q.format.name}"
                  + (f" + rank {q.rank} {q.left_q.format.name}" if q.rank else ""))
    b = checkpoint_bytes(args.checkpoint)
    mib = lambda v: f"{v / 2**20:.3f} MiB"  # noqa: E731
    print(f"bytes: quantized codes and scales {mib(b['quantized'])}, smoothing and biases "
          f"{mib(b['smooth_bias'])}, other parameters {mib(b['unquantized'])}, files "
          f"{mib(sum(b['files'].values()))}")
    return 0
