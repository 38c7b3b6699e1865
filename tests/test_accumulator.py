"""Accumulator widths: A2Q worst case, exact fixed-point widths, l1 bound, observed, tables."""
from __future__ import annotations

import numpy as np
import pytest

import hwsim
import numfmt
from hwsim.accumulator import (accumulator_bits, accumulator_table, block_length, l1_bound_bits,
                               observed_bits, width_bits, worst_case_bits)


@pytest.mark.parametrize("a,b,k,bits", [("mxint8", "mxint8", 32, 21), ("mxint8", "mxint4", 32, 17),
                                        ("int8", "int8", 32, 21), ("fp4_e2m1", "fp4_e2m1", 1, 9),
                                        ("mxfp4", "mxfp4", 32, 14),
                                        ("fp8_e4m3", "fp8_e4m3", 1, 37),
                                        ("mxfp8_e4m3", "mxfp8_e4m3", 32, 42)])
def test_worst_case_matches_the_published_numbers(a, b, k, bits):
    assert worst_case_bits(a, b, k) == bits


def test_worst_case_is_reached_by_max_codes_and_never_exceeded():
    for fa, fb in (("mxint8", "mxint8"), ("mxint8", "mxint4"), ("mxfp4", "mxfp4"),
                   ("mxfp8_e4m3", "mxfp6_e2m3")):
        ea, eb = hwsim.element_of(fa), hwsim.element_of(fb)
        a = numfmt.QTensor(np.full((1, 32), ea.max_code, np.uint8), np.full((1, 1), 127, np.uint8),
                           numfmt.get(fa), 1, (1, 32))
        b = numfmt.QTensor(np.full((1, 32), eb.max_code, np.uint8), np.full((1, 1), 127, np.uint8),
                           numfmt.get(fb), 1, (1, 32))
        need = hwsim.matmul(a, b).acc_bits_needed
        assert need <= worst_case_bits(fa, fb, 32)
        if fa.startswith("mxfp"):  # the exact fixed-point width is tight
            assert need == worst_case_bits(fa, fb, 32)


def test_width_bits():
    assert [width_bits(v) for v in (0, 1, 2, 3, 4, 127, 128)] == [1, 2, 3, 3, 4, 8, 9]
    assert width_bits(127.0) == 8
    with pytest.raises(ValueError, match="max_abs"):
        width_bits(-1)


def test_l1_bound_lies_between_observed_and_worst_case():
    rng = np.random.default_rng(0)
    w = numfmt.quantize(rng.standard_normal((16, 256)).astype(np.float32), "mxint4", axis=1)
    x = numfmt.quantize(rng.standard_normal((32, 256)).astype(np.float32), "mxint8", axis=1)
    per = l1_bound_bits(w, "mxint8", per_channel=True)
    assert per.shape == (16,) and per.max() == l1_bound_bits(w, "mxint8")
    obs = observed_bits(x, w)
    prefix = observed_bits(x, w, prefix=True)
    assert obs <= prefix <= l1_bound_bits(w, "mxint8") <= worst_case_bits("mxint8", "mxint4", 32)
    # the l1 bound is attained by the worst activation: sign(w) * max code, per block
    wi = hwsim.gemm.operand_integers(w).ints
    n = int(np.argmax(np.abs(wi).reshape(16, 8, 32).sum(axis=2).max(axis=1)))
    codes = np.where(wi[n] >= 0, 127, (-127) & 0xFF).astype(np.uint8)[None, :]
    xa = numfmt.QTensor(codes, np.full((1, 8), 127, np.uint8), numfmt.get("mxint8"), 1, (1, 256))
    assert observed_bits(xa, w) == l1_bound_bits(w, "mxint8")


def test_accumulator_bits_and_table():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    wq = numfmt.quantize(w, "mxint4", axis=1)
    x = numfmt.quantize(rng.standard_normal((4, 64)).astype(np.float32), "mxint8", axis=1)
    r = accumulator_bits("mxint8", "mxint4", 64, weights=wq, activations=x)
    assert r["block_length"] == 32 and r["worst_case"] == 17
    assert r["observed"] <= r["l1_bound"] <= r["worst_case"]
    rows = accumulator_table([("q", wq), ("k", w)], "mxint8", weight_format="mxint4",
                             activations={"q": x})
    assert [row["layer"] for row in rows] == ["q", "k"]
    assert rows[0]["observed_bits"] == r["observed"] and rows[1]["observed_bits"] is None
    assert rows[1]["l1_bound_bits"] == rows[0]["l1_bound_bits"]  # same weights
    assert block_length("sint4", "mxint8", 128) == 32
    with pytest.raises(ValueError, match="weight_format"):
        accumulator_table([("k", w)], "mxint8")
    with pytest.raises(ValueError, match="weights"):
        accumulator_bits("mxint8", "mxint4", 64, activations=x)
    with pytest.raises(ValueError, match="k=0"):
        worst_case_bits("mxint8", "mxint8", 0)
