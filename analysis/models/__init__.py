"""Model sources: the only place that knows a model family (see ``base`` for the protocol).

    from analysis.models import resolve
    src = resolve("dit-digits")          # or "minilm", a diffusers / transformers dir, a file
    analyzer.analyze(src.module, configs, src.calibration, src.evaluation, layers=src.layers,
                     groups=src.groups, end_metric=src.end_metric)
"""
from analysis.models.base import (EndMetric, ModelSource, NextTokenKL, OutputCosine, OutputSQNR,
                                  quantizable_layers)
from analysis.models.sources import BUILTIN, DIFFUSERS_CLASSES, INPUT_KEYS, resolve

__all__ = ["resolve", "ModelSource", "EndMetric", "OutputCosine", "OutputSQNR", "NextTokenKL",
           "quantizable_layers", "BUILTIN", "DIFFUSERS_CLASSES", "INPUT_KEYS"]
