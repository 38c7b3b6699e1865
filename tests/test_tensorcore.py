"""hwsim.TensorCore: the GPUs' measured outputs bit for bit, the fast path against a slow
Fraction reference, hwsim.matmul through a unit, and bad input.

The measured sets live in tests/data/tensorcore/validation_codes.npz (BSD 2-Clause, (c) 2025
Faizan A. Khattak and Mantas Mikaitis; see the README there). It was written from the
shared validation.npz with the input values stored as their formats' bit patterns::

    fp8 -> ml_dtypes view uint8; fp16 -> np.float16 view uint16;
    bf16 -> float32 bits >> 16 (uint16); tf32 -> float32 bits >> 13 (uint32); c, d float32
"""
from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hwsim
import numfmt
from hwsim.tensorcore import GPUS, INPUTS, TensorCore, preset_table, tensor_core

DATA = Path(__file__).parent / "data" / "tensorcore" / "validation_codes.npz"
NPZ_INPUTS = {"E4M3": "fp8_e4m3", "E5M2": "fp8_e5m2"}


def load_set(key: str):
    """(a, b, c, d) float32 of one measured set GPU/INPUT/OUTPUT."""
    z = np.load(DATA)
    inp = key.split("/")[1]
    raw = {n: z[f"{key}/{n}"] for n in "abcd"}
    out = []
    for n in "ab":
        u = raw[n]
        if inp == "E4M3":
            v = u.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
        elif inp == "E5M2":
            v = u.view(ml_dtypes.float8_e5m2).astype(np.float32)
        elif inp == "fp16":
            v = u.view(np.float16).astype(np.float32)
        elif inp == "bf16":
            v = (u.astype(np.uint32) << 16).view(np.float32)
        else:  # tf32
            v = (u.astype(np.uint32) << 13).view(np.float32)
        out.append(v)
    return out[0], out[1], raw["c"], raw["d"]


def _keys():
    z = np.load(DATA)
    return sorted({k.rsplit("/", 1)[0] for k in z.files})


# ---------------------------------------------------------------------------
# the slow reference: Fractions, straight from the module docstring's equations
# ---------------------------------------------------------------------------
def floor_log2(f: Fraction) -> int:
    """floor(log2(f)) of a positive Fraction, exactly."""
    e = f.numerator.bit_length() - f.denominator.bit_length()
    while Fraction(2) ** e > f:
        e -= 1
    while Fraction(2) ** (e + 1) <= f:
        e += 1
    return e


def ref_round(v: Fraction, m: int, emin: int, emax: int, mode: str, sub: bool = True) -> float:
    """v rounded to m fraction bits, exponents emin..emax with subnormals; +-Inf above."""
    if v == 0:
        return 0.0
    e = max(floor_log2(abs(v)), emin)
    q = Fraction(2) ** (e - m)
    n = abs(v) / q
    n = math.floor(n) if mode == "rtz" else round(n)  # Fraction.__round__: ties to even
    r = n * q
    if r >= Fraction(2) ** (emax + 1):
        return -math.inf if v < 0 else math.inf
    if not sub and 0 < r < Fraction(2) ** emin:
        r = Fraction(0)
    out = float(r)
    return -out if v < 0 else out


