"""Benchmark of the LoRaQ optimizer: ``python -m analysis.bench``.

1. A seeded 1152 x 4608 matrix (PixArt-Sigma's FFN shape; N(0, 0.02^2) entries
   with 8 outlier input channels scaled by 25), mxint4 main, mxint8 branch at
   equal memory to an FP16 rank-32 branch (rank 62). In the same run: one
   ``torch.linalg.svd`` of the same matrix (full_matrices=False, float32), then
   ``optimize`` with its defaults, then ``optimize`` with 5x as many steps (no
   early stop). Printed: the times, time(optimize) / time(svd), and
   error(default) / error(5x steps) - 1 (the "converged within 1%" test).
2. All 36 MiniLM linear layers x 3 branch formats (mxint8, mxint6, mxint4),
   mxint4 main, through ``optimize_model`` with ``--processes`` workers.

3. ``--scale`` (only this part): the Dask engine on PixArt-Sigma-shaped
   synthetic layers -- one transformer block (self-attention q, k, v, out,
   cross-attention q, k, v, out at 1152 x 1152, FFN up 4608 x 1152 and down
   1152 x 4608, shapes from ``hwsim.models``; ``bench_matrix`` entries with 8
   outlier channels), written to a safetensors file that the workers read
   tensor by tensor, LoRaQ with a fixed budget of ``--scale-steps`` steps (no
   early stop). Serial (this process) against a LocalCluster of
   ``--scale-workers`` processes: wall times, parallel efficiency
   T_serial / (workers x T_parallel) for the whole block and for the two large
   FFN layers alone (``--scale-rounds`` rounds, each a serial run, in a plain process
   of its own, right before a parallel one: the best of each side, which the machine's
   drift disturbs least, and the median and range of the rounds' own ratios; and,
   stricter, against the serial side's optimizer time alone), bit equality of the
   files, the CPU seconds of this process and the workers (psutil; their ratio is the
   engine's work overhead, which a loaded machine does not disturb as it does
   wall time), the per-layer times, Dask's per-task overhead (wall time per no-op task
   through ``map_layers``), a control without Dask (``plain_process_ceiling``: the two
   large layers fitted warm in plain processes, alone and two at once: the efficiency the
   machine itself allows when two processes share its caches and memory), the same fit
   pinned to each CPU in turn (``cpu_speeds``: a virtual machine's CPUs need not be
   equally fast, and one worker per CPU waits for the slowest), and a
   projection of the wall time for all of PixArt-Sigma and SANA
   (``hwsim.models``: every linear layer x blocks; SANA's depthwise conv is not
   a LoRaQ layer) at 1..64 workers: per-layer time from a least-squares fit
   t = a + b * out * in to the measured serial layers plus the per-task
   overhead, scheduled largest first onto the workers, and at least n_tasks x
   overhead (the scheduler hands out one task at a time). The projection
   assumes one worker per free core, as fast as a serial run here.

Numba compile / cache load is timed apart (a warm-up call first). Threads:
``--threads`` (default 2) for torch and Numba in part 1, the SVD included.
Nothing is asserted; the script prints measurements and their ratios.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["bench_matrix", "pixart_block", "project_wall_time", "plain_process_ceiling",
           "cpu_speeds", "main"]


def bench_matrix(seed: int = 0, shape=(1152, 4608), outliers: int = 8,
                 outlier_scale: float = 25.0) -> np.ndarray:
    """The seeded test weight: N(0, 0.02^2) float32, ``outliers`` input columns x scale."""
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    cols = rng.choice(shape[1], outliers, replace=False)
    W[:, cols] *= np.float32(outlier_scale)
    return W


def _matrix_part(threads: int, steps: int | None, factor: int) -> None:
    from analysis.loraq import optimize
    from analysis.loraq.common import limit_threads
    from analysis.loraq.optimizer import DEFAULT_STEPS

    t = time.perf_counter()
    optimize(bench_matrix(shape=(64, 256)), rank=4, steps=2, threads=threads)
    print(f"warm-up (Numba compile / cache load, torch init): {time.perf_counter() - t:.2f} s")
    W = bench_matrix()
    print(f"matrix 1152 x 4608, mxint4 main, mxint8 branch, {threads} thread(s), "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs visible")
    with limit_threads(threads):
        t = time.perf_counter()
        torch.linalg.svd(torch.from_numpy(W), full_matrices=False)
        t_svd = time.perf_counter() - t
    print(f"torch.linalg.svd (float32, full_matrices=False): {t_svd:.2f} s")
    n = DEFAULT_STEPS if steps is None else steps
    t = time.perf_counter()
    res = optimize(W, steps=n, threads=threads)
    t_opt = time.perf_counter() - t
    print(f"optimize, {res.steps} steps (rank {res.rank}): {t_opt:.2f} s, rel_error "
          f"{res.rel_error:.5f}; time / svd = {t_opt / t_svd:.2f}x (goal <= 8x)")
    from analysis.loraq import svdquant
    sq = svdquant(W, threads=threads)
    print(f"svdquant (FP16 rank 32, no data): rel_error {sq.rel_error:.5f}; "
          f"loraq / svdquant = {res.rel_error / sq.rel_error:.3f}")
    if factor > 1:
        t = time.perf_counter()
        long = optimize(W, steps=factor * max(res.steps, 1), early_stop=False, threads=threads)
        t_long = time.perf_counter() - t
        gap = res.rel_error / long.rel_error - 1
        print(f"optimize, {long.steps} steps ({factor}x): {t_long:.2f} s, rel_error "
              f"{long.rel_error:.5f}; default / {factor}x - 1 = {gap:+.2%} (goal <= 1%)")


def _minilm_part(processes: int, formats) -> None:
    from analysis.loraq.driver import optimize_model
    from analysis.minilm import linear_weights

    from analysis import cluster

    weights = linear_weights()
    t = time.perf_counter()
    with cluster.connect(workers=processes) as client:  # one cluster for the three runs
        total = time.perf_counter() - t
        print(f"{cluster.describe(client)}: started in {total:.1f} s")
        for branch in formats:
            with tempfile.TemporaryDirectory() as d:
                t = time.perf_counter()
                res = optimize_model(weights, d, method="loraq", branch=branch, client=client)
                dt = time.perf_counter() - t
            total += dt
            errs = np.array([r.rel_error for r in res.values()])
            print(f"MiniLM 36 layers, branch {branch}: {dt:.1f} s, mean rel_error "
                  f"{errs.mean():.5f}")
    print(f"MiniLM 36 layers x {len(formats)} branch formats, {processes} process(es): "
          f"{total:.1f} s (goal <= 60 s)")


def pixart_block(seed: int = 0) -> dict[str, np.ndarray]:
    """One PixArt-Sigma block's linear weights (shapes from hwsim.models), ``bench_matrix``."""
    from hwsim.models import builtin_model

    return {f"blocks.0.{layer.name}.weight": bench_matrix(seed=seed + i, shape=layer.shape)
            for i, layer in enumerate(builtin_model("pixart-sigma"))}


