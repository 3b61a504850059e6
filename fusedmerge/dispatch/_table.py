"""The int64 table that drives a multi-tensor launch (layout in csrc/cpu/combine_cpu.h).

One row per output tensor: [out_ptr, out_dtype, numel, base_ptr (0: none), base_dtype, drop_threshold,
then per input: in_ptr, in_dtype, coeff (fp64 bit pattern), Philox key]. Dtype codes are shared with
csrc/numerics.h.
"""

from __future__ import annotations

import struct
from typing import List, Sequence, Tuple

import torch

from ..reference import CombineJob

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


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
    """The table of `jobs` as a CPU int64 tensor of shape [len(jobs), 6 + 4N], and the contiguous
    tensors it points to (keep them alive until the launch has finished reading them)."""
    keep: List[torch.Tensor] = []
    rows = []
    for job in jobs:
        if not job.out.is_contiguous():
            raise ValueError("kernel outputs must be contiguous")
        row = [job.out.data_ptr(), DTYPE_CODES[job.out.dtype], job.out.numel()]
        if job.base is None:
            row += [0, 0]
        else:
            base = job.base.contiguous()
            keep.append(base)
            row += [base.data_ptr(), DTYPE_CODES[base.dtype]]
        row.append(job.threshold)
        keys = job.keys if job.threshold else [0] * len(job.inputs)
        for x, c, key in zip(job.inputs, job.coeffs, keys):
            x = x.contiguous()
            keep.append(x)
            row += [x.data_ptr(), DTYPE_CODES[x.dtype], _f64_bits(c), _i64(key)]
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int64), keep
