"""Tests of the hardware cost model (hwsim.cost, hwsim.models, ``loraq cost``)."""
from __future__ import annotations

import json
import math
import os
import struct

import pytest
from hypothesis import given, settings, strategies as st

from numfmt import fileio

from analysis.cli import main as cli_main
from analysis.commands import cost as cost_cmd
from hwsim import cost
from hwsim.accumulator import worst_case_bits
from hwsim.cost import (CostModel, branch_storage_bits, calibration, dot_product_energy,
                        equal_memory_rank, lane_area_um2, layer_cost, load_cost_model,
                        mac_energy_pj, matrix_storage_bits, model_cost, parse_config)
from hwsim.models import Layer, builtin_model, get_model, load_model
from numfmt.formats import get

M = CostModel()


# --- calibration ----------------------------------------------------------
def test_every_horowitz_anchor_within_5_percent():
    rows = calibration()
    assert {r["op"] for r in rows} == set(cost.HOROWITZ)
    assert len(rows) >= 12
    for r in rows:
        assert set(r) == {"op", "anchor_pj", "model_pj", "source"}
        assert "Horowitz" in r["source"]
        assert abs(r["model_pj"] / r["anchor_pj"] - 1) <= 0.05, r


def test_calibration_anchor_values_are_the_published_ones():
    a = {r["op"]: r["anchor_pj"] for r in calibration()}
    assert a["int8_add"] == 0.03 and a["int32_add"] == 0.1
    assert a["int8_mult"] == 0.2 and a["int32_mult"] == 3.1
    assert a["fp16_add"] == 0.4 and a["fp16_mult"] == 1.1
    assert a["fp32_add"] == 0.9 and a["fp32_mult"] == 3.7
    assert a["sram_8kb_read64"] == 10 and a["sram_32kb_read64"] == 20
    assert a["sram_1mb_read64"] == 100 and 1300 <= a["dram_read64"] <= 2600


def test_area_forms_reproduce_horowitz_area_within_5_percent():
    fp16, fp32 = get("fp16"), get("fp32")
    model = {"int8_add": M.add_um2(8), "int32_add": M.add_um2(32), "int8_mult": M.mult_um2(8, 8),
             "int32_mult": M.mult_um2(32, 32), "fp16_add": M.fp_add_um2(fp16),
             "fp32_add": M.fp_add_um2(fp32), "fp16_mult": M.fp_mult_um2(fp16),
             "fp32_mult": M.fp_mult_um2(fp32)}
    for op, anchor in cost.HOROWITZ_AREA_UM2.items():
        assert abs(model[op] / anchor - 1) <= 0.05, (op, model[op], anchor)


def test_fitted_coefficients_are_positive():
    for name, v in cost.horowitz_fit().items():
        assert v > 0, name


def test_technology_scaling_scales_every_energy_and_keeps_calibration():
    half = CostModel(energy_scale=0.5)
    assert half.fp_mult_pj(get("fp16")) == pytest.approx(0.55)
    assert half.pj_per_bit("dram") == pytest.approx(M.pj_per_bit("dram") / 2)
    for r in calibration(half):
        assert abs(r["model_pj"] / r["anchor_pj"] - 1) <= 0.05
    lay = Layer("l", 256, 128, 16)
    assert layer_cost(lay, "W4A4+W8A8", rank=8, model=half).energy_pj == pytest.approx(
        layer_cost(lay, "W4A4+W8A8", rank=8).energy_pj / 2)


def test_cost_model_overrides_from_toml_and_json(tmp_path):
    t = tmp_path / "m.toml"
    t.write_text('energy_scale = 0.25\nweight_level = "sram_1mb"\n')
    m = load_cost_model(t)
    assert m.energy_scale == 0.25 and m.weight_level == "sram_1mb"
    j = tmp_path / "m.json"
    j.write_text(json.dumps({"mult_cell_pj": 0.01}))
    assert load_cost_model(j).mult_pj(8, 8) > M.mult_pj(8, 8)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"mult_cel_pj": 1}))
    with pytest.raises(ValueError, match="mult_cel_pj"):
        load_cost_model(bad)
    broken = tmp_path / "broken.toml"
    broken.write_text("energy_scale = = 1\n")
    with pytest.raises(ValueError, match="malformed"):
        load_cost_model(broken)
    with pytest.raises(ValueError, match="memory level"):
        CostModel(weight_level="tape")
    with pytest.raises(ValueError, match="energy_scale"):
        CostModel(energy_scale=0)


