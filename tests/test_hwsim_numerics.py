"""Known hardware numerics: DeepSeek-V3's truncated FP8 accumulation, overflow below A2Q."""
from __future__ import annotations

from hwsim.bench import deepseek_figures, overflow_figures


def test_deepseek_truncated_accumulation_and_promotion():
    rows = deepseek_figures(m=16, n=16, k=4096)
    for r in rows:
        assert r["fp32_max"] < 1e-5                      # FP32 accumulation: ~1 ulp
        assert 1e-3 < r["trunc14_mean"] < 3e-2           # 14-bit truncation: 0.1% .. 3%
        assert r["promote_gain"] >= 5                     # promote_every=128 fixes it
        assert r["trunc14_promote128_max"] < r["trunc14_mean"]
    assert rows[1]["trunc14_max"] > rows[0]["trunc14_max"]  # massive activations are worse


def test_overflow_wrap_versus_saturate_below_the_bound():
    rows = overflow_figures(m=16, n=16, k=256)
    for cfg in ("W8A8", "W4A8"):
        sel = [r for r in rows if r["config"] == cfg]
        assert sel[0]["needed"] <= sel[0]["l1_bound"] <= sel[0]["a2q_bound"]
        for P in {r["bits"] for r in sel}:
            wrap = next(r for r in sel if r["bits"] == P and r["overflow"] == "wrap")
            sat = next(r for r in sel if r["bits"] == P and r["overflow"] == "saturate")
            assert (wrap["overflow_count"] == 0) == (wrap["rel_error"] == 0.0)
            # saturation degrades gracefully; wrapping errors are far larger once it happens
            if wrap["overflow_count"]:
                assert sat["rel_error"] < wrap["rel_error"]
        narrowest = min(r["bits"] for r in sel)
        assert all(r["overflow_count"] > 0 for r in sel if r["bits"] == narrowest)
