"""LoRaQ optimizer and baselines on small seeded matrices (fast)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import numfmt
import numfmt.torch as nft
from analysis.loraq import (LoRaQResult, hadamard, load_result, loftq, lqer, naive, optimize,
                            rtn, save_result, svdquant)
from analysis.loraq.optimizer import cayley, cayley_grad, step_gradients
from hwsim.cost import branch_storage_bits, equal_memory_rank, matrix_storage_bits


def matrix(out=96, inp=256, seed=0, outliers=(3, 77)):
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((out, inp)) * 0.02).astype(np.float32)
    W[:, list(outliers)] *= 20
    return W


W0 = matrix()


@pytest.fixture(scope="module")
def res():
    return optimize(W0, steps=60)


# --- bad input: clear errors before any work -------------------------------------------
@pytest.mark.parametrize("fn", [optimize, naive, lqer, loftq, svdquant, rtn])
def test_bad_weights_raise(fn):
    with pytest.raises(ValueError, match="2-D"):
        fn(np.zeros(10, dtype=np.float32))
    with pytest.raises(ValueError, match="2-D"):
        fn(np.zeros((2, 3, 4), dtype=np.float32))
    bad = W0.copy()
    bad[5, 7] = np.nan
    with pytest.raises(ValueError, match=r"NaN/Inf.*\[5, 7\]"):
        fn(bad)
    bad[5, 7] = np.inf
    with pytest.raises(ValueError, match="NaN/Inf"):
        fn(bad)
    with pytest.raises(TypeError, match="str"):
        fn("weights")
    with pytest.raises(ValueError, match="mxint5"):
        fn(W0, main="mxint5")


@pytest.mark.parametrize("fn", [optimize, naive, lqer, loftq, svdquant])
def test_bad_rank_and_branch(fn):
    for r in (0, 96, 500, -1):
        with pytest.raises(ValueError, match=f"rank={r}"):
            fn(W0, rank=r)
    with pytest.raises(TypeError, match="rank"):
        fn(W0, rank=2.5)
    with pytest.raises(ValueError, match="'int9'"):
        fn(W0, branch="int9")


def test_bad_options_raise():
    with pytest.raises(ValueError, match="rotation='random'"):
        optimize(W0, rotation="random")
    with pytest.raises(ValueError, match="width 100.*in = 256"):
        optimize(W0, activations=np.ones((8, 100)))
    with pytest.raises(ValueError, match="width 100"):
        svdquant(W0, activations=np.ones((8, 100)))
    with pytest.raises(ValueError, match="NaN/Inf"):
        optimize(W0, activations=np.full((8, 256), np.nan))
    with pytest.raises(ValueError, match="threads=0"):
        optimize(W0, threads=0)
    with pytest.raises(ValueError, match="steps=-1"):
        optimize(W0, steps=-1)
    with pytest.raises(ValueError, match="schedule='warm'"):
        optimize(W0, schedule="warm")
    with pytest.raises(ValueError, match="min_lr_scale=0.0"):
        optimize(W0, min_lr_scale=0)
    with pytest.raises(TypeError, match="early_stop"):
        optimize(W0, early_stop="no")


def test_plateau_schedule_stops_by_its_rule_and_can_continue():
    """The default run stops when its step has been halved below 1/8 (converged, well
    before the cap); early_stop=False runs every step of the cap, and its best is at
    least as good (the same iterates first)."""
    r = optimize(W0, steps=400)
    assert r.converged and 0 < r.steps < 400
    assert r.config["patience"] == 5 and r.config["schedule"] == "plateau"
    longer = optimize(W0, steps=2 * r.steps, early_stop=False)
    assert longer.steps == 2 * r.steps
    assert longer.history[:r.steps + 1] == r.history
    assert longer.rel_error <= r.rel_error
    # a cosine run keeps its budget unless 30 steps pass without improvement
    c = optimize(W0, schedule="cosine", steps=40)
    assert c.config["patience"] == 30 and c.steps == 40


def test_padded_rank_is_exact():
    """r = 62 runs its GEMMs at 64 with zero padding: the result has rank 62 and the
    main matrix is Q1 of the residual of exactly the stored rank-62 branch."""
    from analysis.loraq.optimizer import _padded_rank
    assert [_padded_rank(r) for r in (62, 64, 81, 120, 30, 1)] == [64, 64, 81, 120, 30, 1]
    res = optimize(W0, rank=62, steps=6)
    assert res.left.shape == (96, 62) and res.right.shape == (62, 256)
    P = W0.astype(np.float64) - numfmt.dequantize(res.left).astype(np.float64) @ \
        numfmt.dequantize(res.right).astype(np.float64)
    q = numfmt.quantize(P, "mxint4", axis=1)
    assert np.array_equal(q.codes, res.main.codes) and np.array_equal(q.scales, res.main.scales)
    assert res.history[0] > res.rel_error


# --- result structure --------------------------------------------------------------
def test_result_structure(res):
    out, inp = W0.shape
    r = equal_memory_rank((out, inp), 32, 16, "mxint8")
    assert res.rank == r and res.method == "loraq"
    assert res.main.shape == (out, inp) and res.main.axis == 1
    assert res.left.shape == (out, r) and res.left.axis == 1
    assert res.right.shape == (r, inp) and res.right.axis == 1
    assert res.main.format.name == "mxint4" and res.left.format.name == "mxint8"
    assert (res.main_format, res.branch_format) == ("mxint4", "mxint8")
    # storage: every code and every scale, and the branch fits the FP16 rank-32 budget
    assert res.bits == res.main.bits + res.left.bits + res.right.bits
    assert res.bits == matrix_storage_bits(out, inp, "mxint4") + branch_storage_bits(
        (out, inp), r, "mxint8")
    assert branch_storage_bits((out, inp), r, "mxint8") <= 16 * 32 * (out + inp)
    # w_hat is the float64 reconstruction cast once
    ref = (numfmt.dequantize(res.main).astype(np.float64)
           + numfmt.dequantize(res.left).astype(np.float64)
           @ numfmt.dequantize(res.right).astype(np.float64)).astype(np.float32)
    assert res.w_hat.dtype == np.float32
    assert np.array_equal(res.w_hat.view(np.uint32), ref.view(np.uint32))
    err = np.linalg.norm(W0.astype(np.float64) - ref) / np.linalg.norm(W0.astype(np.float64))
    assert math.isclose(res.rel_error, err, rel_tol=1e-9)
    # the main matrix is Q1 of the actual residual
    P = W0.astype(np.float64) - numfmt.dequantize(res.left).astype(np.float64) @ \
        numfmt.dequantize(res.right).astype(np.float64)
    q = numfmt.quantize(P, "mxint4", axis=1)
    assert np.array_equal(q.codes, res.main.codes) and np.array_equal(q.scales, res.main.scales)
    assert len(res.history) == res.steps + 1


def test_learned_omega_is_orthogonal(res):
    o = res.omega.astype(np.float64)
    assert o.shape == (res.rank, res.rank)
    assert np.abs(o.T @ o - np.eye(res.rank)).max() < 1e-4
    assert np.abs(o - np.eye(res.rank)).max() > 1e-4   # it did move


def test_optimizer_improves_on_its_init_and_on_baselines(res):
    h = np.array(res.history)
    assert res.rel_error < h[0] * 0.97
    assert abs(res.rel_error - h.min()) < 2e-3 * h.min()   # returns the best iterate
    nv = naive(W0, rank=res.rank)
    assert res.rel_error < nv.rel_error < rtn(W0).rel_error
    # against SVDQuant at equal memory: LoRaQ's MXINT8 rank 62 against the FP16 rank 32 it
    # was sized for (storage within 0.1 %)
    sq = svdquant(W0, rank=32)
    assert abs(res.bits / sq.bits - 1) < 1e-3
    assert res.rel_error < sq.rel_error


def test_hadamard_matrix():
    for r in (1, 2, 8, 32):
        h = hadamard(r)
        assert np.array_equal(np.abs(h) * math.sqrt(r), np.ones((r, r)))
        assert np.allclose(h @ h.T, np.eye(r), atol=1e-12)
    h = hadamard(62)   # 32 + 16 + 8 + 4 + 2 blocks
    assert np.allclose(h @ h.T, np.eye(62), atol=1e-12)
    assert np.array_equal(h[:32, :32], hadamard(32)) and np.all(h[:32, 32:] == 0)


@pytest.mark.parametrize("rotation", ["identity", "hadamard"])
def test_fixed_rotations(rotation):
    r = optimize(W0, rotation=rotation, steps=10, rank=12)
    want = np.eye(12) if rotation == "identity" else hadamard(12)
    assert np.array_equal(r.omega, want.astype(np.float32))


def test_determinism_same_seed_and_threads():
    a = optimize(W0, steps=15, seed=3)
    b = optimize(W0, steps=15, seed=3)
    c = optimize(W0, steps=15, seed=3, threads=2)
    for x in (b, c):
        for name in ("main", "left", "right"):
            qa, qx = getattr(a, name), getattr(x, name)
            assert np.array_equal(qa.codes, qx.codes) and np.array_equal(qa.scales, qx.scales)
        assert a.history == x.history


def test_determinism_across_threads_on_a_layer_sized_matrix():
    """Reductions over a 384 x 384 error are large enough for torch to split them by
    thread; the optimizer's sums are ordered so that 1 and 2 threads agree bit for bit."""
    W = np.random.default_rng(5).standard_normal((384, 384)).astype(np.float32) * 0.05
    a = optimize(W, steps=4, rank=40)
    b = optimize(W, steps=4, rank=40, threads=2)
    assert a.history == b.history
    assert np.array_equal(a.left.codes, b.left.codes) and np.array_equal(a.main.codes, b.main.codes)


