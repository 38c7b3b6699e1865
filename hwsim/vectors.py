"""RTL test vectors for a block-scaled integer-accumulate GEMM (``loraq vectors``).

``make_cases`` builds a seeded random case plus edge cases; ``write_vectors``
writes them as ``$readmemh``-compatible text files (one hex value per line)
and as ``cases.json``; ``read_vectors`` reads a directory back. Every file is
written atomically (temporary name in the same folder, then ``os.replace``).

Layout (see ``README_TEXT``, also written to ``DIR/README.txt``): each file
holds every case in ``cases.txt`` order, each case a fixed number of lines:

    a_codes.hex   M*K lines per case, row-major (m, k), element codes
    a_scales.hex  M*nA lines, row-major (m, block), scale codes (absent: no scales)
    b_codes.hex   N*K lines, row-major (n, k)
    b_scales.hex  N*nB lines, row-major (n, block)
    out.hex       M*N lines, row-major (m, n), float32 bit patterns
    acc_trace.hex M*N*K lines, order (m, n, k): the in-block accumulator after adding
                  product k (it restarts at 0 at every block), two's complement in
                  W = trace_bits bits
    block_sums.hex M*N*nblk lines, order (m, n, j): the value each block ends with
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

import numfmt
from numfmt.fileio import write_atomic
from numfmt.formats import BlockFormat, IntFormat
from numfmt.qtensor import QTensor

from hwsim.accumulator import element_of, worst_case_bits
from hwsim.gemm import (Accumulator, FloatAcc, accumulator_trace, matmul, operand_integers,
                        sub_block_length)

__all__ = ["make_cases", "write_vectors", "read_vectors", "README_TEXT", "CASE_NAMES"]

CASE_NAMES = ("random", "max_codes", "sign_swing", "zero_blocks", "nan_scale")
FORMAT_VERSION = 1

README_TEXT = """\
hwsim RTL test vectors (format version {version})
==================================================
GEMM: out[m, n] = sum_k a[m, k] * b[n, k]   (a: M x K, b: N x K, both blocked along K)
a_format = {a_format}, b_format = {b_format}, M = {m}, N = {n}, K = {k}
in-block length L = {block_length} (blocks per row: a {a_blocks}, b {b_blocks}, sums {nblk})
in-block accumulator: bits = {acc_bits}, overflow = {overflow}
inter-block float: mantissa_bits = {mantissa_bits}, rounding = {rounding}, promote_every = {promote_every}
seed = {seed}

Arithmetic (hwsim.gemm): each element is an integer I times 2^q (a: q = {qa}, b: q = {qb});
element code -> integer: {a_elem_rule} (a), {b_elem_rule} (b).
acc_0 = 0; acc_(i+1) = ovf(acc_i + Ia[m,k_i] * Ib[n,k_i]) over the L indices of a block, in
index order; ovf = {overflow} at {acc_bits} bits. The block term is
round_F(S * scale_a * scale_b * 2^(qa+qb)) and the running sum is c <- round_F(c + term) from
+0.0, block by block in K order; F = {mantissa_bits} fraction bits, FP32 exponent range,
{rounding}. E8M0 scale code s means 2^(s-127); s = 0xFF is NaN (the block's outputs are NaN).
SINT scales are fp16 bit patterns (4 hex digits).

Files: one hexadecimal value per line, no prefix, upper-case, fixed width (readable by
Verilog $readmemh). Every file holds the cases in cases.txt order, each case a fixed
number of lines:
  a_codes.hex     M*K lines per case, row-major (m, k); {a_code_digits} hex digits
  a_scales.hex    M*{a_blocks} lines per case, row-major (m, block); {a_scale_digits} digits{a_scale_note}
  b_codes.hex     N*K lines per case, row-major (n, k); {b_code_digits} hex digits
  b_scales.hex    N*{b_blocks} lines per case, row-major (n, block); {b_scale_digits} digits{b_scale_note}
  out.hex         M*N lines per case, row-major (m, n); float32 bit patterns, 8 digits
  acc_trace.hex   M*N*K lines per case, order (m, n, k): the in-block accumulator after
                  adding the product at index k (it restarts from 0 at each block start);
                  two's complement in {trace_bits} bits ({trace_digits} digits)
  block_sums.hex  M*N*{nblk} lines per case, order (m, n, block): the value each block ends
                  with, same encoding as acc_trace.hex
cases.txt lists the case names, one a line; cases.json holds everything (integers and
hex strings, out also as floats with NaN as "nan") plus per-case overflow_count and
max_abs_acc.

Cases:
  random       seeded normal data
  max_codes    every element at its largest positive code, scales at 2^0
  sign_swing   a at +max; b at +max for the first half of each block and -max for the
               second: the exact prefix climbs to L/2 * max|Ia| * max|Ib| and returns to 0,
               so a narrow accumulator overflows mid-block (only when bits < {worst} =
               the worst-case width of this pair over L)
  zero_blocks  random data with every other block of a all-zero codes (scale code 0)
  nan_scale    random data with a's first block scale of row 0 set to NaN (E8M0 0xFF;
               only for E8M0 scales, else identical to random)
