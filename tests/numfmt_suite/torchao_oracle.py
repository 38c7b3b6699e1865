"""torchao's ``to_mx`` as a subprocess oracle for test_numfmt_scale_rules.py.

Run as ``PYTHONPATH=<repo>/.oracle/torchao python torchao_oracle.py REQUESTS INPUTS OUTPUTS``:

* REQUESTS, a JSON list; request ``i`` is ``{"input": key of INPUTS, "input_dtype":
  "float32" | "bfloat16", "elem_dtype": "float8_e4m3fn" | "float8_e5m2" | "fp6_e2m3" |
  "fp6_e3m2" | "float4_e2m1fn_x2", "rule": "floor" | "ceil" | "even" | "rceil",
  "block_size": int}``;
* INPUTS, a .npz of arrays whose last axis is a multiple of the block size: float32
  values, or for bfloat16 their 16-bit patterns as uint16;
* OUTPUTS, written (atomically) as a .npz: ``scales_i``, the E8M0 scale codes (uint8,
  one per block, flattened), and ``codes_i``, the element codes (uint8, one per element,
  FP4 unpacked, the input's shape), from ``to_mx(x, elem_dtype, block_size,
  ScaleCalculationMode(rule))`` eager on the CPU; plus ``torchao_version`` and
  ``torchao_file`` (which torchao answered).

torchao is imported only here, never in the pytest process: installed beside diffusers
and transformers it is imported by them on every start, with warnings on stderr, so the
project keeps it out of .venv (scripts/setup installs it in .oracle/torchao). This script
imports nothing of the project.
"""
import json
import os
import sys
import warnings

import numpy as np
import torch


def main(requests_path: str, inputs_path: str, outputs_path: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torchao
        from torchao.prototype.mx_formats.config import ScaleCalculationMode
        from torchao.prototype.mx_formats.constants import DTYPE_FP6_E2M3, DTYPE_FP6_E3M2
        from torchao.prototype.mx_formats.kernels import unpack_uint4
        from torchao.prototype.mx_formats.mx_tensor import to_mx
    elem_dtypes = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2,
                   "fp6_e2m3": DTYPE_FP6_E2M3, "fp6_e3m2": DTYPE_FP6_E3M2,
                   "float4_e2m1fn_x2": torch.float4_e2m1fn_x2}
    torch.set_num_threads(1)  # small inputs; results do not depend on it
    with open(requests_path) as f:
        requests = json.load(f)
    inputs = np.load(inputs_path, allow_pickle=False)
    out = {"torchao_version": np.array(torchao.__version__),
           "torchao_file": np.array(os.path.abspath(torchao.__file__))}
    for i, req in enumerate(requests):
        x = inputs[req["input"]]
        if req["input_dtype"] == "bfloat16":
            t = torch.from_numpy(x.astype(np.uint16)).view(torch.bfloat16)
        elif req["input_dtype"] == "float32":
            t = torch.from_numpy(x.astype(np.float32))
        else:
            raise ValueError(f"request {i}: input_dtype {req['input_dtype']!r}")
        elem = req["elem_dtype"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s, d = to_mx(t, elem_dtypes[elem], req["block_size"],
                         ScaleCalculationMode(req["rule"]))
        codes = d.view(torch.uint8)
        if elem == "float4_e2m1fn_x2":
            codes = unpack_uint4(codes)
        out[f"scales_{i}"] = s.view(torch.uint8).numpy().reshape(-1)
        out[f"codes_{i}"] = codes.numpy().reshape(x.shape)
    tmp = outputs_path + ".tmp.npz"
    np.savez(tmp, **out)
    os.replace(tmp, outputs_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
