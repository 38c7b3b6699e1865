"""LoRaQ: fully quantized low-rank branches, baselines, and a model driver.

    W ~ Q1(P) + Q2(L Omega) Q2(Omega^T R),   P = W - Q2(L Omega) Q2(Omega^T R)

``optimize`` (the LoRaQ optimizer), the baselines ``rtn``, ``svdquant``,
``lqer``, ``loftq``, ``naive`` (same result type), ``optimize_model`` over a
dict of weights with resumable per-layer files, ``save_result`` /
``load_result``. See the README, section LoRaQ.
"""
from analysis.loraq.baselines import loftq, lqer, naive, rtn, svdquant
from analysis.loraq.optimizer import hadamard, optimize
from analysis.loraq.result import METHODS, LoRaQResult, load_result, save_result

# The one table from a method's name to its function (the driver, the report and
# ``loraq quantize`` all dispatch through it).
METHOD_FUNCTIONS = {"loraq": optimize, "rtn": rtn, "svdquant": svdquant, "lqer": lqer,
                    "loftq": loftq, "naive": naive}
assert tuple(METHOD_FUNCTIONS) == METHODS

__all__ = ["optimize", "rtn", "svdquant", "lqer", "loftq", "naive", "hadamard", "LoRaQResult",
           "METHODS", "METHOD_FUNCTIONS", "save_result", "load_result"]
