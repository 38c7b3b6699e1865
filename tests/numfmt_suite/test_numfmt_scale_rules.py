"""MX scale rules (``scale_rule``: floor, ceil, even, rceil) against torchao's ``to_mx``
and against the slow reference, bit for bit, in both backends.

torchao (``torchao.prototype.mx_formats.mx_tensor.to_mx`` with ``ScaleCalculationMode``
FLOOR, CEIL, EVEN, RCEIL, eager on the CPU) is the oracle. It runs only in a subprocess,
one for the whole module (torchao_oracle.py with ``PYTHONPATH=.oracle/torchao``, where
scripts/setup installs it): torchao must not be importable from the project's
environment, where diffusers and transformers would import it on every start; this
process never imports it (checked), and the torchao tests skip without .oracle. The
reference (``reference.mx_shared_exponent``, exact ``Fraction`` arithmetic written from
torchao's definitions) covers what torchao does not: every rounding mode, MXINT, float64
input, other block sizes. Blocks where numfmt deliberately differs from torchao are left
out of the torchao comparison, each kind counted and checked on its own
(docs/scale_rules.md):

* a block whose scale is 2^-127 (E8M0 code 0): torchao divides by 2^-126 there (floor,
  ceil, even: ``scale_fp32`` is clamped to FP32's smallest normal) or by 1 (rceil:
  ``rcp_fp32 = 1.0`` for exponent 0), so its elements are not V / 2^-127; numfmt's are.
  The scale codes still agree and are compared.
* a block holding Inf (and no NaN): torchao gives it a finite scale; numfmt a NaN scale
  (0xFF) under every rule, its documented OCP policy. NaN blocks: both 0xFF.
* rceil only: torchao's eager fallback takes ceil of a *float32* ``torch.log2(descale)``,
  which rounds to an integer for a descale a few float32 ulps above a power of two, so
  its exponent is one too small there; numfmt's is the exact ceil(log2 descale) of
  cuBLAS and of the PTX cvt.rp.satfinite.ue8m0x2.f32 instruction. The test checks that
  every rceil scale mismatch is such a block.
"""
import json
import math
import os
import pathlib
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import numfmt
import numfmt.torch as nft
import numfmt_reference as ref
from numfmt import _kernels as K
from numfmt.testing import blocks, check_quantizer
from test_torch_backend import assert_backends_equal

pytestmark = pytest.mark.usefixtures("one_numba_thread")

RULES = numfmt.SCALE_RULES
MX_FLOAT = ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp4_e2m1"]
MX_ALL = MX_FLOAT + ["mxint8", "mxint6", "mxint4"]
F32_MAX = float(np.finfo(np.float32).max)


REPO = pathlib.Path(__file__).resolve().parents[2]
ORACLE_PATH = REPO / ".oracle" / "torchao"  # scripts/setup: pip install --target
ORACLE_SCRIPT = pathlib.Path(__file__).with_name("torchao_oracle.py")
# numfmt's MX float formats -> the oracle's names for torchao's element dtypes
TORCHAO_ELEM = {"mxfp8_e4m3": "float8_e4m3fn", "mxfp8_e5m2": "float8_e5m2",
                "mxfp6_e2m3": "fp6_e2m3", "mxfp6_e3m2": "fp6_e3m2",
                "mxfp4_e2m1": "float4_e2m1fn_x2"}


# ---------------------------------------------------------------------------
# inputs: random blocks and blocks whose amax sits on each rule's boundaries
# ---------------------------------------------------------------------------
def _ulps(v: float, k: int) -> np.float32:
    """float32 v moved k ulps (k may be negative)."""
    b = np.float32(v).view(np.int32) + np.int32(k)
    return np.int32(b).view(np.float32)


