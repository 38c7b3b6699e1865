"""The one engine for per-layer work: Dask distributed (or this process alone).

API (everything the rest of the toolkit uses)::

    from analysis import cluster

    # 1. a client: None (run in this process), a LocalCluster, or an existing scheduler
    with cluster.connect() as client:                        # None: in-process, no cluster
    with cluster.connect(workers=4) as client:               # LocalCluster, 4 processes x 1 thread
    with cluster.connect(scheduler="tcp://10.0.0.5:8786") as client:
    with cluster.connect(scheduler="tls://10.0.0.5:8786", tls_ca_file="ca.pem",
                         tls_cert="client.pem", tls_key="client.key") as client:

    # 2. the same from the command line
    cluster.add_cluster_arguments(parser)          # --workers --scheduler --tls-ca-file ...
    with cluster.client_from_args(args) as client:
        ...

    # 3. a pure per-layer function over layers, results as they complete
    items = [(name, (cluster.scatter(W), other_args...)) for name, W in weights.items()]
    for name, result in cluster.map_layers(fit_one, items, client=client,
                                           priority={name: W.size for ...}):
        save(name, result)                      # the client owns every write

``connect(workers=None, scheduler=None, *, tls_ca_file=None, tls_cert=None,
tls_key=None, threads_per_worker=1, connect_timeout=10.0)`` yields

* ``None`` when ``workers`` is None or 1 and there is no ``scheduler``: the
  caller runs everything in this process (``map_layers(client=None)`` does);
* a ``distributed.Client`` of a ``LocalCluster(n_workers=workers,
  threads_per_worker=1, processes=True)`` whose scheduler, workers and nannies
  listen on 127.0.0.1 only and which has no dashboard; the cluster is closed
  when the block ends;
* a ``Client`` of the scheduler at ``scheduler`` (``tcp://HOST:PORT``, or
  ``tls://HOST:PORT`` with mutual TLS through ``distributed.Security``: the CA
  that signed the scheduler's and workers' certificates, and this client's
  certificate and key). The client is closed at the end; the cluster is not.

Before yielding a client it checks that (1) the scheduler answers within
``connect_timeout`` seconds (else ``ClusterError`` naming the address: never a
hang), (2) at least one worker is connected within that time, and (3) every
worker runs the same Python, the same versions of the packages in
``CHECKED_PACKAGES`` and the same toolkit source (SHA-256 of the ``numfmt``,
``hwsim`` and ``analysis`` .py files) as the client, so results are the same
bits as a serial run; otherwise ``ClusterError`` names the package, the
client's version and each differing worker's (workers that join later are not
checked: start the workers first). ``workers=0``, a negative or
non-int count, ``workers`` together with ``scheduler``, a scheme other than
tcp:// or tls://, TLS files with tcp:// or tls:// without them are refused
with ``ValueError`` before anything starts. ``ClusterError`` is a ValueError,
so the command line prints it as one line (exit code 2).

``map_layers(fn, items, *, client=None, retries=1, priority=None)`` calls
``fn(*args)`` for each ``(name, args)`` of ``items`` and yields ``(name,
result)`` in completion order. With a client each call is one Dask task
(``client.submit``, higher ``priority[name]`` first); an argument wrapped in
``scatter(value)`` is sent to the cluster once (``client.scatter``) and the
task receives the value (other arguments travel inside the task's message,
through the scheduler: fine for small values). A task whose worker dies is rerun on another worker
by the scheduler (up to ``distributed.scheduler.allowed-failures``, 3 by
default, then ``ClusterError``); scattered data that died with its worker (Dask cannot recompute it)
is sent again and its task resubmitted (up to 3 times; also when the task had finished on
the dead worker but its result had not been fetched yet; any other task that the scheduler
cancels is resubmitted the same way); a task that raises
is retried ``retries`` times, then its exception
is raised here and the remaining tasks are cancelled. ``fn`` must be pure and
importable on the workers (a module-level function of the toolkit). Without a
client the calls run here, in the order of ``items``.

Worker memory. A LocalCluster's worker processes start with ``WORKER_MALLOC`` in their
environment. Dask's own default, ``MALLOC_TRIM_THRESHOLD_=65536``, makes glibc hand every
freed block back to the kernel at once; each of a fit's tens-of-MB arrays then page-faults
in afresh (3.5x the system time and 1.3-1.8x the wall time per layer measured here). Even
with trimming off, blocks above 32 MiB (a float64 copy of a 4608 x 1152 layer) come from
fresh pages each time, and the task thread's own glibc arena unmaps its heaps whenever
they empty. With ``WORKER_MALLOC`` every block comes from the one main heap and freed memory
stays there: a warm fit of the PixArt FFN layer in a task thread takes 0-10 000 page faults
and about 0.01 s of system time instead of 22 000-26 000 and 0.12-0.73 s. The worker's
resident size stays at its peak, as a long-lived Python process's does. Workers that you
start with ``dask worker`` get it from the same Dask setting in a configuration file (the
README shows it). ``keep_freed_memory()`` applies the same settings to the calling process
(glibc's ``mallopt``); the ``loraq`` command and the benchmark call it, so that a serial
run keeps its memory as the workers do.

Quiet housekeeping. A LocalCluster is also made with ``QUIET_CONFIG``: the workers' statistical
profiler off (it samples every task thread every 10 ms for a dashboard that a LocalCluster here
does not have), the event-loop latency check every 1 s instead of 20 ms, and the memory
monitors every 500 ms instead of 100 ms. Dask's defaults kept an idle 2-worker LocalCluster
busy for 12 % of one core (client process with scheduler and nannies 4.7 %, each worker
3.5-3.8 %); with ``QUIET_CONFIG`` 2.2 %. On a machine with one core per worker those wake-ups
are taken from the fits. Nothing else changes: the memory limits, retries and scheduling are
Dask's.

Security: a Dask scheduler runs whatever code a connected client sends it.
A LocalCluster therefore listens on 127.0.0.1 only; a tcp:// scheduler belongs
on a trusted network only; anything else needs tls:// with certificates.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import platform
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from analysis.errors import InputError

__all__ = ["connect", "client_from_args", "add_cluster_arguments", "map_layers", "scatter",
           "Scatter", "ClusterError", "environment", "describe", "CHECKED_PACKAGES",
           "WORKER_MALLOC", "QUIET_CONFIG", "keep_freed_memory"]

# Packages whose versions must match between client and workers (distribution names).
CHECKED_PACKAGES = ("dask", "distributed", "cloudpickle", "msgpack", "tornado", "toolz",
                    "numpy", "torch", "numba", "safetensors", "loraq-toolkit")
_SOURCE_PACKAGES = ("numfmt", "hwsim", "analysis")
_SCHEMES = ("tcp://", "tls://")
_MAX_RESENDS = 3  # like distributed.scheduler.allowed-failures


class ClusterError(InputError):
    """The cluster the user named cannot be used: unreachable, no workers, or mismatched
    workers (an ``InputError``: the command prints it as one line)."""


class Scatter:
    """An argument of ``map_layers`` sent to the cluster once (see ``scatter``)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def scatter(value) -> Scatter:
    """Mark ``value`` (an array) to be sent to the cluster once by ``map_layers``."""
    return Scatter(value)


