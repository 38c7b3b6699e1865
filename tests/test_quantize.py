"""The quantized model as an artifact: Recipe, quantize_, save_quantized / load_quantized.

Round trips run the loading in a fresh process (no state shared with the quantization)
and compare outputs bit for bit; damaged checkpoints are refused naming file and tensor.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import analysis
from analysis import Recipe, Smoothing, load_quantized, quantize_, save_quantized
from analysis.checkpoint import MANIFEST, TENSORS, checkpoint_bytes
from analysis.layers import QuantLinear
from hwsim.cost import layer_cost

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("W4A4", "W4A4+FP16r4", "W4A4+W8A8r4")   # RTN, SVDQuant, LoRaQ (smoothed)


# --------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("name", ["W4A4", "W4A4+FP16", "W4A4+FP16r32", "W4A4+W8A8",
                                  "W4A4+W6A6r64", "W4A4+W8A8-nosmooth", "W4A4+W4A8r16-nosmooth",
                                  "W4A4+W8A8-lqer", "W4A4+W8A8r8-loftq", "W8A8+W6A6-naive"])
def test_recipe_names_render_back_and_json_round_trips(name):
    r = Recipe.parse(name)
    assert r.name == name
    assert Recipe.from_json(r.to_json()) == r
    assert Recipe.parse(r.name) == r


def test_recipe_fields():
    r = Recipe.parse("W4A4+W6A6", main="sint4", branch="mxfp", ref_rank=8, steps=30, seed=3)
    assert (r.main_weight, r.main_act, r.branch_weight, r.branch_act) == (
        "sint4", "sint4", "mxfp6_e2m3", "mxfp6_e2m3")
    assert r.method == "loraq" and r.rank is None and r.ref_rank == 8 and r.steps == 30
    assert r.smoothing == Smoothing((0.5,), (0.5,))
    assert Recipe.parse("W4A4+W8A8-nosmooth").smoothing is None
    assert Recipe.parse("W4A4+FP16").method == "svdquant"
    assert Recipe.parse("W4A4").method == "none" and Recipe.parse("W4A4").layer_method == "rtn"
    assert Recipe.parse("W4A4+W8A8-lqer").smoothing is None  # data-free baselines
    # the formats are part of the recipe (and of its cache key), not of its name
    m = Recipe.parse("W4A4+W6A6")
    assert m.name == r.name and m != r and m.key() != r.key()
    grid = Recipe.parse("W4A4+W8A8", smoothing=Smoothing((0.25, 0.5), (0.5, 0.75), "output"))
    assert not grid.smoothing.fixed and Recipe.from_json(grid.to_json()) == grid
    assert grid.key() != Recipe.parse("W4A4+W8A8", smoothing=Smoothing((0.25, 0.5),
                                                                        (0.5, 0.75))).key()


@pytest.mark.parametrize("bad, match", [
    ("W4Q4", "grammar"), ("W4A4-nosmooth", "with a branch"), ("W4A4+FP16-nosmooth", "quantized"),
    ("W4A4-lqer", "needs a branch"), ("W4A4+FP16-lqer", "does not fit"), ("W4A4r8", "branch"),
])
def test_recipe_bad_names(bad, match):
    with pytest.raises(ValueError, match=match):
        Recipe.parse(bad)


def test_recipe_bad_fields():
    with pytest.raises(ValueError, match="method='svd'"):
        Recipe(method="svd", branch_weight="mxint8", branch_act="mxint8")
    with pytest.raises(ValueError, match="fp16"):
        Recipe(method="svdquant", branch_weight="mxint8", branch_act="mxint8")
    with pytest.raises(ValueError, match="unknown fields"):
        Recipe.from_dict(dict(Recipe().to_dict(), colour="red"))
    with pytest.raises(ValueError, match="version"):
        Recipe.from_dict(dict(Recipe().to_dict(), version=99))
    with pytest.raises(ValueError, match="not match"):
        Recipe.from_dict(dict(Recipe().to_dict(), name="W8A8"))
    with pytest.raises(ValueError, match="rank=0"):
        Recipe(method="loraq", branch_weight="mxint8", branch_act="mxint8", rank=0)


# --------------------------------------------------------------------------- models


def _pixart(seed=0):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        num_layers=2, cross_attention_dim=32, sample_size=8, patch_size=2, caption_channels=16,
        norm_num_groups=1, use_additional_conditions=False).eval()


def _pixart_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(2, 4, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(2, 6, 16, generator=g),
            "timestep": torch.tensor([500, 100]),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}, "return_dict": False}


def _bert(seed=0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64,
                                max_position_embeddings=16, attn_implementation="eager")).eval()


def _bert_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (3, 10), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "return_dict": False}


def _dit():
    from analysis.models.dit_digits import core

    return core.load()[0].transformer


def _dit_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(3, 1, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(3, 4, 64, generator=g),
            "timestep": torch.tensor([900, 500, 100]),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}, "return_dict": False}


MODELS = {"pixart": (_pixart, _pixart_inputs), "bert": (_bert, _bert_inputs),
          "dit-digits": (_dit, _dit_inputs)}


def _output(model, batch) -> torch.Tensor:
    with torch.inference_mode():
        return model(**batch)[0]


def _quantized(kind, recipe, **kw):
    make, inputs = MODELS[kind]
    model = make()
    quantize_(model, Recipe.parse(recipe, steps=5), calibration=[inputs(1), inputs(2)], **kw)
    return model


_LOADER = """
import sys, torch
from safetensors.torch import save_file
sys.path.insert(0, sys.argv[1])
from test_quantize import MODELS, _output
from analysis import load_quantized
for d, kind, out in zip(sys.argv[2::3], sys.argv[3::3], sys.argv[4::3]):
    model = load_quantized(d)
    save_file({"y": _output(model, MODELS[kind][1](3)).contiguous()}, out)
