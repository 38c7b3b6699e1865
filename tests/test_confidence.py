"""Bootstrap intervals and verdicts (analysis.confidence): coverage on known distributions,
paired differences, and the verdict rule."""
from __future__ import annotations

import numpy as np
import pytest

from analysis import confidence
from analysis.metrics import frechet_distance


def test_interval_of_a_mean_covers_and_narrows():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(400) + 3.0
    lo, hi = confidence.interval(lambda i: x[i].mean(), len(x))
    assert lo < x.mean() < hi and lo < 3.0 < hi
    # about 1.96 standard errors each side
    se = x.std(ddof=1) / np.sqrt(len(x))
    assert 3.4 * se < hi - lo < 4.4 * se
    lo2, hi2 = confidence.interval(lambda i: x[:100][i].mean(), 100)
    assert hi2 - lo2 > 1.6 * (hi - lo)  # a quarter of the samples: twice as wide


def test_paired_difference_cancels_what_both_share():
    """Two configurations on the same samples: a large per-sample spread that both share does
    not widen the interval of their difference; a constant shift is resolved."""
    rng = np.random.default_rng(1)
    base = rng.standard_normal(256) * 10
    better = base + 0.5 + rng.standard_normal(256) * 0.1
    lo, hi = confidence.paired_difference(lambda i: better[i].mean(), lambda i: base[i].mean(), 256)
    assert 0.4 < lo < 0.5 < hi < 0.6
    assert confidence.verdict(lo, hi, higher_is_better=True) == "better"
    assert confidence.verdict(lo, hi, higher_is_better=False) == "worse"
    same = confidence.paired_difference(lambda i: base[i].mean(), lambda i: base[i].mean(), 256)
    assert same == [0.0, 0.0] and confidence.verdict(*same, True) == "not resolved"
    noisy = base + rng.standard_normal(256) * 3  # no shift, noisy: the interval spans 0
    lo, hi = confidence.paired_difference(lambda i: noisy[i].mean(), lambda i: base[i].mean(), 256)
    assert lo < 0 < hi and confidence.verdict(lo, hi, True) == "not resolved"


def test_verdict_rule():
    assert confidence.verdict(0.1, 0.3, True) == "better"
    assert confidence.verdict(-0.3, -0.1, True) == "worse"
    assert confidence.verdict(-0.3, -0.1, False) == "better"
    assert confidence.verdict(-0.1, 0.2, True) == "not resolved"
    assert confidence.verdict(None, None, True) == "not resolved"


def test_fid_interval_is_the_estimates_spread():
    """Two sets drawn from one Gaussian (population FD 0): the plug-in FID of 256 samples in
    64 dimensions is biased far above 0; its interval is centred on it, and its width
    follows the spread of the FIDs of 40 independent sample sets (the jackknife overstates
    it, about 1.5 times here: conservative)."""
    rng = np.random.default_rng(2)
    r = rng.standard_normal((4000, 64))
    f = rng.standard_normal((256, 64))
    plug_in = frechet_distance(f, r)
    lo, hi = confidence.fid_interval(f, r)
    assert plug_in > 3 and lo < plug_in < hi
    assert (hi + lo) / 2 == pytest.approx(plug_in, rel=1e-9)
    others = [frechet_distance(rng.standard_normal((256, 64)), r) for _ in range(40)]
    sd = np.std(others, ddof=1)
    assert 1.0 * sd < (hi - lo) / (2 * confidence.Z95) < 2.5 * sd
    # the eigenvalue form of the trace equals scipy's sqrtm form
    mu, s = r.mean(0), np.cov(r, rowvar=False)
    assert confidence.frechet_from_moments(f.mean(0), np.cov(f, rowvar=False), mu, s) == \
        pytest.approx(plug_in, rel=1e-9)


def test_resamples_are_reproducible():
    a, b = confidence.resample_indices(10), confidence.resample_indices(10)
    assert a.shape == (confidence.RESAMPLES, 10) and np.array_equal(a, b)
    with pytest.raises(ValueError, match="at least 2"):
        confidence.resample_indices(1)
