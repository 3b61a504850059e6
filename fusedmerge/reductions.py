"""`dots`: fused multi-tensor sums of products, deterministic and bit-identical on every backend.

For each job (a group of tensors x_0..x_{M-1} of one shape, optional base b, viewed as [rows, cols] with
cols = numel/rows: rows = 1 per tensor, rows = shape[0] per row) and each index pair (a, c) of the spec:

    u_j = x_j − b   in fp32 (fp64 when an input or the base is fp64), as the combine primitive forms τ
                    (u_j = x_j without a base; bf16/fp16 widened exactly)
    S[r, p] = Σ_e u_a[r, e]·u_c[r, e]      products in fp64, summed by the pairwise tree below

Python entry::

    from fusedmerge import dispatch
    from fusedmerge.reductions import DotsJob, DotsSpec, gram_pairs
    sums = dispatch.run("dots", [DotsJob([grad, tau_1, tau_2]), ...], "auto", DotsSpec(((0, 1), (0, 2))))
    # sums[k]: fp64 [rows_k, len(pairs)] on the jobs' device (one list entry per job, in order)

Order of summation, and why: the products of one row, padded with +0 to a power of two, are added by the
adjacent pairwise tree (level by level p'[k] = p[2k] + p[2k+1], each node one IEEE addition of two
fp64 values, so commutativity is all that is needed), and a zero result is returned as +0. An aligned
subtree of that tree is the tree of an aligned power-of-two chunk, and padding a tree with a zero half only
adds +0 at the root (which changes nothing but the sign of a zero, canonicalised to +0), so:
- a kernel may sum chunks of any power-of-two size (CPU 1024, Triton on GPU 1024, in the interpreter 2¹⁶)
  by the tree, then add each row's chunk sums by the same tree (the C++ CPU kernel in C++; Triton hands
  them to `tree_sum`, shared Python code run as torch ops on the device) — every backend gives the same bits;
- a row's sum depends only on its own elements: not on the other jobs of the launch, their order, or how
  the tensors are batched.
fp32 (and bf16/fp16) products are exact in fp64, so FMA contraction could not change them; fp64 products
round once and the kernels are built without contraction. Against the plain fp64 sum the tree's error is
O(log₂ n · ε₆₄) relative to Σ|products| — far below what any fp32 merge can see. A fixed tree was chosen
over Kahan or exact (superaccumulator) sums because it vectorises on CPUs and GPUs (a reshape + pairwise
add in Triton, vertical vector adds after a transpose in C++) and its determinism needs no atomics; it
costs one fp64 per chunk and pair of scratch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .reference import CombineJob


@dataclass(frozen=True)
class DotsSpec:
    """The index pairs (a, c) whose sums Σ u_a·u_c each job gets, in output order."""

    pairs: Tuple[Tuple[int, int], ...]

    def __post_init__(self):
        pairs = tuple((int(a), int(c)) for a, c in self.pairs)
        if not pairs or any(a < 0 or c < 0 for a, c in pairs):
            raise ValueError(f"pairs must be a non-empty list of non-negative (a, c) input indices, got {self.pairs}")
        object.__setattr__(self, "pairs", pairs)


@dataclass(frozen=True)
class DotsJob:
    """One group of tensors: inputs of one shape (kernels take inputs of one dtype; others go to the
    reference), optional base of that shape (any dtype), seen as
    [rows, numel/rows] (rows = 1: one sum per tensor; rows = shape[0]: one per row)."""

    inputs: Sequence[torch.Tensor]
    base: Optional[torch.Tensor] = None
    rows: int = 1

    def __post_init__(self):
        if not self.inputs:
            raise ValueError("a dots job needs at least one input")
        shape = self.inputs[0].shape
        for k, t in enumerate(list(self.inputs) + ([self.base] if self.base is not None else [])):
            if t.shape != shape or t.device != self.inputs[0].device:
                what = "base" if k == len(self.inputs) else f"inputs[{k}]"
                raise ValueError(f"{what} has shape {tuple(t.shape)} on {t.device}; expected {tuple(shape)} on "
                                 f"{self.inputs[0].device}")
        numel = self.inputs[0].numel()
        if self.rows < 0 or (self.rows == 0 and numel) or (self.rows and numel % self.rows):
            raise ValueError(f"rows={self.rows} does not divide the {numel} elements of shape {tuple(shape)}")

    @property
    def device(self) -> torch.device:
        return self.inputs[0].device

    @property
    def acc_dtype(self) -> torch.dtype:
        return self.as_combine().acc_dtype

    def as_combine(self) -> CombineJob:
        """The job as a row of the multi-tensor table (dispatch/_table.py; out = inputs[0], coeffs unused)."""
        return CombineJob(self.inputs[0], self.inputs, [0.0] * len(self.inputs), self.base)


def gram_pairs(n: int, first: int = 0) -> Tuple[Tuple[int, int], ...]:
    """(i, j) for first ≤ i ≤ j < first + n, row by row: the upper triangle of a Gram matrix."""
    return tuple((i, j) for i in range(first, first + n) for j in range(i, first + n))


def gram_matrix(sums: torch.Tensor, n: int) -> torch.Tensor:
    """[rows, n, n] symmetric matrices from the sums of `gram_pairs(n)` ([rows, n(n+1)/2])."""
    i, j = torch.triu_indices(n, n)
    g = sums.new_zeros((sums.shape[0], n, n))
    g[:, i, j] = sums
    g[:, j, i] = sums
    return g


def tree_sum(values: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The pairwise tree (module docstring) of consecutive segments of `values` [Σcounts, P] (fp64) with
    counts[s] ≥ 1 values each: [len(counts), P], zeros as +0. Segments are reduced level by level together
    (a missing right child is +0); segments of one length as a [segments, length, P] view."""
    if counts.numel() and values.shape[0] == counts.numel() * int(counts[0]) and bool((counts == counts[0]).all()):
        v = values.reshape(counts.numel(), -1, values.shape[1])
        while v.shape[1] > 1:
            if v.shape[1] % 2:
                v = torch.cat([v, torch.zeros_like(v[:, :1])], dim=1)
            v = v[:, 0::2] + v[:, 1::2]
        return v[:, 0] + 0.0
    counts = counts.to(values.device)
    while values.shape[0] > counts.numel():
        starts = torch.cumsum(counts, 0) - counts
        half = (counts + 1) // 2
        seg = torch.repeat_interleave(torch.arange(counts.numel(), device=values.device), half)
        k = torch.arange(seg.numel(), device=values.device) - (torch.cumsum(half, 0) - half)[seg]
        left = starts[seg] + 2 * k
        has_right = (2 * k + 1 < counts[seg]).unsqueeze(1)
        right = values[torch.clamp(left + 1, max=values.shape[0] - 1)]
        values = values[left] + torch.where(has_right, right, torch.zeros_like(right))
        counts = half
    return values + 0.0


