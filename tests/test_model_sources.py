"""Model sources: users' diffusers and transformers directories through ``loraq report``.

Tiny random-config PixArt, SANA and DiT transformers (diffusers) and a tiny BERT
and causal LM (transformers) are saved with ``save_pretrained`` to a temporary
directory and analyzed end to end; bad inputs are refused with one line, exit 2.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from analysis.cli import main
from analysis.models import quantizable_layers, resolve
from analysis.models.base import is_pointwise_conv

CONFIGS = "W4A4,W4A4+W8A8r2"


def _pixart(seed=0):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        num_layers=2, cross_attention_dim=32, sample_size=8, patch_size=2, caption_channels=16,
        norm_num_groups=1, use_additional_conditions=False)


def _sana(seed=0):
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(seed)
    return SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32,
        caption_channels=16, mlp_ratio=2.5, sample_size=8, patch_size=1)


def _dit(seed=0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                 out_channels=4, num_layers=2, sample_size=8, patch_size=2,
                                 num_embeds_ada_norm=10, norm_num_groups=1)


def _run(tmp_path, model_dir, *extra, name="out"):
    out = tmp_path / name
    rc = main(["report", "--model", str(model_dir), "--configs", CONFIGS, "--steps", "2",
               "--no-progress", "--out", str(out), *extra])
    return rc, out


def _results(tmp_path, capsys, model_dir, *extra):
    """``loraq report`` on ``model_dir`` (must exit 0, else its stderr is shown): the
    parsed results.json and the output directory."""
    rc, out = _run(tmp_path, model_dir, *extra)
    assert rc == 0, capsys.readouterr().err
    return json.loads((out / "results.json").read_text()), out


def _linear_like(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_pointwise_conv(m)]


@pytest.mark.parametrize("make", [_pixart, _sana, _dit], ids=["pixart", "sana", "dit"])
def test_diffusers_dir_report_every_layer(tmp_path, make, capsys):
    model = make()
    d = tmp_path / "transformer"
    model.save_pretrained(str(d), safe_serialization=True)
    res, out = _results(tmp_path, capsys, d)
    expected = ["model." + n for n in _linear_like(model)]
    assert res["layer_names"] == expected and len(expected) > 10
    for cfg in res["configs"].values():
        assert [l["name"] for l in cfg["layers"]] == expected
        lay = cfg["layers"][0]
        ts = lay["propagated_sqnr_db_by_timestep"]
        assert len(ts) == 4 and all(v is not None for v in ts.values())
        assert lay["propagated_sqnr_db_worst_t"] == pytest.approx(min(ts.values()))
        em = cfg["end_metrics"]
        assert em["output_sqnr_db"] is not None and len(em["output_sqnr_db_by_timestep"]) == 4
    # a (smoothed LoRaQ) branch lowers the error inside the model against plain RTN; smoothing
    # against none is tested on dit-digits, whose activations have outlier channels
    c = res["configs"]
    assert c["W4A4+W8A8r2"]["propagated_sqnr_db_mean"] > c["W4A4"]["propagated_sqnr_db_mean"]
    notes = " ".join(res["settings"]["notes"])
    assert "seeded Gaussian" in notes
    md = (out / "report.md").read_text()
    assert "timestep_heatmap.png" in md and "Modules left in full precision" in md
    if make is _sana:  # GLUMBConv: 1x1 convs quantized, the depthwise one left out and listed
        convs = [n for n in expected if "conv_inverted" in n or "conv_point" in n]
        assert convs, expected
        sk = {s["name"]: s["reason"] for s in res["settings"]["skipped_layers"]}
        assert any("conv_depth" in n and "depthwise" in r for n, r in sk.items()), sk


def test_quantized_1x1_conv_matches_linear(tmp_path):
    """A 1x1 conv is quantized exactly as the linear layer with its reshaped weight."""
    from analysis.fit import fit_weight
    from analysis.layers import QuantConv1x1, QuantLinear
    from analysis.recipe import Recipe

    torch.manual_seed(0)
    conv = nn.Conv2d(64, 48, 1)
    recipe = Recipe.parse("W4A4+W8A8r4", steps=2)
    res = fit_weight(conv.weight.detach().reshape(48, 64).numpy(), recipe)
    qc = QuantConv1x1.from_result(res, recipe.config, bias=conv.bias.detach())
    ql = QuantLinear.from_result(res, recipe.config, bias=conv.bias.detach())
    x = torch.randn(2, 64, 3, 5)
    y = qc(x)
    y_ref = ql(x.permute(0, 2, 3, 1).reshape(-1, 64)).reshape(2, 3, 5, 48).permute(0, 3, 1, 2)
    assert torch.equal(y, y_ref)
    assert (y - conv(x)).abs().max() < 0.5 * conv(x).abs().max()


def _tokenizer(dirpath):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from analysis import minilm

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]",
                                                                        "[SEP]", "[MASK]"])
    tok.train_from_iterator(minilm.sentences("calibration") + minilm.sentences("evaluation"),
                            trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(str(dirpath))
    return fast


def test_transformers_encoder_dir(tmp_path, capsys):
    from transformers import BertConfig, BertModel

    d = tmp_path / "bert"
    tok = _tokenizer(d)
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64,
                                 max_position_embeddings=64))
    model.save_pretrained(str(d), safe_serialization=True)
    res, _ = _results(tmp_path, capsys, d, "--max-sentences", "8")
    assert res["layer_names"] == _linear_like(model)  # the pooler's dense layer included
    em = res["configs"]["W4A4"]["end_metrics"]
    assert 0.0 < em["mean_cosine"] <= 1.0 and em["min_cosine"] <= em["mean_cosine"]
    types = {s["type"] for s in res["settings"]["skipped_layers"]}
    assert "Embedding" in types and "LayerNorm" in types


def test_transformers_causal_lm_dir(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path / "llama"
    tok = _tokenizer(d)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=2, max_position_embeddings=64,
                                         pad_token_id=tok.pad_token_id))
    model.save_pretrained(str(d), safe_serialization=True)
    res, _ = _results(tmp_path, capsys, d, "--max-sentences", "8")
    assert res["layer_names"] == _linear_like(model) and "lm_head" in res["layer_names"]
    em = res["configs"]["W4A4"]["end_metrics"]
    assert em["kl_mean"] > 0 and em["kl_max"] >= em["kl_mean"]
    assert 0 <= em["top1_agreement"] <= 1


def test_kl_metric_is_zero_for_identical_logits():
    from analysis.models import NextTokenKL

    lg = [torch.randn(2, 5, 11)]
    m = NextTokenKL([torch.ones(2, 5)])
    r = m.measure(None, lg, lg)
    assert r["kl_mean"] == 0.0 and r["top1_agreement"] == 1.0
    r2 = m.measure(None, [lg[0].flip(-1)], lg)
    assert r2["kl_mean"] > 0.1


# --------------------------------------------------------------------------- inputs


def _pixart_dir(tmp_path):
    d = tmp_path / "pixart"
    _pixart().save_pretrained(str(d), safe_serialization=True)
    return d


def test_captured_inputs_drive_the_report(tmp_path, capsys):
    """capture_inputs records a sampling loop's calls; --inputs uses them, per timestep."""
    from analysis.models.capture import capture_inputs

    d = _pixart_dir(tmp_path)
    from diffusers import PixArtTransformer2DModel
    model = PixArtTransformer2DModel.from_pretrained(str(d), local_files_only=True)

    def loop():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 4, 8, 8, generator=g)
        cond = torch.randn(2, 6, 16, generator=g)
        for t in (900, 600, 300):
            eps = model(x, encoder_hidden_states=cond, timestep=torch.tensor([t, t]),
                        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                        return_dict=False)[0]
            x = x - 0.1 * eps

    path = tmp_path / "captured.safetensors"
    data = capture_inputs(model, path, loop)
    assert data["latents"].shape == (6, 4, 8, 8) and data["timesteps"].tolist() == [900] * 2 + [600] * 2 + [300] * 2
    res, _ = _results(tmp_path, capsys, d, "--inputs", str(path))
    lay = res["configs"]["W4A4"]["layers"][0]
    assert set(lay["propagated_sqnr_db_by_timestep"]) == {"900", "600", "300"}
    assert not res["settings"]["notes"]