def test_fp16_branch_and_torch_input():
    r = optimize(torch.from_numpy(W0), branch="fp16", steps=5, rank=8)
    assert r.left.codes.dtype == np.uint16 and r.left.format.name == "fp16"
    assert r.left.scales is None and r.bits == r.main.bits + 16 * 8 * (96 + 256)


def test_step_gradients_match_autograd_through_numfmt_ste():
    """The hand-written gradient against autograd with numfmt.torch's STE (Q1 detached)."""
    torch.manual_seed(0)
    Wn = torch.from_numpy(W0 / 0.03125)
    L = torch.randn(96, 6) * 0.5
    R = torch.randn(6, 256) * 0.5
    K = (torch.randn(6, 6) * 0.1).requires_grad_(True)
    H = torch.rand(256) + 0.5
    for h in (None, H, torch.diag(H)):
        Om = cayley(K)
        loss, Lo, Ro, gA, gB = step_gradients(Wn, L, R, Om, "mxint4", "mxint6", h)
        gK, = torch.autograd.grad(torch.sum(gA * Lo) + torch.sum(gB * Ro), K)
        # the hand-written Cayley backward the optimizer uses (Omega = cayley(K) here)
        gK_hand = cayley_grad(K.detach(), Om.detach(), L.T @ gA + R @ gB.T)
        assert torch.allclose(gK_hand, gK, rtol=1e-4, atol=1e-5)
        # reference: autograd of ||W - Q1(P)_fixed - Q2(L Om) Q2(Om^T R)|| with STE
        Lr, Rr, Kr = (L.clone().requires_grad_(True), R.clone().requires_grad_(True),
                      K.detach().clone().requires_grad_(True))
        Omr = cayley(Kr)
        A = nft.fake_quantize(Lr @ Omr, "mxint6", axis=1)
        B = nft.fake_quantize(Omr.T @ Rr, "mxint6", axis=1)
        M = nft.fake_quantize((Wn - A @ B).detach(), "mxint4", axis=1)
        E = Wn - M - A @ B
        ref = torch.sum(E * E) if h is None else (
            torch.sum(E * E * h) if h.ndim == 1 else torch.sum(E * (E @ h)))
        ref.backward()
        assert math.isclose(loss, float(ref.detach()), rel_tol=1e-5)
        Omd = Om.detach()
        assert torch.allclose(gA @ Omd.T, Lr.grad, rtol=1e-4, atol=1e-4)
        assert torch.allclose(Omd @ gB, Rr.grad, rtol=1e-4, atol=1e-4)
        assert torch.allclose(gK, Kr.grad, rtol=1e-3, atol=1e-3)