def boundary_amaxes(name: str) -> list[float]:
    """Magnitudes at and 1-3 float32 ulps around every rule's decision points, over
    exponents across float32's range: powers of two (floor / ceil), element_max * 2^k
    (rceil's descale a power of two; floor's saturation), the even rule's carry point
    (2 - 2^-(m+1)) * 2^k, the element's midpoint above its max, float32 subnormals,
    the E8M0 ends and float32's max."""
    fmt = numfmt.get(name)
    _, m, vmax = numfmt.core.scale_rule_params(fmt)
    emax = fmt.element_emax
    pts = []
    for k in (-149, -140, -130, -128, -127, -126, -125, -120, -118, -117, -60, -7, -1, 0, 1,
              3, 9, 30, 100, 119, 120, 125, 126, 127):
        for base in (1.0, vmax, 2.0 - 2.0 ** -(m + 1), vmax + 2.0 ** (emax - m - 1)):
            with np.errstate(over="ignore", under="ignore"):
                c = np.float32(math.ldexp(base, k))
            if not np.isfinite(c) or c == 0:
                continue
            for d in (-3, -1, 0, 1, 2):
                v = _ulps(float(c), d)
                if np.isfinite(v) and v > 0:
                    pts.append(float(v))
    pts += [1e-45, 3e-45, 1e-40, 1.1754942e-38, 1.1754944e-38, F32_MAX, float(_ulps(F32_MAX, -1))]
    return sorted(set(pts))


def blocks_with_amax(amaxes, rng, grid=None) -> np.ndarray:
    """One (32,) float32 block per amax: the amax at a random position with a random sign,
    the rest random magnitudes below it (some on the element grid times the block scale,
    ties included, when ``grid`` is given) with random signs and a few zeros."""
    out = np.empty((len(amaxes), 32), np.float32)
    for i, a in enumerate(amaxes):
        v = rng.uniform(0, 1, 32) * a
        if grid is not None and a > 1e-30:
            X = math.floor(math.log2(a)) - grid[1]
            pick = rng.integers(0, len(grid[0]), 32)
            on = rng.random(32) < 0.4
            v = np.where(on, np.minimum(grid[0][pick] * 2.0 ** X, a), v)
        v[rng.random(32) < 0.1] = 0.0
        v = (v * np.where(rng.random(32) < 0.5, -1, 1)).astype(np.float32)
        v[rng.integers(0, 32)] = np.float32(a) * (1 if rng.random() < 0.5 else -1)
        out[i] = v
    return out


def _grid(name):
    """(grid values and their midpoints, element_emax) for ``blocks_with_amax``."""
    fmt = numfmt.get(name)
    t = np.unique(np.abs(numfmt.decode_table(fmt.element)[np.isfinite(numfmt.decode_table(
        fmt.element))])) * 2.0 ** fmt.element_scale_exp
    return np.concatenate([t, (t[:-1] + t[1:]) / 2]), fmt.element_emax


def random_blocks(n: int, seed: int) -> np.ndarray:
    """Gaussian blocks with one random binade each, across float32's whole range."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 32)) * np.exp2(rng.integers(-150, 128, (n, 1)))
    with np.errstate(over="ignore"):
        x = x.astype(np.float32)
    return np.where(np.isfinite(x), x, np.float32(1.0))


def edge_input(name: str, seed: int = 0) -> np.ndarray:
    """Boundary blocks, random blocks, and the special blocks (zeros, -0, NaN, Inf)."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([blocks_with_amax(boundary_amaxes(name), rng, _grid(name)),
                        random_blocks(300, seed + 1)])
    special = np.zeros((6, 32), np.float32)
    special[1] = -0.0
    special[2, :3] = [np.nan, 1.0, -2.0]
    special[3, :3] = [np.inf, 1.0, -2.0]
    special[4, :3] = [-np.inf, np.nan, 3.0]
    special[5, 7] = -0.0
    return np.concatenate([x, special])


# ---------------------------------------------------------------------------
# torchao, in one subprocess for the whole module
# ---------------------------------------------------------------------------
def _differ_on_purpose_blocks() -> dict[str, np.ndarray]:
    """One (1, 32) float32 block per documented difference (e4m3)."""
    tiny = np.full((1, 32), np.float32(1.5 * 2.0 ** -119))  # amax in [2^-119, 2^-118): 2^-127
    inf = np.ones((1, 32), np.float32)
    inf[0, 4] = np.inf
    log2_down = np.full((1, 32), _ulps(448.0 * 16, 1))  # rceil: descale 2^4 (1 + 2^-23)
    return {"tiny": tiny, "inf": inf, "log2_down": log2_down}


