"""Simulated quantized Linear: against obviously-correct references, fast vs exact mode,
accumulator widths against brute force."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import numfmt
from hwsim.accumulator import worst_case_bits
from hwsim.accumulator import (block_length, integer_values, l1_bound_bits, observed_bits,
                               width_bits)
from analysis.layers import LayerStats, QuantLinear
from analysis.quantize import swap


def _rng(seed=0):
    return np.random.default_rng(seed)


def _layer_parts(out_f=48, in_f=96, rank=8, main="mxint4", branch="mxint8", seed=0):
    rng = _rng(seed)
    W = rng.standard_normal((out_f, in_f)).astype(np.float32) * 0.1
    L = rng.standard_normal((out_f, rank)).astype(np.float32) * 0.1
    R = rng.standard_normal((rank, in_f)).astype(np.float32) * 0.1
    main_q = numfmt.quantize(W - L @ R, main, axis=1)
    left = numfmt.quantize(L, branch, axis=1) if rank else None
    right = numfmt.quantize(R, branch, axis=1) if rank else None
    return W, main_q, left, right


def _ref_forward(x, main_q, main_act, left=None, right=None, branch_act=None, bias=None, smooth=None):
    """float64 reference from the NumPy quantizers: the layer's equations written out."""
    x = np.asarray(x, dtype=np.float32)
    if smooth is not None:
        x = (x / smooth).astype(np.float32)
    xm = numfmt.fake_quantize(x, main_act, axis=-1).astype(np.float64)
    y = xm @ numfmt.dequantize(main_q).astype(np.float64).T
    if left is not None:
        xb = numfmt.fake_quantize(x, branch_act, axis=-1).astype(np.float64)
        h = (xb @ numfmt.dequantize(right).astype(np.float64).T).astype(np.float32)
        hq = numfmt.fake_quantize(h, branch_act, axis=-1).astype(np.float64)
        y = y + hq @ numfmt.dequantize(left).astype(np.float64).T
    if bias is not None:
        y = y + bias
    return y


@pytest.mark.parametrize("main_act", ["mxint4", "sint4", "mxfp4"])
def test_main_path_matches_reference(main_act):
    W, main_q, _, _ = _layer_parts(rank=0)
    x = _rng(1).standard_normal((20, 96)).astype(np.float32)
    bias = _rng(2).standard_normal(48).astype(np.float32)
    layer = QuantLinear(main_q, main_act, bias=torch.from_numpy(bias))
    y = layer(torch.from_numpy(x)).numpy()
    ref = _ref_forward(x, main_q, main_act, bias=bias)
    scale = np.abs(numfmt.fake_quantize(x, main_act)) @ np.abs(numfmt.dequantize(main_q)).T + np.abs(bias)
    # float32 GEMM against float64: at most a few ulps of the sum of |products|
    assert np.all(np.abs(y - ref) <= 1e-6 * scale + 1e-7)
    # and the layer really quantizes: it differs from the float layer
    assert np.abs(y - (x @ W.T + bias)).max() > 1e-3


@pytest.mark.parametrize("branch", ["mxint8", "mxint6", "fp16"])
def test_branch_matches_reference(branch):
    W, main_q, left, right = _layer_parts(branch=branch)
    x = _rng(3).standard_normal((3, 5, 96)).astype(np.float32)  # leading dims are kept
    layer = QuantLinear(main_q, "mxint4", left=left, right=right, branch_act=branch)
    y = layer(torch.from_numpy(x)).numpy()
    assert y.shape == (3, 5, 48)
    ref = _ref_forward(x.reshape(-1, 96), main_q, "mxint4", left, right, branch).reshape(3, 5, 48)
    rel = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    # the intermediate is requantized: a float32-vs-float64 tie may flip a code, nothing more
    assert rel < 1e-4
    no_branch = QuantLinear(main_q, "mxint4")(torch.from_numpy(x)).numpy()
    assert np.linalg.norm(y - no_branch) > 10 * np.linalg.norm(y - ref)