def test_cayley_orthogonal():
    K = torch.randn(7, 7, dtype=torch.float64)
    O = cayley(K)
    assert torch.allclose(O.T @ O, torch.eye(7, dtype=torch.float64), atol=1e-12)
    assert torch.equal(cayley(torch.zeros(5, 5)), torch.eye(5))


# --- baselines -----------------------------------------------------------------------------
def test_rtn():
    r = rtn(W0, main="sint4")
    assert r.left is None and r.right is None and r.rank == 0 and r.omega is None
    assert np.array_equal(r.w_hat, numfmt.fake_quantize(W0, "sint4", axis=1))
    assert r.bits == matrix_storage_bits(96, 256, "sint4")


def test_svdquant_is_top_svd_plus_quantized_residual():
    r = svdquant(W0, rank=8)
    assert r.left.format.name == "fp16" and r.rank == 8 and r.smooth is None
    U, S, Vt = np.linalg.svd(W0.astype(np.float64), full_matrices=False)
    LR = numfmt.dequantize(r.left).astype(np.float64) @ numfmt.dequantize(r.right)
    ref8, ref7 = (U[:, :8] * S[:8]) @ Vt[:8], (U[:, :7] * S[:7]) @ Vt[:7]
    assert np.linalg.norm(LR - ref8) < 2e-3 * np.linalg.norm(ref8)   # fp16 factors
    assert np.linalg.norm(LR - ref7) > 0.05 * np.linalg.norm(ref8)
    # refinement keeps the best iterate: never worse
    assert svdquant(W0, rank=8, refine_iters=3).rel_error <= r.rel_error


