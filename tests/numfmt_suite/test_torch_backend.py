"""numfmt.torch's plain-torch backend == the Numba kernels, bit for bit.

On CPU, ``backend="torch"`` forces the torch implementation, so every comparison runs
here: codes, scales (E8M0 / E4M3 codes, fp16 / bf16 / fp32 scale values), the NVFP4
tensor scale, fake_quantize and dequantize outputs, on the suite's edge matrices, on
hypothesis blocks, on every registered format and every rounding and compat mode. The
same comparisons run on CUDA where there is a GPU (skipped otherwise).
"""
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import numfmt
import numfmt.torch as nft
import numfmt_reference as ref
from numfmt import _kernels as K
from numfmt import _torch_backend as TB
from numfmt.testing import blocks
from test_numfmt_blocks_reference import BLOCK_FORMATS, edge_matrix, fmt_id
from test_numfmt_elements import ELEMENT_FORMATS, _finite_inputs, edge_values, random_values
from test_numfmt_microxcaling import PAIRS, edge_blocks

pytestmark = pytest.mark.usefixtures("one_numba_thread")

MODES = ref.ROUNDINGS
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device here")


def same_bits(a, b) -> bool:
    """Identical values bit for bit (float: same bits or both NaN; ints: equal)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.kind == "f":
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        same = (a64 == b64) & (np.signbit(a64) == np.signbit(b64))
        return bool((same | (np.isnan(a64) & np.isnan(b64))).all())
    return bool(np.array_equal(a, b))


def first_diff(x, got, exp) -> str:
    g = np.asarray(got, np.float64).reshape(-1)
    e = np.asarray(exp, np.float64).reshape(-1)
    bad = np.flatnonzero(~(((g == e) & (np.signbit(g) == np.signbit(e)))
                           | (np.isnan(g) & np.isnan(e))))
    i = bad[:3]
    xf = np.asarray(x, np.float64).reshape(-1)
    xs = xf[i].tolist() if xf.size == g.size else "-"
    return f"{bad.size} differ, first at {i.tolist()}: x={xs} torch={g[i].tolist()} numba={e[i].tolist()}"


def assert_backends_equal(x, fmt, mode="rne", *, axis=-1, seed=5, compat="ocp", device="cpu"):
    """The torch backend on ``device`` == the Numba path on the CPU, for quantize (codes,
    scales, tensor scale), fake_quantize (float32 and the input dtype) and dequantize."""
    kw = dict(axis=axis, rounding=mode, seed=seed, compat=compat)
    qn = numfmt.quantize(x, fmt, **kw)
    fn = numfmt.fake_quantize(x, fmt, **kw)
    t = torch.from_numpy(np.array(x, copy=True)).to(device)  # (ascontiguousarray makes 0-d 1-d)
    qt = nft.quantize(t, fmt, backend="torch", **kw)
    ft = nft.fake_quantize(t, fmt, backend="torch", **kw)
    assert ft.device == t.device and ft.dtype == t.dtype and tuple(ft.shape) == np.shape(x)
    assert qt.codes.dtype == qn.codes.dtype and qt.axis == qn.axis and qt.shape == qn.shape
    assert same_bits(qt.codes, qn.codes), "codes: " + first_diff(x, qt.codes, qn.codes)
    if qn.scales is None:
        assert qt.scales is None
    else:
        assert qt.scales.dtype == qn.scales.dtype
        if qn.scales.dtype == np.uint8:  # E8M0 / E4M3 scale codes
            assert same_bits(qt.scales, qn.scales), "scales: " + first_diff(None, qt.scales,
                                                                           qn.scales)
        else:  # scale values in fp16 / bf16 / fp32 (ml_dtypes' bfloat16 is not kind "f")
            s_t, s_n = qt.scales.astype(np.float64), qn.scales.astype(np.float64)
            assert same_bits(s_t, s_n), "scales: " + first_diff(None, s_t, s_n)
    if qn.tensor_scale is not None:
        assert np.float32(qt.tensor_scale).view(np.uint32) == np.float32(qn.tensor_scale).view(np.uint32)
    if wide_decode_bug(fmt):
        # numfmt.decode reads every code wider than 16 bits as a float32 bit pattern,
        # which is right for fp32 only (tf32's 19-bit codes came out as tiny subnormals
        # when this test was written): compare with the reference's decode of the codes
        fn = np.asarray(ref.decode(qn.codes, numfmt.get(fmt)), np.float64).astype(np.float32)
    got = ft.cpu().to(torch.float32).numpy() if t.dtype != torch.float64 else ft.cpu().numpy()
    want = fn if t.dtype != torch.float64 else fn.astype(np.float64)
    assert same_bits(got, want), "fake_quantize: " + first_diff(x, got, want)
    dq = nft.dequantize(qn, device=device, backend="torch")
    assert dq.device == t.device and dq.dtype == torch.float32
    dn = fn if wide_decode_bug(fmt) else numfmt.dequantize(qn)
    assert same_bits(dq.cpu().numpy(), dn), "dequantize: " + first_diff(x, dq.cpu().numpy(), dn)


def wide_decode_bug(fmt) -> bool:
    """An element format of 17..31 bits (tf32): numfmt.decode views its codes as float32."""
    fmt = numfmt.get(fmt)
    return fmt.kind == "float" and 16 < fmt.bits < 32


# ---------------------------------------------------------------------------
# block formats: the suite's edge matrices, every mode; float64 inputs; axes
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", BLOCK_FORMATS, ids=fmt_id)
def test_block_formats_edges_every_mode(fmt):
    x = edge_matrix(fmt)
    for mode in MODES:
        assert_backends_equal(x, fmt, mode)


@pytest.mark.parametrize("fmt", BLOCK_FORMATS, ids=fmt_id)
def test_block_formats_float64_and_other_axis(fmt):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 70)) * np.exp2(rng.integers(-9, 9, (3, 70)))
    x = x + rng.uniform(-1, 1, x.shape) * 2.0 ** -30  # more than 24 significant bits
    x[0, 0] = 2.0 ** 130
    x[0, 1] = 2.0 ** -1070   # scaled values below float64's subnormals
    x[1, 2] = -(2.0 ** -1074)
    x[2, 3] = 1e39           # beyond float32 (NVFP4 reads it as Inf)
    for mode in ("rne", "rup", "rdn", "rtz", "stochastic"):
        assert_backends_equal(x, fmt, mode, seed=3)
    x3 = np.moveaxis(edge_matrix(fmt)[:6].reshape(6, -1, 1), 1, 0).copy()  # (L, 6, 1)
    assert_backends_equal(x3, fmt, "rne", axis=0)
    assert_backends_equal(x3, fmt, "stochastic", axis=-3, seed=11)


@pytest.mark.parametrize("elem,name", PAIRS)
def test_microxcaling_compat_edges(elem, name):
    x = edge_blocks(name)
    for mode in ("rne", "rna", "rtz"):
        assert_backends_equal(x, numfmt.get(name), mode, compat="microxcaling")
    assert_backends_equal(x[:, :77].copy(), numfmt.get(name, block_size=16), "rne",
                          compat="microxcaling")
    assert_backends_equal(x.astype(np.float64), numfmt.get(name), "rna", compat="microxcaling")


def test_microxcaling_log2f_table_equals_the_kernel():
    """floor(float32(log2 a)) from the threshold table == the kernel's log2f_floor at
    every threshold, one below it, and at each binade's ends (every float32 exponent)."""
    thr = TB._log2f_thresholds_np()
    bits = set()
    for i, e in enumerate(range(-149, 128)):
        lo = TB._f32_bits(math.ldexp(1.0, e))
        hi = TB._f32_bits(math.ldexp(1.0, e + 1)) if e < 127 else 0x7F800000
        bits.update(b for b in (lo, int(thr[i]) - 1, int(thr[i]), int(thr[i]) + 1, hi - 1)
                    if lo <= b < hi)
    b = np.array(sorted(bits), np.uint32)
    a = b.view(np.float32).astype(np.float64)
    got = TB.log2f_floor(torch.from_numpy(a)).numpy()
    want = np.array([K.log2f_floor(float(v)) for v in a])
    assert np.array_equal(got, want), a[got != want][:5]
    assert (thr < 0x7F800000).sum() > 200  # most binades do round up near their top


