"""The int64 table that drives a multi-tensor launch: its layout and codes, and build_table.

The one Python definition of the layout, the dtype codes and the TIES merge codes; the C++ definition is
csrc/common/table.h (the extensions export it as ``_cpu.LAYOUT`` / ``_cuda.LAYOUT``, and
tests/test_layout.py checks that both agree). The Triton kernels read rows through
triton_kernels/table.py, whose offsets come from here.

One row per output tensor, ``table_width(N)`` entries: [out_ptr, out_dtype, numel, base_ptr (0: none),
base_dtype, drop_threshold (0: keep all), first (the index of the row's first element in its whole tensor,
a multiple of 128, when the row is a block of it: the Philox counters start there), then per input i,
at HEADER_WIDTH + INPUT_STRIDE * i: in_ptr, in_dtype, coeff (fp64 bit pattern), Philox key].
"""

from __future__ import annotations

import struct
from typing import Dict, List, Sequence, Tuple

import torch

from ..reference import CombineJob

# Header columns, one of each per row.
OUT_PTR = 0
OUT_DTYPE = 1
NUMEL = 2
BASE_PTR = 3
BASE_DTYPE = 4
DROP_THRESHOLD = 5
FIRST = 6
HEADER_WIDTH = 7
# Columns of input i, at HEADER_WIDTH + INPUT_STRIDE * i + the offset below.
IN_PTR = 0
IN_DTYPE = 1
COEFF = 2
KEY = 3
INPUT_STRIDE = 4

# Dtype codes of the dtype columns.
F32, F16, BF16, F64 = 0, 1, 2, 3
DTYPE_CODES = {torch.float32: F32, torch.float16: F16, torch.bfloat16: BF16, torch.float64: F64}

# TIES merge modes (TiesSpec.merge).
MERGE_SUM, MERGE_MEAN, MERGE_MAX = 0, 1, 2
MERGE_CODES = {"sum": MERGE_SUM, "mean": MERGE_MEAN, "max": MERGE_MAX}

# Every value above by name, as csrc/common/table.h exports it (kLayout).
LAYOUT: Dict[str, int] = dict(
    OUT_PTR=OUT_PTR, OUT_DTYPE=OUT_DTYPE, NUMEL=NUMEL, BASE_PTR=BASE_PTR, BASE_DTYPE=BASE_DTYPE,
    DROP_THRESHOLD=DROP_THRESHOLD, FIRST=FIRST, HEADER_WIDTH=HEADER_WIDTH,
    IN_PTR=IN_PTR, IN_DTYPE=IN_DTYPE, COEFF=COEFF, KEY=KEY, INPUT_STRIDE=INPUT_STRIDE,
    F32=F32, F16=F16, BF16=BF16, F64=F64,
    MERGE_SUM=MERGE_SUM, MERGE_MEAN=MERGE_MEAN, MERGE_MAX=MERGE_MAX,
)

assert sorted((OUT_PTR, OUT_DTYPE, NUMEL, BASE_PTR, BASE_DTYPE, DROP_THRESHOLD, FIRST)) == list(range(HEADER_WIDTH))
assert sorted((IN_PTR, IN_DTYPE, COEFF, KEY)) == list(range(INPUT_STRIDE))


def table_width(n_inputs: int) -> int:
    """int64 entries of one row with n_inputs inputs."""
    return HEADER_WIDTH + INPUT_STRIDE * n_inputs


def input_column(i: int, offset: int) -> int:
    """Column of `offset` (IN_PTR, IN_DTYPE, COEFF or KEY) of input i."""
    return HEADER_WIDTH + INPUT_STRIDE * i + offset


def kernel_supports(job: CombineJob) -> bool:
    """True when every tensor of the job has a dtype the kernels read and write."""
    tensors = [job.out, *job.inputs] + ([job.base] if job.base is not None else [])
    return all(t.dtype in DTYPE_CODES for t in tensors)


def _f64_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _i64(u: int) -> int:
    """A uint64 as the int64 with the same bits."""
    return u - (1 << 64) if u >= 1 << 63 else u


def build_table(jobs: Sequence[CombineJob]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """The table of `jobs` as a CPU int64 tensor of shape [len(jobs), table_width(N)], and the contiguous
    tensors it points to (keep them alive until the launch has finished reading them)."""
    keep: List[torch.Tensor] = []
    rows = []
    for job in jobs:
        if not job.out.is_contiguous():
            raise ValueError("kernel outputs must be contiguous")
        n = len(job.inputs)
        row = [0] * table_width(n)
        row[OUT_PTR] = job.out.data_ptr()
        row[OUT_DTYPE] = DTYPE_CODES[job.out.dtype]
        row[NUMEL] = job.out.numel()
        if job.base is not None:  # else BASE_PTR stays 0: no base
            base = job.base.contiguous()
            keep.append(base)
            row[BASE_PTR] = base.data_ptr()
            row[BASE_DTYPE] = DTYPE_CODES[base.dtype]
        row[DROP_THRESHOLD] = job.threshold
        if job.first % 128:
            raise ValueError(f"a row block's first element must be a multiple of 128 (Philox groups), got {job.first}")
        row[FIRST] = job.first
        keys = job.keys if job.threshold else [0] * n
        for i, (x, c, key) in enumerate(zip(job.inputs, job.coeffs, keys)):
            x = x.contiguous()
            keep.append(x)
            row[input_column(i, IN_PTR)] = x.data_ptr()
            row[input_column(i, IN_DTYPE)] = DTYPE_CODES[x.dtype]
            row[input_column(i, COEFF)] = _f64_bits(c)
            row[input_column(i, KEY)] = _i64(key)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int64), keep

