"""The per-layer smoothing search with the activation quantizer in the loop
(analysis.smoothing), against the weight-only criterion and across layers."""
from __future__ import annotations

import numpy as np
import pytest

from analysis import smoothing
from analysis.fit import fit_weight
from analysis.loraq.baselines import smoothing_search, svdquant
from analysis.recipe import Recipe, Smoothing

GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


def _layer(seed, outliers: bool):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((96, 128)) * 0.05
    X = rng.standard_normal((256, 128))
    if outliers:  # a few input channels 15x larger than the rest, as in transformers, and
        X[:, [3, 40, 77, 100]] *= 15.0  # two weight columns 10x larger
        W[:, [5, 60]] *= 10.0
    return W, X


def test_the_search_chooses_differently_with_activation_outliers():
    plain = smoothing.search(*_layer(0, False), GRID, GRID, 8, "mxint4", "mxint4")
    outl = smoothing.search(*_layer(0, True), GRID, GRID, 8, "mxint4", "mxint4")
    assert plain[1] != outl[1]
    assert outl[1][0] > 0  # the outlier layer migrates scale into the weights
    # and the chosen point is the grid's minimum of the criterion
    for _, chosen, scores in (plain, outl):
        assert scores[chosen] == min(scores.values())


def test_activation_quantization_in_the_criterion_beats_the_weight_only_choice():
    """On a layer with activation outliers, the point chosen with the activation quantizer
    in the criterion gives a lower output MSE of the quantized layer than the point that the
    weight-only criterion chooses."""
    W, X = _layer(1, True)
    lam_w, chosen_w, _ = smoothing_search(W, X, GRID, GRID, _svd_fit(8))
    lam_o, chosen_o, scores = smoothing.search(W, X, GRID, GRID, 8, "mxint4", "mxint4")
    assert chosen_o != chosen_w
    assert scores[chosen_o] < 0.95 * scores[chosen_w]


def _svd_fit(rank):
    def fit(Ws):
        r = svdquant(Ws, main="mxint4", rank=rank)
        return r.main, r.left, r.right, r.history
    return fit


def test_smoothing_rank_follows_the_branch_rank():
    shape = (384, 384)
    assert smoothing.smoothing_rank(Recipe.parse("W4A4+FP16r16"), shape) == 16
    assert smoothing.smoothing_rank(Recipe.parse("W4A4+FP16"), shape) == 32
    assert smoothing.smoothing_rank(Recipe.parse("W4A4+W8A8"), shape) == 32   # equal memory
    assert smoothing.smoothing_rank(Recipe.parse("W4A4+W8A8r124"), shape) == 64  # 2x its rank
    assert smoothing.smoothing_rank(Recipe.parse("W4A4+W8A8r31"), shape) == 16


@pytest.mark.parametrize("name", ["W4A4+FP16r8", "W4A4+W8A8r8"])
def test_fits_record_the_chosen_point(name):
    W, X = (a.astype(np.float32) for a in _layer(2, True))
    recipe = Recipe.parse(name, steps=3, smoothing=Smoothing(GRID, GRID, "output"))
    res = fit_weight(W, recipe, X)
    rank = smoothing.smoothing_rank(recipe, W.shape)
    # LoRaQ's rank 8 is 8/62 of the equal-memory rank on 96 x 128: smoothing rank 32 * 8/62
    assert rank == (8 if name.endswith("FP16r8") else 4)
    _, chosen, _ = smoothing.search(W, X, GRID, GRID, rank, "mxint4", "mxint4")
    assert tuple(res.config["smoothing"]) == chosen
    lam = smoothing_vector_of(W.astype(np.float64), X.astype(np.float64), chosen)
    assert np.array_equal(res.smooth.astype(np.float64), lam)
    with pytest.raises(ValueError, match="criterion='mse'"):
        Smoothing(GRID, GRID, "mse")


def smoothing_vector_of(W, X, ab):
    from analysis.loraq.baselines import smoothing_vector
    return smoothing_vector(W, X, *ab)


def test_paper_lr_rule():
    """The paper's steps (1e-3 FP, 1e-4 INT) on the unnormalized weight, in the optimizer's
    units: divided by sqrt(c), c the power-of-two RMS scale the optimizer divides W by."""
    from analysis.fit import paper_lr

    W = np.full((8, 8), 2.0 ** -6)  # rms 2^-6: c = 2^-6, sqrt(c) = 2^-3
    assert paper_lr(W, "mxint8") == pytest.approx(1e-4 * 8)
    assert paper_lr(W, "mxfp8_e4m3") == pytest.approx(1e-3 * 8)
    r = Recipe.parse("W4A4+W8A8-nosmooth", steps=3).replace(lr_rule="paper")
    assert Recipe.from_json(r.to_json()) == r and r.key() != Recipe.parse(
        "W4A4+W8A8-nosmooth", steps=3).key()
    rng = np.random.default_rng(0)
    Wr = (rng.standard_normal((64, 96)) * 0.02).astype(np.float32)
    a, b = fit_weight(Wr, r), fit_weight(Wr, r.replace(lr_rule="ours"))
    assert a.rel_error != b.rel_error  # the rule reaches the optimizer
    with pytest.raises(ValueError, match="lr_rule='fast'"):
        r.replace(lr_rule="fast")
    with pytest.raises(ValueError, match="not both"):
        r.replace(lr=1e-3)