def test_stochastic_hash_equals_documented_splitmix():
    idx = np.array([0, 1, 2, 31, 2 ** 31 - 1, 2 ** 31, 2 ** 40 + 7, 2 ** 62], np.int64)
    for seed in (0, 1, 11, 2 ** 40, 2 ** 63 - 1):
        got = TB.hash_u32(seed, torch.from_numpy(idx)).numpy()
        assert got.tolist() == [ref.hash_u32(seed, int(i)) for i in idx]


# ---------------------------------------------------------------------------
# element formats and every registered format
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ELEMENT_FORMATS, ids=lambda f: f.name + ("" if getattr(
    f, "saturating", True) else "_nonsat"))
def test_element_formats_every_mode(fmt):
    base = fmt if fmt.kind == "int" or fmt.bits <= 8 else numfmt.get("fp8_e5m2")
    x = np.concatenate([edge_values(base), random_values(300, 3, -12, 12),
                        np.float32([np.inf, -np.inf, np.nan, -0.0, 0.0, 3e38, -1e-45])])
    x = _finite_inputs(fmt, x)
    for mode in MODES:
        assert_backends_equal(x, fmt, mode, seed=11)
        assert_backends_equal(x.astype(np.float64)[::3], fmt, mode, seed=11)


@pytest.mark.parametrize("name", numfmt.formats())
def test_every_registered_format(name):
    """Every name in the registry (new formats included: the implementation reads only
    the format's parameters), RNE and stochastic, float32 with zeros, ties and specials."""
    fmt = numfmt.get(name)
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((4, 96)) * np.exp2(rng.integers(-12, 12, (4, 96)))).astype(np.float32)
    x[0, :40] = 0.0
    x[0, 1] = -0.0
    x[1, :8] = np.float32([0.5, 1.5, 2.5, -2.5, 1e-42, -1e-40, 65504.0, 65520.0])
    if fmt.kind == "block":
        x[2, 5], x[3, 70] = np.nan, -np.inf
    else:
        x = _finite_inputs(fmt, x.reshape(-1))
    for mode in ("rne", "stochastic", "rtz"):
        assert_backends_equal(x, fmt, mode, seed=2)


