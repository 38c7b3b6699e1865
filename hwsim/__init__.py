"""hwsim: integer-accumulate GEMM models, accumulator widths and hardware cost."""
from hwsim.accumulator import element_of, worst_case_bits
from hwsim.gemm import ACC_ROUNDINGS, OVERFLOWS, Accumulator, FloatAcc, GemmResult, matmul

__all__ = ["matmul", "Accumulator", "FloatAcc", "GemmResult", "OVERFLOWS", "ACC_ROUNDINGS",
           "worst_case_bits", "element_of"]
