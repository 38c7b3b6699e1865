"""The built-in all-MiniLM-L6-v2 as a model source (sentence embeddings, output cosine)."""
from __future__ import annotations

from analysis.files import file_sha256
from analysis.models.base import ModelSource, OutputCosine, quantizable_layers

__all__ = ["minilm_source", "minilm_inputs"]


def minilm_inputs(max_sentences: int | None = None, batch_size: int = 16) -> tuple[list, list]:
    """Tokenized calibration and evaluation batches of the shipped sentences.

    ``max_sentences`` keeps the first n of each split (even n for evaluation,
    so paraphrase pairs stay whole).
    """
    from analysis import minilm

    tok = minilm.tokenizer()

    def batches(split, n):
        s = minilm.sentences(split)
        if n is not None:
            s = s[:n]
        return [minilm.tokenize(s[i:i + batch_size], tok=tok) for i in range(0, len(s), batch_size)]

    n_eval = None if max_sentences is None else max(4, max_sentences - max_sentences % 2)
    return batches("calibration", max_sentences), batches("evaluation", n_eval)


def minilm_source(max_sentences: int | None = None, sentences=None, path=None) -> ModelSource:
    """The encoder (transformers' BertModel, package directory or ``path``), the shipped
    sentence splits (or ``sentences`` = (calibration, evaluation)), output cosine."""
    from analysis import minilm

    model = minilm.MiniLM.from_pretrained(path)
    if sentences is None:
        cal, ev = minilm_inputs(max_sentences)
        n_cal, n_ev = len(minilm.sentences("calibration")), len(minilm.sentences("evaluation"))
        if max_sentences:
            n_cal = min(n_cal, max_sentences)
            n_ev = min(n_ev, max(4, max_sentences - max_sentences % 2))
    else:
        c, e = sentences
        if max_sentences:
            c, e = c[:max_sentences], e[:max(3, max_sentences)]
        tok = minilm.tokenizer()
        cal = [minilm.tokenize(c[i:i + 16], tok=tok) for i in range(0, len(c), 16)]
        ev = [minilm.tokenize(e[i:i + 16], tok=tok) for i in range(0, len(e), 16)]
        n_cal, n_ev = len(c), len(e)
    names, skipped = quantizable_layers(model)
    fp = file_sha256(minilm.model_dir() / minilm.WEIGHTS_FILE) if path is None else ""
    return ModelSource(name="all-MiniLM-L6-v2 (built-in)", kind="minilm", fingerprint=fp,
                       module=model, layers=names, skipped=skipped, calibration=cal,
                       evaluation=ev, end_metric=OutputCosine(),
                       calibration_desc=f"{n_cal} sentences", evaluation_desc=f"{n_ev} sentences",
                       ref_rank=32,
                       default_configs=("W4A4", "W4A4+FP16r32", "W4A4+W8A8", "W4A4+W6A6",
                                        "W4A4+W4A8"))