def project_wall_time(seconds: list[float], workers: int, overhead: float) -> float:
    """Wall time of tasks taking ``seconds`` (+ ``overhead`` each) on ``workers``, largest
    first onto the least-loaded worker, and at least len(seconds) x overhead."""
    import heapq

    load = [0.0] * workers
    for t in sorted(seconds, reverse=True):
        heapq.heapreplace(load, load[0] + t + overhead)
    return max(max(load), len(seconds) * overhead)


def _warm_worker() -> None:
    """Imports, Numba cache loads and torch init on a worker, before anything is timed."""
    from analysis.loraq import optimize

    optimize(bench_matrix(shape=(64, 256)), rank=4, steps=2)


def _noop(i: int) -> int:
    return i


def _warm_fit(path: str, name: str, steps: int):
    """In a fresh plain process (no Dask): the workers' malloc settings, layer ``name``
    read from ``path`` and fitted once to warm up. Returns ``fit``, a function that fits
    it again and returns the seconds taken."""
    from analysis.cluster import keep_freed_memory
    from analysis.loraq import optimize
    from analysis.loraq.driver import read_layer

    keep_freed_memory()  # as in the workers: only the engine differs
    W = read_layer(path, name)

    def fit() -> float:
        t = time.perf_counter()
        optimize(W, steps=steps, early_stop=False, threads=1)
        return time.perf_counter() - t
    fit()
    return fit


def _plain_fit(path: str, name: str, steps: int, barrier, queue) -> None:
    """``_warm_fit``, then (after ``barrier``, when given) a timed fit into ``queue``."""
    fit = _warm_fit(path, name, steps)
    if barrier is not None:
        barrier.wait()
    queue.put((name, fit()))


