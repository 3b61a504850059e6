"""The int64 table that drives a multi-tensor launch (layout in csrc/cpu/combine_cpu.h).

One row per output tensor: [out_ptr, out_dtype, numel, base_ptr (0: none), base_dtype,
in_ptr_0, in_dtype_0, ..., in_ptr_{N-1}, in_dtype_{N-1}]. Dtype codes are shared with csrc/numerics.h.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from ..reference import CombineJob

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def kernel_supports(job: CombineJob) -> bool:
    """True when every tensor of the job has a dtype the kernels read and write."""
    tensors = [job.out, *job.inputs] + ([job.base] if job.base is not None else [])
    return all(t.dtype in DTYPE_CODES for t in tensors)


def build_table(jobs: Sequence[CombineJob]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """The table of `jobs` as a CPU int64 tensor of shape [len(jobs), 5 + 2N], and the contiguous
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
        for x in job.inputs:
            x = x.contiguous()
            keep.append(x)
            row += [x.data_ptr(), DTYPE_CODES[x.dtype]]
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int64), keep
