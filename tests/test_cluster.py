"""analysis.cluster and optimize_model on Dask: localhost clusters only.

One LocalCluster (2 worker processes, 1 thread each) is shared by the tests
that need one; the external-scheduler and TLS tests start `dask scheduler` /
`dask worker` subprocesses on 127.0.0.1 and stop them afterwards.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from analysis import cluster
from analysis.cli import main as cli_main
from analysis.loraq.driver import StoredResults, layer_stem, optimize_model

KW = dict(steps=6, rank=4)
DASK = Path(sys.executable).with_name("dask")


def weights(n=6, shape=(64, 128), seed=3):
    """Seeded layers with a few outlier input channels (and a bias that is skipped)."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        W = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        W[:, rng.choice(shape[1], 2, replace=False)] *= 20
        out[f"blocks.{i}.w"] = W
    out["blocks.0.bias"] = np.zeros(shape[0], np.float32)
    return out


def same_bits(a, b):
    """Two results hold the same codes, scales, omega (and w_hat when both have it)."""
    for part in ("main", "left", "right"):
        qa, qb = getattr(a, part), getattr(b, part)
        assert np.array_equal(qa.codes, qb.codes), part
        assert np.array_equal(qa.scales, qb.scales), part
    assert np.array_equal(a.omega, b.omega)
    assert a.rel_error == b.rel_error and a.history == b.history
    if a.w_hat is not None and b.w_hat is not None:
        assert a.w_hat.tobytes() == b.w_hat.tobytes()


def layer_files_equal(d1, d2, names):
    for name in names:
        f = layer_stem(name) + ".safetensors"
        assert (Path(d1) / f).read_bytes() == (Path(d2) / f).read_bytes(), name


@pytest.fixture(scope="module")
def local_client():
    import dask
    import distributed  # noqa: F401  (registers the distributed.* configuration)

    keys = set(dask.config.get("distributed.nanny.pre-spawn-environ")) | set(cluster.WORKER_MALLOC)
    before = {k: os.environ.get(k) for k in keys}
    with cluster.connect(workers=2) as client:
        yield client
    # the nannies' environment variables do not stay in this process
    assert {k: os.environ.get(k) for k in keys} == before


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    """The serial (in-process) run of ``weights()``: results and their folder."""
    d = tmp_path_factory.mktemp("serial")
    return optimize_model(weights(), d, **KW), d


def test_local_cluster_bit_identical_to_serial(local_client, serial, tmp_path):
    from distributed import get_task_stream

    one, one_dir = serial
    addrs = set(local_client.nthreads())
    assert len(addrs) == 2 and all(a.startswith("tcp://127.0.0.1:") for a in addrs)
    assert local_client.scheduler.address.startswith("tcp://127.0.0.1:")
    with get_task_stream(local_client) as ts:
        two = optimize_model(weights(), tmp_path / "mem", client=local_client, **KW)
    assert len({t["worker"] for t in ts.data}) == 2  # both workers did layers
    assert list(two) == list(one)
    for name in one:
        same_bits(one[name], two[name])
    layer_files_equal(one_dir, tmp_path / "mem", one)
    # the same from a file that the workers read tensor by tensor
    f = tmp_path / "m.safetensors"
    save_file(weights(), str(f))
    three = optimize_model(f, tmp_path / "file", client=local_client, **KW)
    assert isinstance(three, StoredResults) and list(three) == list(one)
    for name in one:
        same_bits(one[name], three[name])
    layer_files_equal(one_dir, tmp_path / "file", one)
    # a rerun computes nothing: every layer file is left untouched
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "file").iterdir()}
    optimize_model(f, tmp_path / "file", client=local_client, **KW)
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "file").iterdir()}
    assert {k: v for k, v in after.items() if k != "index.json"} == \
        {k: v for k, v in before.items() if k != "index.json"}


def _worker_settings() -> dict:
    import dask

    return {"env": {k: os.environ.get(k) for k in cluster.WORKER_MALLOC},
            "config": {k: dask.config.get(k) for k in cluster.QUIET_CONFIG}}