# --- environment check --------------------------------------------------------
def _source_fingerprint() -> str:
    """SHA-256 over the relative paths and bytes of the toolkit's .py files."""
    import importlib

    h = hashlib.sha256()
    for pkg in _SOURCE_PACKAGES:
        root = Path(importlib.import_module(pkg).__file__).parent
        for p in sorted(root.rglob("*.py")):
            if "__pycache__" in p.parts:
                continue
            h.update(f"{pkg}/{p.relative_to(root).as_posix()}\0".encode())
            h.update(p.read_bytes())
            h.update(b"\0")
    return h.hexdigest()[:16]


def environment() -> dict[str, str]:
    """Python version, versions of ``CHECKED_PACKAGES`` and the toolkit source hash here."""
    from importlib.metadata import PackageNotFoundError, version

    env = {"python": platform.python_version()}
    for pkg in CHECKED_PACKAGES:
        try:
            env[pkg] = version(pkg)
        except PackageNotFoundError:
            env[pkg] = "not installed"
    env["toolkit source sha256"] = _source_fingerprint()
    return env


def _check_environment(client) -> None:
    mine = environment()
    try:
        theirs = client.run(environment)
    except Exception as exc:  # e.g. a worker without the toolkit cannot unpickle the call
        raise ClusterError(f"could not read the workers' package versions "
                           f"({type(exc).__name__}: {exc}); install the same toolkit and "
                           f"packages on every worker") from None
    # A source file saved while the workers were hashing is not a mismatch: accept the
    # client's hash from before or after the call.
    source_key = "toolkit source sha256"
    also = _source_fingerprint()
    for env in theirs.values():
        if env.get(source_key) == also:
            env[source_key] = mine[source_key]
    problems = []
    for key, want in mine.items():
        bad = {addr: env.get(key, "missing") for addr, env in sorted(theirs.items())
               if env.get(key, "missing") != want}
        if bad:
            shown = ", ".join(f"{addr}: {v}" for addr, v in bad.items())
            problems.append(f"{key} {want} on the client but {shown}")
    if problems:
        raise ClusterError("workers differ from the client, so their results could differ: "
                           + "; ".join(problems) + "; install the same versions everywhere")


