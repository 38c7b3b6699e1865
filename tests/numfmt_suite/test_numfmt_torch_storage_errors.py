"""numfmt.torch == the NumPy path; STE gradient; pack/unpack and .bits; bad input."""
import numpy as np
import pytest
import torch

import numfmt
import numfmt.torch as nft
from numfmt.qtensor import QTensor

pytestmark = pytest.mark.usefixtures("one_numba_thread")

NAMES = ["mxint8", "mxint4", "mxfp8_e4m3", "mxfp4", "mxfp6_e2m3", "sint4", "nvfp4",
         "int8_channel", "fp8_e4m3", "int4"]


# ---------------------------------------------------------------------------
# fake_quantize(out=...)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fake_quantize_into_out(name, axis, dtype):
    """out= gets the same bits as a fresh result, is returned, and may alias x."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((5, 70)) * np.exp2(rng.integers(-9, 9, (5, 70)))).astype(dtype)
    x[1, :32] = 0.0
    if numfmt.get(name).kind == "block":
        x[2, 3] = np.nan  # (integer element formats refuse NaN)
    ref = numfmt.fake_quantize(x, name, axis=axis)
    out = np.full(x.shape, 7.0, np.float32)
    got = numfmt.fake_quantize(x, name, axis=axis, out=out)
    assert got is out
    assert np.array_equal(out.view(np.uint32), ref.view(np.uint32))
    if dtype == np.float32:
        xi = x.copy()
        numfmt.fake_quantize(xi, name, axis=axis, out=xi)
        assert np.array_equal(xi.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("out,err,match", [
    (np.empty((4, 64), np.float64), TypeError, "float32, got float64"),
    (np.empty((4, 63), np.float32), ValueError, r"shape \(4, 63\).*\(4, 64\)"),
    (np.empty((64, 4), np.float32).T, ValueError, "C-contiguous"),
    ([0.0] * 256, TypeError, "got list"),
])
def test_fake_quantize_bad_out(out, err, match):
    x = np.ones((4, 64), np.float32)
    with pytest.raises(err, match=match):
        numfmt.fake_quantize(x, "mxint8", out=out)
    ro = np.empty((4, 64), np.float32)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="writeable"):
        numfmt.fake_quantize(x, "mxint8", out=ro)


def test_fake_quantize_out_partly_overlapping_x_is_refused():
    """x itself is allowed; an out= that overlaps x elsewhere (shifted by one element)
    would be written while later blocks of x are still read: refused."""
    buf = np.random.default_rng(3).standard_normal(129).astype(np.float32)
    x, shifted = buf[:128], buf[1:]
    with pytest.raises(ValueError, match="overlaps x"):
        numfmt.fake_quantize(x, "mxint8", out=shifted)
    ref = numfmt.fake_quantize(x.copy(), "mxint8")
    assert np.array_equal(x, buf[:128])  # untouched by the refused call
    assert numfmt.fake_quantize(x, "mxint8", out=x) is x
    assert np.array_equal(x.view(np.uint32), ref.view(np.uint32))


# ---------------------------------------------------------------------------
# torch
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode,compat", [("rne", "ocp"), ("stochastic", "ocp"), ("rdn", "ocp"),
                                         ("rna", "microxcaling")])
def test_torch_equals_numpy(name, mode, compat):
    if compat == "microxcaling" and not name.startswith("mx"):
        pytest.skip("microxcaling applies to MX formats")
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((6, 70)) * np.exp2(rng.integers(-6, 6, (6, 70)))).astype(np.float32)
    x[0, 3] = -0.0
    seed = 4 if mode == "stochastic" else None
    kw = dict(rounding=mode, compat=compat, seed=seed)
    ref = numfmt.fake_quantize(x, name, **kw)
    for dtype in (torch.float32, torch.float64):
        t = torch.from_numpy(x).to(dtype)
        out = nft.fake_quantize(t, name, **kw)
        assert out.dtype == dtype and out.shape == t.shape
        assert np.array_equal(out.float().numpy().view(np.uint32), ref.view(np.uint32)) or \
            dtype == torch.float64 and np.array_equal(out.numpy(), numfmt.fake_quantize(
                x.astype(np.float64), name, **kw).astype(np.float64))
    # axis 0, and the autograd path gives the same forward bits
    t = torch.from_numpy(x.copy()).requires_grad_(True)
    out = nft.fake_quantize(t, name, axis=0, **kw)
    assert np.array_equal(out.detach().numpy().view(np.uint32),
                          numfmt.fake_quantize(x, name, axis=0, **kw).view(np.uint32))
    q = nft.quantize(torch.from_numpy(x), name, **kw)
    qn = numfmt.quantize(x, name, **kw)
    assert np.array_equal(q.codes, qn.codes)
    assert np.array_equal(nft.dequantize(q).numpy().view(np.uint32),
                          numfmt.dequantize(qn).view(np.uint32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_half_inputs_equal_numpy(dtype):
    t = (torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    out = nft.fake_quantize(t, "mxint8")
    assert out.dtype == dtype
    ref = numfmt.fake_quantize(t.float().numpy(), "mxint8")
    assert torch.equal(out, torch.from_numpy(ref).to(dtype))


@pytest.mark.parametrize("name", ["mxint4", "mxfp4", "sint4", "nvfp4"])
def test_ste_gradient_is_identity(name):
    t = torch.randn(3, 64, dtype=torch.float32, generator=torch.Generator().manual_seed(1)) * 10
    t[0, 0] = 1e6  # saturating values pass the gradient too (STE)
    t.requires_grad_(True)
    w = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    (nft.fake_quantize(t, name) * w).sum().backward()
    assert torch.equal(t.grad, w)


# ---------------------------------------------------------------------------
# storage
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mxint4", "mxfp4", "mxfp6_e3m2", "mxint6", "mxint8",
                                  "mxfp8_e5m2", "sint4", "nvfp4", "int8_channel", "fp8_e4m3"])
@pytest.mark.parametrize("shape", [(32, 64), (3, 37), (1,), (5, 7, 33)])
def test_pack_unpack_round_trip(name, shape):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape).astype(np.float32)
    q = numfmt.quantize(x, name)
    packed = q.pack()
    bits = q.format.bits
    n = int(np.prod(shape))
    assert packed.dtype == np.uint8 and packed.size == -(-n * bits // 8)
    back = QTensor.unpack(packed, name, shape, axis=-1, scales=q.scales,
                          tensor_scale=q.tensor_scale)
    assert np.array_equal(back.codes, q.codes) and back.codes.dtype == q.codes.dtype
    assert np.array_equal(numfmt.dequantize(back).view(np.uint32),
                          numfmt.dequantize(q).view(np.uint32))


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_pack_layout_every_code(bits):
    from numfmt.qtensor import pack_codes, unpack_codes
    codes = np.arange(1 << bits, dtype=np.uint8)
    codes = np.concatenate([codes, codes[::-1], codes[:5]])
    p = pack_codes(codes, bits)
    assert p.size == -(-codes.size * bits // 8)
    assert np.array_equal(unpack_codes(p, bits, codes.size), codes)
    if bits == 4:  # two codes a byte, the first in the low nibble
        assert p[0] == codes[0] | (codes[1] << 4)
    if bits == 6:  # four codes in three bytes, LSB first
        c = [int(v) for v in codes[:4]]
        word = c[0] | c[1] << 6 | c[2] << 12 | c[3] << 18
        assert list(p[:3]) == [word & 255, (word >> 8) & 255, word >> 16]


def test_bits_accounting():
    x = np.ones((32, 64), np.float32)
    assert numfmt.quantize(x, "mxint4").bits == 32 * 64 * 4 + 64 * 8
    assert numfmt.quantize(x, "mxfp8_e4m3").bits == 32 * 64 * 8 + 64 * 8
    assert numfmt.quantize(x, "mxfp6_e2m3").bits == 32 * 64 * 6 + 64 * 8
    assert numfmt.quantize(x, "sint4").bits == 32 * 64 * 4 + 32 * 16
    assert numfmt.quantize(x, "nvfp4").bits == 32 * 64 * 4 + 32 * 4 * 8 + 32
    assert numfmt.quantize(x, "int8_channel").bits == 32 * 64 * 8 + 32 * 32
    assert numfmt.quantize(x[:, :40], "mxint4").bits == 32 * 40 * 4 + 64 * 8  # partial block
    assert numfmt.quantize(x, "fp8_e4m3").bits == 32 * 64 * 8


# ---------------------------------------------------------------------------
# bad input: a clear ValueError / TypeError naming the bad value
# ---------------------------------------------------------------------------
def test_unknown_format_lists_close_names():
    with pytest.raises(ValueError, match="mxint5") as e:
        numfmt.get("mxint5")
    assert "mxint4" in str(e.value) and "mxint6" in str(e.value)
    with pytest.raises(ValueError, match="mxfp9"):
        numfmt.quantize(np.ones(4, np.float32), "mxfp9")
    with pytest.raises(TypeError):
        numfmt.get(3.5)


@pytest.mark.parametrize("axis", [2, -3, 7])
def test_axis_out_of_range(axis):
    with pytest.raises(ValueError, match=str(axis)):
        numfmt.quantize(np.ones((2, 32), np.float32), "mxint8", axis=axis)
    with pytest.raises(ValueError, match=str(axis)):
        numfmt.fake_quantize(np.ones((2, 32), np.float32), "mxint8", axis=axis)


def test_axis_wrong_type():
    with pytest.raises(TypeError, match="axis"):
        numfmt.quantize(np.ones(32, np.float32), "mxint8", axis=1.0)


@pytest.mark.parametrize("arr", [np.arange(32), np.arange(32, dtype=np.uint8),
                                 np.ones(32, np.complex64), np.array([1.0, "a"], dtype=object),
                                 np.ones(32, bool), "hello"])
def test_non_float_arrays_are_type_errors(arr):
    for fn in (numfmt.quantize, numfmt.fake_quantize):
        with pytest.raises(TypeError) as e:
            fn(arr, "mxint8")
        assert "float" in str(e.value)
    with pytest.raises(TypeError):
        numfmt.encode(arr, "fp8_e4m3")


def test_stochastic_without_seed():
    with pytest.raises(ValueError, match="seed"):
        numfmt.quantize(np.ones(32, np.float32), "mxint8", rounding="stochastic")
    with pytest.raises(ValueError, match="seed"):
        numfmt.encode(np.ones(3, np.float32), "fp8_e4m3", rounding="stochastic")
    with pytest.raises(ValueError, match="-1"):
        numfmt.quantize(np.ones(32, np.float32), "mxint8", rounding="stochastic", seed=-1)


@pytest.mark.parametrize("bs", [0, -4])
def test_block_size_zero(bs):
    with pytest.raises(ValueError, match=str(bs)):
        numfmt.get("mxint4", block_size=bs)
    with pytest.raises(TypeError):
        numfmt.get("mxint4", block_size=2.5)


def test_unknown_rounding_and_compat():
    x = np.ones(32, np.float32)
    with pytest.raises(ValueError, match="'nearest'"):
        numfmt.quantize(x, "mxint8", rounding="nearest")
    with pytest.raises(ValueError, match="'gfloat'"):
        numfmt.fake_quantize(x, "mxint8", compat="gfloat")
    with pytest.raises(ValueError, match="microxcaling"):
        numfmt.fake_quantize(x, "sint4", compat="microxcaling")
    with pytest.raises(ValueError, match="rup"):
        numfmt.fake_quantize(x, "mxint8", compat="microxcaling", rounding="rup")
    with pytest.raises(ValueError, match="block_sizes"):
        numfmt.get("mxint8", block_sizes=3)


def test_qtensor_codes_and_scales_disagree():
    q = numfmt.quantize(np.ones((4, 64), np.float32), "mxint8")
    with pytest.raises(ValueError, match=r"\(4, 3\)"):
        QTensor(q.codes, np.zeros((4, 3), np.uint8), q.format, q.axis, q.shape)
    with pytest.raises(ValueError, match="shape"):
        QTensor(q.codes[:, :32], q.scales, q.format, q.axis, q.shape)
    with pytest.raises(TypeError):
        QTensor(q.codes.astype(np.float32), q.scales, q.format, q.axis, q.shape)
    with pytest.raises(TypeError):
        numfmt.dequantize(q.codes)
    with pytest.raises(ValueError):
        QTensor.unpack(q.pack()[:10], "mxint8", (4, 64), scales=q.scales)


@pytest.mark.parametrize("name,bad", [("mxint4", 0x10), ("mxfp4", 0xFF), ("mxfp6_e3m2", 0x40),
                                      ("sint4", 0x1F), ("nvfp4", 0x80)])
def test_dequantize_codes_wider_than_the_element(name, bad):
    """A code that does not fit the element's bits is refused by dequantize and pack (the
    decode tables have 2^bits entries: reading past them would be a silent wrong answer)."""
    q = numfmt.quantize(np.ones((3, 64), np.float32), name)
    codes = q.codes.copy()
    codes[2, 17] = bad
    bits = q.format.element.bits
    wide = QTensor(codes, q.scales, q.format, q.axis, q.shape, q.tensor_scale)
    with pytest.raises(ValueError, match=rf"{bad:#x} at index \(2, 17\).*0\.\.{(1 << bits) - 1}"):
        numfmt.dequantize(wide)
    with pytest.raises(ValueError, match=rf"{bad:#x}"):
        wide.pack()  # would drop the high bits
    codes[2, 17] = (1 << bits) - 1  # the widest code that fits decodes
    assert numfmt.dequantize(QTensor(codes, q.scales, q.format, q.axis, q.shape,
                                     q.tensor_scale)).shape == (3, 64)


def test_decode_and_encode_bad_values():
    with pytest.raises(ValueError, match="0..15"):
        numfmt.decode(np.array([16], np.uint8), "fp4_e2m1")
    with pytest.raises(TypeError):
        numfmt.decode(np.array([1.0]), "fp4_e2m1")
    with pytest.raises(ValueError, match="NaN"):
        numfmt.encode(np.float32([np.nan]), "fp4_e2m1")
    with pytest.raises(ValueError, match="inf"):
        numfmt.encode(np.float32([np.inf]), "int8")
    with pytest.raises(ValueError, match="block format"):
        numfmt.encode(np.float32([1.0]), "mxint8")


def test_torch_bad_input():
    with pytest.raises(TypeError):
        nft.fake_quantize(np.ones(4, np.float32), "mxint8")
    with pytest.raises(TypeError, match="int64"):
        nft.fake_quantize(torch.ones(4, dtype=torch.int64), "mxint8")