def test_sram_energy_grows_with_capacity():
    sizes = ["sram_1kb", "sram_8kb", "sram_32kb", "sram_256kb", "sram_1mb", "sram_16mb"]
    e = [M.pj_per_bit(s) for s in sizes]
    assert e == sorted(e) and len(set(e)) == len(e)
    assert M.pj_per_bit("dram") > e[-1]


# --- configuration grammar -------------------------------------------------
def test_parse_config_defaults():
    c = parse_config("W4A4+W8A8r64")
    assert (get(c.main_weight).name, get(c.main_act).name) == ("mxint4", "mxint4")
    assert (get(c.branch_weight).name, get(c.branch_act).name) == ("mxint8", "mxint8")
    assert c.rank == 64 and c.name == "W4A4+W8A8r64"
    c = parse_config("w4a4+fp16R32")
    assert c.fp16_branch and c.rank == 32 and c.name == "W4A4+FP16r32"
    assert get(c.branch_weight).name == "fp16" and get(c.branch_act).name == "fp16"
    c = parse_config("W4A4")
    assert not c.has_branch and c.rank is None and c.branch_weight is None
    c = parse_config("W4A4+W4A8")
    assert (get(c.branch_weight).name, get(c.branch_act).name) == ("mxint4", "mxint8")
    c = parse_config("W4A4+W6A6")
    assert get(c.branch_weight).name == "mxint6" and c.rank is None


def test_parse_config_main_families():
    c = parse_config("W4A4+W8A8", main="sint4")
    assert (get(c.main_weight).name, get(c.main_act).name) == ("sint4", "sint4")
    assert get(c.branch_weight).name == "mxint8"
    c = parse_config("W4A4", main="nvfp4")
    assert get(c.main_weight).name == "nvfp4"
    c = parse_config("W4A8", main="sint")
    assert get(c.main_act).name == "sint8"
    c = parse_config("W4A4+W8A8", branch="mxfp")
    assert get(c.branch_weight).name == "mxfp8_e4m3"
    c = parse_config("W8A8", main_weight="int8_channel", main_act="int8_channel")
    assert get(c.main_weight).name == "int8_channel"


@pytest.mark.parametrize("bad", ["", "W4", "W4A4+", "W4A4+W8", "W4A4r32", "W4A4+FP32r8",
                                 "W4A4+W8A8r0", "X4A4", "W4A4 + W8A8", "W4A4+W8A8r-3"])
def test_parse_config_errors_show_the_grammar(bad):
    with pytest.raises(ValueError) as e:
        parse_config(bad)
    assert repr(bad) in str(e.value) or bad.strip().upper() in str(e.value).upper()
    if bad not in ("W4A4+W8A8r0",):
        assert "W<b>A<b>" in str(e.value)


def test_parse_config_format_errors():
    with pytest.raises(ValueError, match="8-bit"):
        parse_config("W4A8", main="nvfp4")
    with pytest.raises(ValueError, match="main_weight"):
        parse_config("W4A4", main_weight="mxint8")
    with pytest.raises(ValueError, match="unknown format"):
        parse_config("W4A4", main="mxint5")
    with pytest.raises(TypeError):
        parse_config(44)


# --- storage and equal-memory rank -----------------------------------------
def test_storage_bits_by_hand():
    # 48 x 64 mxint4 along 64: 2 blocks of 32 per row, E8M0 scales
    assert matrix_storage_bits(48, 64, "mxint4") == 48 * 64 * 4 + 48 * 2 * 8
    # a partial block (40 = 32 + 8) stores a full scale
    assert matrix_storage_bits(3, 40, "mxint8") == 3 * 40 * 8 + 3 * 2 * 8
    assert matrix_storage_bits(3, 40, "fp16") == 3 * 40 * 16
    assert matrix_storage_bits(2, 64, "sint4") == 2 * 64 * 4 + 2 * 1 * 16
    assert matrix_storage_bits(2, 32, "nvfp4") == 2 * 32 * 4 + 2 * 2 * 8 + 32
    # 4.25 bits per element for mxint4 when the rows are whole blocks
    assert matrix_storage_bits(1152, 1152, "mxint4") / (1152 * 1152) == 4.25
    assert branch_storage_bits((48, 64), 4, "mxint8") == (48 * 4 * 8 + 48 * 8) + (4 * 64 * 8 + 4 * 2 * 8)