# --- connecting ---------------------------------------------------------------
def _check_options(workers, scheduler, tls_ca_file, tls_cert, tls_key, threads_per_worker,
                   connect_timeout):
    if workers is not None:
        if isinstance(workers, bool) or not isinstance(workers, int):
            raise TypeError(f"workers must be an int >= 1 or None, got {workers!r}")
        if workers < 1:
            raise ValueError(f"workers={workers} is not allowed; give N >= 1 worker processes "
                             f"(1 runs in this process)")
    if isinstance(threads_per_worker, bool) or not isinstance(threads_per_worker, int) \
            or threads_per_worker < 1:
        raise ValueError(f"threads_per_worker={threads_per_worker!r} must be an int >= 1")
    if isinstance(connect_timeout, bool) or not isinstance(connect_timeout, (int, float)) \
            or not connect_timeout > 0:
        raise ValueError(f"connect_timeout={connect_timeout!r} must be a number of seconds > 0")
    tls = {"tls_ca_file": tls_ca_file, "tls_cert": tls_cert, "tls_key": tls_key}
    given = [k for k, v in tls.items() if v is not None]
    if scheduler is None:
        if given:
            raise ValueError(f"{', '.join('--' + k.replace('_', '-') for k in given)} need a "
                             f"--scheduler tls://HOST:PORT")
        return
    if workers is not None:
        raise ValueError(f"give either workers={workers} (a local cluster) or "
                         f"scheduler={scheduler!r} (an existing one), not both")
    if not isinstance(scheduler, str) or not scheduler.startswith(_SCHEMES) \
            or ":" not in scheduler.split("://", 1)[1]:
        raise ValueError(f"scheduler={scheduler!r} must be tcp://HOST:PORT or tls://HOST:PORT")
    if scheduler.startswith("tcp://") and given:
        raise ValueError(f"{', '.join('--' + k.replace('_', '-') for k in given)} apply to a "
                         f"tls:// scheduler, not {scheduler!r}")
    if scheduler.startswith("tls://"):
        missing = [k for k in ("tls_ca_file", "tls_cert") if tls[k] is None]
        if missing:
            raise ValueError(f"scheduler {scheduler!r} uses TLS: give "
                             f"{' and '.join('--' + k.replace('_', '-') for k in missing)} "
                             f"(and --tls-key unless the key is in the certificate file)")
        for k in given:
            if not Path(tls[k]).is_file():
                raise FileNotFoundError(f"--{k.replace('_', '-')} file {str(tls[k])!r} does "
                                        f"not exist")


def connect(workers: int | None = None, scheduler: str | None = None, *,
            tls_ca_file=None, tls_cert=None, tls_key=None, threads_per_worker: int = 1,
            connect_timeout: float = 10.0):
    """A context manager yielding None (in-process), a LocalCluster's client, or a
    scheduler's client. The options are checked here, before the block is entered, so a
    caller can validate them before any other work.

    See the module docstring for the semantics and the errors.
    """
    _check_options(workers, scheduler, tls_ca_file, tls_cert, tls_key, threads_per_worker,
                   connect_timeout)
    return _connect(workers, scheduler, tls_ca_file, tls_cert, tls_key, threads_per_worker,
                    connect_timeout)


# glibc malloc in a LocalCluster's workers (see the module docstring): keep freed memory
# (no trimming below 1 GiB of free heap), serve every block from the heap (no fresh mmap
# pages: MALLOC_MMAP_MAX_=0; the threshold is the largest glibc allows, for glibc builds
# that ignore the former), and give the task thread the main heap (MALLOC_ARENA_MAX=1: a
# thread's own arena unmaps each of its heaps once it is empty, so every fit faulted its
# memory in again)
WORKER_MALLOC = {"MALLOC_TRIM_THRESHOLD_": str(1 << 30), "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
                 "MALLOC_MMAP_MAX_": "0", "MALLOC_ARENA_MAX": "1"}