def test_svdquant_smoothing_lowers_output_error_on_outlier_channels():
    """On activations with outlier channels, the searched smoothing (a grid without the
    no-smoothing point (0, 0), so the win is not by construction) lowers the output error."""
    rng = np.random.default_rng(1)
    X = rng.standard_normal((64, 256)) * np.exp(rng.standard_normal(256))[None, :]
    plain = svdquant(W0, rank=8, activations=X, alpha_grid=(0.0,), beta_grid=(0.0,))
    assert np.all(plain.smooth == 1)
    grid = (0.25, 0.5, 0.75, 1.0)
    sm = svdquant(W0, rank=8, activations=X, alpha_grid=grid, beta_grid=grid)
    assert sm.smooth.shape == (256,) and sm.output_rel_error < 0.9 * plain.output_rel_error
    # a layer that divides its input by smooth and uses the stored matrices equals x @ w_hat^T
    stored = (numfmt.dequantize(sm.main).astype(np.float64)
              + numfmt.dequantize(sm.left).astype(np.float64) @ numfmt.dequantize(sm.right))
    y = (X / sm.smooth.astype(np.float64)) @ stored.T
    assert np.allclose(y, X @ sm.w_hat.astype(np.float64).T, rtol=1e-4, atol=1e-4)


def test_lqer_loftq_naive_shapes_and_order():
    r = equal_memory_rank((96, 256), 32, 16, "mxint6")
    for fn in (lqer, loftq, naive):
        x = fn(W0, branch="mxint6")
        assert x.rank == r and x.left.format.name == "mxint6" and x.rel_error < rtn(W0).rel_error
    lf = loftq(W0, branch="mxint6", iters=4)
    assert len(lf.history) == 4 and math.isclose(lf.rel_error, min(lf.history), rel_tol=1e-6)
    assert lqer(W0, branch="fp16", rank=4).left.codes.dtype == np.uint16


