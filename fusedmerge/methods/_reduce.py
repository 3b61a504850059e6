"""What the "reductions, then one combination" methods share (slerp, model_stock, nuslerp, multislerp,
karcher): one `dots` launch for the sums of a whole group of tensors, per-tensor or per-row coefficients
computed from them by vectorised fp64 torch over all rows at once, and one `combine` launch."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from .. import dispatch, options
from ..reductions import DotsJob, DotsSpec, dots
from ..reference import CombineJob


def rows_of(t: torch.Tensor, per_row: bool) -> int:
    """Rows of the [rows, last dim] view (1 per tensor; a 1-D tensor is one row)."""
    if not per_row or t.dim() < 2:
        return 1
    return t.numel() // t.shape[-1] if t.shape[-1] else 0


def group_sums(jobs: Sequence[DotsJob], spec: DotsSpec, backend: str) -> torch.Tensor:
    """The jobs' sums stacked row after row on the CPU: fp64 [Σ rows, P] (one dots launch per device)."""
    sums = [s.cpu() for s in dots(jobs, spec, backend)]
    return torch.cat(sums) if sums else torch.zeros((0, len(spec.pairs)), dtype=torch.float64)


def combine_rows(out: torch.Tensor, inputs: Sequence[torch.Tensor], base: Optional[torch.Tensor],
                 coeffs: torch.Tensor, arg: str) -> List[CombineJob]:
    """Combination jobs out = base + Σ c[r, i]·(x_i − base) (no base: Σ c[r, i]·x_i) per row r of the
    [rows, −1] views, coeffs fp64 [rows, len(inputs)] (one job for one row); coefficients that are not finite
    in the accumulation dtype are refused, naming `arg`."""
    rows = coeffs.shape[0]
    acc = CombineJob(out, inputs, [], base).acc_dtype
    if out.numel():
        bad = ~torch.isfinite(coeffs.to(acc)).all(dim=1)
        if bad.any():
            options.finite_coefficients(coeffs[int(bad.nonzero()[0])].tolist(), acc, arg)
    c = coeffs.tolist()
    if rows == 1:
        return [CombineJob(out, inputs, c[0], base)]
    view = lambda x: x.reshape(rows, -1)  # noqa: E731
    o, xs = view(out), [view(x) for x in inputs]
    b = view(base) if base is not None else None
    return [CombineJob(o[r], [x[r] for x in xs], c[r], b[r] if b is not None else None) for r in range(rows)]


def run_combine(jobs: Sequence[CombineJob], backend: str) -> None:
    """One combine launch per device."""
    by_device: Dict[torch.device, List[CombineJob]] = {}
    for job in jobs:
        by_device.setdefault(job.out.device, []).append(job)
    for device_jobs in by_device.values():
        dispatch.run("combine", device_jobs, backend)