@pytest.mark.parametrize("drop,change,match", [
    ("encoder_hidden_states", None, "lacks key 'encoder_hidden_states'.*caption_channels"),
    (None, ("latents", torch.zeros(4, 3, 8, 8)), r"'latents' has shape \(4, 3, 8, 8\), expected \(4, 4"),
    (None, ("timesteps", torch.zeros(3)), r"'timesteps' has shape \(3,\), expected \(4,\)"),
    (None, ("encoder_hidden_states", torch.zeros(4, 6, 7)), r"expected \(4, 'L', 16\)"),
])
def test_bad_inputs_file_refused(tmp_path, capsys, drop, change, match):
    from safetensors.torch import save_file

    d = _pixart_dir(tmp_path)
    data = {"latents": torch.zeros(4, 4, 8, 8), "timesteps": torch.tensor([999, 999, 500, 500]),
            "encoder_hidden_states": torch.zeros(4, 6, 16)}
    if drop:
        del data[drop]
    if change:
        data[change[0]] = change[1]
    p = tmp_path / "bad.safetensors"
    save_file(data, str(p))
    rc, out = _run(tmp_path, d, "--inputs", str(p))
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    import re
    assert re.search(match, err), err
    assert not (out / "results.json").exists()


def test_bad_model_dirs_refused(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run(tmp_path, empty)[0] == 2
    assert "has no config.json" in capsys.readouterr().err

    unsup = tmp_path / "unet"
    unsup.mkdir()
    (unsup / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    (unsup / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    assert _run(tmp_path, unsup)[0] == 2
    err = capsys.readouterr().err
    assert "'UNet2DConditionModel'" in err and "PixArtTransformer2DModel" in err
    assert "SanaTransformer2DModel" in err and len(err.strip().splitlines()) == 1

    pick = tmp_path / "pickled"
    pick.mkdir()
    (pick / "config.json").write_text(json.dumps({"_class_name": "PixArtTransformer2DModel"}))
    torch.save({"w": torch.zeros(2)}, pick / "diffusion_pytorch_model.bin")
    assert _run(tmp_path, pick)[0] == 2
    err = capsys.readouterr().err
    assert "only pickled weights" in err and "arbitrary code" in err

    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "x", "auto_map": {"AutoModel": "m.M"}}))
    (remote / "model.safetensors").write_bytes(b"")
    assert _run(tmp_path, remote)[0] == 2
    assert "remote code" in capsys.readouterr().err