# --- data-aware variant ----------------------------------------------------------------------
def test_data_aware_variant_lowers_output_error():
    from analysis.loraq.common import output_rel_error
    rng = np.random.default_rng(2)
    X = rng.standard_normal((128, 256)) * np.exp(1.5 * rng.standard_normal(256))[None, :]
    free = optimize(W0, steps=40, rank=12)
    assert free.output_rel_error is None
    free_out = output_rel_error(W0, free.w_hat, X)
    for weighting in ("full", "diag"):
        aware = optimize(W0, steps=40, rank=12, activations=X, weighting=weighting)
        assert aware.output_rel_error < 0.8 * free_out, weighting
        assert aware.config["weighting"] == weighting


# --- files -----------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path, res):
    save_result(res, tmp_path / "layer")
    back = load_result(tmp_path / "layer")
    assert isinstance(back, LoRaQResult)
    for name in ("main", "left", "right"):
        a, b = getattr(res, name), getattr(back, name)
        assert np.array_equal(a.codes, b.codes) and np.array_equal(a.scales, b.scales)
        assert a.format == b.format and a.axis == b.axis
    assert np.array_equal(back.w_hat.view(np.uint32), res.w_hat.view(np.uint32))
    assert np.array_equal(back.omega, res.omega)
    assert back.metrics() == res.metrics() and back.history == res.history
    assert not list(tmp_path.glob("*.tmp"))
    r0 = rtn(W0)
    save_result(r0, tmp_path / "r")
    assert load_result(tmp_path / "r").left is None


def test_residual_in_blocks_has_the_bits_of_the_whole_matrix_step():
    """The CPU loop forms E = P - Q1(P) and ||E||^2 in row blocks that stay in cache; the
    loss and both gradients are the same bits as the whole-matrix step (buffers=None),
    also when the row count is not a multiple of the block."""
    from analysis.loraq.optimizer import _Buffers, step_gradients
    rng = np.random.default_rng(3)
    out, inp, r = 4607, 1152, 62  # PixArt FFN-sized (less a row): MKL blocks its products
    Wn = torch.from_numpy(rng.standard_normal((out, inp)).astype(np.float32))
    L = torch.from_numpy((rng.standard_normal((out, r)) * 0.2).astype(np.float32))
    R = torch.from_numpy((rng.standard_normal((r, inp)) * 0.2).astype(np.float32))
    Om = torch.eye(r)
    whole = step_gradients(Wn, L, R, Om, "mxint4", "mxint8")
    bufs = _Buffers(out, inp, r)
    assert 1 < bufs.block_rows < out and out % bufs.block_rows != 0
    blocked = step_gradients(Wn, L, R, Om, "mxint4", "mxint8", buffers=bufs)
    assert whole[0] == blocked[0] and whole[0] > 0
    for x, y in zip(whole[1:], blocked[1:]):
        assert torch.equal(x, y)
    # and the residual left in the buffer is E = P - Q1(P) itself
    A = torch.from_numpy(numfmt.fake_quantize(blocked[1].numpy(), "mxint8", axis=1))
    B = torch.from_numpy(numfmt.fake_quantize(blocked[2].numpy(), "mxint8", axis=1))
    P = torch.addmm(Wn, A, B, alpha=-1.0)
    Q = torch.from_numpy(numfmt.fake_quantize(P.numpy(), "mxint4", axis=1))
    assert torch.equal(bufs.P, P - Q)