# mallopt's parameter numbers for those variables (glibc's <malloc.h>)
_MALLOPT = {"MALLOC_TRIM_THRESHOLD_": -1, "MALLOC_MMAP_THRESHOLD_": -3, "MALLOC_MMAP_MAX_": -4,
            "MALLOC_ARENA_MAX": -8}


def keep_freed_memory() -> bool:
    """Give this process ``WORKER_MALLOC``'s glibc malloc settings (``mallopt``): freed memory
    stays in the heap (up to 1 GiB), every block comes from the heap, and threads started
    from now on share the main heap, so a loop that frees and reallocates tens-of-MB arrays
    does not page-fault them in afresh. Returns True when all were set, False where the C
    library is not glibc (nothing changes there). A glibc malloc whose heap cannot grow
    still falls back to fresh pages, so no allocation fails for these settings."""
    import ctypes
    import ctypes.util

    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # a list, not a generator: every setting is tried even if one is refused
    return all([mallopt(_MALLOPT[k], int(v)) == 1 for k, v in WORKER_MALLOC.items()])


# Dask's periodic housekeeping in a LocalCluster, made rarer (see the module docstring)
QUIET_CONFIG = {"distributed.worker.profile.enabled": False,
                "distributed.admin.tick.interval": "1s",
                "distributed.worker.memory.monitor-interval": "500ms"}