def test_rank_wider_than_every_layer_refused(tmp_path, capsys):
    d = _pixart_dir(tmp_path)
    out = tmp_path / "r"
    rc = main(["report", "--model", str(d), "--configs", "W4A4+W8A8r40", "--steps", "1",
               "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "rank 40 exceeds the width of every layer (the widest" in err
    assert err.count("\n") == 1
    assert not (out / "results.json").exists()


def test_rank_capped_on_narrow_layers_recorded(tmp_path, capsys):
    """r20 fits the 32-wide layers but not the 16-wide caption projection: those get rank
    15, for SVDQuant and LoRaQ alike, recorded per layer and said in the notes."""
    d = _pixart_dir(tmp_path)
    out = tmp_path / "c"
    rc = main(["report", "--model", str(d), "--configs", "W4A4+W8A8r20,W4A4+FP16r20", "--steps",
               "1", "--no-progress", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    for cfg in res["configs"].values():
        narrow = [L for L in cfg["layers"] if min(L["shape"]) <= 20]
        assert narrow and all(L["rank"] == min(L["shape"]) - 1 and L["rank_requested"] == 20
                              for L in narrow)
        assert all(L["rank"] == 20 and "rank_requested" not in L for L in cfg["layers"]
                   if min(L["shape"]) > 20)
    assert sum("rank 20 is not below the width" in n for n in res["settings"]["notes"]) == 2


def test_quantizable_layers_lists_what_stays_fp():
    model = _sana()
    names, skipped = quantizable_layers(model)
    assert names == _linear_like(model)
    kinds = {s["type"] for s in skipped}
    assert "Conv2d" in kinds  # the patch embedding and the depthwise convs
    assert all(s["reason"] for s in skipped)


def test_resolve_unknown_name():
    with pytest.raises(FileNotFoundError, match="dit-digits, minilm"):
        resolve("no-such-model")


def test_report_on_two_dask_workers_is_bit_identical(tmp_path, capsys):
    """The analyzer's per-layer fits as Dask tasks on a 2-process LocalCluster give the same
    results.json as the in-process run."""
    d = _pixart_dir(tmp_path)
    rc, serial = _run(tmp_path, d, name="serial")
    assert rc == 0, capsys.readouterr().err
    rc, dask = _run(tmp_path, d, "--workers", "2", name="dask")
    assert rc == 0, capsys.readouterr().err
    assert (serial / "results.json").read_bytes() == (dask / "results.json").read_bytes()
    rc, _ = _run(tmp_path, d, "--workers", "0", name="zero")
    assert rc == 2 and "workers=0 is not allowed" in capsys.readouterr().err


def test_report_device_cpu_through_torch_backend_is_identical(tmp_path, capsys):
    """--device cpu runs the simulated layers on the torch backend and LoRaQ's loop on the
    device: the same results.json as the default (Numba) path; an absent device is refused."""
    d = _pixart_dir(tmp_path)
    rc, default = _run(tmp_path, d, name="default")
    assert rc == 0, capsys.readouterr().err
    rc, dev = _run(tmp_path, d, "--device", "cpu", name="dev")
    assert rc == 0, capsys.readouterr().err
    a = json.loads((default / "results.json").read_text())
    b = json.loads((dev / "results.json").read_text())
    assert b["settings"].pop("device") == "cpu" and a["settings"].pop("device") is None
    assert a == b
    if not torch.cuda.is_available():
        rc, _ = _run(tmp_path, d, "--device", "cuda", name="cuda")
        err = capsys.readouterr().err
        assert rc == 2 and "CUDA is not available" in err and len(err.strip().splitlines()) == 1
