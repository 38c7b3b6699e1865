"""hwsim.matmul against the Python-integer / Fraction reference, bit for bit."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hwsim
import numfmt
from hwsim.gemm import round_to_float_acc
from test_hwsim_reference import reference_matmul, round_fraction

FORMATS = ["mxint8", "mxint6", "mxint4", "mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3",
           "mxfp4", "sint8", "sint4", "fp8_e4m3", "int8", "int4"]


def _block(fmt):
    f = numfmt.get(fmt)
    return getattr(f, "block_size", None)


def _compatible(fa, fb):
    ba, bb = _block(fa), _block(fb)
    return ba is None or bb is None or max(ba, bb) % min(ba, bb) == 0


def _data(rng, rows, k, kind):
    x = rng.standard_normal((rows, k))
    if kind == "positive":
        x = np.abs(x)
    elif kind == "spread":
        x = x * 2.0 ** rng.integers(-20, 20, (rows, 1))
    elif kind == "sparse":
        x = x * (rng.random((rows, k)) < 0.3)
    return x.astype(np.float32)


def _bits_equal(x, y):
    return np.array_equal(np.asarray(x, np.float32).view(np.uint32),
                          np.asarray(y, np.float32).view(np.uint32))


@st.composite
def cases(draw):
    fa = draw(st.sampled_from(FORMATS))
    fb = draw(st.sampled_from([f for f in FORMATS if _compatible(fa, f)]))
    m = draw(st.integers(1, 3))
    n = draw(st.integers(1, 3))
    k = draw(st.integers(1, 80))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    kind = draw(st.sampled_from(["normal", "positive", "spread", "sparse"]))
    acc_kind = draw(st.sampled_from(["exact", "exact", "exact_bits", "wrap", "saturate"]))
    bits = None if acc_kind == "exact" else draw(st.integers(2, 26))
    overflow = "exact" if acc_kind.startswith("exact") else acc_kind
    mant = draw(st.sampled_from([23, 23, 13, 10, 7, 3, 1]))
    rounding = draw(st.sampled_from(["rne", "rtz"]))
    promote = draw(st.sampled_from([None, None, 1, 2, 3]))
    special = draw(st.sampled_from([None, None, None, "nan_scale", "nan_elem"]))
    return dict(fa=fa, fb=fb, m=m, n=n, k=k, seed=seed, kind=kind, bits=bits, overflow=overflow,
                mant=mant, rounding=rounding, promote=promote, special=special)


def _build(c):
    rng = np.random.default_rng(c["seed"])
    a = numfmt.quantize(_data(rng, c["m"], c["k"], c["kind"]), c["fa"], axis=1)
    b = numfmt.quantize(_data(rng, c["n"], c["k"], c["kind"]), c["fb"], axis=1)
    if c["special"] == "nan_scale" and a.format.kind == "block" and a.format.scaling == "mx":
        s = a.scales.copy()
        s[rng.integers(0, s.shape[0]), rng.integers(0, s.shape[1])] = 255
        a = numfmt.QTensor(a.codes, s, a.format, a.axis, a.shape)
    if c["special"] == "nan_elem":
        elem = hwsim.element_of(b.format)
        if getattr(elem, "nan_code", -1) >= 0:
            codes = b.codes.copy()
            codes[rng.integers(0, b.shape[0]), rng.integers(0, b.shape[1])] = elem.nan_code
            b = numfmt.QTensor(codes, b.scales, b.format, b.axis, b.shape)
    return a, b


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_matmul_equals_reference_bit_for_bit(c):
    a, b = _build(c)
    L = hwsim.gemm.sub_block_length(_block(c["fa"]), _block(c["fb"]), c["k"])
    promote = None if c["promote"] is None else c["promote"] * L
    acc = hwsim.Accumulator(c["bits"], c["overflow"])
    ib = hwsim.FloatAcc(c["mant"], c["rounding"], promote)
    try:
        res = hwsim.matmul(a, b, acc=acc, inter_block=ib)
    except ValueError as exc:  # E5M2 x E5M2 (70-bit sums) only runs with the exact accumulator
        assert "handles at most 63" in str(exc) and c["fa"] == c["fb"] == "mxfp8_e5m2"
        return
    out, max_prefix, max_block, count = reference_matmul(
        a, b, bits=c["bits"], overflow=c["overflow"], mantissa_bits=c["mant"],
        rounding=c["rounding"], promote_every=promote)
    assert _bits_equal(res.out, out), (res.path, res.out, out)
    assert res.overflow_count == count
    want = max_prefix if res.prefix_stats else max_block
    assert res.max_abs_acc == want
    assert res.acc_bits_needed == int(want).bit_length() + 1


@pytest.mark.parametrize("fa,fb", [("mxint8", "mxint8"), ("mxfp8_e4m3", "mxfp8_e4m3"),
                                   ("mxfp8_e5m2", "mxfp8_e5m2"), ("mxint4", "mxint8"),
                                   ("sint8", "sint4")])
def test_exact_and_index_order_paths_agree(fa, fb):
    """The BLAS / Python-int exact path and the index-order path give the same bits."""
    rng = np.random.default_rng(3)
    a = numfmt.quantize(_data(rng, 9, 200, "spread"), fa, axis=1)
    b = numfmt.quantize(_data(rng, 7, 200, "spread"), fb, axis=1)
    ib = hwsim.FloatAcc(11, "rtz")
    fast = hwsim.matmul(a, b, inter_block=ib)
    if fa == fb == "mxfp8_e5m2":
        assert fast.path == "python"
        ref = reference_matmul(a[:0] if False else a, b, mantissa_bits=11, rounding="rtz")
        assert _bits_equal(fast.out, ref[0])
        return
    seq = hwsim.matmul(a, b, inter_block=ib, prefix_stats=True)
    assert fast.path.startswith("blas") and seq.path == "sequential"
    assert _bits_equal(fast.out, seq.out)
    assert seq.max_abs_acc >= fast.max_abs_acc


@pytest.mark.parametrize("fa,fb", [("mxint8", "mxint8"), ("mxfp4", "mxint4"),
                                   ("mxfp8_e4m3", "mxfp8_e4m3"), ("sint4", "sint8")])
@pytest.mark.parametrize("ib", [hwsim.FloatAcc(), hwsim.FloatAcc(11, "rtz"),
                                hwsim.FloatAcc(23, "rne", promote_every=64)])
def test_exact_path_output_tiles_equal_reference(fa, fb, ib, monkeypatch):
    """The exact BLAS path works on output tiles (rows x columns, spread over threads);
    with tiny tiles every tile edge, partial tile and thread split is crossed."""
    monkeypatch.setattr(hwsim.gemm, "TILE_ROWS", 3)
    monkeypatch.setattr(hwsim.gemm, "TILE_COLS", 5)
    rng = np.random.default_rng(11)
    a = numfmt.quantize(_data(rng, 7, 150, "spread"), fa, axis=1)
    b = numfmt.quantize(_data(rng, 11, 150, "spread"), fb, axis=1)
    res = hwsim.matmul(a, b, inter_block=ib)
    assert res.path.startswith("blas")
    out, _, max_block, _ = reference_matmul(a, b, mantissa_bits=ib.mantissa_bits,
                                            rounding=ib.rounding, promote_every=ib.promote_every)
    assert _bits_equal(res.out, out)
    assert res.max_abs_acc == max_block


def test_fp32_accumulation_is_float32_addition_of_exact_block_terms():
    """m = 23, rne: the output is the float32 running sum of the exact block values."""
    rng = np.random.default_rng(4)
    a = numfmt.quantize(_data(rng, 5, 256, "normal"), "mxint8", axis=1)
    b = numfmt.quantize(_data(rng, 6, 256, "normal"), "mxint8", axis=1)
    res = hwsim.matmul(a, b)
    da, db = numfmt.dequantize(a).astype(np.float64), numfmt.dequantize(b).astype(np.float64)
    want = np.zeros((5, 6), np.float32)
    for j in range(0, 256, 32):
        want = want + (da[:, j:j + 32] @ db[:, j:j + 32].T).astype(np.float32)  # exact terms
    assert _bits_equal(res.out, want)


def test_mixed_block_sizes_and_element_operands():
    rng = np.random.default_rng(5)
    x = _data(rng, 3, 128, "normal")
    w = _data(rng, 4, 128, "normal")
    a = numfmt.quantize(x, "mxint8", axis=1)
    b = numfmt.quantize(w, "sint4", axis=1)  # block 64 = 2 x 32
    res = hwsim.matmul(a, b)
    assert res.block_length == 32
    assert _bits_equal(res.out, reference_matmul(a, b)[0])
    e = numfmt.quantize(x, "fp8_e4m3", axis=1)
    res = hwsim.matmul(e, numfmt.quantize(w, "fp8_e4m3", axis=1))
    assert res.block_length == 128  # no scales on either side: one block of K


def test_nan_scale_and_nan_element_give_nan_only_where_they_reach():
    rng = np.random.default_rng(6)
    a = numfmt.quantize(_data(rng, 3, 64, "normal"), "mxfp8_e4m3", axis=1)
    b = numfmt.quantize(_data(rng, 2, 64, "normal"), "mxfp8_e4m3", axis=1)
    s = a.scales.copy()
    s[1, 0] = 255
    an = numfmt.QTensor(a.codes, s, a.format, 1, a.shape)
    out = hwsim.matmul(an, b).out
    assert np.isnan(out[1]).all() and np.isfinite(out[[0, 2]]).all()
    codes = b.codes.copy()
    codes[0, 40] = 0x7F  # E4M3 NaN
    bn = numfmt.QTensor(codes, b.scales, b.format, 1, b.shape)
    out = hwsim.matmul(a, bn, acc=hwsim.Accumulator(20, "saturate")).out
    assert np.isnan(out[:, 0]).all() and np.isfinite(out[:, 1]).all()


def test_wrap_is_modular_and_saturate_clamps():
    # all codes at +max: every prefix grows; a 12-bit accumulator must overflow
    a = numfmt.quantize(np.full((1, 32), 1.0, np.float32), "mxint8", axis=1)
    b = numfmt.quantize(np.full((1, 32), 1.0, np.float32), "mxint8", axis=1)
    exact = hwsim.matmul(a, b)
    S = 32 * 64 * 64  # codes are 64 (1.0 = 64 * 2^-6)
    assert exact.max_abs_acc == S and exact.acc_bits_needed == S.bit_length() + 1
    P = 12
    wrap = hwsim.matmul(a, b, acc=hwsim.Accumulator(P, "wrap"))
    sat = hwsim.matmul(a, b, acc=hwsim.Accumulator(P, "saturate"))
    wrapped = ((S + 2 ** (P - 1)) % 2 ** P) - 2 ** (P - 1)
    assert wrap.out[0, 0] == wrapped * 2.0 ** -12
    assert sat.out[0, 0] == (2 ** (P - 1) - 1) * 2.0 ** -12
    # prefix 64*64*k crosses 2047 at k = 1 (4096): every addition saturates
    assert sat.overflow_count == 32
    assert wrap.overflow_count == 32  # each +4096 step is a whole turn of 2^12


@pytest.mark.parametrize("fa,fb,bits", [("mxint8", "mxint8", 14), ("mxint8", "mxint4", 10),
                                        ("mxfp8_e4m3", "mxfp8_e4m3", 30), ("sint8", "sint4", 10)])
@pytest.mark.parametrize("overflow", ["wrap", "saturate", "exact"])
@pytest.mark.parametrize("ib", [hwsim.FloatAcc(), hwsim.FloatAcc(11, "rtz")])
def test_index_order_path_row_groups_equal_reference(fa, fb, bits, overflow, ib):
    """The index-order kernel runs rows in groups sharing each pass over b (float32 lanes
    when every value stays below 2^24, else float64) and folds FP32 sums in float32 when
    that is exact: more rows than a group, a partial last group, against the reference."""
    rng = np.random.default_rng(12)
    a = numfmt.quantize(np.abs(_data(rng, 9, 96, "normal")) + 0.3, fa, axis=1)
    b = numfmt.quantize(_data(rng, 7, 96, "normal") + 0.5, fb, axis=1)
    res = hwsim.matmul(a, b, acc=hwsim.Accumulator(bits, overflow), inter_block=ib)
    assert res.path == "sequential"
    out, max_prefix, _, count = reference_matmul(
        a, b, bits=bits, overflow=overflow, mantissa_bits=ib.mantissa_bits, rounding=ib.rounding)
    assert _bits_equal(res.out, out)
    assert res.overflow_count == count and res.max_abs_acc == max_prefix
    if overflow != "exact" and fa != "mxfp8_e4m3":
        assert count > 0  # the width is below what the data needs: the rule matters


def test_round_to_float_acc_matches_reference_on_edges():
    vals = [1.0 + 2.0 ** -14, 1.0 + 3 * 2.0 ** -14, -(1.0 + 2.0 ** -14), 2.0 ** -130, 3.5e38,
            -3.5e38, 2.0 ** -149, 1.9999999, 65504.0]
    from fractions import Fraction
    for v in vals:
        for m in (1, 13, 23):
            for r in ("rne", "rtz"):
                assert round_to_float_acc(v, m, r) == round_fraction(Fraction(v), m, r == "rtz")


def test_promote_every_must_be_a_block_multiple_and_bad_inputs_are_named():
    a = numfmt.quantize(np.ones((2, 64), np.float32), "mxint8", axis=1)
    b = numfmt.quantize(np.ones((3, 64), np.float32), "mxint8", axis=1)
    with pytest.raises(ValueError, match="promote_every=48"):
        hwsim.matmul(a, b, inter_block=hwsim.FloatAcc(promote_every=48))
    with pytest.raises(ValueError, match="bits=1"):
        hwsim.Accumulator(1, "wrap")
    with pytest.raises(ValueError, match="overflow='clip'"):
        hwsim.Accumulator(16, "clip")
    with pytest.raises(ValueError, match="needs a width"):
        hwsim.Accumulator(None, "saturate")
    with pytest.raises(ValueError, match="rounding='rna'"):
        hwsim.FloatAcc(rounding="rna")
    with pytest.raises(ValueError, match="mantissa_bits=30"):
        hwsim.FloatAcc(mantissa_bits=30)
    with pytest.raises(TypeError, match="QTensor"):
        hwsim.matmul(np.ones((2, 64)), b)
    with pytest.raises(ValueError, match="K"):
        hwsim.matmul(a, numfmt.quantize(np.ones((3, 96), np.float32), "mxint8", axis=1))
    mx = numfmt.get("mxint8")
    col = numfmt.QTensor(np.zeros((64, 2), np.uint8), np.full((2, 2), 127, np.uint8), mx, 0,
                         (64, 2))
    with pytest.raises(ValueError, match="axis"):
        hwsim.matmul(col, b)
    odd = numfmt.QTensor(np.zeros((3, 96), np.uint8), np.full((3, 2), 127, np.uint8),
                         numfmt.get("mxint8", block_size=48), 1, (3, 96))
    a96 = numfmt.QTensor(np.zeros((2, 96), np.uint8), np.full((2, 3), 127, np.uint8), mx, 1,
                         (2, 96))
    with pytest.raises(ValueError, match="do not line up"):
        hwsim.matmul(a96, odd)
    with pytest.raises(ValueError, match="out="):
        hwsim.matmul(a, b, out="fp16")
    with pytest.raises(ValueError, match="nvfp4"):
        hwsim.matmul(numfmt.QTensor(np.zeros((2, 64), np.uint8), np.zeros((2, 4), np.uint8),
                                    numfmt.get("nvfp4"), 1, (2, 64), np.float32(1.0)), b)
    with pytest.raises(TypeError, match="Accumulator"):
        hwsim.matmul(a, b, acc="wrap")
    a4 = numfmt.quantize(np.ones((2, 64), np.float32), "mxint4", axis=1)
    wide = a4.codes.copy()
    wide[1, 40] = 0xF0  # read past the 16-entry decode table: a silent wrong answer before
    with pytest.raises(ValueError, match=r"0xf0 at index \(1, 40\).*0\.\.15"):
        hwsim.matmul(numfmt.QTensor(wide, a4.scales, a4.format, 1, (2, 64)),
                     numfmt.quantize(np.ones((3, 64), np.float32), "mxint4", axis=1))


def test_zero_sized_and_partial_last_block():
    rng = np.random.default_rng(8)
    a = numfmt.quantize(_data(rng, 2, 45, "normal"), "mxint4", axis=1)  # blocks 32 + 13
    b = numfmt.quantize(_data(rng, 3, 45, "normal"), "mxint8", axis=1)
    res = hwsim.matmul(a, b, inter_block=hwsim.FloatAcc(5, "rtz", promote_every=32))
    assert _bits_equal(res.out, reference_matmul(a, b, mantissa_bits=5, rounding="rtz",
                                                 promote_every=32)[0])
    assert math.isfinite(float(res.out.sum()))