def plain_process_ceiling(path, names, steps: int) -> tuple[dict, dict, float]:
    """The machine's own ceiling for a 2-worker run, without Dask: each layer of
    ``names`` fitted (warm) in one process alone, then all of them at once, one process
    each, started together. Returns (alone seconds, together seconds, efficiency
    sum(alone) / (len(names) x max(together))): what any engine can reach here when the
    processes compete for the machine's shared caches and memory."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    alone = {}
    for n in names:
        p = ctx.Process(target=_plain_fit, args=(str(path), n, steps, None, q))
        p.start()
        alone.update([q.get()])
        p.join()
    barrier = ctx.Barrier(len(names))
    procs = [ctx.Process(target=_plain_fit, args=(str(path), n, steps, barrier, q))
             for n in names]
    for p in procs:
        p.start()
    together = dict(q.get() for _ in procs)
    for p in procs:
        p.join()
    eff = sum(alone.values()) / (len(names) * max(together.values()))
    return alone, together, eff


def _serial_run(path: str, out: str, kw: dict) -> tuple[float, dict]:
    """In the benchmark's serial process: ``optimize_model`` on ``path`` in that process,
    as ``loraq optimize`` without a cluster runs it; returns (wall seconds, metrics)."""
    from analysis.cluster import keep_freed_memory
    from analysis.loraq.driver import optimize_model

    keep_freed_memory()  # as the loraq command does
    t = time.perf_counter()
    res = optimize_model(path, out, **kw)
    return time.perf_counter() - t, res.metrics


def _pinned_fits(path: str, name: str, steps: int, rounds: int) -> dict[int, list[float]]:
    """In a fresh process: layer ``name`` fitted warm (``_warm_fit``), pinned in turn to
    each CPU this process may use, ``rounds`` times per CPU; cpu -> seconds."""
    fit = _warm_fit(path, name, steps)
    cpus = sorted(os.sched_getaffinity(0))
    out: dict[int, list[float]] = {c: [] for c in cpus}
    try:
        for _ in range(rounds):
            for c in cpus:
                os.sched_setaffinity(0, {c})
                out[c].append(fit())
    finally:
        os.sched_setaffinity(0, cpus)
    return out


def cpu_speeds(path, name: str, steps: int, rounds: int = 3) -> dict[int, list[float]]:
    """The same warm fit pinned to each CPU in turn (``_pinned_fits`` in a fresh process):
    on a virtual machine the CPUs need not be equally fast, and a run with one worker per
    CPU then waits for the slowest. Empty where the OS cannot pin (not Linux)."""
    if not hasattr(os, "sched_setaffinity"):
        return {}
    import multiprocessing as mp
    with mp.get_context("spawn").Pool(1) as p:
        return p.apply(_pinned_fits, (str(path), name, steps, rounds))


def _load_line(when: str) -> str:
    try:
        a, b, c = os.getloadavg()
    except OSError:
        return f"load average {when}: unavailable"
    return f"load average {when}: {a:.2f} {b:.2f} {c:.2f} ({os.cpu_count()} CPUs)"


def _scale_part(steps: int, workers: int, rounds: int = 5) -> None:
    import psutil  # a dependency of distributed
    from safetensors.numpy import save_file

    from analysis import cluster
    from analysis.loraq.driver import layer_stem, optimize_model
    from hwsim.models import builtin_model

    print(_load_line("before --scale"))
    block = pixart_block()
    large = [n for n in block if ".ff." in n]
    kw = dict(steps=steps, early_stop=False)
    print(f"PixArt-Sigma block: {len(block)} layers, LoRaQ mxint4 + mxint8 branch, {steps} "
          f"steps each (fixed), 1 thread per process, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        save_file(block, str(d / "block.safetensors"))
        save_file({n: block[n] for n in large}, str(d / "large.safetensors"))
        del block
        _warm_worker()

        procs = [psutil.Process()]  # this process, then the workers

        def cpu() -> float:
            return sum(sum(p.cpu_times()[:2]) for p in procs)

        def run(name, client, out):
            c, t = cpu(), time.perf_counter()
            res = optimize_model(d / f"{name}.safetensors", d / out, client=client, **kw)
            wall = time.perf_counter() - t
            cpu_used[out] = cpu() - c
            return wall, res.metrics

        cpu_used: dict[str, float] = {}

        t_serial, serial = run("block", None, "serial")
        t = time.perf_counter()
        with cluster.connect(workers=workers) as client:
            t_start = time.perf_counter() - t
            t = time.perf_counter()
            client.run(_warm_worker)
            procs += [psutil.Process(pid) for pid in client.run(os.getpid).values()]
            t_warm = time.perf_counter() - t
            n_noop = 400
            t = time.perf_counter()
            for _ in cluster.map_layers(_noop, [(f"t{i}", (i,)) for i in range(n_noop)],
                                        client=client):
                pass
            overhead = (time.perf_counter() - t) / n_noop
            t_par, par = run("block", client, "parallel")
            # The large pair is short and the machine's speed drifts from minute to minute:
            # rounds of a serial run right before a parallel one. The serial runs go to a
            # plain process of their own, warmed up like the workers, with no Dask thread
            # in it: `loraq optimize` without a cluster (this process hosts the scheduler
            # and the nannies).
            import multiprocessing as mp
            with mp.get_context("spawn").Pool(1) as serial_proc:
                large_path = str(d / "large.safetensors")
                serial_proc.apply(_serial_run, (large_path, str(d / "serial-warm"), kw))
                pairs = [(serial_proc.apply(_serial_run, (large_path, str(d / f"serial-large{i}"),
                                                          kw)),
                          run("large", client, f"parallel-large{i}")) for i in range(rounds)]
        ceil_alone, ceil_together, ceil_eff = plain_process_ceiling(
            d / "large.safetensors", large, steps)
        speeds = cpu_speeds(d / "large.safetensors", large[0], steps)
        same = all((d / "serial" / f"{layer_stem(n)}.safetensors").read_bytes()
                   == (d / "parallel" / f"{layer_stem(n)}.safetensors").read_bytes()
                   for n in serial)
    print(f"LocalCluster of {workers} workers: start {t_start:.1f} s, worker warm-up (imports, "
          f"Numba cache) {t_warm:.1f} s, not counted below")
    print(f"Dask per-task overhead: {overhead * 1e3:.2f} ms (wall per no-op task, {n_noop} "
          f"through map_layers)")
    eff = t_serial / (workers * t_par)
    t_serial_large = min(a for (a, _), _ in pairs)
    t_par_large = min(b for _, (b, _) in pairs)
    eff_large = t_serial_large / (workers * t_par_large)
    round_eff = sorted(a / (workers * b) for (a, _), (b, _) in pairs)
    print(f"block, {len(serial)} layers: serial {t_serial:.1f} s, {workers} workers "
          f"{t_par:.1f} s, speed-up {t_serial / t_par:.2f}x, efficiency {eff:.2f}")
    print(f"large layers (FFN up + down), {rounds} rounds of serial then {workers} workers, wall "
          f"(the layers' optimizer times):")
    for (a, ma), (b, mb) in pairs:
        fits_a = " + ".join(f"{m['seconds']:.2f}" for m in ma.values())
        fits_b = ", ".join(f"{m['seconds']:.2f}" for m in mb.values())
        print(f"  serial {a:.2f} s ({fits_a}) | {workers} workers {b:.2f} s ({fits_b}): "
              f"efficiency {a / (workers * b):.2f}")
    print(f"  best of each side: serial {t_serial_large:.2f} s, {workers} workers "
          f"{t_par_large:.2f} s, speed-up {t_serial_large / t_par_large:.2f}x, efficiency "
          f"{eff_large:.2f} (goal >= 0.85); the rounds' own efficiencies: median "
          f"{float(np.median(round_eff)):.2f}, range {round_eff[0]:.2f}-{round_eff[-1]:.2f}")
    # stricter: the serial side counted as its optimizer time alone (no read, hash, write)
    fit_eff = min(sum(m["seconds"] for m in ma.values()) for (_, ma), _ in pairs) / (
        workers * t_par_large)
    print(f"  stricter, the serial side as its optimizer time alone (best round, no read / "
          f"hash / write): efficiency {fit_eff:.2f}")
    print("control without Dask, the large layers fitted warm in plain processes: alone "
          + ", ".join(f"{ceil_alone[n]:.2f} s" for n in large) + "; two at once "
          + ", ".join(f"{ceil_together[n]:.2f} s" for n in large)
          + f": the machine's own ceiling for 2 workers, efficiency {ceil_eff:.2f}; Dask's "
          f"efficiency on them relative to it {eff_large / ceil_eff:.2f}; the best {workers}-worker "
          f"wall against these fits alone: efficiency "
          f"{sum(ceil_alone.values()) / (workers * t_par_large):.2f}")
    if speeds:
        med = {c: float(np.median(v)) for c, v in speeds.items()}
        print(f"the same fit ({large[0]}) pinned to each CPU in turn, {len(speeds[min(speeds)])} "
              f"times each: " + "; ".join(f"CPU {c} " + ", ".join(f"{x:.2f}" for x in v)
                                          + f" s (median {med[c]:.2f})"
                                          for c, v in speeds.items())
              + f": one worker per CPU waits for the slowest, efficiency at most "
              f"{min(med.values()) / max(med.values()):.2f} against a serial run on the "
              f"fastest")
    print(f"result files bit-identical to the serial run: {same}")
    c_ser, c_par = cpu_used["serial"], cpu_used["parallel"]
    print(f"CPU seconds (this process + workers), block: serial {c_ser:.1f} s "
          f"({c_ser / t_serial:.2f} cores busy on average), {workers} workers {c_par:.1f} s "
          f"({c_par / t_par:.2f} cores); serial CPU / parallel CPU = {c_ser / c_par:.2f} (the "
          f"engine's work overhead; 1 = none)")
    print("per-layer optimizer time (s), serial | in the parallel run:")
    for n, m in serial.items():
        print(f"  {n:<34} {m['shape'][0]:>5} x {m['shape'][1]:<5} rank {m['rank']:>3}  "
              f"{m['seconds']:6.2f} | {par[n]['seconds']:6.2f}")
    ser_s = np.array([m["seconds"] for m in serial.values()])
    par_s = np.array([par[n]["seconds"] for n in serial])
    print(f"  min / median / max: serial {ser_s.min():.2f} / {np.median(ser_s):.2f} / "
          f"{ser_s.max():.2f}; parallel / serial per layer: mean {np.mean(par_s / ser_s):.2f}")
    # t = a + b * out * in over the measured layers; the serial wall time beyond the
    # optimizer's own time (read, hash, write) is spread evenly over the layers.
    sizes = np.array([m["shape"][0] * m["shape"][1] for m in serial.values()], dtype=float)
    b, a = np.polyfit(sizes, ser_s, 1)
    per_layer_io = max(t_serial - ser_s.sum(), 0.0) / len(ser_s)
    print(f"fit: t = {a:.3f} s + {b * 1e6:.3f} s per million weights; read/hash/write "
          f"{per_layer_io:.3f} s per layer")
    counts = (1, 2, 4, 8, 16, 32, 64)
    print(f"projected wall time (s) at {steps} steps per layer: " + " ".join(
        f"{w:>8}" for w in counts))
    for model in ("pixart-sigma", "sana-1600m"):
        layers = [la for la in builtin_model(model) if la.kind == "linear"]
        secs = [a + b * la.out_features * la.in_features + per_layer_io
                for la in layers for _ in range(la.count)]
        print(f"  {model:<12} {len(secs):>4} layers: " + " ".join(
            f"{project_wall_time(secs, w, overhead):8.1f}" for w in counts))
    print(_load_line("after --scale"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.bench", description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="steps of the default run")
    p.add_argument("--factor", type=int, default=5, help="the long run has factor x steps")
    p.add_argument("--skip-matrix", action="store_true")
    p.add_argument("--skip-minilm", action="store_true")
    p.add_argument("--scale", action="store_true", help="only the Dask scaling part (3.)")
    p.add_argument("--scale-steps", type=int, default=30)
    p.add_argument("--scale-workers", type=int, default=2)
    p.add_argument("--scale-rounds", type=int, default=5,
                   help="rounds of serial then parallel runs of the large layers")
    args = p.parse_args(argv)
    for opt in ("scale_steps", "scale_workers", "scale_rounds"):
        if getattr(args, opt) < 1:
            p.error(f"--{opt.replace('_', '-')} {getattr(args, opt)}: give an integer >= 1")
    from analysis.cluster import keep_freed_memory

    keep_freed_memory()  # as the loraq command does: the serial runs keep their memory
    if args.scale:
        _scale_part(args.scale_steps, args.scale_workers, args.scale_rounds)
        return 0
    try:
        load = os.getloadavg()
        print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    except OSError:
        pass
    if not args.skip_matrix:
        _matrix_part(args.threads, args.steps, args.factor)
    if not args.skip_minilm:
        _minilm_part(args.processes, ("mxint8", "mxint6", "mxint4"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
