"""Throughput benchmark: ``python -m numfmt.bench [--size N] [--threads 2,1] [--repeat R]
[--formats a,b] [--json PATH] [--cold]``.

One run, one seeded N x N float32 Gaussian tensor (seed 0). Prints, all measured in
the same process:

* the first call of every kernel family (compile, or load from Numba's on-disk cache;
  ``--cold`` points the cache at an empty temporary folder so every kernel compiles),
  reported apart from the run times;
* Melem/s of ``fake_quantize`` (a fresh result, and into a preallocated ``out=``),
  ``quantize`` (codes + scales) and ``dequantize`` for each block format, best of
  ``--repeat`` runs, with the first thread count of ``--threads`` (default 2; a second
  count, e.g. ``--threads 2,1``, adds a column for ``fake_quantize``);
* the bandwidth ceiling: a Numba parallel copy of the same buffer into a preallocated
  float32 buffer, and into a freshly allocated one (the page faults a function that
  returns a new array pays); each ``fake_quantize`` figure is compared with the copy
  that writes its output the same way;
* ml_dtypes' element casts (float32 -> narrow float -> float32) and, when importable,
  torchao's MX cast round trip (``to_mx`` then ``to_dtype``);
* ratios: x copy ceiling (like for like), x ml_dtypes, x torchao.

Throughput = elements / best wall time. Other processes on the machine slow every
line alike, so compare ratios within one run.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

from numfmt.fileio import write_json_atomic

FORMATS = ("mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4", "mxint8", "mxint6",
           "mxint4", "sint8", "sint4", "nvfp4", "int8_channel")

# which compiled kernel family serves each format (for the compile-time table)
_FAMILY = {"mxfp8_e4m3": "mx float", "mxfp8_e5m2": "mx float", "mxfp6_e3m2": "mx float",
           "mxfp6_e2m3": "mx float", "mxfp4": "mx float", "mxint8": "mx int", "mxint6": "mx int",
           "mxint4": "mx int", "sint8": "absmax", "sint4": "absmax", "sint6": "absmax",
           "nvfp4": "nvfp4", "int8_channel": "absmax"}

_ML_DTYPES_CASTS = (("float8_e4m3fn", "fp8_e4m3"), ("float8_e5m2", "fp8_e5m2"),
                    ("float6_e3m2fn", "fp6_e3m2"), ("float6_e2m3fn", "fp6_e2m3"),
                    ("float4_e2m1fn", "fp4_e2m1"), ("bfloat16", "bf16"))


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m numfmt.bench", description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=4096, help="tensor is size x size float32")
    p.add_argument("--threads", default="2",
                   help="Numba thread counts, comma separated; the first is the main one")
    p.add_argument("--repeat", type=int, default=5, help="runs per measurement (best is kept)")
    p.add_argument("--formats", default=",".join(FORMATS), help="comma-separated block formats")
    p.add_argument("--json", default=None, help="also write the results as JSON to this path")
    p.add_argument("--cold", action="store_true",
                   help="compile every kernel (empty temporary Numba cache) to time compilation")
    args = p.parse_args(argv)
    if args.size < 1:
        raise ValueError(f"--size={args.size} is not allowed; it must be >= 1")
    if args.repeat < 1:
        raise ValueError(f"--repeat={args.repeat} is not allowed; it must be >= 1")
    try:
        args.threads = [int(t) for t in args.threads.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--threads={args.threads!r} must be comma-separated integers") from None
    if not args.threads or min(args.threads) < 1:
        raise ValueError(f"--threads={args.threads!r}: each thread count must be >= 1")
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    return args


def best_time(fn, repeat: int = 1) -> float:
    """Best wall time (s) of ``repeat`` calls of ``fn``."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (benchmark headers)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None) -> int:
    try:
        args = _parse(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.cold:
        os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="numfmt-bench-cache-")

    import numba
    import numpy as np

    import numfmt

    unknown = [f for f in args.formats if f not in numfmt.formats()]
    if unknown:
        print(f"error: unknown format(s) {unknown}; allowed: {list(FORMATS)}", file=sys.stderr)
        return 2
    threads = args.threads[0]
    if max(args.threads) > numba.config.NUMBA_NUM_THREADS:
        print(f"error: --threads {max(args.threads)} exceeds Numba's pool of "
              f"{numba.config.NUMBA_NUM_THREADS}", file=sys.stderr)
        return 2
    numba.set_num_threads(threads)

    n = args.size
    x = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    nel = x.size
    R = args.repeat
    res = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                       "numba": numba.__version__, "numpy": np.__version__,
                       "loadavg_1min_at_start": os.getloadavg()[0]},
           "size": [n, n], "dtype": "float32", "threads": args.threads, "repeat": R,
           "numba_cache": "cold (empty temporary cache)" if args.cold else "default (warm if run before)",
           "compile_s": {}, "formats": {}, "references": {}}

    def mel(seconds):
        return nel / seconds / 1e6

    # -- the bandwidth ceiling ----------------------------------------------------------
    @numba.njit(parallel=True, cache=False)
    def parallel_copy(src, dst):
        for i in numba.prange(src.size):
            dst[i] = src[i]

    flat = x.reshape(-1)
    dst = np.empty_like(flat)
    t0 = time.perf_counter()
    parallel_copy(flat, dst)
    res["compile_s"]["parallel copy (reference)"] = time.perf_counter() - t0

    # -- first calls (compile or cache load), apart from the timings -------------------
    small = x[:4, :256].copy()
    for fam_fmt in args.formats:
        fam = _FAMILY.get(fam_fmt, "other")
        for verb, fn in (("fake_quantize", numfmt.fake_quantize), ("quantize", numfmt.quantize)):
            t0 = time.perf_counter()
            out = fn(small, fam_fmt)
            dt = time.perf_counter() - t0
            res["compile_s"][f"{fam_fmt} {verb} [{fam}]"] = dt
        t0 = time.perf_counter()
        numfmt.dequantize(out)
        res["compile_s"][f"{fam_fmt} dequantize"] = time.perf_counter() - t0

    copy_s = best_time(lambda: parallel_copy(flat, dst), R)
    copy_alloc_s = best_time(lambda: parallel_copy(flat, np.empty_like(flat)), R)
    dst2 = np.empty_like(x)
    res["copy_melem_s"] = mel(copy_s)
    res["copy_alloc_melem_s"] = mel(copy_alloc_s)

    # -- numfmt ---------------------------------------------------------------------
    for f in args.formats:
        row = {}
        row["fake_quantize"] = mel(best_time(lambda: numfmt.fake_quantize(x, f), R))
        row["fake_quantize_out"] = mel(best_time(lambda: numfmt.fake_quantize(x, f, out=dst2), R))
        q = numfmt.quantize(x, f)
        row["quantize"] = mel(best_time(lambda: numfmt.quantize(x, f), R))
        row["dequantize"] = mel(best_time(lambda: numfmt.dequantize(q), R))
        for t in args.threads[1:]:
            numba.set_num_threads(t)
            row[f"fake_quantize_{t}t"] = mel(best_time(lambda: numfmt.fake_quantize(x, f), R))
            numba.set_num_threads(threads)
        row["fake_x_copy"] = row["fake_quantize"] / res["copy_alloc_melem_s"]
        row["fake_out_x_copy"] = row["fake_quantize_out"] / res["copy_melem_s"]
        res["formats"][f] = row

    # -- references -----------------------------------------------------------------
    import ml_dtypes
    for dt_name, ours in _ML_DTYPES_CASTS:
        dt = getattr(ml_dtypes, dt_name, None)
        if dt is None:
            continue
        s = best_time(lambda: x.astype(dt).astype(np.float32), R)
        res["references"][f"ml_dtypes {dt_name} round trip"] = mel(s)
    try:
        import torch
        from torchao.prototype.mx_formats.mx_tensor import to_dtype, to_mx
        torch.set_num_threads(threads)
        xt = torch.from_numpy(x)
        for label, elem in (("float8_e4m3fn", torch.float8_e4m3fn),
                            ("float4_e2m1fn_x2", getattr(torch, "float4_e2m1fn_x2", None))):
            if elem is None:
                continue
            try:
                def rt(elem=elem):
                    scale, data = to_mx(xt, elem, 32)
                    return to_dtype(data, scale, elem, 32, torch.float32)
                rt()
                s = best_time(rt, R)
                res["references"][f"torchao MX {label} round trip"] = mel(s)
                s = best_time(lambda elem=elem: to_mx(xt, elem, 32), R)
                res["references"][f"torchao MX {label} to_mx"] = mel(s)
            except Exception as e:  # a torchao API change: report, do not fail the benchmark
                res["references"][f"torchao MX {label}"] = f"failed: {type(e).__name__}: {e}"
        import torchao
        res["machine"]["torchao"] = torchao.__version__
    except ImportError:
        # not in .venv on purpose (diffusers / transformers would import it on every start)
        res["references"]["torchao"] = ("not importable (to compare: PYTHONPATH=.oracle/torchao, "
                                        "where scripts/setup installs it)")

    _print(res, args)
    if args.json:
        write_json_atomic(args.json, res)
        print(f"\nwrote {args.json}")
    return 0


