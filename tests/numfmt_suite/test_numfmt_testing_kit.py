"""The public conformance kit numfmt.testing: it passes numfmt itself and catches
deliberately broken quantizers with a message carrying hex bits."""
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import numfmt
import numfmt_reference as ref
from numfmt.testing import blocks, check_quantizer, elements, formats, hex_bits

pytestmark = pytest.mark.usefixtures("one_numba_thread")
HEX = re.compile(r"\b[0-9a-f]{8}\b")


def _mx_exponents(x, fmt):
    """OCP shared exponent per element (NaN for NaN blocks), the honest way."""
    q = numfmt.quantize(x, fmt)
    X = q.scales.astype(np.float64) - 127
    X[q.scales == 255] = np.nan
    return np.repeat(X, fmt.block_size)[:x.size]


def mxint8_half_up(x):
    """Broken: rounds half up instead of to even."""
    X = _mx_exponents(x, numfmt.get("mxint8"))
    s = np.exp2(X - 6)
    n = np.clip(np.floor(x / s + 0.5), -127, 127)
    with np.errstate(invalid="ignore"):
        return np.where(np.isnan(X), np.nan, n * s).astype(np.float32)


def mxint8_off_by_one_exponent(x):
    """Broken: shared exponent one too large (floor(log2 amax) + 1)."""
    X = _mx_exponents(x, numfmt.get("mxint8")) + 1
    s = np.exp2(X - 6)
    n = np.clip(np.rint(x / s), -127, 127)
    with np.errstate(invalid="ignore"):
        return np.where(np.isnan(X), np.nan, n * s).astype(np.float32)


def mxfp8_e4m3_no_saturation(x):
    """Broken: E4M3 elements rounded with an unbounded exponent, never clipped at 448."""
    X = _mx_exponents(x, numfmt.get("mxfp8_e4m3"))
    out = np.empty(x.size, np.float32)
    for i, (v, e) in enumerate(zip(x.astype(np.float64), X)):
        if np.isnan(e):
            out[i] = np.nan
            continue
        t = v * 2.0 ** -e
        if t == 0:
            out[i] = np.float32(v * 0.0)
            continue
        qe = max(int(np.floor(np.log2(abs(t)))), -6) - 3
        out[i] = np.float32(np.rint(t * 2.0 ** -qe) * 2.0 ** (qe + e))
    return out


@pytest.mark.parametrize("name,mode,compat", [
    ("mxint8", "rne", "ocp"), ("mxint4", "rtz", "ocp"), ("mxfp4", "rne", "microxcaling"),
    ("mxfp8_e4m3", "rup", "ocp"), ("sint4", "rne", "ocp"), ("nvfp4", "rne", "ocp"),
    ("int8_channel", "rdn", "ocp"), ("fp8_e5m2", "rne", "ocp"), ("mxint6", "stochastic", "ocp")])
def test_kit_passes_numfmt_itself(name, mode, compat):
    seed = 7 if mode == "stochastic" else None
    check_quantizer(lambda x: numfmt.fake_quantize(x, name, rounding=mode, compat=compat,
                                                   seed=seed),
                    name, rounding=mode, compat=compat, max_examples=40, seed=7)
    # a QTensor is accepted too
    check_quantizer(lambda x: numfmt.quantize(x, name, rounding=mode, compat=compat, seed=seed),
                    name, rounding=mode, compat=compat, max_examples=10, seed=7)


@pytest.mark.parametrize("broken,name", [(mxint8_half_up, "mxint8"),
                                         (mxint8_off_by_one_exponent, "mxint8"),
                                         (mxfp8_e4m3_no_saturation, "mxfp8_e4m3")])
def test_kit_catches_broken_quantizers(broken, name):
    with pytest.raises(AssertionError) as e:
        check_quantizer(broken, name, max_examples=200, seed=0)
    msg = str(e.value)
    assert "block" in msg and "expected" in msg and "got" in msg
    assert len(HEX.findall(msg)) >= 3, msg
    # the hex bits in the message are the real counterexample: re-run it
    inp = re.search(r"input block \d+ \(hex float32 bits\): ([0-9a-f ]+)", msg).group(1).split()
    x = np.array([int(h, 16) for h in inp], np.uint32).view(np.float32)
    assert not np.array_equal(broken(x).view(np.uint32), numfmt.fake_quantize(x, name).view(np.uint32)) \
        or np.isnan(x).any()


def test_kit_catches_wrong_shape_and_dtype():
    with pytest.raises(AssertionError, match="shape"):
        check_quantizer(lambda x: numfmt.fake_quantize(x, "mxint4")[:-1], "mxint4", max_examples=5)
    with pytest.raises(AssertionError, match="float64"):
        check_quantizer(lambda x: numfmt.fake_quantize(x, "mxint4").astype(np.float64), "mxint4",
                        max_examples=5)


def test_kit_argument_errors():
    with pytest.raises(ValueError, match="mxint5"):
        check_quantizer(lambda x: x, "mxint5")
    with pytest.raises(ValueError, match="'nearest'"):
        check_quantizer(lambda x: x, "mxint4", rounding="nearest")
    with pytest.raises(TypeError):
        check_quantizer(None, "mxint4")
    with pytest.raises(ValueError):
        check_quantizer(lambda x: x, "mxint4", max_examples=0)


@settings(ref.CI, max_examples=60)
@given(formats(), st.data())
def test_strategies_produce_valid_inputs(name, data):
    fmt = numfmt.get(name)
    x = data.draw(blocks(name))
    assert x.dtype == np.float32 and x.ndim == 1 and x.size >= 1
    if fmt.kind == "block" and fmt.block_size:
        assert x.size % fmt.block_size == 0
    v = data.draw(elements(name))
    assert isinstance(v, np.float32)
    assert isinstance(data.draw(formats(objects=True)), (numfmt.FloatFormat, numfmt.IntFormat,
                                                         numfmt.BlockFormat))


def test_blocks_hit_ties_and_power_of_two_edges():
    """The generator's weighting is real: over a fixed sample it produces exact ties of
    the element grid and block maxima a few ulps below a power of two."""
    fmt = numfmt.get("mxint8")
    ties = below_pow2 = 0

    @settings(ref.CI, max_examples=150)
    @given(blocks(fmt, n_blocks=1, specials=False))
    def probe(x):
        nonlocal ties, below_pow2
        q = numfmt.quantize(x, fmt)
        X = int(q.scales[0]) - 127
        t = x.astype(np.float64) * 2.0 ** (6 - X)
        ties += int(np.sum(np.abs(t - np.floor(t)) == 0.5))
        amax = np.abs(x).max()
        if amax > 0:
            m, _ = np.frexp(amax)
            below_pow2 += int(m > 1 - 8 * 2.0 ** -24)
    probe()
    assert ties >= 20 and below_pow2 >= 5, (ties, below_pow2)


def test_hex_bits():
    assert hex_bits(np.float32([1.0, -0.0, np.inf])) == "3f800000 80000000 7f800000"


def test_kit_imports_without_pytest():
    code = ("import sys; sys.modules['pytest'] = None; sys.modules['_pytest'] = None\n"
            "import numfmt.testing as t; print(t.check_quantizer.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "check_quantizer" in out.stdout, out.stderr