def ref_operation(tc: TensorCore, a, b, c, offs_a=None, offs_b=None) -> float:
    """One operation d = TC(a, b, c) (finite inputs). ``offs_*`` are power-of-two scale
    exponents folded into the elements' exponents (hwsim.matmul with MX scales)."""
    fin, fout = tc.input, tc.output
    p = fin.mantissa_bits
    terms = []  # (Fraction value, exponent)
    for k, (x, y) in enumerate(zip(a, b)):
        x, y = Fraction(float(x)), Fraction(float(y))
        oa = int(offs_a[k]) if offs_a is not None else 0
        ob = int(offs_b[k]) if offs_b is not None else 0
        if not tc.subnormal_inputs:
            x = x if abs(x) >= Fraction(2) ** fin.emin else Fraction(0)
            y = y if abs(y) >= Fraction(2) ** fin.emin else Fraction(0)
        if x == 0 or y == 0:
            continue
        ea = max(floor_log2(abs(x)), fin.emin)
        eb = max(floor_log2(abs(y)), fin.emin)
        # the element significands are integers: x = A * 2^(ea - p)
        assert (x / Fraction(2) ** (ea - p)).denominator == 1
        prod = x * y * Fraction(2) ** (oa + ob)
        E = ea + eb + oa + ob
        if not tc.products_denormalized and abs(prod) >= Fraction(2) ** (E + 1):
            E += 1
        terms.append((prod, E))
    cf = Fraction(float(c))
    if not tc.subnormal_outputs and abs(cf) < Fraction(2) ** fout.emin:
        cf = Fraction(0)
    exps = [E for _, E in terms]
    if cf != 0:
        exps.append(max(floor_log2(abs(cf)), -126))
        terms.append((cf, None))
    if not terms:
        return 0.0
    X = max(exps)
    if tc.min_anchor_exponent is not None:
        X = max(X, tc.min_anchor_exponent)
    u = Fraction(2) ** (X - tc.alignment_bits)
    total = 0
    for v, _ in terms:
        t = math.floor(abs(v) / u)
        if tc.sticky_bit:
            t = 2 * t + (1 if abs(v) != t * u else 0)
        total += -t if v < 0 else t
    unit = u / 2 if tc.sticky_bit else u
    return ref_round(total * unit, tc.output_mantissa_bits, fout.emin, fout.emax, tc.rounding,
                     tc.subnormal_outputs)


def ref_dot(tc: TensorCore, a, b, c, promote=None, offs_a=None, offs_b=None) -> float:
    """The chained unit over a row (finite inputs), with optional FP32 promotion."""
    K = len(a)
    n = tc.fma_size
    d = 0.0 if promote else float(c)
    reg = np.float32(c)
    for k0 in range(0, K, n):
        k1 = min(k0 + n, K)
        if math.isinf(d):
            pass  # +-Inf plus finite products stays +-Inf
        else:
            d = ref_operation(tc, a[k0:k1], b[k0:k1], d,
                              None if offs_a is None else offs_a[k0:k1],
                              None if offs_b is None else offs_b[k0:k1])
        if promote and (k1 % promote == 0 or k1 == K):
            with np.errstate(invalid="ignore", over="ignore"):
                reg = np.float32(reg + np.float32(d))
            d = 0.0
    return float(reg) if promote else d


def bits(x):
    return np.asarray(x, dtype=np.float32).view(np.uint32)


# ---------------------------------------------------------------------------
# the GPUs' measured outputs
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("key", _keys())
def test_measured_outputs_bit_for_bit(key):
    gpu, inp, out = key.split("/")
    a, b, c, d = load_set(key)
    assert a.shape[0] == 5000
    tc = tensor_core(gpu, NPZ_INPUTS.get(inp, inp), out)
    got = tc.dot(a, b, c)
    mismatches = int(np.sum(bits(got) != bits(d)))
    assert mismatches == 0, f"{key}: {mismatches} of 5000 outputs differ from the GPU's"


def test_measured_sets_all_present_and_reference_agrees_on_a_sample():
    keys = _keys()
    assert len(keys) == 12  # V100 fp16 x2, A100 fp16 x2 / bf16 / tf32, H100 x6
    for key in keys:
        gpu, inp, out = key.split("/")
        a, b, c, d = load_set(key)
        tc = tensor_core(gpu, NPZ_INPUTS.get(inp, inp), out)
        for i in range(0, 5000, 1250):  # the Fraction reference gives the GPU's bits too
            assert bits(ref_dot(tc, a[i], b[i], c[i])) == bits(d[i]), (key, i)


