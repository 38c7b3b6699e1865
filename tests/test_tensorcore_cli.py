"""``loraq tensorcore``: presets table, error table, atomic plot, bad options."""
from __future__ import annotations

import json

from analysis.cli import main
from analysis.commands.tensorcore import error_rows


def test_tensorcore_command_prints_presets_errors_and_writes_plot(tmp_path, capsys):
    out = tmp_path / "plots" / "err.png"
    js = tmp_path / "tc.json"
    rc = main(["tensorcore", "--k", "32,128,512", "--rows", "8", "--inputs", "fp8_e4m3,fp16",
               "--out", str(out), "--json", str(js)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "H100  fp8_e4m3  fp32   32   -10  13     14 rtz" in text
    assert "B200  fp8_e4m3  fp32   32     2  25     24 rtz" in text
    assert "H100=H200 fp8_e4m3" in text and "promote128" in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.parent.glob(".*"))  # no temporary file left behind
    data = json.loads(js.read_text())
    assert {r["gpu"] for r in data["presets"]} >= {"V100", "A100", "L40S", "H100", "B200"}
    h100 = next(r for r in data["errors"] if r["gpu"] == "H100" and r["inputs"] == "fp8_e4m3")
    b200 = next(r for r in data["errors"] if r["gpu"] == "B200" and r["inputs"] == "fp8_e4m3")
    # 14 bits kept on Hopper FP8 against 24 on Blackwell; promotion caps the growth
    assert h100["plain_mean"][-1] > 100 * b200["plain_mean"][-1]
    assert h100["promoted_mean"][-1] < h100["plain_mean"][-1]


def test_error_rows_grow_with_k_without_promotion():
    rows = error_rows((32, 256, 2048), rows=8, inputs=["fp8_e5m2"], gpus=["H100"])
    assert len(rows) == 1 and rows[0]["same_as"] == []
    m = rows[0]["plain_mean"]
    assert m[0] < m[1] < m[2]


def test_tensorcore_command_bad_options_exit_2(capsys):
    assert main(["tensorcore", "--k", "32,x", "--out", ""]) == 2
    assert "comma-separated" in capsys.readouterr().err
    assert main(["tensorcore", "--gpus", "P100", "--k", "32", "--out", ""]) == 2
    cap = capsys.readouterr()
    assert "unknown GPU 'P100'" in cap.err and cap.err.count("\n") == 1 and cap.out == ""
    assert main(["tensorcore", "--inputs", "fp4", "--k", "32", "--out", ""]) == 2
    assert "unknown input format 'fp4'" in capsys.readouterr().err