def test_smoothing_divides_the_input():
    W, main_q, left, right = _layer_parts()
    s = (0.5 + _rng(4).random(96)).astype(np.float32)
    x = _rng(5).standard_normal((7, 96)).astype(np.float32)
    a = QuantLinear(main_q, "mxint4", left=left, right=right, branch_act="mxint8", smooth=s)
    b = QuantLinear(main_q, "mxint4", left=left, right=right, branch_act="mxint8")
    xs = torch.from_numpy(x) / torch.from_numpy(s)
    assert torch.equal(a(torch.from_numpy(x)), b(xs))


def test_fast_and_exact_agree():
    hwsim = pytest.importorskip("hwsim")
    if not hasattr(hwsim, "matmul"):
        pytest.skip("hwsim.matmul not available")
    W, main_q, left, right = _layer_parts(out_f=40, in_f=64, rank=8)
    x = _rng(6).standard_normal((12, 64)).astype(np.float32)
    fast = QuantLinear(main_q, "mxint4", left=left, right=right, branch_act="mxint8")
    exact = QuantLinear(main_q, "mxint4", left=left, right=right, branch_act="mxint8", mode="exact")
    exact.collect_stats = True
    yf, ye = fast(torch.from_numpy(x)).numpy(), exact(torch.from_numpy(x)).numpy()
    xm = numfmt.fake_quantize(x, "mxint4")
    scale = np.abs(xm) @ np.abs(numfmt.dequantize(main_q)).T
    hb = np.abs(numfmt.fake_quantize(x, "mxint8")) @ np.abs(numfmt.dequantize(right)).T
    scale = scale + np.abs(numfmt.fake_quantize(hb.astype(np.float32), "mxint8")) @ np.abs(
        numfmt.dequantize(left)).T * 1.01
    # FP32 reordering only: a few ulps of the magnitude sums
    assert np.all(np.abs(yf - ye) <= 4e-6 * scale + 1e-7), np.abs(yf - ye).max()
    main_only_f = QuantLinear(main_q, "mxint4")(torch.from_numpy(x)).numpy()
    main_only_e = QuantLinear(main_q, "mxint4", mode="exact")(torch.from_numpy(x)).numpy()
    assert np.all(np.abs(main_only_f - main_only_e) <= 4e-6 * (np.abs(xm) @ np.abs(
        numfmt.dequantize(main_q)).T) + 1e-7)
    # the exact mode's observed widths match the brute-force count
    assert exact.stats.acc_bits_observed["main"] == observed_bits(
        numfmt.quantize(x, "mxint4", axis=-1), main_q)


def _observed_brute(a, b) -> int:
    """Plain loops over blocks with Python ints."""
    av = integer_values(a).astype(np.int64)
    bv = integer_values(b).astype(np.int64)
    K = a.shape[1]
    B = block_length(a.format, b.format, K)
    best = 0
    for i in range(av.shape[0]):
        for j in range(bv.shape[0]):
            for s in range(0, K, B):
                best = max(best, abs(int(np.dot(av[i, s:s + B], bv[j, s:s + B]))))
    return width_bits(best)


@pytest.mark.parametrize("fa,fb,k", [("mxint4", "mxint4", 64), ("mxint8", "mxint4", 80),
                                     ("mxfp4", "mxfp4", 64), ("sint4", "mxint4", 128),
                                     ("mxint8", "mxint8", 40)])
def test_observed_bits_brute_force_and_bounds(fa, fb, k):
    rng = _rng(7)
    a = numfmt.quantize(rng.standard_normal((6, k)).astype(np.float32), fa, axis=1)
    w = numfmt.quantize(rng.standard_normal((5, k)).astype(np.float32), fb, axis=1)
    obs = observed_bits(a, w)
    assert obs == _observed_brute(a, w)
    l1 = l1_bound_bits(w, fa)
    worst = worst_case_bits(fa, fb, block_length(fa, fb, k))
    assert obs <= l1 <= worst


def test_l1_bound_is_tight_for_the_worst_input():
    rng = _rng(8)
    w = numfmt.quantize(rng.standard_normal((4, 64)).astype(np.float32), "mxint4", axis=1)
    wv = integer_values(w)
    # the input that reaches the bound: x_i = 7 * sign(w_i) in every block (int4 max is 7)
    xv = 7.0 * np.sign(wv[:1])
    x = numfmt.quantize(xv.astype(np.float32), "mxint4", axis=1)
    assert np.array_equal(integer_values(x), xv)
    assert observed_bits(x, w) == l1_bound_bits(w, "mxint4")


