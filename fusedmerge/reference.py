"""The contract: plain-torch references that define every op's result, bit for bit.

Linear combination (averaging, weighted averaging, task arithmetic) of one tensor, inputs x_0..x_{N-1},
optional base b, coefficients c_i (Python floats, rounded once to the accumulation dtype)::

    d_i = x_i - b                     (d_i = x_i without a base)
    acc = c_0*d_0 ; acc = acc + c_i*d_i  for i = 1..N-1     left fold, every operation rounded, no FMA
    out = round(b + acc)              (round(acc) without a base)

The accumulation dtype is fp64 when the base or any input is fp64, else fp32; inputs are widened
exactly. `round` is one round-to-nearest-even to the output dtype; an fp64 accumulator meets a 16-bit
output through fp32, as torch's own casts do. Every backend must equal this function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass
class CombineJob:
    """One output tensor of a multi-tensor launch: ``out = combine(inputs, base)``."""

    out: torch.Tensor
    inputs: Sequence[torch.Tensor]
    base: Optional[torch.Tensor] = None

    @property
    def acc_dtype(self) -> torch.dtype:
        tensors = list(self.inputs) + ([self.base] if self.base is not None else [])
        return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def combine_reference(job: CombineJob, coeffs: Sequence[float]) -> torch.Tensor:
    """The linear combination of one job, computed in plain torch as the module docstring defines it."""
    acc_dtype = job.acc_dtype
    base = job.base.to(acc_dtype) if job.base is not None else None
    acc = None
    for c, x in zip(coeffs, job.inputs):
        d = x.to(acc_dtype)
        if base is not None:
            d = d - base
        d = d * torch.tensor(c, dtype=acc_dtype, device=d.device)
        acc = d if acc is None else acc + d
    if base is not None:
        acc = base + acc
    if acc_dtype == torch.float64 and job.out.dtype in (torch.float16, torch.bfloat16):
        acc = acc.to(torch.float32)
    return acc.to(job.out.dtype)


def combine(jobs: Sequence[CombineJob], coeffs: Sequence[float]) -> None:
    """Backend entry point of the reference: writes every job's output."""
    for job in jobs:
        job.out.copy_(combine_reference(job, coeffs))