def test_equal_memory_rank_pixart_square_layer():
    r = equal_memory_rank((1152, 1152), 32, 16, "mxint8")
    assert 60 <= r <= 64
    assert r == 62
    budget = 16 * 32 * (1152 + 1152)
    assert branch_storage_bits((1152, 1152), r, "mxint8") <= budget
    assert branch_storage_bits((1152, 1152), r + 1, "mxint8") > budget
    # an fp16 branch at the reference rank is exactly the budget
    assert equal_memory_rank((1152, 1152), 32, 16, "fp16") == 32
    # narrower branches get larger ranks
    assert equal_memory_rank((1152, 1152), branch="mxint4") > equal_memory_rank(
        (1152, 1152), branch="mxint6") > r


@settings(max_examples=60, deadline=None)
@given(out=st.integers(1, 3000), inp=st.integers(1, 3000), ref_rank=st.integers(1, 64),
       branch=st.sampled_from(["mxint8", "mxint6", "mxint4", "sint4", "nvfp4", "fp16", "mxfp4"]))
def test_equal_memory_rank_is_the_largest_that_fits(out, inp, ref_rank, branch):
    r = equal_memory_rank((out, inp), ref_rank, 16, branch)
    budget = 16 * ref_rank * (out + inp)
    assert isinstance(r, int) and 0 <= r <= min(out, inp)
    if r > 0:
        assert branch_storage_bits((out, inp), r, branch) <= budget
    if r < min(out, inp):
        assert branch_storage_bits((out, inp), r + 1, branch) > budget


def test_equal_memory_rank_errors():
    with pytest.raises(ValueError, match="shape"):
        equal_memory_rank((10,))
    with pytest.raises(ValueError, match="negative"):
        equal_memory_rank((-4, 8))
    with pytest.raises(TypeError):
        equal_memory_rank((4.0, 8))
    with pytest.raises(ValueError, match="unknown format"):
        equal_memory_rank((16, 16), branch="mxint9")


# --- MACs, bits and energy of a small layer by hand ------------------------
def test_small_layer_counts_by_hand():
    T, nin, nout, r = 5, 64, 48, 4
    lc = layer_cost(Layer("tiny", nin, nout, T), "W4A4+W8A8", rank=r)
    assert lc.macs == T * nout * nin + T * r * nin + T * nout * r == 15360 + 1280 + 960
    assert lc.macs_by_datapath == {"mxint4 x mxint4": 15360, "mxint8 x mxint8": 2240}
    assert lc.main_weight_bits == 48 * 64 * 4 + 48 * 2 * 8 == 13056
    assert lc.branch_weight_bits == (48 * 4 * 8 + 48 * 8) + (4 * 64 * 8 + 4 * 2 * 8) == 4032
    # x in mxint4 and in mxint8 (2 blocks per token row)
    assert lc.activation_bits == (5 * 64 * 4 + 5 * 2 * 8) + (5 * 64 * 8 + 5 * 2 * 8) == 4000
    # x R^T (5 x 4, one partial block per row) written and read once
    assert lc.intermediate_bits == 2 * (5 * 4 * 8 + 5 * 8) == 400
    assert lc.output_bits == 5 * 48 * 16
    assert lc.bits_moved == 13056 + 4032 + 4000 + 400 + 3840
    e = M.pj_per_bit
    assert lc.memory_pj["weights"] == pytest.approx((13056 + 4032) * e("dram"))
    assert lc.memory_pj["activations"] == pytest.approx((4000 + 3840) * e("sram_1mb"))
    assert lc.memory_pj["intermediate"] == pytest.approx(400 * e("sram_32kb"))
    # the fp32 add of the two paths: one per output element, plus the fp16 output rounding
    assert lc.compute_pj["output"] == pytest.approx(
        5 * 48 * (M.fp_add_pj(get("fp32")) + M.add_pj(11) + M.add_pj(5)))
    main_only = layer_cost(Layer("tiny", nin, nout, T), "W4A4")
    assert main_only.macs == 15360 and main_only.rank == 0 and main_only.branch_weight_bits == 0


def test_fp16_branch_dot_product_by_hand():
    d = dot_product_energy("fp16", "fp16", 10)
    assert d["multiply"] == pytest.approx(10 * 1.1)
    assert d["accumulate"] == pytest.approx(9 * 0.9)
    assert sum(d.values()) == pytest.approx(11.0 + 8.1)