def test_local_cluster_workers_keep_memory_and_quiet_housekeeping(local_client):
    """Every worker of a LocalCluster runs with WORKER_MALLOC in its environment and
    QUIET_CONFIG in its Dask configuration; this process's configuration is unchanged."""
    import dask

    seen = local_client.run(_worker_settings)
    assert len(seen) == 2
    for addr, got in seen.items():
        assert got == {"env": cluster.WORKER_MALLOC, "config": cluster.QUIET_CONFIG}, addr
    assert dask.config.get("distributed.worker.profile.enabled") is True


_MALLINFO = """
import ctypes, json, sys
from analysis.cluster import keep_freed_memory
if sys.argv[1] == "1":
    assert keep_freed_memory() is True
libc = ctypes.CDLL("libc.so.6")


class Info(ctypes.Structure):  # glibc's struct mallinfo2 (2.33+): ten size_t fields
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks",
                                               "keepcost")]


libc.mallinfo2.restype = Info
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
before = libc.mallinfo2()
small = [libc.malloc(1 << 20) for _ in range(40)]   # 40 blocks of 1 MiB
big = libc.malloc(40 << 20)                          # and, while they live, one of 40 MiB
during = libc.mallinfo2()
for b in small + [big]:
    libc.free(b)
after = libc.mallinfo2()
print(json.dumps({"mmapped_during": during.hblkhd - before.hblkhd,
                  "free_kept_after": after.fordblks - before.fordblks}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc (Linux) only")
def test_keep_freed_memory_reuses_the_heap():
    """After keep_freed_memory(), large blocks come from the heap and freed memory stays in
    it; with glibc's defaults they are mapped apart and handed back. Read from glibc's own
    allocator state (mallinfo2), not from page-fault counts or timings."""
    pytest.importorskip("ctypes")

    def state(flag):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        out = subprocess.run([sys.executable, "-c", _MALLINFO, flag], capture_output=True,
                             text=True, check=True, cwd=Path(__file__).parents[1], env=env)
        return json.loads(out.stdout.strip().splitlines()[-1])

    kept, default = state("1"), state("0")
    mib = 1 << 20
    print(f"[mallinfo2: glibc defaults {default}, keep_freed_memory {kept}]")
    # defaults: the 40 MiB block is mmapped apart, and unmapped again when freed (the 1 MiB
    # ones are too, or not, by the dynamic threshold that the start-up's frees moved)
    assert default["mmapped_during"] >= 40 * mib and default["free_kept_after"] < 40 * mib
    # kept: nothing new is mmapped, and (nearly all of) the 80 MiB freed stay in the heap
    assert kept["mmapped_during"] == 0 and kept["free_kept_after"] >= 75 * mib


def test_map_layers_errors_and_order(local_client):
    items = [("a", (4.0,)), ("b", (9.0,))]
    assert list(cluster.map_layers(math.sqrt, items)) == [("a", 2.0), ("b", 3.0)]
    assert dict(cluster.map_layers(math.sqrt, items, client=local_client)) == {"a": 2.0, "b": 3.0}
    with pytest.raises(ValueError, match="math domain error"):  # the task's own exception
        list(cluster.map_layers(math.sqrt, items + [("c", (-1.0,))], client=local_client,
                                retries=0))
    with pytest.raises(ValueError, match=r"repeated: \['a'\]"):
        list(cluster.map_layers(math.sqrt, items + [("a", (1.0,))]))
    with pytest.raises(TypeError, match="must be a tuple"):
        list(cluster.map_layers(math.sqrt, [("a", 4.0)]))


def test_file_streamed_client_peak_memory(local_client, tmp_path, capsys):
    """96 tensors of 128 x 256 float32 (12 MiB) in a file: the client never holds them all."""
    rng = np.random.default_rng(0)
    w = {f"l{i}.weight": (rng.standard_normal((128, 256)) * 0.02).astype(np.float32)
         for i in range(96)}
    total = sum(v.nbytes for v in w.values())
    f = tmp_path / "big.safetensors"
    save_file(w, str(f))
    save_file({k: w[k] for k in list(w)[:2]}, str(tmp_path / "warm.safetensors"))
    del w
    peaks = {}
    for label, client in (("in-process", None), ("2 workers", local_client)):
        # imports, Numba cache loads and Dask's first messages are not the weights' memory
        optimize_model(tmp_path / "warm.safetensors", tmp_path / f"warm-{label}", method="rtn",
                       client=client)
        tracemalloc.start()
        res = optimize_model(f, tmp_path / label, method="rtn", client=client)
        peaks[label] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(res) == 96 and isinstance(res, StoredResults)
        assert res.metrics["l7.weight"]["rel_error"] == res["l7.weight"].rel_error
    with capsys.disabled():
        print(f"\n[client peak (tracemalloc) over a {total / 2**20:.1f} MiB file of 96 tensors: "
              + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in peaks.items()) + "]")
    # about one layer's working set at a time in-process; a LocalCluster's client process
    # also holds the scheduler's bookkeeping (~20 KiB a task), never the weights
    assert peaks["in-process"] < total / 4 and peaks["2 workers"] < total / 4
    # the in-memory mapping holds every tensor: the contrast that makes the bound meaningful
    tracemalloc.start()
    from analysis.minilm import load_weights
    load_weights(f)
    assert tracemalloc.get_traced_memory()[1] >= total
    tracemalloc.stop()


def test_worker_killed_mid_run_same_results(local_client, tmp_path):
    """A worker is SIGKILLed when the first layer comes back; its layers (and the weights
    scattered to it) are sent again and the run ends with the serial run's bits."""
    w = weights(n=6, shape=(128, 256), seed=9)
    kw = dict(steps=25, rank=8)
    pids = local_client.run(os.getpid)
    killed = []

    def progress(name, res, done, total):
        if not killed:
            busy = [a for a, keys in local_client.processing().items() if keys]
            assert busy, "no layer in flight to lose"
            os.kill(pids[busy[0]], signal.SIGKILL)
            killed.append(pids[busy[0]])

    two = optimize_model(w, tmp_path / "two", client=local_client, progress=progress, **kw)
    assert killed and killed[0] not in local_client.run(os.getpid).values()
    one = optimize_model(w, tmp_path / "one", **kw)
    for name in one:
        same_bits(one[name], two[name])
    layer_files_equal(tmp_path / "one", tmp_path / "two", one)
    local_client.wait_for_workers(2, timeout=60)  # the nanny restarted it


