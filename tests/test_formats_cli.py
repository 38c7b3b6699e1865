"""``loraq formats``: the table, and its ``--scale-rule`` option for MX formats."""
import json

import pytest

import numfmt
from analysis.cli import main
from analysis.commands.formats import format_rows


def test_scale_rule_moves_only_mx_rows(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert main(["formats", "--size", "64", "--scale-rule", "ceil", "--json", str(out)]) == 0
    assert "'ceil' rule" in capsys.readouterr().out
    ceil = {r["format"]: r for r in json.loads(out.read_text())}
    floor = {r["format"]: r for r in format_rows(64)}
    assert ceil.keys() == floor.keys() and "fp8_e4m3fnuz" in ceil
    moved = 0
    for name, r in ceil.items():
        fmt = numfmt.get(name)
        if fmt.kind == "block" and fmt.scaling == "mx":
            assert r["scale_rule"] == "ceil" and floor[name]["scale_rule"] == "floor"
            assert r["sqnr_db"] == numfmt_sqnr(name, "ceil")
            moved += r["sqnr_db"] != floor[name]["sqnr_db"]
        else:
            assert r == floor[name]  # non-MX rows are unchanged
    assert moved == sum(1 for n in ceil if numfmt.get(n).kind == "block"
                        and numfmt.get(n).scaling == "mx")


def numfmt_sqnr(name, rule, size=64):
    """The SQNR the table reports, recomputed with the rule given to fake_quantize."""
    import math

    import numpy as np
    x = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    y = numfmt.fake_quantize(x, name, scale_rule=rule)
    x64 = x.astype(np.float64)
    return 10.0 * math.log10(float(np.sum(x64 ** 2)) / float(np.sum((x64 - y) ** 2)))


def test_bad_scale_rule_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["formats", "--size", "8", "--scale-rule", "round"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "'round'" in err and "floor" in err and "rceil" in err
    with pytest.raises(ValueError, match=r"scale_rule='round' is not one of"):
        format_rows(8, scale_rule="round")
