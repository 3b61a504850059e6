"""What the "reductions, then one combination" methods share (slerp, model_stock, nuslerp, multislerp,
karcher): one `dots` launch for the sums of a whole group of tensors, per-tensor or per-row coefficients
computed from them by vectorised fp64 torch over all rows at once, and one `combine` launch."""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import dispatch, options
from ..reductions import DotsJob, DotsSpec, dots, tree_sum
from ..reference import CombineJob
from ._spec import BlockPass, GroupCall, RowBlocks, Span, StateDict


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
                 coeffs: torch.Tensor, arg: str, name: str = "tensor") -> List[CombineJob]:
    """Combination jobs out = base + Σ c[r, i]·(x_i − base) (no base: Σ c[r, i]·x_i) per row r of the
    [rows, −1] views, coeffs fp64 [rows, len(inputs)] (one job for one row); coefficients that are not finite
    in the accumulation dtype are refused, naming `arg`, or key `name` where its tensors are not finite."""
    rows = coeffs.shape[0]
    acc = CombineJob(out, inputs, [], base).acc_dtype
    if out.numel():
        bad = ~torch.isfinite(coeffs.to(acc)).all(dim=1)
        if bad.any():
            options.finite_coefficients(coeffs[int(bad.nonzero()[0])].tolist(), acc, arg, name,
                                        [*inputs, *([base] if base is not None else [])])
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


# --- row blocks (RowBlocks) ------------------------------------------------------------------------------------

BLOCK_CHUNK = 2**16  # elements (a power of two): a per-tensor sum is gathered over row blocks as chunk sums


def chunk_sums(spec: DotsSpec, inputs: Sequence[torch.Tensor], base: Optional[torch.Tensor], backend: str,
               step: Optional[int] = None) -> torch.Tensor:
    """The `dots` sums of the consecutive `step`-element chunks (BLOCK_CHUNK by default; the last one what
    remains) of 1-D inputs and base: fp64 [chunks, P], one dots launch per device. The chunk sums of blocks
    that start at multiples of BLOCK_CHUNK, concatenated in order and reduced by `tensor_sums`, are the whole
    tensor's sums bit for bit (reduce_blocks)."""
    n = inputs[0].numel()
    step = step or BLOCK_CHUNK
    full = n // step * step
    parts = [(0, full, full // step)] if full else []
    parts += [(full, n, 1)] if full < n else []
    jobs = [DotsJob([x[a:b] for x in inputs], None if base is None else base[a:b], rows) for a, b, rows in parts]
    return group_sums(jobs, spec, backend)


def tensor_sums(sums: torch.Tensor) -> torch.Tensor:
    """A tensor's sums [1, P] from all its chunk_sums [chunks, P], by the pairwise tree."""
    return tree_sum(sums, torch.tensor([sums.shape[0]]))


Operands = Callable[[GroupCall], Tuple[List[torch.Tensor], Optional[torch.Tensor]]]


def reduce_blocks(spec: Callable[[int], DotsSpec], operands: Operands, per_row: Callable[[GroupCall], bool],
                  merge: Callable[[GroupCall, torch.Tensor], StateDict]) -> RowBlocks:
    """RowBlocks for a method whose statistics are the `dots` sums spec(len(inputs)) of operands(call) =
    (inputs, base) of a row block (GroupCall.block), per
    tensor (per row of the [rows, last dim] view where per_row(call) and the tensor has two dims or more),
    with the whole tensor's bits. One pass: per row, a block holds whole rows and gives their sums; per tensor,
    blocks start at multiples of BLOCK_CHUNK and give the tree sums of their aligned BLOCK_CHUNK-element
    chunks (the last one may be short), which `tree_sum` reduces at the end — an aligned power-of-two chunk's
    sum is a subtree of the whole tensor's tree, and a short chunk's tree differs from its zero-padded one by
    +0 only (reductions.py). merge(call, sums) then merges a block whose tensors are [rows, last dim] views
    (per row) given its rows' sums, or 1-D blocks given the tensor's sums [1, P]."""

    def cols(shape, call) -> int:
        return shape[-1] if per_row(call) and len(shape) >= 2 else 0

    def partial(call: GroupCall, span: Span, stats) -> Tuple[torch.Tensor, bool]:
        inputs, base = operands(call)
        step = cols(span.shape, call) or BLOCK_CHUNK
        return chunk_sums(spec(len(inputs)), inputs, base, call.backend, step), not cols(span.shape, call)

    def combine(total, part):
        return torch.cat([total[0], part[0]]), total[1]

    def finish(total, stats) -> torch.Tensor:
        sums, per_tensor = total
        return tensor_sums(sums) if per_tensor else sums

    def merge_block(call: GroupCall, span: Span, sums: torch.Tensor) -> StateDict:
        c = cols(span.shape, call)
        if not c:
            return merge(call, sums)
        view = lambda sd: None if sd is None else {k: t.reshape(-1, c) for k, t in sd.items()}  # noqa: E731
        rows = dataclasses.replace(call, base=view(call.base), models=[view(m) for m in call.models])
        merged = merge(rows, sums[span.first // c:(span.first + span.numel) // c])
        return {k: t.reshape(-1) for k, t in merged.items()}

    return RowBlocks(passes=(BlockPass(partial, combine, finish),), merge=merge_block,
                     align=lambda shape, call: cols(shape, call) or BLOCK_CHUNK)