def test_fp8_hopper_keeps_14_bits_and_a_plain_fp32_model_would_not_match():
    """The measured H100 FP8 outputs need the 13-fraction-bit alignment and result: the
    same unit with FP32's full 23 bits (extra 0, result 23) disagrees on most rows."""
    a, b, c, d = load_set("H100/E4M3/fp32")
    tc = tensor_core("H100", "fp8_e4m3")
    assert tc.significant_bits == 14 and tc.alignment_bits == 13
    full = TensorCore("H100", "fp8_e4m3", "fp32", fma_size=32, extra_alignment_bits=0)
    wrong = int(np.sum(bits(full.dot(a, b, c)) != bits(d)))
    assert wrong > 1000
    # and the result's low 10 fraction bits are always zero on the GPU
    assert np.all(bits(d) & 0x3FF == 0)


# ---------------------------------------------------------------------------
# fast path == slow reference (hypothesis)
# ---------------------------------------------------------------------------
def _values(fmt, data, n, *, exps):
    """n values of ``fmt``: integer significands at exponents drawn from ``exps``
    (subnormals and zeros included)."""
    f = numfmt.get(fmt)
    p = f.mantissa_bits
    out = []
    for _ in range(n):
        kind = data.draw(st.sampled_from(["normal", "normal", "normal", "sub", "zero"]))
        sign = data.draw(st.sampled_from([1.0, -1.0]))
        if kind == "zero":
            out.append(0.0)
        elif kind == "sub" and f.subnormals:
            m = data.draw(st.integers(1, (1 << p) - 1)) if p else 0
            out.append(sign * math.ldexp(m, f.emin - p))
        else:
            e = data.draw(exps)
            m = data.draw(st.integers(1 << p, (2 << p) - 1))
            v = math.ldexp(m, e - p)
            out.append(sign * min(v, f.max_normal))
    return out


@st.composite
def units(draw):
    if draw(st.booleans()):
        tc = draw(st.sampled_from(preset_table()))
        return tc
    inp = draw(st.sampled_from(INPUTS))
    out = draw(st.sampled_from(("fp32", "fp16")))
    fma = draw(st.integers(1, 40))
    extra = draw(st.integers(-12, 12))  # F = 23 + extra: both sides of the int32 path (F <= 29)
    full = 23 if out == "fp32" else 10
    rm = draw(st.one_of(st.none(), st.integers(max(1, full - 12), full)))
    return TensorCore("custom", inp, out, fma_size=fma, extra_alignment_bits=extra,
                      rounding=draw(st.sampled_from(("rtz", "rne"))), result_mantissa_bits=rm,
                      sticky_bit=draw(st.booleans()),
                      products_denormalized=draw(st.booleans()),
                      min_anchor_exponent=draw(st.one_of(st.none(), st.integers(-140, -10))),
                      subnormal_inputs=draw(st.booleans()),
                      subnormal_outputs=draw(st.booleans()))


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(units(), st.data())
def test_fast_path_equals_reference(tc, data):
    fin, fout = tc.input, tc.output
    rows = data.draw(st.integers(1, 3))
    K = data.draw(st.integers(1, 2 * tc.fma_size + 3))
    # exponents: a narrow window (products span the alignment window: partial truncation,
    # whole terms shifted out) or the whole range including the subnormal end
    lo = data.draw(st.integers(fin.emin, fin.emax))
    width = data.draw(st.sampled_from([0, 3, tc.alignment_bits // 2 + 1, tc.alignment_bits + 4,
                                       fin.emax - fin.emin]))
    exps = st.integers(lo, min(lo + width, fin.emax))
    a = np.array([_values(fin.name, data, K, exps=exps) for _ in range(rows)])
    b = np.array([_values(fin.name, data, K, exps=exps) for _ in range(rows)])
    if K >= 2 and data.draw(st.booleans()):  # cancellation: pairs of equal and opposite products
        a[:, 1::2] = -a[:, 0:K - 1:2][:, :a[:, 1::2].shape[1]]
        b[:, 1::2] = b[:, 0:K - 1:2][:, :b[:, 1::2].shape[1]]
    c = np.array(_values(fout.name, data, rows,
                         exps=st.integers(max(fout.emin, -30), min(fout.emax, 30))))
    if data.draw(st.booleans()):  # an addend that nearly cancels the first chunk
        for i in range(rows):
            s = float(np.dot(a[i, :tc.fma_size], b[i, :tc.fma_size]))
            with np.errstate(over="ignore"):
                c[i] = float(np.float16(-s)) if fout.name == "fp16" else float(np.float32(-s))
            if not math.isfinite(c[i]):
                c[i] = 0.0
    promote = None
    if data.draw(st.booleans()):
        promote = tc.fma_size * data.draw(st.integers(1, 3))
    got = tc.dot(a, b, c, promote_every=promote)
    want = np.array([ref_dot(tc, a[i], b[i], c[i], promote) for i in range(rows)],
                    dtype=np.float32)
    assert np.array_equal(bits(got), bits(want)), (tc, a, b, c, got, want)