# ---------------------------------------------------------------------------
# hypothesis blocks
# ---------------------------------------------------------------------------
@st.composite
def format_mode_array(draw):
    fmt = draw(st.sampled_from(BLOCK_FORMATS))
    mode = draw(st.sampled_from(MODES))
    return fmt, mode, draw(blocks(fmt, n_blocks=(1, 3)))


@settings(ref.CI, max_examples=80)
@given(format_mode_array(), st.integers(0, 2 ** 40))
def test_hypothesis_blocks(fmt_mode_x, seed):
    fmt, mode, x = fmt_mode_x
    assert_backends_equal(x, fmt, mode, seed=seed)
    if fmt.scaling == "mx" and mode in ("rne", "rna", "rtz"):
        assert_backends_equal(x, fmt, mode, compat="microxcaling")


# ---------------------------------------------------------------------------
# shapes and dtypes
# ---------------------------------------------------------------------------
SOME = ["mxint8", "mxfp4", "mxfp8_e5m2", "sint4", "nvfp4", "int8_channel", "fp8_e4m3", "int4"]


@pytest.mark.parametrize("name", SOME)
def test_empty_zero_dim_and_half_inputs(name):
    fmt = numfmt.get(name)
    for shape, axis in (((0,), -1), ((3, 0), -1), ((0, 32), 0), ((2, 0, 5), 1)):
        assert_backends_equal(np.zeros(shape, np.float32), fmt, axis=axis)
    for v in (3.3, -0.0, 1e-40, -5e6):
        assert_backends_equal(np.array(v, np.float32), fmt)
    t = (torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 3).to(torch.bfloat16)
    for dtype in (torch.bfloat16, torch.float16):
        th = t.to(dtype)
        out = nft.fake_quantize(th, fmt, backend="torch")
        assert out.dtype == dtype
        assert torch.equal(out, torch.from_numpy(numfmt.fake_quantize(th.float().numpy(), fmt)).to(dtype))


