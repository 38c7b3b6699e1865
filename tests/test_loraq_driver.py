"""optimize_model (resumable, atomic, parallel) and the ``loraq optimize`` command."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from analysis.cli import main as cli_main
from analysis.loraq import load_result
from analysis.loraq.driver import layer_stem, optimize_model


def weights():
    rng = np.random.default_rng(5)
    return {"a.weight": (rng.standard_normal((64, 96)) * 0.05).astype(np.float32),
            "a.bias": np.zeros(64, dtype=np.float32),
            "b/odd name": (rng.standard_normal((96, 64)) * 0.05).astype(np.float32),
            "c.weight": (rng.standard_normal((64, 64)) * 0.05).astype(np.float32)}


KW = dict(steps=8, rank=6)


def _mtimes(d):
    return {p.name: p.stat().st_mtime_ns for p in d.iterdir()}


def test_driver_writes_every_2d_layer_and_resumes(tmp_path):
    seen = []
    res = optimize_model(weights(), tmp_path, progress=lambda *a: seen.append(a[0]), **KW)
    assert list(res) == ["a.weight", "b/odd name", "c.weight"] and len(seen) == 3
    for name, r in res.items():
        back = load_result(tmp_path / layer_stem(name))
        assert np.array_equal(back.main.codes, r.main.codes)
        assert np.array_equal(back.left.codes, r.left.codes) and back.rank == 6
    assert "/" not in layer_stem("b/odd name") and layer_stem("a.weight") == "a.weight"
    index = json.loads((tmp_path / "index.json").read_text())
    assert set(index["layers"]) == set(res)
    assert not list(tmp_path.glob(".*tmp"))
    # rerun: nothing recomputed (files untouched), same results
    before = _mtimes(tmp_path)
    again = optimize_model(weights(), tmp_path, **KW)
    after = _mtimes(tmp_path)
    assert {k: v for k, v in after.items() if k != "index.json"} == \
        {k: v for k, v in before.items() if k != "index.json"}
    assert all(again[k].rel_error == res[k].rel_error for k in res)
    # an interrupted run: one layer's JSON missing -> only that layer is recomputed
    os.unlink(tmp_path / "c.weight.json")
    before = _mtimes(tmp_path)
    optimize_model(weights(), tmp_path, **KW)
    after = _mtimes(tmp_path)
    changed = {k for k in after if after[k] != before.get(k)}
    assert changed == {"c.weight.json", "c.weight.safetensors", "index.json"}


def test_driver_config_mismatch(tmp_path):
    optimize_model({"a.weight": weights()["a.weight"]}, tmp_path, **KW)
    with pytest.raises(ValueError, match=r"'a.weight'.*different config.*kwargs"):
        optimize_model({"a.weight": weights()["a.weight"]}, tmp_path, steps=9, rank=6)
    changed = weights()["a.weight"] * 2
    with pytest.raises(ValueError, match="weight_sha256"):
        optimize_model({"a.weight": changed}, tmp_path, **KW)
    r = optimize_model({"a.weight": changed}, tmp_path, overwrite=True, **KW)
    assert load_result(tmp_path / "a.weight").rel_error == r["a.weight"].rel_error


def test_driver_bad_input_before_work(tmp_path):
    w = weights()
    with pytest.raises(ValueError, match="method='gptq'"):
        optimize_model(w, tmp_path, method="gptq")
    bad = dict(w, **{"d.weight": np.full((8, 8), np.inf, dtype=np.float32)})
    with pytest.raises(ValueError, match="d.weight.*NaN/Inf"):
        optimize_model(bad, tmp_path / "x")
    with pytest.raises(ValueError, match="rotation='spin'"):
        optimize_model(w, tmp_path / "y", rotation="spin")
    with pytest.raises(TypeError):
        optimize_model(w, tmp_path / "z", method="rtn", rank=4)
    assert not (tmp_path / "y").exists() or not list((tmp_path / "y").glob("*.json"))


def test_driver_processes_match_serial(tmp_path):
    w = {k: v for k, v in weights().items() if k != "a.bias"}
    one = optimize_model(w, tmp_path / "one", method="rtn")
    two = optimize_model(w, tmp_path / "two", method="rtn", processes=2)
    for k in w:
        assert np.array_equal(one[k].main.codes, two[k].main.codes)
        assert np.array_equal(one[k].main.scales, two[k].main.scales)


def test_cli_optimize(tmp_path, capsys):
    f = tmp_path / "m.safetensors"
    save_file({k: v for k, v in weights().items()}, str(f))
    out = tmp_path / "run"
    rc = cli_main(["optimize", "--weights", str(f), "--out", str(out), "--steps", "5",
                   "--rank", "6", "--quiet"])
    assert rc == 0 and "3 layers" in capsys.readouterr().out
    assert (out / "index.json").exists()
    rc = cli_main(["optimize", "--weights", str(f), "--out", str(out), "--steps", "6",
                   "--rank", "6"])
    assert rc == 2 and "different config" in capsys.readouterr().err
    assert cli_main(["optimize", "--weights", str(f), "--out", str(out), "--method", "x"]) == 2
    assert "not one of" in capsys.readouterr().err
    assert cli_main(["optimize", "--weights", str(tmp_path / "w.pt"), "--out", str(out)]) == 2
    rc = cli_main(["optimize", "--weights", str(f), "--out", str(tmp_path / "r"), "--method",
                   "rtn", "--quiet"])
    assert rc == 0