def test_truncation_drops_what_the_window_cannot_hold():
    """By hand: V100 fp16 (F = 23 fraction bits below the anchor 2^0): the product 2^-24
    sits one bit below the window and is lost; A100 (F = 24) keeps it."""
    a = np.array([[1.0, 2.0 ** -12, 0.0, 0.0]])
    b = np.array([[1.0, 2.0 ** -12, 0.0, 0.0]])
    v = tensor_core("V100").dot(a, b)[0]
    assert v == 1.0  # 2^-24 truncated away (RZ would keep nothing below 2^-23 anyway)
    c = np.array([2.0 ** -23 * 1.5], dtype=np.float32)  # c = 1.5 ulp: split by the window
    v = tensor_core("V100").dot(a, b, c)[0]
    assert v == np.float32(1.0 + 2.0 ** -23)  # 1.5 ulp + 0.5 ulp: the 0.5 ulp parts are lost
    w = tensor_core("A100").dot(a, b, c)[0]
    assert w == np.float32(1.0 + 2.0 ** -22)  # F = 24 keeps both halves: 2 ulp exactly


def test_specials_follow_ieee():
    tc = tensor_core("H100", "fp16")
    a = np.array([[np.inf, 1.0], [np.inf, 1.0], [np.nan, 1.0], [np.inf, -np.inf], [65504.0] * 2])
    b = np.array([[1.0, 1.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.0], [65504.0] * 2])
    d = tc.dot(a, b)
    assert d[0] == np.inf and np.isnan(d[1]) and np.isnan(d[2]) and np.isnan(d[3])
    assert d[4] == np.float32(65504.0 ** 2 * 2)  # finite in FP32
    h = tensor_core("H100", "fp16", "fp16").dot(a[4:], b[4:])
    assert h[0] == np.inf  # overflows the FP16 output
    # an FP32 running sum that overflows stays Inf over the following chunks
    big = np.full((1, 32), 65504.0)
    e5 = tensor_core("V100", "fp16", "fp16")
    assert e5.dot(big, big)[0] == np.inf


def test_promotion_matches_deepseek_scheme():
    """promote_every=N: the unit restarts from +0 every N products and its partial sums
    are added in FP32 (RNE); on positive data the error shrinks."""
    rng = np.random.default_rng(3)
    a = numfmt.fake_quantize(np.abs(rng.standard_normal((64, 1024))).astype(np.float32),
                             "fp8_e4m3")
    b = numfmt.fake_quantize(np.abs(rng.standard_normal((64, 1024))).astype(np.float32),
                             "fp8_e4m3")
    exact = np.sum(a.astype(np.float64) * b, axis=1)
    tc = tensor_core("H100", "fp8_e4m3")
    plain = np.abs(tc.dot(a, b) - exact) / exact
    prom = np.abs(tc.dot(a, b, promote_every=128) - exact) / exact
    assert prom.mean() < plain.mean() / 3
    assert 1e-4 < plain.mean() < 2e-2
    i = 5
    assert bits(tc.dot(a[i:i + 1], b[i:i + 1], promote_every=128))[0] == bits(
        ref_dot(tc, a[i], b[i], 0.0, 128))