def test_mx_dot_product_by_hand():
    d = dot_product_energy("mxint8", "mxint8", 32)
    assert d["multiply"] == pytest.approx(32 * 0.2)
    widths = [worst_case_bits("mxint8", "mxint8", 2 ** lvl) for lvl in range(1, 6)]
    adders = [16, 8, 4, 2, 1]
    assert d["adder_tree"] == pytest.approx(sum(n * M.add_pj(w) for n, w in zip(adders, widths)))
    assert d["scale"] == pytest.approx(M.add_pj(8))  # one E8M0 exponent add
    assert d["accumulate"] == 0.0
    d64 = dot_product_energy("mxint8", "mxint8", 64)
    # two blocks: twice the block, plus one fp32 inter-block add
    assert sum(d64.values()) == pytest.approx(2 * sum(d.values()) + 0.9)


def test_partial_block_costs_less_than_a_full_one():
    e = lambda k: sum(dot_product_energy("mxint8", "mxint8", k).values())  # noqa: E731
    assert e(32) < e(40) < e(64)
    assert e(0) == 0.0


# --- monotonicity ---------------------------------------------------------
def test_more_bits_cost_more_per_mac():
    for k in (32, 1152):
        e = [mac_energy_pj(f"mxint{b}", f"mxint{b}", k) for b in (4, 6, 8)]
        assert e[0] < e[1] < e[2]
        assert mac_energy_pj("mxint4", "mxint4", k) < mac_energy_pj("mxint4", "mxint8", k) < \
            mac_energy_pj("mxint8", "mxint8", k) < mac_energy_pj("fp16", "fp16", k)
    assert M.mult_pj(4, 4) < M.mult_pj(4, 8) < M.mult_pj(8, 8) < M.mult_pj(16, 16)
    assert M.fp_mult_pj(get("fp16")) < M.fp_mult_pj(get("fp32"))


@pytest.mark.parametrize("cfg", ["W4A4+W8A8", "W4A4+W4A8", "W4A4+FP16", "W4A4+W6A6"])
def test_larger_rank_costs_more(cfg):
    lay = Layer("l", 256, 192, 64)
    costs = [layer_cost(lay, cfg, rank=r) for r in (1, 8, 32, 64, 192)]
    for a, b in zip(costs, costs[1:]):
        assert a.energy_pj < b.energy_pj
        assert a.compute_energy_pj < b.compute_energy_pj
        assert a.macs < b.macs and a.weight_bits < b.weight_bits
    assert layer_cost(lay, "W4A4").energy_pj < costs[0].energy_pj


def test_quantized_branch_is_cheaper_than_fp16_branch_at_equal_memory():
    res = model_cost(builtin_model("pixart-sigma"), ["W4A4", "W4A4+FP16r32", "W4A4+W8A8"],
                     equal_memory=True)
    t = res["totals"]
    assert t["W4A4+W8A8"]["rank"] == 62
    assert t["W4A4+W8A8"]["branch_weight_bits"] <= t["W4A4+FP16r32"]["branch_weight_bits"]
    assert t["W4A4"]["energy_pj"] < t["W4A4+W8A8"]["energy_pj"] < t["W4A4+FP16r32"]["energy_pj"]
    assert t["W4A4"]["area_mm2"] < t["W4A4+W8A8"]["area_mm2"] < t["W4A4+FP16r32"]["area_mm2"]


def test_area_grows_with_throughput_and_width():
    lays = [Layer("l", 256, 256, 32)]
    a = [model_cost(lays, ["W4A4+W8A8"], rank=16, throughput=n)["totals"]["W4A4+W8A8"]["area_mm2"]
         for n in (256, 1024, 4096)]
    assert a[0] < a[1] < a[2]
    assert lane_area_um2("mxint4", "mxint4") < lane_area_um2("mxint8", "mxint8") < \
        lane_area_um2("fp16", "fp16")


def test_other_main_formats_cost_sensibly():
    lay = Layer("l", 512, 512, 16)
    for main in ("sint4", "nvfp4", "mxfp4"):
        c = layer_cost(lay, parse_config("W4A4+W8A8", main=main), rank=16)
        assert c.energy_pj > 0 and math.isfinite(c.energy_pj)
        assert c.macs_by_datapath[f"{main if main != 'mxfp4' else 'mxfp4_e2m1'} x "
                                  f"{main if main != 'mxfp4' else 'mxfp4_e2m1'}"] == 16 * 512 * 512
    assert layer_cost(lay, parse_config("W4A4", main="nvfp4")).main_weight_bits == \
        512 * 512 * 4 + 512 * 32 * 8 + 32