"""


# ---------------------------------------------------------------------------
# case construction
# ---------------------------------------------------------------------------
def _max_code(fmt) -> int:
    elem = element_of(fmt)
    return int(elem.max_code)


def _neg_code(fmt, code: int) -> int:
    """Code of the negated value (two's complement for ints, sign bit for floats)."""
    elem = element_of(fmt)
    if isinstance(elem, IntFormat):
        return (-code) & ((1 << elem.bits) - 1)
    return code | (1 << (elem.bits - 1))


def _with(q: QTensor, codes=None, scales=None) -> QTensor:
    return QTensor(q.codes if codes is None else codes, q.scales if scales is None else scales,
                   q.format, q.axis, q.shape, q.tensor_scale)


def _unit_scales(q: QTensor):
    if q.scales is None:
        return None
    fmt = q.format
    if fmt.scaling == "mx":
        return np.full(q.scales.shape, 127, dtype=np.uint8)
    return np.ones(q.scales.shape, dtype=q.scales.dtype)


def make_cases(a_format, b_format, m: int, n: int, k: int, *, seed: int = 0,
               cases=CASE_NAMES) -> list[dict]:
    """A list of ``{"name", "a", "b"}`` with QTensors a (m x k) and b (n x k)."""
    for what, v in (("m", m), ("n", n), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{what}={v!r} is not allowed; it must be an int >= 1")
    fa, fb = numfmt.get(a_format), numfmt.get(b_format)
    for f in (fa, fb):
        if isinstance(f, BlockFormat) and f.scaling == "nvfp4":
            raise ValueError(f"format {f.name!r} is not supported by hwsim.matmul")
    bad = [c for c in cases if c not in CASE_NAMES]
    if bad:
        raise ValueError(f"unknown cases {bad}; allowed: {list(CASE_NAMES)}")
    rng = np.random.default_rng(seed)
    xa = rng.standard_normal((m, k)).astype(np.float32)
    xb = rng.standard_normal((n, k)).astype(np.float32)
    qa = numfmt.quantize(xa, fa, axis=1)
    qb = numfmt.quantize(xb, fb, axis=1)
    ba = fa.block_size if isinstance(fa, BlockFormat) else None
    bb = fb.block_size if isinstance(fb, BlockFormat) else None
    L = sub_block_length(ba, bb, k)
    out = []
    for name in cases:
        a, b = qa, qb
        if name == "max_codes":
            a = _with(qa, np.full(qa.shape, _max_code(fa), dtype=qa.codes.dtype), _unit_scales(qa))
            b = _with(qb, np.full(qb.shape, _max_code(fb), dtype=qb.codes.dtype), _unit_scales(qb))
        elif name == "sign_swing":
            a = _with(qa, np.full(qa.shape, _max_code(fa), dtype=qa.codes.dtype), _unit_scales(qa))
            pos, neg = _max_code(fb), _neg_code(fb, _max_code(fb))
            idx = np.arange(k) % L
            row = np.where(idx < (L + 1) // 2, pos, neg).astype(qb.codes.dtype)
            b = _with(qb, np.broadcast_to(row, qb.shape).copy(), _unit_scales(qb))
        elif name == "zero_blocks":
            codes = qa.codes.copy()
            zero = (np.arange(k) // L) % 2 == 1
            codes[:, zero] = 0  # +0 in every element format (int, sign-magnitude float)
            scales = None
            if qa.scales is not None:
                scales = qa.scales.copy()
                blk = k if ba is None else ba
                zb = (np.arange(scales.shape[1]) * blk // L) % 2 == 1
                if fa.scaling == "mx":
                    scales[:, zb] = 0
            a = _with(qa, codes, scales)
        elif name == "nan_scale":
            if qa.scales is not None and fa.scaling == "mx":
                scales = qa.scales.copy()
                scales[0, 0] = 255
                a = _with(qa, None, scales)
        out.append({"name": name, "a": a, "b": b})
    return out


# ---------------------------------------------------------------------------
# encoding
# ---------------------------------------------------------------------------
def _digits(bits: int) -> int:
    return max(1, -(-bits // 4))


def _scale_words(q: QTensor):
    """(list of ints, bits per word) of a QTensor's scales, row-major; ([], 0) if none."""
    if q.scales is None:
        return [], 0
    fmt = q.format
    if fmt.scaling == "mx":
        return [int(v) for v in q.scales.reshape(-1)], 8
    s = np.ascontiguousarray(q.scales)
    if s.dtype == np.float16:
        return [int(v) for v in s.view(np.uint16).reshape(-1)], 16
    if s.dtype == np.float32:
        return [int(v) for v in s.view(np.uint32).reshape(-1)], 32
    raise ValueError(f"scales of dtype {s.dtype} cannot be written")


def _twos(v: int, bits: int) -> int:
    return int(v) & ((1 << bits) - 1)


def _hex(v: int, digits: int) -> str:
    return format(int(v), "X").zfill(digits)


def _case_record(case: dict, acc: Accumulator, inter_block: FloatAcc) -> dict:
    a, b = case["a"], case["b"]
    res = matmul(a, b, acc=acc, inter_block=inter_block, prefix_stats=True)
    trace, sums = accumulator_trace(a, b, acc=acc)
    out_bits = np.ascontiguousarray(res.out).view(np.uint32)
    a_scales, a_sb = _scale_words(a)
    b_scales, b_sb = _scale_words(b)
    return {
        "name": case["name"],
        "a_codes": [int(v) for v in a.codes.reshape(-1)],
        "a_scales": a_scales,
        "b_codes": [int(v) for v in b.codes.reshape(-1)],
        "b_scales": b_scales,
        "out_hex": [_hex(v, 8) for v in out_bits.reshape(-1)],
        "out": [("nan" if math.isnan(v) else (repr(v) if math.isinf(v) else v))
                for v in (float(x) for x in res.out.reshape(-1))],
        "acc_trace": [int(v) for v in trace.reshape(-1)],
        "block_sums": [int(v) for v in sums.reshape(-1)],
        "overflow_count": int(res.overflow_count),
        "max_abs_acc": int(res.max_abs_acc),
        "acc_bits_needed": int(res.acc_bits_needed),
    }


def write_vectors(out_dir, a_format, b_format, m: int, n: int, k: int, *, seed: int = 0,
                  acc: Accumulator = Accumulator(), inter_block: FloatAcc = FloatAcc(),
                  cases=CASE_NAMES) -> dict:
    """Build the cases and write them to ``out_dir`` (created if missing). Returns the
    JSON document written to ``cases.json``."""
    if not isinstance(acc, Accumulator):
        raise TypeError(f"acc must be a hwsim.Accumulator, got {type(acc).__name__}")
    if not isinstance(inter_block, FloatAcc):
        raise TypeError(f"inter_block must be a hwsim.FloatAcc, got {type(inter_block).__name__}")
    built = make_cases(a_format, b_format, m, n, k, seed=seed, cases=cases)
    fa, fb = built[0]["a"].format, built[0]["b"].format
    A = operand_integers(built[0]["a"], "a")
    B = operand_integers(built[0]["b"], "b")
    L = sub_block_length(A.block, B.block, k)
    if inter_block.promote_every is not None and inter_block.promote_every % L:
        raise ValueError(f"promote_every={inter_block.promote_every} is not a multiple of the "
                         f"block length {L}")
    worst = worst_case_bits(fa, fb, L)
    trace_bits = acc.bits if acc.bits is not None else worst
    records = [_case_record(c, acc, inter_block) for c in built]
    a_blocks = len(records[0]["a_scales"]) // m if records[0]["a_scales"] else 0
    b_blocks = len(records[0]["b_scales"]) // n if records[0]["b_scales"] else 0
    a_sbits = _scale_words(built[0]["a"])[1]
    b_sbits = _scale_words(built[0]["b"])[1]
    nblk = -(-k // L)
    meta = {
        "format_version": FORMAT_VERSION, "a_format": fa.name, "b_format": fb.name,
        "m": m, "n": n, "k": k, "block_length": L, "blocks": nblk, "a_blocks": a_blocks,
        "b_blocks": b_blocks, "seed": seed,
        "acc": {"bits": acc.bits, "overflow": acc.overflow},
        "inter_block": {"mantissa_bits": inter_block.mantissa_bits,
                        "rounding": inter_block.rounding,
                        "promote_every": inter_block.promote_every},
        "a_quantum_exp": A.qexp, "b_quantum_exp": B.qexp,
        "a_code_bits": fa.bits, "b_code_bits": fb.bits,
        "a_scale_bits": a_sbits, "b_scale_bits": b_sbits,
        "trace_bits": trace_bits, "worst_case_bits": worst,
        "cases": records,
    }
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    tdig = _digits(trace_bits)
    files = {
        "a_codes.hex": [_hex(v, _digits(fa.bits)) for r in records for v in r["a_codes"]],
        "a_scales.hex": [_hex(v, _digits(a_sbits)) for r in records for v in r["a_scales"]],
        "b_codes.hex": [_hex(v, _digits(fb.bits)) for r in records for v in r["b_codes"]],
        "b_scales.hex": [_hex(v, _digits(b_sbits)) for r in records for v in r["b_scales"]],
        "out.hex": [v for r in records for v in r["out_hex"]],
        "acc_trace.hex": [_hex(_twos(v, trace_bits), tdig) for r in records
                          for v in r["acc_trace"]],
        "block_sums.hex": [_hex(_twos(v, trace_bits), tdig) for r in records
                           for v in r["block_sums"]],
        "cases.txt": [r["name"] for r in records],
    }
    for name, lines in files.items():
        write_atomic(out / name, "".join(line + "\n" for line in lines))
    write_atomic(out / "cases.json", json.dumps(meta, indent=1) + "\n")
    write_atomic(out / "README.txt", _readme(meta, fa, fb, A, B))
    return meta


def _elem_rule(fmt, q) -> str:
    elem = element_of(fmt)
    if isinstance(elem, IntFormat):
        return f"two's complement {elem.bits}-bit integer"
    return (f"{elem.name} value / 2^{q} (sign-magnitude float, {elem.exponent_bits} exponent "
            f"and {elem.mantissa_bits} mantissa bits, bias {elem.bias})")


def _readme(meta, fa, fb, A, B) -> str:
    def note(bits, blocks):
        if not blocks:
            return " (empty: no scales)"
        return " (E8M0 codes)" if bits == 8 else f" (fp{bits} bit patterns)"
    return README_TEXT.format(
        version=meta["format_version"], a_format=fa.name, b_format=fb.name, m=meta["m"],
        n=meta["n"], k=meta["k"], block_length=meta["block_length"], a_blocks=meta["a_blocks"],
        b_blocks=meta["b_blocks"], nblk=meta["blocks"], acc_bits=meta["acc"]["bits"],
        overflow=meta["acc"]["overflow"], mantissa_bits=meta["inter_block"]["mantissa_bits"],
        rounding=meta["inter_block"]["rounding"],
        promote_every=meta["inter_block"]["promote_every"], seed=meta["seed"],
        qa=A.qexp, qb=B.qexp, a_elem_rule=_elem_rule(fa, A.qexp),
        b_elem_rule=_elem_rule(fb, B.qexp), a_code_digits=_digits(fa.bits),
        b_code_digits=_digits(fb.bits), a_scale_digits=_digits(meta["a_scale_bits"] or 4),
        b_scale_digits=_digits(meta["b_scale_bits"] or 4),
        a_scale_note=note(meta["a_scale_bits"], meta["a_blocks"]),
        b_scale_note=note(meta["b_scale_bits"], meta["b_blocks"]),
        trace_bits=meta["trace_bits"], trace_digits=_digits(meta["trace_bits"]),
        worst=meta["worst_case_bits"])


# ---------------------------------------------------------------------------
# reading back
# ---------------------------------------------------------------------------
def _read_hex(path: Path) -> list[int]:
    return [int(line, 16) for line in path.read_text().split()]


def _signed(v: int, bits: int) -> int:
    return v - (1 << bits) if v >= 1 << (bits - 1) else v


def read_vectors(out_dir) -> dict:
    """Read a vectors directory back from its .hex files (cases.json gives the shapes).

    Returns ``{"meta": cases.json, "cases": [{"name", "a", "b" (QTensors), "out" (float32
    M x N), "acc_trace" (int M x N x K), "block_sums"}]}``.
    """
    d = Path(out_dir)
    meta = json.loads((d / "cases.json").read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{d}/cases.json has format_version {meta.get('format_version')!r}; "
                         f"this reader understands {FORMAT_VERSION}")
    fa, fb = numfmt.get(meta["a_format"]), numfmt.get(meta["b_format"])
    m, n, k, nblk = meta["m"], meta["n"], meta["k"], meta["blocks"]
    names = (d / "cases.txt").read_text().split()
    ac, bc = _read_hex(d / "a_codes.hex"), _read_hex(d / "b_codes.hex")
    asc, bsc = _read_hex(d / "a_scales.hex"), _read_hex(d / "b_scales.hex")
    outs = _read_hex(d / "out.hex")
    tr, bs = _read_hex(d / "acc_trace.hex"), _read_hex(d / "block_sums.hex")
    W = meta["trace_bits"]
    nab, nbb = meta["a_blocks"], meta["b_blocks"]
    cases = []
    for i, name in enumerate(names):
        a = _qtensor(ac[i * m * k:(i + 1) * m * k], asc[i * m * nab:(i + 1) * m * nab], fa,
                     (m, k), nab, meta["a_scale_bits"])
        b = _qtensor(bc[i * n * k:(i + 1) * n * k], bsc[i * n * nbb:(i + 1) * n * nbb], fb,
                     (n, k), nbb, meta["b_scale_bits"])
        out = np.array(outs[i * m * n:(i + 1) * m * n], dtype=np.uint32).view(np.float32)
        trace = np.array([_signed(v, W) for v in tr[i * m * n * k:(i + 1) * m * n * k]],
                         dtype=object).reshape(m, n, k)
        sums = np.array([_signed(v, W) for v in bs[i * m * n * nblk:(i + 1) * m * n * nblk]],
                        dtype=object).reshape(m, n, nblk)
        cases.append({"name": name, "a": a, "b": b, "out": out.reshape(m, n),
                      "acc_trace": trace, "block_sums": sums})
    return {"meta": meta, "cases": cases}


def _qtensor(codes, scales, fmt, shape, nblocks, sbits) -> QTensor:
    c = np.array(codes, dtype=np.uint8 if fmt.bits <= 8 else np.uint16).reshape(shape)
    if not isinstance(fmt, BlockFormat):
        return QTensor(c, None, fmt, 1, shape)
    if fmt.scaling == "mx":
        s = np.array(scales, dtype=np.uint8)
    elif sbits == 16:
        s = np.array(scales, dtype=np.uint16).view(np.float16)
    else:
        s = np.array(scales, dtype=np.uint32).view(np.float32)
    return QTensor(c, s.reshape(shape[0], nblocks), fmt, 1, shape)