def oracle_cases() -> tuple[dict[str, np.ndarray], list[tuple[str, str, str]]]:
    """Every input this module sends to torchao (by key) and every comparison
    (input key, MX format, rule) it asks for, so that one subprocess answers them all."""
    inputs = {f"edge_{name}": edge_input(name, seed=3) for name in MX_FLOAT}
    inputs["bfloat16"] = random_blocks(200, 7).astype(ml_dtypes.bfloat16)
    inputs.update(_differ_on_purpose_blocks())
    cases = [(f"edge_{name}", name, rule) for name in MX_FLOAT for rule in RULES]
    cases += [("bfloat16", name, rule) for name in ("mxfp8_e4m3", "mxfp4_e2m1") for rule in RULES]
    cases += [("tiny", "mxfp8_e4m3", rule) for rule in ("floor", "even", "rceil")]
    cases += [("inf", "mxfp8_e4m3", rule) for rule in RULES]
    cases += [("log2_down", "mxfp8_e4m3", "rceil")]
    return inputs, cases


class TorchaoOracle:
    """torchao's to_mx results for ``oracle_cases()``, computed by torchao_oracle.py in
    a subprocess (``PYTHONPATH=.oracle/torchao``); this process never imports torchao."""

    def __init__(self, workdir: pathlib.Path):
        self.inputs, cases = oracle_cases()
        requests = [{"input": key, "input_dtype": "bfloat16" if self.inputs[key].dtype ==
                     ml_dtypes.bfloat16 else "float32", "elem_dtype": TORCHAO_ELEM[name],
                     "rule": rule, "block_size": 32} for key, name, rule in cases]
        paths = [workdir / f for f in ("requests.json", "inputs.npz", "outputs.npz")]
        paths[0].write_text(json.dumps(requests))
        np.savez(paths[1], **{k: v.view(np.uint16) if v.dtype == ml_dtypes.bfloat16 else v
                              for k, v in self.inputs.items()})
        env = {**os.environ, "PYTHONPATH": str(ORACLE_PATH)}
        run = subprocess.run([sys.executable, str(ORACLE_SCRIPT), *map(str, paths)], env=env,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, f"torchao_oracle.py failed:\n{run.stderr[-3000:]}"
        with np.load(paths[2], allow_pickle=False) as out:
            self.version, self.file = str(out["torchao_version"]), str(out["torchao_file"])
            self.results = {case: (out[f"scales_{i}"], out[f"codes_{i}"])
                            for i, case in enumerate(cases)}

    def mx(self, key: str, name: str, rule: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input, E8M0 scale codes (nblocks,), element codes (nblocks, 32)) of one case."""
        s, c = self.results[(key, name, rule)]
        return self.inputs[key], s, c


@pytest.fixture(scope="module")
def torchao(tmp_path_factory):
    """The module's one torchao subprocess (skips when .oracle/torchao is missing)."""
    if not (ORACLE_PATH / "torchao").is_dir():
        pytest.skip(f"torchao oracle not installed at {ORACLE_PATH} (bash scripts/setup "
                    f"installs it: pip install --no-deps --target .oracle/torchao torchao==0.18.0)")
    oracle = TorchaoOracle(tmp_path_factory.mktemp("torchao_oracle"))
    assert oracle.version.startswith("0.18.0"), oracle.version
    assert pathlib.Path(oracle.file).is_relative_to(ORACLE_PATH), oracle.file
    return oracle


@pytest.fixture(scope="module", autouse=True)
def torchao_stays_out_of_this_process():
    yield
    assert "torchao" not in sys.modules, (
        "torchao was imported in the pytest process: it must only run in torchao_oracle.py's "
        "subprocess (is it installed in the environment? diffusers and transformers import it "
        "when it is; scripts/setup puts it in .oracle/torchao only)")


# ---------------------------------------------------------------------------
# numfmt vs torchao
# ---------------------------------------------------------------------------
def _rceil_log2_rounds_down(x: np.ndarray, name: str) -> np.ndarray:
    """Per block: torchao's eager rceil exponent ceil(float32 log2(descale)) is below the
    exact ceil(log2(descale)), descale = float32(amax / element_max)."""
    fmt = numfmt.get(name)
    amax = torch.from_numpy(np.abs(x).max(axis=1).astype(np.float32))
    descale = amax / fmt.element.max_normal
    tao = torch.ceil(torch.log2(descale))  # torchao's eager fallback
    d = descale.double().numpy()
    e = np.frexp(np.where(d > 0, d, 1.0))[1] - 1  # floor(log2 d), exactly
    exact = np.where(d == np.exp2(e), e, e + 1)
    return (tao.double().numpy() < exact) & (d > 0) & np.isfinite(d)


def compare_with_torchao(torchao: TorchaoOracle, key: str, name: str, rule: str) -> dict:
    """Assert numfmt (both backends) == torchao on the input ``key`` (nblocks, 32) except
    the documented blocks; returns the counts compared and left out."""
    fmt = numfmt.get(name, scale_rule=rule)
    x, s_t, c_t = torchao.mx(key, name, rule)
    q = numfmt.quantize(x, fmt)
    qt = nft.quantize(torch.from_numpy(x.astype(np.float32)), fmt, backend="torch")
    assert np.array_equal(q.codes, qt.codes) and np.array_equal(q.scales, qt.scales)
    s_n, c_n = q.scales.reshape(-1), q.codes
    x32 = x.astype(np.float32)
    has_nan = np.isnan(x32).any(axis=1)
    has_inf = np.isinf(x32).any(axis=1) & ~has_nan
    finite = ~has_nan & ~has_inf
    # NaN and Inf blocks: numfmt's NaN scale; torchao agrees on NaN blocks
    assert (s_n[~finite] == 255).all()
    assert (s_t[has_nan] == 255).all()
    log2_down = _rceil_log2_rounds_down(x32, name) & finite if rule == "rceil" else \
        np.zeros(len(x), bool)
    # rceil: every scale mismatch is a block where torch.log2's float32 result hid the
    # round-up, and there torchao's exponent is exactly one below numfmt's
    bad_scale = finite & (s_n != s_t)
    assert not (bad_scale & ~log2_down).any(), (
        f"{name} {rule}: scale differs from torchao in blocks "
        f"{np.flatnonzero(bad_scale & ~log2_down)[:5].tolist()}: numfmt "
        f"{s_n[bad_scale & ~log2_down][:5].tolist()} torchao {s_t[bad_scale & ~log2_down][:5].tolist()}")
    assert (s_t[bad_scale].astype(int) == s_n[bad_scale].astype(int) - 1).all()
    cmp_blocks = finite & ~log2_down & (s_t != 0)
    diff = (c_n != c_t) & cmp_blocks[:, None]
    assert not diff.any(), (
        f"{name} {rule}: element codes differ from torchao at "
        f"{[tuple(map(int, i)) for i in np.argwhere(diff)[:5]]}: x="
        f"{x32[diff][:5].tolist()} numfmt={c_n[diff][:5].tolist()} torchao={c_t[diff][:5].tolist()}")
    return {"blocks": int(cmp_blocks.sum()), "scale_blocks": int((finite & ~log2_down).sum()),
            "zero_scale": int((finite & (s_t == 0)).sum()), "log2_down": int(log2_down.sum()),
            "inf": int(has_inf.sum())}


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("name", MX_FLOAT)
def test_equals_torchao_to_mx(name, rule, torchao):
    """Scale codes and element codes == torchao's to_mx on boundary, random and special
    blocks (float32), except the documented blocks (module docstring)."""
    counts = compare_with_torchao(torchao, f"edge_{name}", name, rule)
    assert counts["blocks"] > 0.6 * len(torchao.inputs[f"edge_{name}"])
    if rule == "rceil":
        # the boundary blocks do reach torch.log2's rounding (and nothing else differs)
        assert counts["log2_down"] >= 1


@pytest.mark.parametrize("rule", RULES)
def test_equals_torchao_on_bfloat16_input(rule, torchao):
    for name in ("mxfp8_e4m3", "mxfp4_e2m1"):
        compare_with_torchao(torchao, "bfloat16", name, rule)


def test_where_numfmt_and_torchao_differ_on_purpose(torchao):
    """The documented differences, shown on one block each (e4m3)."""
    name = "mxfp8_e4m3"
    # scale 2^-127 (amax in [2^-119, 2^-118)): torchao's elements are V / 2^-126
    for rule in ("floor", "even"):
        x, s_t, c_t = torchao.mx("tiny", name, rule)
        q = numfmt.quantize(x, name, scale_rule=rule)
        assert s_t[0] == q.scales[0, 0] == 0
        assert numfmt.dequantize(q)[0, 0] == x[0, 0]  # exact: 1.5 * 256 * 2^-127
        assert numfmt.decode(c_t[0, :1], "fp8_e4m3")[0] == 1.5 * 128  # half of it
    # rceil, exponent 0: torchao multiplies by 1, so a nonzero tiny block becomes zeros
    x, s_t, c_t = torchao.mx("tiny", name, "rceil")
    q = numfmt.quantize(x, name, scale_rule="rceil")
    assert s_t[0] == q.scales[0, 0] == 0 and (c_t == 0).all() and (q.codes != 0).all()
    # an Inf block: torchao has a finite scale, numfmt the NaN scale
    for rule in RULES:
        x, s_t, _ = torchao.mx("inf", name, rule)
        assert s_t[0] != 255 and numfmt.quantize(x, name, scale_rule=rule).scales[0, 0] == 255
    # rceil: descale one float32 ulp above 2^4 (amax = 448 * 16 * (1 + 2^-23))
    x, s_t, _ = torchao.mx("log2_down", name, "rceil")
    q = numfmt.quantize(x, name, scale_rule="rceil")
    assert q.scales[0, 0] == 127 + 5 and s_t[0] == 127 + 4


# ---------------------------------------------------------------------------
# numfmt vs the slow reference: every MX format, rule and mode; both backends
# ---------------------------------------------------------------------------
def small_edge_input(name: str, seed: int) -> np.ndarray:
    """A reference-sized subset of ``edge_input``: every fourth boundary block, a few
    random ones and the special blocks."""
    x = edge_input(name, seed)
    nb = len(boundary_amaxes(name))
    return np.concatenate([x[:nb:4], x[nb:nb + 12], x[-6:]])


def assert_equals_reference(x, fmt, mode, seed=5):
    q = numfmt.quantize(x, fmt, rounding=mode, seed=seed)
    r = ref.quantize_mx(x, fmt, -1, mode, seed)
    assert np.array_equal(q.scales.astype(np.int64), r.scales.astype(np.int64)), (
        fmt.name, fmt.scale_rule, mode, np.flatnonzero(q.scales.reshape(-1) != r.scales.reshape(-1))[:5])
    assert np.array_equal(q.codes.astype(np.int64), r.codes.astype(np.int64)), (
        fmt.name, fmt.scale_rule, mode, np.argwhere(q.codes != r.codes)[:5].tolist())
    f = numfmt.fake_quantize(x, fmt, rounding=mode, seed=seed)
    same = (f.view(np.uint32) == r.fake.view(np.uint32)) | (np.isnan(f) & np.isnan(r.fake))
    assert same.all(), (fmt.name, fmt.scale_rule, mode)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("name", MX_ALL)
def test_equals_reference_and_backends_agree(name, rule):
    """Numba == reference (scales, codes, fake-quantized values) for RNE, RTZ and
    stochastic rounding; the torch backend == Numba in every mode; float64 input too."""
    fmt = numfmt.get(name, scale_rule=rule)
    x = small_edge_input(name, seed=11)
    for mode in ("rne", "rtz", "stochastic"):
        assert_equals_reference(x, fmt, mode)
    for mode in ref.ROUNDINGS:
        assert_backends_equal(x, fmt, mode, seed=5)
    # float64: values off the float32 grid, beyond float32's range and below its subnormals
    rng = np.random.default_rng(4)
    x64 = x[:40].astype(np.float64) * (1 + rng.uniform(-1, 1, (40, 32)) * 2.0 ** -35)
    x64[0, 0], x64[1, 0], x64[2, 0] = 2.0 ** 140, 2.0 ** -140, 1.7e308
    assert_equals_reference(x64, fmt, "rne")
    assert_backends_equal(x64, fmt, "rne")
    assert_backends_equal(x64, fmt, "rup")


@pytest.mark.parametrize("rule", RULES)
def test_fast_loops_equal_reference_loops(rule, monkeypatch):
    """The vectorized RNE routines and the element-by-element loop give the same bits
    under every rule (the rule only moves X, which each routine's range check reads)."""
    for name in ("mxfp8_e4m3", "mxfp4_e2m1", "mxint8"):
        fmt = numfmt.get(name, scale_rule=rule)
        x = edge_input(name, seed=2)
        fast = numfmt.quantize(x, fmt), numfmt.fake_quantize(x, fmt)
        x64 = x.astype(np.float64)
        fast64 = numfmt.fake_quantize(x64, fmt)
        monkeypatch.setattr(K, "_FAST_MX", False)
        slow = numfmt.quantize(x, fmt), numfmt.fake_quantize(x, fmt)
        slow64 = numfmt.fake_quantize(x64, fmt)
        monkeypatch.setattr(K, "_FAST_MX", True)
        assert np.array_equal(fast[0].codes, slow[0].codes)
        assert np.array_equal(fast[0].scales, slow[0].scales)
        assert np.array_equal(fast[1].view(np.uint32), slow[1].view(np.uint32))
        assert np.array_equal(fast64.view(np.uint32), slow64.view(np.uint32))


def test_other_block_sizes_and_axes():
    for rule in ("ceil", "even", "rceil"):
        fmt = numfmt.get("mxfp6_e3m2", block_size=7, scale_rule=rule)
        x = random_blocks(4, 9).reshape(8, 16)
        x[0, :7] = _ulps(28.0 * 2 ** -3, 1)
        assert_equals_reference(x, fmt, "rne")
        assert_backends_equal(x.T.copy(), fmt, "rne", axis=0)


# ---------------------------------------------------------------------------
# what each rule promises, on hypothesis blocks
# ---------------------------------------------------------------------------
@settings(ref.CI, max_examples=150)
@given(st.sampled_from(MX_ALL), st.sampled_from(RULES), st.sampled_from(["rne", "rtz", "rup"]),
       st.data())
def test_rule_properties(name, rule, mode, data):
    """numfmt == reference on the conformance kit's blocks for the rule; and the rules
    order as defined: floor <= even <= floor + 1, floor <= ceil <= floor + 1, rceil <=
    ceil; under ceil and rceil no element exceeds the element's max (nothing saturates
    except by rounding up past it)."""
    fmt = numfmt.get(name, scale_rule=rule)
    x = data.draw(blocks(fmt, n_blocks=(1, 2), specials=False))
    assert_equals_reference(x, fmt, mode)
    X = {r: numfmt.quantize(x, name, scale_rule=r).scales.astype(int) for r in RULES}
    fin = X["floor"] != 255
    assert (X["floor"][fin] <= X["even"][fin]).all() and (X["even"][fin] <= X["floor"][fin] + 1).all()
    assert (X["floor"][fin] <= X["ceil"][fin]).all() and (X["ceil"][fin] <= X["floor"][fin] + 1).all()
    assert (X["rceil"][fin] <= X["ceil"][fin]).all()
    if rule in ("ceil", "rceil"):
        _, _, vmax = numfmt.core.scale_rule_params(fmt)
        xs = x.reshape(-1, fmt.block_size).astype(np.float64)
        sc = np.exp2(X[rule].reshape(-1, 1) - 127.0)
        big = np.abs(xs) / sc
        # exact below the E8M0 floor too: X = -127 only when the block is that small
        assert (big[X[rule].reshape(-1) > 0] <= vmax).all()


# ---------------------------------------------------------------------------
# API: where the rule lives, errors
# ---------------------------------------------------------------------------
def test_rule_is_format_data_and_a_keyword():
    x = random_blocks(8, 1)
    f = numfmt.get("mxfp8_e4m3", scale_rule="rceil")
    assert f.scale_rule == "rceil" and numfmt.get("mxfp8_e4m3").scale_rule == "floor"
    q1 = numfmt.quantize(x, f)
    q2 = numfmt.quantize(x, "mxfp8_e4m3", scale_rule="rceil")
    assert q1.format == q2.format == f  # the QTensor records the rule
    assert np.array_equal(q1.codes, q2.codes) and np.array_equal(q1.scales, q2.scales)
    assert np.array_equal(numfmt.dequantize(q2), numfmt.fake_quantize(x, f))
    assert np.array_equal(numfmt.fake_quantize(x, "mxfp8_e4m3", scale_rule="floor"),
                          numfmt.fake_quantize(x, "mxfp8_e4m3"))
    # the keyword overrides a format's own rule; "floor" on an element format is a no-op
    assert numfmt.quantize(x, f, scale_rule="floor").format.scale_rule == "floor"
    assert numfmt.fake_quantize(x[0], "fp8_e4m3", scale_rule="floor").shape == (32,)
    t = torch.from_numpy(x).requires_grad_()
    y = nft.fake_quantize(t, "mxfp4_e2m1", scale_rule="even")
    y.sum().backward()
    assert torch.equal(y.detach(), torch.from_numpy(numfmt.fake_quantize(x, "mxfp4_e2m1",
                                                                         scale_rule="even")))
    assert torch.equal(t.grad, torch.ones_like(t))


@pytest.mark.parametrize("bad", ["Floor", "round", "", None, 1])
def test_bad_rule_names_the_value_and_the_allowed(bad):
    x = np.ones(32, np.float32)
    allowed = "('floor', 'ceil', 'even', 'rceil')"
    calls = [lambda: numfmt.get("mxfp4", scale_rule=bad),
             lambda: numfmt.quantize(x, "mxfp4", scale_rule=bad),
             lambda: numfmt.fake_quantize(x, "mxint8", scale_rule=bad),
             lambda: nft.fake_quantize(torch.ones(32), "mxfp4", scale_rule=bad),
             lambda: nft.quantize(torch.ones(32), "mxfp4", scale_rule=bad, backend="torch")]
    for call in calls if bad is not None else calls[:1]:
        with pytest.raises(ValueError) as e:
            call()
        assert repr(bad) in str(e.value) and allowed in str(e.value)


def test_rule_only_on_mx_formats():
    x = np.ones(64, np.float32)
    for name in ("sint8", "nvfp4", "int8_channel"):
        with pytest.raises(ValueError, match=r"scale_rule='ceil' applies to MX formats"):
            numfmt.get(name, scale_rule="ceil")
        assert numfmt.get(name, scale_rule="floor") == numfmt.get(name)
    with pytest.raises(ValueError, match="applies to MX block formats; 'fp8_e4m3'"):
        numfmt.quantize(x, "fp8_e4m3", scale_rule="rceil")
    for call in (lambda: numfmt.quantize(x, "mxfp4", compat="microxcaling", scale_rule="even"),
                 lambda: nft.fake_quantize(torch.ones(64), "mxfp4", compat="microxcaling",
                                           scale_rule="even", backend="torch")):
        with pytest.raises(ValueError, match="scale_rule='even' is not allowed"):
            call()


def test_conformance_kit_takes_the_rule():
    fmt = numfmt.get("mxfp6_e2m3", scale_rule="even")
    check_quantizer(lambda v: numfmt.fake_quantize(v, "mxfp6_e2m3", scale_rule="even"),
                    "mxfp6_e2m3", scale_rule="even", max_examples=20)
    check_quantizer(lambda v: numfmt.fake_quantize(v, fmt), fmt, max_examples=10)
    with pytest.raises(AssertionError, match="scale_rule='even'"):
        check_quantizer(lambda v: numfmt.fake_quantize(v, "mxfp6_e2m3"), "mxfp6_e2m3",
                        scale_rule="even", max_examples=200)


def test_element_with_one_exponent_bit_near_float32_max():
    """An element whose emax equals its emin (1 exponent bit): ceil / rceil scales put
    X + emin above every element's exponent, which the float32 fast loops cannot hold
    near float32's max; they hand such blocks to the reference loop."""
    elem = numfmt.float_format(1, 1, specials="none", name="fp3_e1m1")
    x = random_blocks(6, 3)
    x[:3] = x[:3] / np.abs(x[:3]).max(axis=1, keepdims=True) * np.float32(3e38)
    for rule in RULES:
        fmt = numfmt.BlockFormat("mx_e1m1", elem, 32, numfmt.get("e8m0"), "mx", rule)
        assert_equals_reference(x, fmt, "rne")
        assert_backends_equal(x, fmt, "rne")