# --- layers and models ----------------------------------------------------
def test_rank_and_token_errors():
    lay = Layer("small", 16, 24, 4)
    with pytest.raises(ValueError, match=r"rank 17 .*small.*1\.\.min\(in, out\) = 16"):
        layer_cost(lay, "W4A4+W8A8", rank=17)
    with pytest.raises(ValueError, match="rank"):
        layer_cost(lay, "W4A4+W8A8r40")
    with pytest.raises(ValueError, match="tokens"):
        Layer("neg", 16, 16, -1)
    with pytest.raises(ValueError, match="tokens"):
        layer_cost(lay, "W4A4", tokens=-3)
    with pytest.raises(ValueError, match="unknown model"):
        builtin_model("stable-diffusion")
    with pytest.raises(ValueError, match="more than once"):
        model_cost([lay], ["W4A4", "w4a4"])


def test_builtin_shapes():
    px = builtin_model("pixart-sigma")
    assert sum(x.count for x in px) == 28 * 10
    assert {(x.in_features, x.out_features) for x in px} == {(1152, 1152), (1152, 4608), (4608, 1152)}
    assert {x.tokens for x in px} == {4096, 300}
    assert {x.tokens for x in builtin_model("pixart-sigma", 512)} == {1024, 300}
    sana = builtin_model("sana-1600m")
    assert {x.count for x in sana} == {20}
    shapes = {(x.name, x.in_features, x.out_features, x.tokens) for x in sana}
    assert ("ff.conv_inverted", 2240, 11200, 1024) in shapes
    assert ("ff.conv_point", 5600, 2240, 1024) in shapes
    assert ("attn2.to_k", 2240, 2240, 300) in shapes
    dw = [x for x in sana if x.kind == "depthwise"]
    assert len(dw) == 1 and dw[0].kernel == 9 and dw[0].out_features == 11200
    params = sum(x.count * x.in_features * x.out_features for x in sana if x.kind == "linear")
    assert 1.5e9 < params < 1.7e9  # SANA 1600M


def test_model_files(tmp_path):
    t = tmp_path / "m.toml"
    t.write_text('[[layers]]\nname = "a"\nin = 64\nout = 32\ntokens = 10\n'
                 '[[layers]]\nname = "b"\nin = 32\nout = 64\ntokens = 10\ncount = 3\n')
    lays = load_model(t)
    assert [(x.name, x.in_features, x.out_features, x.tokens, x.count) for x in lays] == \
        [("a", 64, 32, 10, 1), ("b", 32, 64, 10, 3)]
    j = tmp_path / "m.json"
    j.write_text(json.dumps([["a", 64, 32, 10], ["b", 32, 64, 7]]))
    assert [x.tokens for x in load_model(j)] == [10, 7]
    assert [x.tokens for x in load_model(j, tokens=2)] == [2, 2]


@pytest.mark.parametrize("body,match", [
    ('[[layers]]\nname = "a"\nin = 64\nout = 32\n', "missing"),
    ('[[layers]]\nname = "a"\nin = 64\nout = 32\ntokens = -5\n', "tokens"),
    ('[[layers]]\nname = "a"\nin = 0\nout = 32\ntokens = 5\n', "in"),
    ('[[layers]]\nname = "a"\nin = 64\nout = 32\ntokens = 5\nwidth = 3\n', "unknown keys"),
    ('layers = []\n', "non-empty"),
    ('layers = [[[\n', "malformed"),
    ('[[layers]]\nname = "a"\nin = "64"\nout = 32\ntokens = 5\n', "int"),
])
def test_bad_model_files(tmp_path, body, match):
    p = tmp_path / "bad.toml"
    p.write_text(body)
    with pytest.raises((ValueError, TypeError), match=match):
        load_model(p)


def test_bad_model_paths(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nope.toml")
    p = tmp_path / "m.yaml"
    p.write_text("x")
    with pytest.raises(ValueError, match=r"\.toml"):
        load_model(p)


def _write_safetensors(path, tensors: dict[str, list[int]]):
    header, offset = {}, 0
    for name, shape in tensors.items():
        n = math.prod(shape) * 2
        header[name] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * offset)