def _in_memory_layers(dask_scheduler):
    """key -> addresses of the workers holding the finished layer tasks' results."""
    return {k: [w.address for w in ts.who_has] for k, ts in dask_scheduler.tasks.items()
            if str(k).startswith("layer-") and ts.state == "memory"}


def test_finished_result_lost_with_its_worker_is_recomputed(local_client):
    """A task finished on a worker, whose result the client has not fetched yet, dies with
    that worker (with the scattered input it needs, so Dask cannot recompute it): map_layers
    sends the input again and still yields every result."""
    items = [("a", (cluster.scatter(np.arange(3.0)),)), ("b", (cluster.scatter(np.ones(4)),))]
    pids = local_client.run(os.getpid)
    got, killed = {}, []
    for name, value in cluster.map_layers(np.sum, items, client=local_client):
        got[name] = float(value)
        if not killed:
            other = "b" if name == "a" else "a"
            deadline = time.monotonic() + 30
            while True:  # wait until the other layer's result sits on a worker
                held = {k: w for k, w in local_client.run_on_scheduler(
                    _in_memory_layers).items() if k.endswith("-" + other)}
                if held or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            assert len(held) == 1, f"layer {other!r} never finished on a worker: {held}"
            (addrs,) = held.values()
            os.kill(pids[addrs[0]], signal.SIGKILL)
            killed.append(addrs[0])
    assert killed and got == {"a": 3.0, "b": 4.0}
    local_client.wait_for_workers(2, timeout=60)  # the nanny restarted it


# --- external clusters -----------------------------------------------------------
def _start(args, env=None, log=None):
    return subprocess.Popen([str(DASK), *args], stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, **(env or {})), start_new_session=True)


def _stop(procs):
    """SIGTERM the workers, then the scheduler (workers first: a worker whose scheduler is
    gone waits to reconnect); SIGKILL whatever is left after 20 s."""
    for group in (procs[1:], procs[:1]):
        for p in group:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in group:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert all(p.poll() is not None for p in procs)


