"""loraq vectors: files read back and checked against hwsim.matmul and the reference."""
from __future__ import annotations

import json

import numpy as np
import pytest

import hwsim
from analysis.cli import main
from hwsim.vectors import read_vectors, write_vectors
from test_hwsim_reference import reference_matmul


def _same(x, y):
    return np.array_equal(np.asarray(x, np.float32).view(np.uint32),
                          np.asarray(y, np.float32).view(np.uint32))


def test_cli_writes_readable_vectors_that_match_matmul(tmp_path, capsys):
    out = tmp_path / "vec"
    rc = main(["vectors", "--a-format", "mxint8", "--b-format", "mxint4", "--m", "4", "--n", "4",
               "--k", "128", "--acc-bits", "20", "--overflow", "saturate", "--seed", "0",
               "--out", str(out)])
    assert rc == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["a_codes.hex", "a_scales.hex", "b_codes.hex", "b_scales.hex",
                            "out.hex", "acc_trace.hex", "block_sums.hex", "cases.txt",
                            "cases.json", "README.txt"])
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    data = read_vectors(out)
    assert [c["name"] for c in data["cases"]] == ["random", "max_codes", "sign_swing",
                                                   "zero_blocks", "nan_scale"]
    acc = hwsim.Accumulator(20, "saturate")
    for case in data["cases"]:
        res = hwsim.matmul(case["a"], case["b"], acc=acc)
        assert _same(res.out, case["out"]), case["name"]
        ref = reference_matmul(case["a"], case["b"], bits=20, overflow="saturate")
        assert _same(ref[0], case["out"]), case["name"]
        trace, sums = hwsim.gemm.accumulator_trace(case["a"], case["b"], acc=acc)
        assert np.array_equal(trace.astype(object), case["acc_trace"])
        assert np.array_equal(case["acc_trace"][:, :, 31::32], case["block_sums"])
    nan = data["cases"][4]["out"]
    assert np.isnan(nan[0]).all() and np.isfinite(nan[1:]).all()
    zero = data["cases"][3]["acc_trace"]
    assert (zero[:, :, 32:64] == 0).all()
    # every line is fixed-width upper-case hex ($readmemh)
    for name in ("a_codes.hex", "b_codes.hex", "out.hex", "acc_trace.hex"):
        lines = (out / name).read_text().splitlines()
        assert len({len(x) for x in lines}) == 1
        assert all(c in "0123456789ABCDEF" for x in lines for c in x)
    assert len((out / "acc_trace.hex").read_text().splitlines()) == 5 * 4 * 4 * 128
    meta = json.loads((out / "cases.json").read_text())
    assert meta["trace_bits"] == 20 and meta["block_length"] == 32
    assert "$readmemh" in (out / "README.txt").read_text()


def test_sign_swing_overflows_a_narrow_accumulator(tmp_path):
    meta = write_vectors(tmp_path, "mxint8", "mxint8", 2, 2, 64,
                         acc=hwsim.Accumulator(16, "wrap"), cases=("sign_swing",))
    case = meta["cases"][0]
    # prefix climbs to 16 * 127 * 127 = 258064 > 2^15: wraps on the way up and back
    assert case["overflow_count"] > 0
    assert case["max_abs_acc"] == 16 * 127 * 127
    data = read_vectors(tmp_path)
    assert (data["cases"][0]["block_sums"] == 0).all()  # wrap comes back to the exact 0
    assert (data["cases"][0]["out"] == 0).all()


def test_sint_and_element_formats_round_trip(tmp_path):
    write_vectors(tmp_path, "fp8_e4m3", "sint4", 2, 3, 64, acc=hwsim.Accumulator(24, "wrap"),
                  cases=("random", "max_codes"))
    for case in read_vectors(tmp_path)["cases"]:
        res = hwsim.matmul(case["a"], case["b"], acc=hwsim.Accumulator(24, "wrap"))
        assert _same(res.out, case["out"])


@pytest.mark.parametrize("argv,msg", [
    (["--overflow", "saturate"], "needs a width"),
    (["--acc-bits", "1", "--overflow", "wrap"], "bits=1"),
    (["--a-format", "mxint9"], "unknown format"),
    (["--k", "0"], "k=0"),
    (["--cases", "random,bogus"], "bogus"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, argv, msg):
    rc = main(["vectors", "--out", str(tmp_path / "x"), *argv])
    assert rc == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