@contextmanager
def _connect(workers, scheduler, tls_ca_file, tls_cert, tls_key, threads_per_worker,
             connect_timeout) -> Iterator[object]:
    if scheduler is None and workers in (None, 1):
        yield None
        return
    from distributed import Client, LocalCluster

    if scheduler is None:
        import dask
        import distributed  # noqa: F401  (registers the distributed.* configuration)

        # the scheduler, the nannies and (through the nannies, which reuse it when they
        # restart a worker) the workers read this configuration when they are made
        env = dict(dask.config.get("distributed.nanny.pre-spawn-environ"), **WORKER_MALLOC)
        # a nanny writes these variables into this process's os.environ before it spawns a
        # worker, and leaves them there (every later subprocess would inherit them):
        # they are put back as they were when the cluster closes
        saved = {k: os.environ.get(k) for k in env}
        try:
            with dask.config.set({"distributed.nanny.pre-spawn-environ": env, **QUIET_CONFIG}):
                local = LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker,
                                     processes=True, host="127.0.0.1", dashboard_address=None,
                                     silence_logs=logging.CRITICAL)  # errors reach the client
            try:
                client = Client(local, set_as_default=False)
                try:
                    _check_environment(client)
                    yield client
                finally:
                    client.close()
            finally:
                local.close()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        return

    security = None
    if scheduler.startswith("tls://"):
        from distributed.security import Security

        security = Security(tls_ca_file=str(tls_ca_file), tls_client_cert=str(tls_cert),
                            tls_client_key=None if tls_key is None else str(tls_key),
                            require_encryption=True)
    try:
        client = Client(scheduler, security=security, timeout=connect_timeout,
                        set_as_default=False)
    except (OSError, TimeoutError) as exc:
        hint = ("check the address, that `dask scheduler` runs there and is reachable"
                + (", and that its certificates are signed by --tls-ca-file's CA"
                   if security is not None else ""))
        raise ClusterError(f"cannot connect to the Dask scheduler {scheduler!r} within "
                           f"{connect_timeout:g} s ({exc}); {hint}") from None
    try:
        try:
            client.wait_for_workers(1, timeout=connect_timeout)
        except (OSError, TimeoutError):
            raise ClusterError(f"the Dask scheduler {scheduler!r} has no workers after "
                               f"{connect_timeout:g} s; start some with `dask worker "
                               f"{scheduler}`") from None
        _check_environment(client)
        yield client
    finally:
        client.close()


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --workers, --scheduler, --tls-ca-file, --tls-cert, --tls-key to ``parser``."""
    g = parser.add_argument_group(
        "cluster (Dask distributed)",
        "Per-layer work runs in this process by default. A tcp:// scheduler runs any code a "
        "client sends: use it on a trusted network only, otherwise tls://.")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="start a local Dask cluster of N worker processes (1 thread each), "
                   "listening on 127.0.0.1 only (default: run in this process)")
    g.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="join an existing cluster (`dask scheduler` + `dask worker`): "
                   "tcp://HOST:PORT on a trusted network, or tls://HOST:PORT with the --tls-* "
                   "files")
    g.add_argument("--tls-ca-file", default=None, metavar="PEM",
                   help="CA certificate that signed the scheduler's and workers' certificates")
    g.add_argument("--tls-cert", default=None, metavar="PEM", help="this client's certificate")
    g.add_argument("--tls-key", default=None, metavar="PEM", help="this client's private key")


def client_from_args(args: argparse.Namespace):
    """``connect(...)`` from the options ``add_cluster_arguments`` added (a context manager)."""
    return connect(workers=args.workers, scheduler=args.scheduler,
                   tls_ca_file=args.tls_ca_file, tls_cert=args.tls_cert, tls_key=args.tls_key)


def describe(client) -> str:
    """One line: where the work runs."""
    if client is None:
        return "in this process"
    return f"Dask scheduler {client.scheduler.address}, {len(client.nthreads())} worker(s)"


# --- mapping ------------------------------------------------------------------
def map_layers(fn: Callable, items: Iterable[tuple[str, tuple]], *, client=None,
               retries: int = 1, priority: Mapping[str, float] | None = None
               ) -> Iterator[tuple[str, object]]:
    """Yield ``(name, fn(*args))`` for each ``(name, args)`` in ``items``, as they complete.

    See the module docstring. ``priority`` maps names to numbers; larger runs
    first on a cluster (e.g. the weight's size, so that no worker is left with
    a big layer at the end).
    """
    items = list(items)
    names = [name for name, _ in items]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"map_layers: layer names must be unique, repeated: {dup[:5]}")
    for name, args in items:
        if not isinstance(args, tuple):
            raise TypeError(f"map_layers: the arguments of {name!r} must be a tuple, got "
                            f"{type(args).__name__}")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries={retries!r} must be an int >= 0")
    if client is None:
        for name, args in items:
            yield name, fn(*(a.value if isinstance(a, Scatter) else a for a in args))
        return
    yield from _map_on_cluster(fn, items, client, retries, priority or {})


def _map_on_cluster(fn, items, client, retries, priority):
    from distributed import as_completed
    from distributed.client import FutureCancelledError
    from distributed.scheduler import KilledWorker

    marks = [[j for j, a in enumerate(args) if isinstance(a, Scatter)] for _, args in items]
    flat = [(i, j) for i, js in enumerate(marks) for j in js]
    sent = client.scatter([items[i][1][j].value for i, j in flat], hash=False) if flat else []
    held = [[] for _ in items]  # the scattered futures each task uses
    for (i, j), fut in zip(flat, sent):
        held[i].append((j, fut))
    del sent
    run = uuid.uuid4().hex[:8]
    futures: dict = {}  # future -> item index
    lost = [0] * len(items)
    done = as_completed(loop=client.loop)

    def submit(i):
        name, args = items[i]
        args = list(args)
        for j, fut in held[i]:
            args[j] = fut
        fut = client.submit(fn, *args, key=f"layer-{run}-{lost[i]}-{name}", pure=False,
                            retries=retries, priority=priority.get(name, 0))
        futures[fut] = i
        done.add(fut)

    try:
        for i in range(len(items)):
            submit(i)
        for fut in done:
            i = futures.pop(fut)
            name = items[i][0]
            result, cancelled = None, fut.status == "cancelled"
            if not cancelled:
                try:
                    result = fut.result()  # re-raises the task's own exception
                except FutureCancelledError:
                    cancelled = True  # finished, then lost with its worker before we got it
                except KilledWorker as exc:
                    raise ClusterError(f"layer {name!r}: every worker that ran it died "
                                       f"({exc}); the layer may need more memory than a "
                                       f"worker has") from None
            if cancelled:
                # Scattered data lives on one worker; if that worker died the data is gone
                # (Dask cannot recompute it) and the task is cancelled, also when it had
                # finished there but its result was not fetched yet: send it again.
                lost[i] += 1
                if lost[i] > _MAX_RESENDS:
                    raise ClusterError(f"layer {name!r}: its task was cancelled {lost[i]} "
                                       f"times (its data lost with a worker); the cluster is "
                                       f"unstable")
                if held[i]:
                    client.cancel([f for _, f in held[i]])
                    values = [items[i][1][j].value for j, _ in held[i]]
                    held[i] = list(zip([j for j, _ in held[i]],
                                       client.scatter(values, hash=False)))
                submit(i)
                continue
            fut.release()
            if held[i]:
                client.cancel([f for _, f in held[i]])
                held[i] = []
            yield name, result
    finally:
        if futures:
            client.cancel(list(futures))
        rest = [f for h in held for _, f in h]
        if rest:
            client.cancel(rest)