def _address(scheduler_file: Path, proc) -> str:
    import json
    for _ in range(300):
        if scheduler_file.exists():
            try:
                return json.loads(scheduler_file.read_text())["address"]
            except (ValueError, KeyError):
                pass
        assert proc.poll() is None, "dask scheduler exited"
        time.sleep(0.1)
    raise AssertionError("dask scheduler did not start")


def _wait_workers(address, n, security=None):
    from distributed import Client
    with Client(address, security=security, timeout=30, set_as_default=False) as c:
        c.wait_for_workers(n, timeout=60)


@pytest.mark.skipif(not DASK.exists(), reason="the dask command is not installed")
def test_external_scheduler_cli_and_version_mismatch(serial, tmp_path, capsys):
    one, one_dir = serial
    f = tmp_path / "m.safetensors"
    save_file(weights(), str(f))
    log = open(tmp_path / "dask.log", "w")
    sf = tmp_path / "scheduler.json"
    common = ["--no-dashboard", "--host", "127.0.0.1"]
    procs = [_start(["scheduler", "--port", "0", "--scheduler-file", str(sf), *common],
                    log=log)]
    try:
        addr = _address(sf, procs[0])
        assert addr.startswith("tcp://127.0.0.1:")
        for _ in range(2):
            procs.append(_start(["worker", addr, "--nthreads", "1", "--no-nanny", *common],
                                log=log))
        _wait_workers(addr, 2)
        out = tmp_path / "run"
        rc = cli_main(["optimize", "--weights", str(f), "--out", str(out), "--scheduler", addr,
                       "--steps", "6", "--rank", "4"])
        text = capsys.readouterr().out
        assert rc == 0, text
        assert "2 worker(s)" in text and "6 layers" in text
        layer_files_equal(one_dir, out, one)
        # a worker whose environment has another version of the toolkit joins: refused
        fake = tmp_path / "other-env"
        info = fake / "loraq_toolkit-0.0.0+other.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: loraq-toolkit\n"
                                       "Version: 0.0.0+other\n")
        procs.append(_start(["worker", addr, "--nthreads", "1", "--no-nanny", *common],
                            env={"PYTHONPATH": str(fake)}, log=log))
        _wait_workers(addr, 3)
        rc = cli_main(["optimize", "--weights", str(f), "--out", str(tmp_path / "r2"),
                       "--scheduler", addr, "--steps", "6", "--rank", "4", "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2 and "loraq-toolkit 0.1.0 on the client but" in err
        assert "0.0.0+other" in err and err.count("\n") == 1
        assert not (tmp_path / "r2").exists() or not list((tmp_path / "r2").iterdir())
    finally:
        _stop(procs)
        log.close()


def _certificates(d: Path) -> dict:
    """A CA, a certificate for the scheduler and workers, one for the client, and a client
    certificate from another CA (EC P-256 keys, made with the openssl command)."""
    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "rogue-ca"):
        run("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "1",
            "-subj", f"/CN={ca}")
    for name, ca in (("node", "ca"), ("client", "ca"), ("rogue", "rogue-ca")):
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "1")
    return {n: (str(d / f"{n}.pem"), str(d / f"{n}.key")) for n in ("node", "client", "rogue")}


@pytest.mark.skipif(not DASK.exists() or shutil.which("openssl") is None,
                    reason="needs the dask and openssl commands")
