"""analysis: LoRaQ and its baselines, model sources, the analyzer, reports and ``loraq``.

The quantized model as an artifact::

    import analysis
    recipe = analysis.Recipe.parse("W4A4+W8A8")          # or a Recipe(...) of your own
    analysis.quantize_(model, recipe, calibration=batches)
    analysis.save_quantized(model, "out/model-w4a4-w8a8")
    model = analysis.load_quantized("out/model-w4a4-w8a8")
"""
from analysis.checkpoint import load_quantized, save_quantized
from analysis.quantize import quantize_
from analysis.recipe import Recipe, Smoothing

__all__ = ["Recipe", "Smoothing", "quantize_", "save_quantized", "load_quantized"]