def _products(job: DotsJob, pairs) -> torch.Tensor:
    """[P, rows, cols] fp64 products u_a·u_c of one job, u formed as the module docstring says."""
    acc = job.acc_dtype
    rows = job.rows
    u = [x.to(acc).reshape(rows, -1) for x in job.inputs]
    if job.base is not None:
        b = job.base.to(acc).reshape(rows, -1)
        u = [x - b for x in u]
    return torch.stack([u[a].double() * u[c].double() for a, c in pairs])


def dots_reference(jobs: Sequence[DotsJob], spec: DotsSpec) -> List[torch.Tensor]:
    """The definition: per job, products in fp64, then the pairwise tree over each row."""
    out = []
    check_pairs(jobs, spec)
    for job in jobs:
        if job.rows == 0:
            out.append(torch.zeros((0, len(spec.pairs)), dtype=torch.float64, device=job.device))
            continue
        p = _products(job, spec.pairs)
        while p.shape[-1] > 1:
            if p.shape[-1] % 2:
                p = torch.cat([p, torch.zeros_like(p[..., :1])], dim=-1)
            p = p.reshape(*p.shape[:-1], -1, 2).sum(-1)
        s = p[..., 0] if p.shape[-1] else torch.zeros(p.shape[:-1], dtype=torch.float64, device=job.device)
        out.append(s.T.contiguous() + 0.0)
    return out