def test_safetensors_model(tmp_path):
    p = tmp_path / "w.safetensors"
    _write_safetensors(p, {"fc1.weight": [48, 64], "fc1.bias": [48], "fc2.weight": [64, 48]})
    lays = load_model(p, tokens=9)
    assert [(x.name, x.in_features, x.out_features, x.tokens) for x in lays] == \
        [("fc1.weight", 64, 48, 9), ("fc2.weight", 48, 64, 9)]
    with pytest.raises(ValueError, match="tokens"):
        load_model(p)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 10 ** 6) + b"{}")
    with pytest.raises(ValueError, match="malformed"):
        load_model(bad, tokens=1)
    bad.write_bytes(struct.pack("<Q", 4) + b"nope")
    with pytest.raises(ValueError, match="malformed"):
        load_model(bad, tokens=1)
    one_d = tmp_path / "b.safetensors"
    _write_safetensors(one_d, {"bias": [8]})
    with pytest.raises(ValueError, match="2-D"):
        load_model(one_d, tokens=1)


def test_safetensors_written_by_the_library(tmp_path):
    np = pytest.importorskip("numpy")
    st_numpy = pytest.importorskip("safetensors.numpy")
    p = tmp_path / "lib.safetensors"
    st_numpy.save_file({"proj": np.zeros((16, 32), np.float16)}, str(p))
    (lay,) = get_model(str(p), tokens=4)
    assert (lay.out_features, lay.in_features, lay.tokens) == (16, 32, 4)


# --- CLI ------------------------------------------------------------------
def test_cli_end_to_end(tmp_path, capsys):
    j, c, png = tmp_path / "c.json", tmp_path / "c.csv", tmp_path / "c.png"
    rc = cli_main(["cost", "--model", "pixart-sigma", "--configs",
                   "W4A4,W4A4+FP16r32,W4A4+W8A8,W4A4+W6A6,W4A4+W4A8", "--equal-memory",
                   "--json", str(j), "--csv", str(c), "--plot", str(png)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "W4A4+FP16r32" in out and "| config |" in out
    data = json.loads(j.read_text())
    assert list(data["totals"]) == ["W4A4", "W4A4+FP16r32", "W4A4+W8A8", "W4A4+W6A6", "W4A4+W4A8"]
    for t in data["totals"].values():
        for key in ("energy_pj", "compute_energy_pj", "memory_energy_pj", "weight_bytes", "macs",
                    "rank"):
            assert key in t
        assert t["energy_pj"] == pytest.approx(t["compute_energy_pj"] + t["memory_energy_pj"])
    assert data["totals"]["W4A4+W8A8"]["rank"] == 62
    assert data["totals"]["W4A4+FP16r32"]["rank"] == 32
    assert len(data["layers"]) == 5 * 10
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = c.read_text().splitlines()
    assert rows[0].startswith("config,layer") and len(rows) == 1 + 50 + 5
    assert sorted(os.listdir(tmp_path)) == ["c.csv", "c.json", "c.png"]  # no temporaries left


def test_cli_calibration_json(tmp_path, capsys):
    j = tmp_path / "cal.json"
    assert cli_main(["cost", "--calibration", "--json", str(j)]) == 0
    rows = json.loads(j.read_text())
    assert len(rows) >= 12
    for r in rows:
        assert set(r) == {"op", "anchor_pj", "model_pj", "source"}
        assert abs(r["model_pj"] / r["anchor_pj"] - 1) <= 0.05
    assert "int32_mult" in capsys.readouterr().out


@pytest.mark.parametrize("argv,match", [
    (["--configs", "W4A4,W4B4"], "grammar"),
    (["--model", "nosuchmodel"], "unknown model"),
    (["--configs", "W4A4+W8A8r5000"], "rank 5000"),
    (["--tokens", "-1"], "negative"),
    (["--model", "missing.toml"], "does not exist"),
    (["--tech-scale", "-1"], "energy_scale"),
])
def test_cli_bad_input_is_one_line_exit_2(argv, match, capsys):
    assert cli_main(["cost", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err


def test_write_atomic_keeps_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "out.json"
    p.write_text("old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(fileio.os, "replace", boom)
    with pytest.raises(OSError):
        cost_cmd.write_atomic(p, "new")
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.json"]