# ---------------------------------------------------------------------------
# hwsim.matmul through a unit
# ---------------------------------------------------------------------------
def test_matmul_with_tensorcore_equals_dot_and_reference():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 96)).astype(np.float32) * 4
    w = rng.standard_normal((3, 96)).astype(np.float32)
    tc = tensor_core("H100", "fp8_e4m3")
    qa = numfmt.quantize(x, "fp8_e4m3", axis=1)
    qb = numfmt.quantize(w, "fp8_e4m3", axis=1)
    r = hwsim.matmul(qa, qb, inter_block=tc)
    assert r.path == "tensorcore" and r.out.dtype == np.float32
    da, db = numfmt.dequantize(qa), numfmt.dequantize(qb)
    for m in range(5):
        for n in range(3):
            assert bits(r.out[m, n]) == bits(tc.dot(da[m:m + 1], db[n:n + 1])[0])
    # MX scales fold into the exponents: the reference with the scale exponents
    qa = numfmt.quantize(x * 1e3, "mxfp8_e4m3", axis=1)
    qb = numfmt.quantize(w * 1e-4, "mxfp8_e4m3", axis=1)
    for promote in (None, 64):
        r = hwsim.matmul(qa, qb, inter_block=tc, promote_every=promote)
        ea = numfmt.decode(qa.codes, "fp8_e4m3").astype(np.float64)
        eb = numfmt.decode(qb.codes, "fp8_e4m3").astype(np.float64)
        sa = np.repeat(qa.scales.astype(np.int64) - 127, 32, axis=1)
        sb = np.repeat(qb.scales.astype(np.int64) - 127, 32, axis=1)
        for m in range(5):
            for n in range(3):
                want = ref_dot(tc, ea[m], eb[n], 0.0, promote, sa[m], sb[n])
                assert bits(r.out[m, n]) == bits(want), (m, n, promote)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_gemm_fp32_element_path_equals_scaled_path_and_reference(data):
    """The GEMM on unscaled FP32 elements with the chunk's scales folded into its anchor
    and scale (FP8 / FP16 inputs) equals the general float64 path and the Fraction
    reference, over scales from 2^-127 to 2^127, subnormals, zeros and cancellation."""
    import hwsim.tensorcore as htc
    fp32_units = [t for t in preset_table() if htc._products_f32(t)]
    assert {t.input_format for t in fp32_units} == {"fp8_e4m3", "fp8_e5m2", "fp16"}
    tc = data.draw(st.sampled_from(fp32_units))
    elem = tc.input_format
    M, N = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    K = data.draw(st.integers(1, 80))
    exps = st.integers(tc.input.emin, tc.input.emax)
    ea = np.array([_values(elem, data, K, exps=exps) for _ in range(M)], dtype=np.float32)
    eb = np.array([_values(elem, data, K, exps=exps) for _ in range(N)], dtype=np.float32)
    if K >= 2 and data.draw(st.booleans()):
        eb[:, 1::2] = -eb[:, 0:K - 1:2][:, :eb[:, 1::2].shape[1]]
        ea[:, 1::2] = ea[:, 0:K - 1:2][:, :ea[:, 1::2].shape[1]]
    scaled = elem != "fp16" and data.draw(st.booleans())
    if scaled:
        fmt = numfmt.get("mx" + elem)
        nblk = -(-K // 32)
        codes = st.integers(0, 254)
        sa = np.array([[data.draw(codes) for _ in range(nblk)] for _ in range(M)], np.uint8)
        sb = np.array([[data.draw(codes) for _ in range(nblk)] for _ in range(N)], np.uint8)
        qa = numfmt.QTensor(numfmt.encode(ea, tc.input), sa, fmt, 1, (M, K))
        qb = numfmt.QTensor(numfmt.encode(eb, tc.input), sb, fmt, 1, (N, K))
        offa = np.repeat(sa.astype(np.int64) - 127, 32, axis=1)[:, :K]
        offb = np.repeat(sb.astype(np.int64) - 127, 32, axis=1)[:, :K]
    else:
        qa = numfmt.quantize(ea, elem, axis=1)
        qb = numfmt.quantize(eb, elem, axis=1)
        offa = np.zeros((M, K), np.int64)
        offb = np.zeros((N, K), np.int64)
    promote = tc.fma_size * data.draw(st.integers(1, 3)) if data.draw(st.booleans()) else None
    assert htc._gemm_f32(tc, qa.format)
    fast = hwsim.matmul(qa, qb, inter_block=tc, promote_every=promote).out
    orig = htc._gemm_f32
    htc._gemm_f32 = lambda *args: False
    try:
        general = hwsim.matmul(qa, qb, inter_block=tc, promote_every=promote).out
    finally:
        htc._gemm_f32 = orig
    assert np.array_equal(bits(fast), bits(general)), (tc, fast, general)
    for m in range(M):
        for n in range(N):
            want = ref_dot(tc, ea[m], eb[n], 0.0, promote, offa[m], offb[n])
            assert bits(fast[m, n]) == bits(np.float32(want)), (tc, m, n, fast[m, n], want)


def test_matmul_tensorcore_specials_and_errors():
    tc = tensor_core("H100", "fp8_e4m3")
    x = np.ones((2, 64), dtype=np.float32)
    qa = numfmt.quantize(x, "mxfp8_e4m3", axis=1)
    scales = qa.scales.copy()
    scales[1, 0] = 255  # a NaN E8M0 scale poisons row 1 only
    qa = numfmt.QTensor(qa.codes, scales, qa.format, qa.axis, qa.shape)
    qb = numfmt.quantize(x, "mxfp8_e4m3", axis=1)
    out = hwsim.matmul(qa, qb, inter_block=tc).out
    assert out[0, 0] == 64.0 and np.isnan(out[1]).all()
    with pytest.raises(ValueError, match="fp8_e4m3"):
        hwsim.matmul(numfmt.quantize(x, "mxint8", axis=1), qb, inter_block=tc)
    h = numfmt.quantize(x * 0.5, "fp16", axis=1)  # an element format: no scales
    assert np.all(hwsim.matmul(h, h, inter_block=tensor_core("A100")).out == 16.0)
    with pytest.raises(ValueError, match="multiple"):
        hwsim.matmul(qa, qb, inter_block=tc, promote_every=48)
    with pytest.raises(ValueError, match="acc="):
        hwsim.matmul(qa, qb, inter_block=tc, acc=hwsim.Accumulator(16, "wrap"))
    with pytest.raises(ValueError, match="FloatAcc"):
        hwsim.matmul(qa, qb, promote_every=128)


# ---------------------------------------------------------------------------
# presets and bad input
# ---------------------------------------------------------------------------
def test_presets_cover_the_gpus_with_their_published_parameters():
    assert {tc.gpu for tc in preset_table()} == set(GPUS)
    assert tensor_core("Ada", "fp8_e5m2") == tensor_core("L40S", "fp8_e5m2")
    got = {g: (tensor_core(g).fma_size, tensor_core(g).extra_alignment_bits) for g in GPUS}
    assert got == {"V100": (4, 0), "A100": (8, 1), "A2": (8, 1), "A30": (8, 1),
                   "L40S": (8, 1), "H100": (16, 2), "H200": (16, 2), "B200": (16, 2)}
    assert tensor_core("B200", "fp8_e4m3").significant_bits == 24  # Blackwell: full FP32
    assert tensor_core("L40S", "fp8_e4m3").fma_size == 16
    assert tensor_core("H100", "fp8_e4m3", "fp16").rounding == "rne"
    for tc in preset_table():
        assert tc.source and tc.carry_bits >= 1
        assert tc.rounding == ("rne" if tc.output_format == "fp16" else "rtz")


def test_tf32_is_a_numfmt_format():
    f = numfmt.get("tf32")
    assert (f.exponent_bits, f.mantissa_bits, f.bias, f.bits) == (8, 10, 127, 19)
    assert f.emax == 127 and f.max_normal == (2 - 2 ** -10) * 2.0 ** 127


def test_bad_input_is_a_clear_value_error():
    with pytest.raises(ValueError, match=r"unknown GPU 'P100'; known: V100, A100"):
        tensor_core("P100")
    with pytest.raises(ValueError, match=r"unknown input format 'fp6'.*fp16, bf16, tf32"):
        tensor_core("H100", "fp6")
    with pytest.raises(ValueError, match=r"unknown output format 'bf16'.*fp32, fp16"):
        tensor_core("H100", "fp16", "bf16")
    with pytest.raises(ValueError, match="V100 tensor cores do not take bf16"):
        tensor_core("V100", "bf16")
    with pytest.raises(ValueError, match="no fp16 output"):
        tensor_core("A100", "tf32", "fp16")
    with pytest.raises(ValueError, match="fma_size=0"):
        TensorCore("x", "fp16", fma_size=0)
    tc = tensor_core("H100", "fp8_e4m3")
    a = np.ones((2, 8))
    a[1, 3] = 0.1
    with pytest.raises(ValueError, match=r"a\[1, 3\] = 0.1 is not representable in fp8_e4m3"):
        tc.dot(a, np.ones((2, 8)))
    b = np.ones((2, 8))
    b[0, 5] = 480.0  # above E4M3's 448
    with pytest.raises(ValueError, match=r"b\[0, 5\] = 480.0 is not representable"):
        tc.dot(np.ones((2, 8)), b)
    with pytest.raises(ValueError, match=r"c\[1\] = 0.1 is not representable in fp32"):
        tc.dot(np.ones((2, 8)), np.ones((2, 8)), np.array([0.0, 0.1]))
    with pytest.raises(ValueError, match=r"a is \(2, 8\) and b is \(2, 7\)"):
        tc.dot(np.ones((2, 8)), np.ones((2, 7)))
    with pytest.raises(ValueError, match=r"c has shape \(3,\)"):
        tc.dot(np.ones((2, 8)), np.ones((2, 8)), np.zeros(3))
    with pytest.raises(ValueError, match="2-D"):
        tc.dot(np.ones(8), np.ones(8))
    with pytest.raises(ValueError, match="multiple of the unit's fma_size 32"):
        tc.dot(np.ones((2, 8)), np.ones((2, 8)), promote_every=20)
    with pytest.raises(ValueError, match="not representable in fp8_e4m3"):
        tc.dot(np.full((1, 2), np.inf), np.ones((1, 2)))  # E4M3 has no Inf


def test_tf32_operands_through_numfmt_decode():
    """TF32's 19-bit codes go through numfmt.decode (which once read them as FP32 bit
    patterns, 0.126 -> 1.8e-40): round_to_input equals float32 rounded to 10 fraction
    bits by integer arithmetic, and a tf32 QTensor GEMM equals dot and the reference."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((4, 24)) * np.exp2(rng.integers(-20, 20, (4, 24)))).astype(np.float32)
    u = x.view(np.uint32).astype(np.int64)
    q, rem = u >> 13, u & 0x1FFF
    q += (rem > 0x1000) | ((rem == 0x1000) & (q & 1 == 1))
    want = (q << 13).astype(np.uint32).view(np.float32)
    got = hwsim.tensorcore.round_to_input(x, "tf32")
    assert np.array_equal(bits(got), bits(want))
    tc = tensor_core("A100", "tf32")
    qa = numfmt.quantize(x, "tf32", axis=1)
    qb = numfmt.quantize(x[::-1].copy(), "tf32", axis=1)
    r = hwsim.matmul(qa, qb, inter_block=tc)
    da, db = numfmt.dequantize(qa), numfmt.dequantize(qb)
    assert np.array_equal(bits(da), bits(want)) and np.abs(da).min() > 0
    for m in range(4):
        for n in range(4):
            assert bits(r.out[m, n]) == bits(tc.dot(da[m:m + 1], db[n:n + 1])[0])
            assert bits(r.out[m, n]) == bits(np.float32(ref_dot(tc, da[m].astype(np.float64),
                                                                 db[n].astype(np.float64), 0.0)))