def check_pairs(jobs: Sequence[DotsJob], spec: DotsSpec) -> None:
    """A clear error when a pair's index is out of range for a job."""
    top = max(max(a, c) for a, c in spec.pairs)
    for job in jobs:
        if top >= len(job.inputs):
            raise ValueError(f"pair index {top} is out of range for a job with {len(job.inputs)} inputs")


def chunk_list(jobs: Sequence[DotsJob], chunk: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Chunks of at most `chunk` (a power of two) elements, aligned within each row of each job: int64
    [n_chunks, 3] (job index, first element, length) job by job, row by row, and the chunks per row."""
    rows = torch.tensor([j.rows for j in jobs], dtype=torch.int64)
    cols = torch.tensor([j.inputs[0].numel() // max(j.rows, 1) for j in jobs], dtype=torch.int64)
    per_row = torch.clamp((cols + chunk - 1) // chunk, min=1)
    seg_job = torch.repeat_interleave(torch.arange(len(jobs)), rows)
    seg_row = torch.arange(seg_job.numel()) - (torch.cumsum(rows, 0) - rows)[seg_job]
    counts = per_row[seg_job]
    chunk_seg = torch.repeat_interleave(torch.arange(seg_job.numel()), counts)
    k = torch.arange(chunk_seg.numel()) - (torch.cumsum(counts, 0) - counts)[chunk_seg]
    job = seg_job[chunk_seg]
    in_row = k * chunk
    start = seg_row[chunk_seg] * cols[job] + in_row
    length = torch.clamp(cols[job] - in_row, min=0, max=chunk)
    return torch.stack([job, start, length], dim=1).contiguous(), counts


Launch = Callable[[Sequence[DotsJob], torch.Tensor, torch.Tensor, torch.Tensor, bool, int], None]


def run_chunked(jobs: Sequence[DotsJob], spec: DotsSpec, max_chunk: int, launch: Launch) -> List[torch.Tensor]:
    """What the Triton backend runs around its kernel: per number of inputs and dtypes, the chunk list, one
    launch that writes each chunk's tree sums (`launch(jobs, chunks, pairs, partials [n_chunks, P] fp64,
    acc_f64, chunk)`), then `tree_sum` over each row's chunks. The chunk is the smallest power of two that
    holds the longest row, at most `max_chunk` (any power of two gives the same sums)."""
    check_pairs(jobs, spec)
    out: List[Optional[torch.Tensor]] = [None] * len(jobs)
    device = jobs[0].device
    pairs = torch.tensor(spec.pairs, dtype=torch.int64)
    groups: Dict[tuple, List[int]] = {}
    for k, j in enumerate(jobs):
        key = (len(j.inputs), j.acc_dtype == torch.float64, j.inputs[0].dtype, j.base is None or j.base.dtype)
        groups.setdefault(key, []).append(k)
    for (_, acc_f64, _, _), index in groups.items():
        group = [jobs[k] for k in index]
        longest = max(j.inputs[0].numel() // max(j.rows, 1) for j in group)
        chunk = min(max_chunk, 1 << max(longest - 1, 0).bit_length())
        chunks, counts = chunk_list(group, chunk)
        partials = torch.zeros((chunks.shape[0], len(spec.pairs)), dtype=torch.float64, device=device)
        if chunks.shape[0]:
            launch(group, chunks, pairs, partials, acc_f64, chunk)
        sums = tree_sum(partials, counts)
        for k, s in zip(index, torch.split(sums, [j.rows for j in group])):
            out[k] = s
    return out


def dots(jobs: Sequence[DotsJob], spec: DotsSpec, backend: str = "auto") -> List[torch.Tensor]:
    """``dispatch.run("dots", ...)`` for jobs on any devices (one launch per device and input count): per
    job an fp64 [rows, len(spec.pairs)] tensor on its device, in job order."""
    from . import dispatch

    out: List[Optional[torch.Tensor]] = [None] * len(jobs)
    by_device: Dict[torch.device, List[int]] = {}
    for k, j in enumerate(jobs):
        by_device.setdefault(j.device, []).append(k)
    for index in by_device.values():
        for k, s in zip(index, dispatch.run("dots", [jobs[k] for k in index], backend, spec)):
            out[k] = s
    return out