def test_width_bits():
    assert [width_bits(v) for v in (0, 1, 2, 3, 4, 127, 128)] == [1, 2, 3, 3, 4, 8, 9]
    # a P-bit signed accumulator holds up to 2^(P-1) - 1
    for v in range(1, 300):
        p = width_bits(v)
        assert v <= 2 ** (p - 1) - 1 and v > 2 ** (p - 2) - 1


def test_stats_and_bounds():
    W, main_q, left, right = _layer_parts()
    layer = QuantLinear(main_q, "mxint4", left=left, right=right, branch_act="mxint8")
    x = torch.from_numpy(_rng(9).standard_normal((10, 96)).astype(np.float32))
    layer(x)
    assert layer.stats.tokens == 0  # off by default
    layer.collect_stats = True
    layer(x[:4])
    layer(x[4:])
    xq = numfmt.fake_quantize(x.numpy(), "mxint4")
    expect = np.linalg.norm(x.numpy() - xq) / np.linalg.norm(x.numpy())
    assert layer.stats.tokens == 10
    assert math.isclose(layer.stats.act_error, expect, rel_tol=1e-6)
    assert layer.stats.branch_act_error < layer.stats.act_error
    worst, l1, obs = layer.acc_bits_worst(), layer.acc_bits_l1(), layer.stats.acc_bits_observed
    assert set(worst) == set(l1) == set(obs) == {"main", "branch_in", "branch_out"}
    for g in worst:
        assert obs[g] <= l1[g] <= worst[g]
    assert worst["main"] == worst_case_bits("mxint4", "mxint4", 32)
    assert LayerStats().act_error is None


def test_bad_inputs():
    W, main_q, left, right = _layer_parts()
    with pytest.raises(ValueError, match="both left and right"):
        QuantLinear(main_q, "mxint4", left=left)
    with pytest.raises(ValueError, match="branch_act"):
        QuantLinear(main_q, "mxint4", left=left, right=right)
    with pytest.raises(ValueError, match="mode"):
        QuantLinear(main_q, "mxint4", mode="slow")
    with pytest.raises(ValueError, match="input features"):
        QuantLinear(main_q, "mxint4")(torch.zeros(2, 95))
    with pytest.raises(ValueError, match="do not fit"):
        QuantLinear(main_q, "mxint4", left=right, right=left, branch_act="mxint8")


def test_swap_and_restore():
    model = nn.Sequential(nn.Linear(96, 48), nn.ReLU(), nn.Sequential(nn.Linear(48, 8)))
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(0))
    y0 = model(x)
    seen = []

    def factory(name, mod):
        seen.append(name)
        q = numfmt.quantize(mod.weight.detach().numpy(), "mxint8", axis=1)
        return QuantLinear(q, "mxint8", bias=mod.bias.detach(), name=name)

    originals = swap(model, {n: factory(n, model.get_submodule(n)) for n in ("0", "2.0")})
    assert seen == ["0", "2.0"]
    assert isinstance(model[0], QuantLinear) and isinstance(model[2][0], QuantLinear)
    yq = model(x)
    assert not torch.equal(yq, y0) and torch.allclose(yq, y0, atol=0.05)
    swap(model, originals)
    assert torch.equal(model(x), y0)


@pytest.mark.parametrize("fa,fb,k", [("mxint4", "mxint4", 64), ("mxint8", "mxint4", 80),
                                     ("mxfp4", "mxfp4", 64), ("nvfp4", "mxint8", 64)])
def test_observed_widths_equal_the_exact_gemms(fa, fb, k):
    """The blocked float GEMM of observed_bits equals the widest in-block sum of
    hwsim.matmul's exact integer GEMM (NVFP4, which matmul does not take, against the
    brute-force count)."""
    rng = _rng(10)
    a = numfmt.quantize(rng.standard_normal((6, k)).astype(np.float32), fa, axis=1)
    w = numfmt.quantize(rng.standard_normal((5, k)).astype(np.float32), fb, axis=1)
    if fa == "nvfp4":
        assert observed_bits(a, w) == _observed_brute(a, w)
    else:
        import hwsim
        assert observed_bits(a, w) == hwsim.matmul(a, w).acc_bits_needed
