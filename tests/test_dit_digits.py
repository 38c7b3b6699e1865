"""The built-in dit-digits model: its metrics' properties, the sampler, a reduced report."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from analysis.cli import main
from analysis import metrics
from analysis.models.dit_digits import core


@pytest.fixture(scope="module")
def shipped():
    return core.load()


def test_frechet_real_vs_real_near_zero_noise_far(shipped):
    _, clf, _ = shipped
    train, _ = core.digits("train")
    hold, _ = core.digits("holdout")
    with torch.no_grad():
        f_train, f_hold = clf.features(train), clf.features(hold)
        noise = torch.rand(360, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
        f_noise = clf.features(noise)
    real = metrics.frechet_distance(f_hold, f_train)
    fake = metrics.frechet_distance(f_noise, f_train)
    assert metrics.frechet_distance(f_train, f_train) == pytest.approx(0.0, abs=1e-6)
    assert fake > 20 * real, (real, fake)


def test_frechet_matches_gaussian_closed_form():
    """Two Gaussians with known moments: FD = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrt(S1 S2))."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((20000, 3))
    b = rng.standard_normal((20000, 3)) * 2.0 + np.array([1.0, 0.0, -1.0])
    # S1 = I, S2 = 4 I: tr(I + 4I - 2 * 2I) = 3; mean term 2
    assert metrics.frechet_distance(a, b) == pytest.approx(5.0, rel=0.03)


def test_classifier_accuracy_on_held_out_digits(shipped):
    _, clf, _ = shipped
    x, y = core.digits("holdout")
    with torch.no_grad():
        acc = metrics.class_accuracy(clf(x), y)
    assert acc >= 0.95


def test_psnr_and_feature_distance_properties():
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    assert metrics.psnr_db(x, x) == math.inf
    y = x + 0.01
    assert metrics.psnr_db(x, y) == pytest.approx(10 * math.log10(4 / 1e-4), rel=1e-6)
    f = torch.randn(5, 64)
    assert metrics.feature_distance(f, f) == 0.0
    assert metrics.feature_distance(f, 3 * f) == pytest.approx(0.0, abs=1e-6)  # scale-free
    assert metrics.feature_distance(f, -f) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.psnr_db(x, x[:2])


def test_sampler_deterministic_per_seed_and_batch_free(shipped):
    den, _, _ = shipped
    a, la = core.sample(den, 6, seed=5, steps=3)
    b, _ = core.sample(den, 6, seed=5, steps=3, batch=4)  # another batching: same digits
    c, _ = core.sample(den, 6, seed=6, steps=3)
    assert torch.equal(la, torch.arange(6) % 10)
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, c, atol=1e-2)
    a2, _ = core.sample(den, 6, seed=5, steps=3)
    assert torch.equal(a, a2)


def test_full_precision_model_is_good(shipped):
    """The shipped model's own training log: class accuracy >= 0.9 (EMA samples)."""
    _, _, info = shipped
    assert info["eval"]["class_accuracy"] >= 0.9
    assert info["steps_done"] == info["steps"]


def test_reduced_report_end_to_end(tmp_path, capsys):
    out = tmp_path / "dit"
    rc = main(["report", "--samples", "12", "--sample-steps", "2", "--steps", "2",
               "--configs", "W4A4,W4A4+FP16,W4A4+W8A8,W4A4+W8A8-nosmooth", "--no-progress",
               "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    ref = res["reference"]["end_metrics"]
    assert set(ref) >= {"fid", "class_accuracy", "psnr_db", "feature_distance"}
    assert ref["psnr_db"] is None and ref["feature_distance"] == 0.0  # FP vs itself
    for name, c in res["configs"].items():
        em = c["end_metrics"]
        for k in ("fid", "class_accuracy", "psnr_db", "feature_distance"):
            assert em[k] is not None, (name, k)
        assert 0 <= em["class_accuracy"] <= 1 and em["psnr_db"] > 0
        lay = c["layers"][0]
        assert len(lay["propagated_sqnr_db_by_timestep"]) == 2
    assert res["settings"]["ref_rank"] == 8
    fp16 = res["configs"]["W4A4+FP16"]
    assert fp16["rank_max"] == 8
    # smoothing first lowers the 4-bit activations' error and raises the propagated SQNR
    sm, df = res["configs"]["W4A4+W8A8"], res["configs"]["W4A4+W8A8-nosmooth"]
    assert sm["act_error_mean"] < 0.95 * df["act_error_mean"]
    assert sm["propagated_sqnr_db_mean"] > df["propagated_sqnr_db_mean"]
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert "plots/samples.png" in md and html.count("data:image/png;base64") >= 6
    assert (out / "plots" / "samples.png").stat().st_size > 1000
    assert res["headline"] and all("fid" in h and "reference_fid" in h for h in res["headline"])
    # every end metric carries its 95 % interval, and each branch a verdict per metric
    for c in res["configs"].values():
        em = c["end_metrics"]
        for k in ("fid", "class_accuracy", "psnr_db", "feature_distance"):
            lo, hi = em[k + "_ci"]
            assert lo <= em[k] <= hi, (k, lo, em[k], hi)
        assert len(em["per_sample"]["mse"]) == 12
        assert metrics.psnr_from_mse(em["per_sample"]["mse"]) == pytest.approx(em["psnr_db"])
    for h in res["headline"]:
        assert set(h["verdicts"]) == {"fid", "class_accuracy", "psnr_db", "feature_distance"}
        assert set(h["verdicts"].values()) <= {"better", "worse", "not resolved"}
        lo, hi = h["psnr_db_diff_ci"]
        assert lo <= h["psnr_db"] - h["reference_psnr_db"] <= hi
    assert "| verdict |" in md


@pytest.mark.parametrize("n,match", [("0", "--samples=0"), ("5000", "allow")])
def test_bad_sample_counts(tmp_path, capsys, n, match):
    rc = main(["report", "--samples", n, "--no-progress", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and len(err.strip().splitlines()) == 1


def test_missing_or_damaged_weights(tmp_path, monkeypatch, capsys):
    d = tmp_path / "w"
    shutil.copytree(core.WEIGHTS_DIR, d)
    (d / core.CLASSIFIER_FILE).unlink()
    with pytest.raises(core.BuiltinMissing, match="classifier.safetensors is missing.*train"):
        core.load(d)
    shutil.copy(core.WEIGHTS_DIR / core.CLASSIFIER_FILE, d / core.CLASSIFIER_FILE)
    p = d / core.TRANSFORMER_DIR / "diffusion_pytorch_model.safetensors"
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(core.BuiltinMissing, match="damaged.*python -m analysis.models.dit_digits train"):
        core.load(d)
    monkeypatch.setattr(core, "WEIGHTS_DIR", d)
    rc = main(["report", "--no-progress", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "damaged" in err and len(err.strip().splitlines()) == 1
