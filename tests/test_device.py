"""The device paths: loraq.optimize(device=), QuantLinear(device=, backend=), fp32_matmul,
loraq optimize --device. On the CPU the torch backend must give the default path's bits;
CUDA runs (skipped without a GPU) must match the CPU within FP32 GEMM reordering."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import numfmt
from analysis.cli import main as cli_main
from analysis.layers import QuantLinear, fp32_matmul
from analysis.loraq.optimizer import optimize

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device here")


def _weight(shape=(96, 160), seed=0):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal(shape) * 0.05
    W[:, :8] *= 6.0  # a few outlier input channels, as in real layers
    return W.astype(np.float32)


def _same_result(a, b) -> None:
    for qa, qb in ((a.main, b.main), (a.left, b.left), (a.right, b.right)):
        assert np.array_equal(qa.codes, qb.codes)
        assert np.array_equal(qa.scales.view(np.uint8), qb.scales.view(np.uint8))
    assert a.history == b.history and a.steps == b.steps and a.converged == b.converged
    assert np.array_equal(a.omega, b.omega) and a.rel_error == b.rel_error


# ---------------------------------------------------------------------------
# optimizer
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [
    dict(),                                                           # learned rotation, mxint4/mxint8
    dict(main="mxfp4", branch="mxfp8_e4m3", rotation="hadamard", rank=62),  # padded rank 64
    dict(main="sint4", branch="nvfp4", schedule="cosine", weighting="diag"),
])
def test_optimize_torch_backend_on_cpu_equals_default(kw):
    W = _weight()
    if "weighting" in kw:
        kw = dict(kw, activations=np.random.default_rng(1).standard_normal((40, 160)))
    a = optimize(W, steps=25, **kw)
    b = optimize(W, steps=25, device="cpu", **kw)
    _same_result(a, b)
    assert b.config["device"] == "cpu" and "device" not in a.config
    assert a.steps > 0 and a.history[-1] != a.history[0]  # the loop moved


def test_optimize_bad_device():
    W = _weight((32, 64))
    with pytest.raises(ValueError, match="'gpu0'"):
        optimize(W, steps=1, device="gpu0")
    with pytest.raises(TypeError, match="device"):
        optimize(W, steps=1, device=3)
    if not CUDA:
        with pytest.raises(ValueError, match=r"'cuda'.*not available"):
            optimize(W, steps=1, device="cuda")


@needs_cuda
def test_optimize_cuda_matches_cpu_within_fp32_reordering():
    W = _weight()
    a = optimize(W, steps=25)
    b = optimize(W, steps=25, device="cuda")
    assert isinstance(b.main.codes, np.ndarray) and b.config["device"].startswith("cuda")
    # the first iterate sees the same quantizers and GEMMs up to summation order
    assert abs(b.history[0] - a.history[0]) <= 1e-5 * a.history[0]
    assert abs(b.rel_error - a.rel_error) <= 0.02 * a.rel_error


# ---------------------------------------------------------------------------
# QuantLinear
# ---------------------------------------------------------------------------
def _parts(out_f=40, in_f=96, rank=8, main="mxint4", branch="mxint8"):
    rng = np.random.default_rng(3)
    W = rng.standard_normal((out_f, in_f)).astype(np.float32) * 0.1
    L = rng.standard_normal((out_f, rank)).astype(np.float32) * 0.1
    R = rng.standard_normal((rank, in_f)).astype(np.float32) * 0.1
    return (numfmt.quantize(W - L @ R, main, axis=1), numfmt.quantize(L, branch, axis=1),
            numfmt.quantize(R, branch, axis=1))


@pytest.mark.parametrize("mode", ["fast", "exact"])
@pytest.mark.parametrize("acts", [("mxint4", "mxint8"), ("sint4", "fp16")])
def test_quantlinear_torch_backend_on_cpu_equals_default(mode, acts):
    main_q, left, right = _parts()
    x = torch.from_numpy(np.random.default_rng(4).standard_normal((3, 7, 96)).astype(np.float32))
    smooth = np.linspace(0.5, 2.0, 96).astype(np.float32)
    kw = dict(left=left, right=right, branch_act=acts[1], bias=torch.linspace(-1, 1, 40),
              smooth=smooth, mode=mode)
    ref = QuantLinear(main_q, acts[0], **kw)
    dev = QuantLinear(main_q, acts[0], device="cpu", backend="torch", **kw)
    ref.collect_stats = dev.collect_stats = True
    ya, yb = ref(x), dev(x)
    assert yb.dtype == torch.float32 and yb.shape == (3, 7, 40)
    assert torch.equal(ya.view(torch.int32), yb.view(torch.int32))
    assert ref.stats == dev.stats and ref.stats.tokens == 21 and ref.stats.act_err2 > 0


def test_quantlinear_device_errors():
    main_q, left, right = _parts()
    meta = QuantLinear(main_q, "mxint4", device="meta")  # buffers moved, nothing computed
    assert meta.weight.device.type == "meta"
    with pytest.raises(ValueError, match=r"meta.*cpu"):  # names both devices
        meta(torch.zeros(2, 96))
    with pytest.raises(ValueError, match="numba"):
        QuantLinear(main_q, "mxint4", device="meta", backend="numba")
    with pytest.raises(ValueError, match="'cupy'"):
        QuantLinear(main_q, "mxint4", backend="cupy")
    if not CUDA:
        with pytest.raises(ValueError, match="not available"):
            QuantLinear(main_q, "mxint4", device="cuda")


@needs_cuda
@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_quantlinear_cuda_matches_cpu(mode):
    main_q, left, right = _parts()
    x = torch.from_numpy(np.random.default_rng(4).standard_normal((16, 96)).astype(np.float32))
    kw = dict(left=left, right=right, branch_act="mxint8", mode=mode)
    ref = QuantLinear(main_q, "mxint4", **kw)
    gpu = QuantLinear(main_q, "mxint4", device="cuda", **kw)
    ref.collect_stats = gpu.collect_stats = True
    y = gpu(x.cuda())
    assert y.device.type == "cuda"
    torch.testing.assert_close(y.cpu(), ref(x), rtol=1e-5, atol=1e-5)
    assert gpu.stats.acc_bits_observed == ref.stats.acc_bits_observed


@needs_cuda
def test_fp32_matmul_disables_tf32_on_cuda_only():
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        with fp32_matmul("cpu"):
            assert torch.get_float32_matmul_precision() == "high"
        with fp32_matmul("cuda"):
            assert torch.get_float32_matmul_precision() == "highest"
            assert not torch.backends.cuda.matmul.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------
@pytest.mark.skipif(CUDA, reason="checks the error where there is no CUDA")
def test_cli_device_cuda_without_cuda_is_one_line(tmp_path, capsys):
    rc = cli_main(["optimize", "--out", str(tmp_path / "o"), "--device", "cuda"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "CUDA is not available" in err
    assert not (tmp_path / "o").exists()  # refused before any work
    rc = cli_main(["optimize", "--out", str(tmp_path / "o"), "--device", "cpu", "--method", "rtn"])
    assert rc == 2 and "--device applies to --method loraq" in capsys.readouterr().err


def test_device_top_svd_equals_cpu_top_svd():
    """The initial SVD a device run computes there (_top_svd_on) is top_svd's arithmetic:
    run on the CPU it gives top_svd's values (within float64 rounding)."""
    from analysis.loraq.common import top_svd
    from analysis.loraq.optimizer import _top_svd_on
    W = np.random.default_rng(5).standard_normal((50, 80))
    for M in (W, np.ascontiguousarray(W.T)):
        for a, b in zip(top_svd(M, 7), _top_svd_on(M, 7, torch.device("cpu"))):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_optimize_backend_needs_a_device():
    W = _weight((32, 64))
    with pytest.raises(ValueError, match="device="):
        optimize(W, steps=1, backend="compiled")
    with pytest.raises(ValueError, match="'numba'"):
        optimize(W, steps=1, device="cpu", backend="numba")