def test_out_argument_and_auto_backend():
    x = torch.from_numpy(edge_matrix(numfmt.get("mxint4")))
    want = numfmt.fake_quantize(x.numpy(), "mxint4")
    for backend in (None, "numba", "torch"):
        out = torch.full_like(x, 7.0)
        assert nft.fake_quantize(x, "mxint4", backend=backend, out=out) is out
        assert same_bits(out.numpy(), want)
        xi = x.clone()
        nft.fake_quantize(xi, "mxint4", backend=backend, out=xi)
        assert same_bits(xi.numpy(), want)
    assert nft.resolve_backend(None, "cpu") == "numba"
    assert nft.resolve_backend(None, "meta") == "torch"


# ---------------------------------------------------------------------------
# straight-through gradient
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mxint4", "mxfp4", "sint4", "nvfp4", "fp8_e4m3"])
def test_ste_gradient_is_identity(name):
    t = torch.randn(3, 64, generator=torch.Generator().manual_seed(1)) * 10
    t[0, 0] = 1e6  # saturating values pass the gradient too
    t.requires_grad_(True)
    w = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    y = nft.fake_quantize(t, name, backend="torch")
    assert y.requires_grad
    (y * w).sum().backward()
    assert torch.equal(t.grad, w)
    assert torch.equal(y.detach(), nft.fake_quantize(t.detach(), name, backend="numba"))


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------
def test_bad_backend_device_and_out():
    x = torch.ones(4, 32)
    with pytest.raises(ValueError, match="'cupy'"):
        nft.fake_quantize(x, "mxint8", backend="cupy")
    meta = torch.empty(4, 32, device="meta")
    with pytest.raises(ValueError, match="meta"):
        nft.fake_quantize(meta, "mxint8", backend="numba")
    with pytest.raises(ValueError, match="meta"):
        nft.quantize(meta, "mxint8", backend="numba")
    with pytest.raises(ValueError, match=r"cpu.*meta"):  # mixed devices name both
        nft.fake_quantize(x, "mxint8", out=meta)
    with pytest.raises(TypeError, match="float64"):
        nft.fake_quantize(x, "mxint8", out=torch.empty(4, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(4, 31\)"):
        nft.fake_quantize(x, "mxint8", out=torch.empty(4, 31))
    with pytest.raises(ValueError, match="requires grad"):
        nft.fake_quantize(x.clone().requires_grad_(True), "mxint8", out=torch.empty(4, 32))
    with pytest.raises(TypeError, match="int64"):
        nft.fake_quantize(torch.ones(4, dtype=torch.int64), "mxint8", backend="torch")
    with pytest.raises(ValueError, match="meta"):
        nft.dequantize(numfmt.quantize(np.ones(32, np.float32), "mxint8"), device="meta",
                       backend="numba")


@pytest.mark.parametrize("kw,err,match", [
    (dict(rounding="nearest"), ValueError, "'nearest'"),
    (dict(rounding="stochastic"), ValueError, "seed"),
    (dict(compat="gfloat"), ValueError, "'gfloat'"),
    (dict(compat="microxcaling", rounding="rup"), ValueError, "rup"),
    (dict(axis=2), ValueError, "axis=2"),
    (dict(axis=1.0), TypeError, "axis"),
])
def test_torch_backend_refuses_what_numba_refuses(kw, err, match):
    x = torch.ones(2, 32)
    for fn in (nft.quantize, nft.fake_quantize):
        with pytest.raises(err, match=match):
            fn(x, "mxint8", backend="torch", **kw)
        with pytest.raises(err, match=match):
            fn(x, "mxint8", backend="numba", **kw)


def test_element_refusals_match_numba():
    with pytest.raises(ValueError, match="NaN"):
        nft.quantize(torch.tensor([float("nan")]), "fp4_e2m1", backend="torch")
    with pytest.raises(ValueError, match="inf"):
        nft.fake_quantize(torch.tensor([float("inf")]), "int8", backend="torch")
    with pytest.raises(ValueError, match="unsigned"):
        nft.quantize(torch.tensor([-2.0]), "e8m0", backend="torch")
    with pytest.raises(ValueError, match="microxcaling"):
        nft.quantize(torch.ones(32), "sint4", compat="microxcaling", backend="torch")


# ---------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ---------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("fmt", BLOCK_FORMATS, ids=fmt_id)
def test_cuda_equals_numba_on_edges(fmt):
    x = edge_matrix(fmt)
    for mode in MODES:
        assert_backends_equal(x, fmt, mode, device="cuda")
    if fmt.scaling == "mx":
        assert_backends_equal(x, fmt, "rne", compat="microxcaling", device="cuda")


@needs_cuda
def test_cuda_auto_backend_and_gradient():
    x = torch.from_numpy(edge_matrix(numfmt.get("mxfp4"))).cuda().requires_grad_(True)
    y = nft.fake_quantize(x, "mxfp4")  # backend None: torch on a CUDA tensor
    assert y.device == x.device
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert same_bits(y.detach().cpu().numpy(),
                     numfmt.fake_quantize(x.detach().cpu().numpy(), "mxfp4"))
    with pytest.raises(ValueError, match="cuda"):
        nft.fake_quantize(x.detach(), "mxfp4", out=torch.empty(x.shape))


COMPILE_ON_CPU = os.environ.get("NUMFMT_TEST_COMPILE") == "1"


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.skipif(
        not COMPILE_ON_CPU, reason="torch.compile on the CPU takes 20-50 s here; set "
        "NUMFMT_TEST_COMPILE=1 to run it")),
    pytest.param("cuda", marks=needs_cuda)])