"""


def test_save_load_in_a_fresh_process_is_bit_identical(tmp_path):
    """quantize_, save_quantized; load_quantized(dir) in a fresh process (the model rebuilt
    from config.json) gives the in-memory quantized model's outputs bit for bit: a tiny
    PixArt-Sigma transformer and a transformers BERT for RTN, SVDQuant and LoRaQ, and the
    built-in dit-digits transformer for LoRaQ."""
    args, expected = [], {}
    for kind in MODELS:
        for recipe in (RECIPES if kind != "dit-digits" else RECIPES[2:]):
            model = _quantized(kind, recipe)
            q = model.get_submodule(analysis.quantize.quantized_layers(model).popitem()[0])
            assert isinstance(q, QuantLinear) and q.recipe.name == recipe
            d = tmp_path / f"{kind}-{recipe}"
            save_quantized(model, d)
            assert (d / "config.json").is_file()
            out = tmp_path / f"{kind}-{recipe}.y.safetensors"
            expected[out] = _output(model, MODELS[kind][1](3))
            args += [str(d), kind, str(out)]
    r = subprocess.run([sys.executable, "-c", _LOADER, str(ROOT / "tests"), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for out, y in expected.items():
        got = load_file(str(out))["y"]
        assert torch.equal(got, y), out.name
    # and the quantization is real: RTN's output differs from the full-precision model's
    fp = _output(_pixart(), _pixart_inputs(3))
    assert not torch.equal(expected[tmp_path / "pixart-W4A4.y.safetensors"], fp)


def test_load_into_a_given_model_and_layer_filter(tmp_path):
    model = _quantized("pixart", "W4A4+W8A8r4", layers=lambda n, m: "ff." in n)
    qnames = list(analysis.quantize.quantized_layers(model))
    assert qnames and all("ff." in n for n in qnames)
    save_quantized(model, tmp_path / "c")
    again = load_quantized(tmp_path / "c", model=_pixart(seed=5))  # other weights: overwritten
    x = _pixart_inputs(4)
    assert torch.equal(_output(again, x), _output(model, x))
    # the stored codes, scales and buffers come back bit for bit (compared as integers)
    for n, q in analysis.quantize.quantized_layers(model).items():
        r = again.get_submodule(n)
        for a, b in ((q.main_q, r.main_q), (q.left_q, r.left_q), (q.right_q, r.right_q)):
            assert np.array_equal(a.codes, b.codes) and np.array_equal(a.scales, b.scales)
        for buf in ("weight", "left", "right", "smooth", "bias"):
            ta, tb = getattr(q, buf), getattr(r, buf)
            assert (ta is None) == (tb is None)
            if ta is not None:
                assert torch.equal(ta.view(torch.int32), tb.view(torch.int32)), (n, buf)
    with pytest.raises(ValueError, match="not quantizable layers"):
        quantize_(_pixart(), "W4A4", layers=["nope"])
    with pytest.raises(ValueError, match="selected none of the model's"):
        quantize_(_pixart(), "W4A4", layers=lambda n, m: False)
    with pytest.raises(ValueError, match="empty list"):
        quantize_(_pixart(), "W4A4", layers=[])
    with pytest.raises(ValueError, match="give calibration inputs"):
        quantize_(_pixart(), "W4A4+W8A8")


def test_checkpoint_bytes_match_the_cost_model(tmp_path):
    """The quantized tensors' bytes are within 2 % of the bits hwsim.cost counts (element
    codes, block scales, branch factors): for 4-, 6- and 8-bit branches and FP16."""
    for recipe in ("W4A4", "W4A4+W8A8r4", "W4A4+W6A6r4", "W4A4+FP16r4"):
        model = _quantized("pixart", recipe)
        d = tmp_path / recipe
        save_quantized(model, d)
        r = Recipe.parse(recipe)
        bits = 0
        for q in analysis.quantize.quantized_layers(model).values():
            lc = layer_cost(("l", q.in_features, q.out_features, 1), r.config,
                            rank=q.rank or None)
            bits += lc.weight_bits
        b = checkpoint_bytes(d)
        assert abs(8 * b["quantized"] - bits) <= 0.02 * bits, (recipe, 8 * b["quantized"], bits)
        assert b["files"][TENSORS] >= b["quantized"] + b["unquantized"] + b["smooth_bias"]


def test_damaged_checkpoints_are_refused_naming_file_and_tensor(tmp_path):
    model = _quantized("bert", "W4A4+W8A8r4")
    d = tmp_path / "c"
    save_quantized(model, d)
    f = d / TENSORS
    good = f.read_bytes()
    name = "encoder.layer.0.attention.self.query.main.codes"
    tensors = load_file(str(f))
    # flipped bits in one tensor
    tensors[name] = tensors[name] ^ 1
    save_file(tensors, str(f))
    with pytest.raises(ValueError, match=f"tensor '{name}' is damaged"):
        load_quantized(d)
    # truncated
    f.write_bytes(good[:len(good) // 2])
    with pytest.raises(ValueError, match="damaged or truncated"):
        load_quantized(d)
    # a pickle instead of safetensors
    torch.save({"x": torch.zeros(1)}, f)
    with pytest.raises(ValueError, match="pickle"):
        load_quantized(d)
    f.write_bytes(good)
    # a manifest that does not fit the tensors, or is not JSON
    man = json.loads((d / MANIFEST).read_text())
    man["tensors"][name]["shape"] = [1, 2]
    (d / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(ValueError, match=f"tensor '{name}' is uint8"):
        load_quantized(d)
    (d / MANIFEST).write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_quantized(d)
    (d / MANIFEST).unlink()
    with pytest.raises(ValueError, match="is missing"):
        load_quantized(d)
    # the right checkpoint for the wrong model
    save_quantized(model, tmp_path / "ok")
    with pytest.raises(ValueError, match="layer 'encoder.layer.0.attention.self.query'"):
        load_quantized(tmp_path / "ok", model=_pixart())


def test_dit_digits_checkpoint_generates_the_reports_digits(tmp_path):
    """A quantized dit-digits transformer, saved and loaded back, generates the same digits
    as the analyzer's configuration, bit for bit (the report's picture grid)."""
    from analysis import analyzer
    from analysis.models.dit_digits import core
    from analysis.models.dit_digits.source import _grid, dit_digits_source

    src = dit_digits_source(samples=4, sample_steps=2)
    layers = [n for n in src.layers if ".transformer_blocks.0." in n]
    recipe = Recipe.parse("W4A4+W8A8", ref_rank=8, steps=5)
    opts = analyzer.AnalysisOptions(layers=layers, groups=src.groups, end_metric=src.end_metric)
    res = analyzer.analyze(src.module, [recipe], src.calibration, src.evaluation, opts)
    grid = res["configs"]["W4A4+W8A8"]["end_metrics"]["grid_uint8"]
    quantize_(src.module, recipe, calibration=src.calibration, layers=layers)
    save_quantized(src.module.transformer, tmp_path / "dit")
    den = core.Denoiser(load_quantized(tmp_path / "dit"), src.module.conditions.detach())
    img, _ = core.sample(den, 4, seed=0, steps=2, guidance=src.extra["guidance"])
    assert _grid(img) == grid
    fp_grid = res["reference"]["end_metrics"]["grid_uint8"]
    assert grid != fp_grid  # the quantization changed the digits


def test_weights_only_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    layers = {}
    for n, shape in (("a", (32, 64)), ("b", (16, 32))):
        res = analysis.fit.fit_weight(rng.standard_normal(shape).astype(np.float32),
                                      Recipe.parse("W4A4+W8A8r4-nosmooth", steps=3))
        layers[n] = QuantLinear.from_result(res, Recipe.parse("W4A4+W8A8r4").config, name=n)
    save_quantized(layers, tmp_path / "w")
    back = load_quantized(tmp_path / "w")
    assert set(back) == {"a", "b"} and not (tmp_path / "w" / "config.json").exists()
    x = torch.randn(5, 64)
    assert torch.equal(back["a"](x), layers["a"](x))
    assert math.isclose(checkpoint_bytes(tmp_path / "w")["unquantized"], 0)