def _print(res, args):
    m = res["machine"]
    t = args.threads[0]
    n = res["size"][0]
    print(f"numfmt benchmark: {n}x{n} float32 (seed 0), {t} Numba thread(s), best of "
          f"{res['repeat']}; {m['cpu']}, {m['cores']} logical cores; numba {m['numba']}; "
          f"1-min load average at start {m['loadavg_1min_at_start']:.1f}")
    print(f"\nfirst call (compile or cache load; Numba cache: {res['numba_cache']})")
    for k, v in res["compile_s"].items():
        print(f"  {k:48s} {v:8.2f} s")
    copy = res["copy_melem_s"]
    print(f"\nbandwidth ceiling: Numba parallel copy {copy:8.0f} Melem/s "
          f"({copy * 8 / 1e3:.1f} GB/s read+write) into a preallocated buffer; into a "
          f"fresh allocation {res['copy_alloc_melem_s']:.0f} Melem/s")
    extra = [f"fake {tt}T" for tt in args.threads[1:]]
    head = (f"\n{'format':14s} {'fake_quantize':>14s} {'x fresh copy':>13s} {'fake out=':>10s} "
            f"{'x copy':>7s}" + "".join(f"{e:>11s}" for e in extra)
            + f" {'quantize':>10s} {'dequantize':>11s}   (Melem/s)")
    print(head)
    for f, row in res["formats"].items():
        cols = "".join(f"{row[f'fake_quantize_{tt}t']:11.0f}" for tt in args.threads[1:])
        print(f"{f:14s} {row['fake_quantize']:14.0f} {row['fake_x_copy']:13.2f} "
              f"{row['fake_quantize_out']:10.0f} {row['fake_out_x_copy']:7.2f}{cols} "
              f"{row['quantize']:10.0f} {row['dequantize']:11.0f}")
    print("\nreferences (Melem/s)")
    refs = res["references"]
    for k, v in refs.items():
        print(f"  {k:44s} " + (f"{v:8.0f}" if isinstance(v, float) else str(v)))
    print("\nratios")
    fmts = res["formats"]
    pairs = (("mxfp8_e4m3", "float8_e4m3fn"), ("mxfp8_e5m2", "float8_e5m2"),
             ("mxfp6_e3m2", "float6_e3m2fn"), ("mxfp6_e2m3", "float6_e2m3fn"),
             ("mxfp4", "float4_e2m1fn"))
    for f, dt in pairs:
        r = refs.get(f"ml_dtypes {dt} round trip")
        if f in fmts and isinstance(r, float):
            print(f"  {f} fake_quantize / ml_dtypes {dt} element round trip: "
                  f"{fmts[f]['fake_quantize'] / r:6.2f}x")
    for f, label in (("mxfp8_e4m3", "float8_e4m3fn"), ("mxfp4", "float4_e2m1fn_x2")):
        r = refs.get(f"torchao MX {label} round trip")
        if f in fmts and isinstance(r, float):
            print(f"  {f} fake_quantize / torchao MX {label} round trip: "
                  f"{fmts[f]['fake_quantize'] / r:6.1f}x")
    for f in ("mxint8", "mxint4"):
        if f in fmts:
            print(f"  {f} fake_quantize / copy into a fresh allocation: "
                  f"{fmts[f]['fake_x_copy']:.2f}; fake_quantize(out=) / preallocated copy: "
                  f"{fmts[f]['fake_out_x_copy']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
