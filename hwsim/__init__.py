"""hwsim: bit-exact integer-accumulate GEMM models, accumulator widths and hardware cost.

    res = hwsim.matmul(a, b, acc=hwsim.Accumulator(bits=20, overflow="saturate"),
                       inter_block=hwsim.FloatAcc(mantissa_bits=13, rounding="rtz"))

The cost model lives in ``hwsim.cost`` (import it explicitly).
"""
from hwsim.accumulator import (accumulator_bits, accumulator_table, block_length, element_of,
                               l1_bound_bits, observed_bits, width_bits, worst_case_bits)
from hwsim.gemm import (ACC_ROUNDINGS, OVERFLOWS, Accumulator, FloatAcc, GemmResult,
                        accumulator_trace, matmul)
from hwsim.tensorcore import TensorCore, tensor_core

__all__ = ["matmul", "Accumulator", "FloatAcc", "GemmResult", "OVERFLOWS", "ACC_ROUNDINGS",
           "accumulator_trace", "accumulator_bits", "accumulator_table", "block_length",
           "l1_bound_bits", "observed_bits", "width_bits", "worst_case_bits", "element_of",
           "TensorCore", "tensor_core"]