def test_tls_cluster(serial, tmp_path, capsys):
    from distributed.security import Security

    one, one_dir = serial
    certs = _certificates(tmp_path)
    ca = str(tmp_path / "ca.pem")
    node = ["--tls-ca-file", ca, "--tls-cert", certs["node"][0], "--tls-key", certs["node"][1]]
    f = tmp_path / "m.safetensors"
    save_file(weights(), str(f))
    log = open(tmp_path / "dask.log", "w")
    sf = tmp_path / "scheduler.json"
    common = ["--no-dashboard", "--host", "127.0.0.1"]
    procs = [_start(["scheduler", "--protocol", "tls", "--port", "0", "--scheduler-file",
                     str(sf), *node, *common], log=log)]
    try:
        addr = _address(sf, procs[0])
        assert addr.startswith("tls://127.0.0.1:")
        procs.append(_start(["worker", addr, "--nthreads", "1", "--no-nanny", *node, *common],
                            log=log))
        _wait_workers(addr, 1, Security(tls_ca_file=ca, tls_client_cert=certs["client"][0],
                                        tls_client_key=certs["client"][1],
                                        require_encryption=True))
        out = tmp_path / "run"
        rc = cli_main(["optimize", "--weights", str(f), "--out", str(out), "--scheduler", addr,
                       "--tls-ca-file", ca, "--tls-cert", certs["client"][0], "--tls-key",
                       certs["client"][1], "--steps", "6", "--rank", "4", "--quiet"])
        assert rc == 0, capsys.readouterr().err
        layer_files_equal(one_dir, out, one)
        # a client whose certificate another CA signed is refused, within the timeout
        t = time.monotonic()
        with pytest.raises(cluster.ClusterError, match="cannot connect to the Dask scheduler"):
            with cluster.connect(scheduler=addr, tls_ca_file=ca, tls_cert=certs["rogue"][0],
                                 tls_key=certs["rogue"][1], connect_timeout=1.5):
                pass
        assert time.monotonic() - t < 30
        # plain tcp to the TLS port, and tls:// without certificates, are refused too
        with pytest.raises(cluster.ClusterError):
            with cluster.connect(scheduler=addr.replace("tls://", "tcp://"), connect_timeout=1.5):
                pass
        rc = cli_main(["optimize", "--weights", str(f), "--out", str(tmp_path / "r2"),
                       "--scheduler", addr])
        assert rc == 2 and "--tls-ca-file and --tls-cert" in capsys.readouterr().err
    finally:
        _stop(procs)
        log.close()


# --- bad input -------------------------------------------------------------------
def test_unreachable_scheduler_bounded_error():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.monotonic()
    with pytest.raises(cluster.ClusterError, match=rf"tcp://127.0.0.1:{port}.* within 2 s"):
        with cluster.connect(scheduler=f"tcp://127.0.0.1:{port}", connect_timeout=2):
            pass
    assert time.monotonic() - t < 30  # bounded: not a hang


def test_bad_cluster_options(tmp_path, capsys):
    out = str(tmp_path / "o")
    assert cli_main(["optimize", "--out", out, "--workers", "0"]) == 2
    assert "workers=0 is not allowed" in capsys.readouterr().err
    assert cli_main(["optimize", "--out", out, "--workers", "2", "--scheduler",
                     "tcp://127.0.0.1:1"]) == 2
    assert "not both" in capsys.readouterr().err
    assert cli_main(["optimize", "--out", out, "--scheduler", "127.0.0.1:8786"]) == 2
    assert "tcp://HOST:PORT or tls://HOST:PORT" in capsys.readouterr().err
    assert cli_main(["optimize", "--out", out, "--scheduler", "tcp://127.0.0.1:1",
                     "--tls-cert", "c.pem"]) == 2
    assert "--tls-cert apply to a tls:// scheduler" in capsys.readouterr().err
    assert cli_main(["optimize", "--out", out, "--tls-ca-file", "ca.pem"]) == 2
    assert "need a --scheduler tls://" in capsys.readouterr().err
    assert cli_main(["optimize", "--out", out, "--scheduler", "tls://127.0.0.1:1",
                     "--tls-ca-file", str(tmp_path / "no.pem"), "--tls-cert", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not Path(out).exists()
    with pytest.raises(ValueError, match="workers=-1"):
        with cluster.connect(workers=-1):
            pass
    with pytest.raises(TypeError, match="workers must be an int"):
        with cluster.connect(workers=2.0):
            pass
    with cluster.connect(workers=1) as c:  # one process: no cluster at all
        assert c is None and cluster.describe(c) == "in this process"
    with pytest.raises(ValueError, match="workers=0 is not allowed"):
        optimize_model(weights(), tmp_path / "x", workers=0)
    with pytest.raises(ValueError, match="client= or workers=2"):
        optimize_model(weights(), tmp_path / "x", client=object(), workers=2)