def test_compiled_backend_equals_numba(device):
    """backend="compiled" (torch.compile of the same functions) gives the Numba bits on
    the edge matrix: the arithmetic leaves a compiler nothing to contract or reorder.
    One format and two modes only: each compiles for several seconds."""
    fmt = numfmt.get("mxfp4")
    x = edge_matrix(fmt)
    t = torch.from_numpy(x).to(device)
    got = nft.fake_quantize(t, fmt, backend="compiled")
    assert same_bits(got.cpu().numpy(), numfmt.fake_quantize(x, fmt))
    if device == "cuda":
        for name in ("nvfp4", "sint4"):  # the float32 / float64 divisions
            got = nft.fake_quantize(t, name, backend="compiled", rounding="stochastic", seed=1)
            assert same_bits(got.cpu().numpy(), numfmt.fake_quantize(
                x, name, rounding="stochastic", seed=1))


@pytest.mark.parametrize("fmt", [f for f in BLOCK_FORMATS if f.scaling == "mx"], ids=fmt_id)
def test_float32_rne_route_row_by_row(fmt):
    """OCP + RNE on float32 input takes a float32 route when every block of the call is
    inside its exact range, else the float64 one: each edge row alone (most rows in range,
    the rows at scales near 2^-127 not) must still give the Numba bits."""
    x = edge_matrix(fmt)
    routes = set()
    for row in x:
        assert_backends_equal(row[None, :].copy(), fmt, "rne")
        X = torch.from_numpy(numfmt.quantize(row[None, :], fmt).scales.astype(np.int64) - 127)
        routes.add(TB._mx_rne_f32(torch.from_numpy(row[None, :fmt.block_size].copy())[:, None, :],
                                  X[:, :1], X[:, :1] == 128, fmt, False) is None)
    assert routes == {True, False}  # both routes ran
