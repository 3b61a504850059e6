"""The contract: plain-torch references that define every op's result, bit for bit.

Linear combination with optional random drop (averaging, weighted averaging, task arithmetic, DARE) of
one tensor: inputs x_0..x_{N-1}, optional base b, coefficients c_i (Python floats, rounded once to the
accumulation dtype) and, when a drop threshold T > 0 is set, keep_i = U(key_i, element) >= T
(fusedmerge/philox.py)::

    d_i = x_i - b                     (d_i = x_i without a base)
    e_i = keep_i ? c_i*d_i : 0        (e_i = c_i*d_i without dropping)
    acc = e_0 ; acc = acc + e_i  for i = 1..N-1     left fold, every operation rounded, no FMA
    out = round(b + acc)              (round(acc) without a base)

The accumulation dtype is fp64 when the base or any input is fp64, else fp32; inputs are widened
exactly. `round` is one round-to-nearest-even to the output dtype; an fp64 accumulator meets a 16-bit
output through fp32, as torch's own casts do. Every backend must equal this function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .philox import keep_mask, random_words


@dataclass
class CombineJob:
    """One output tensor of a multi-tensor launch: ``out = combine(inputs, base)`` with one coefficient,
    and for dropping one Philox key, per input. `first`: the index of out's first element in the whole
    tensor when the job is a row block of it (a multiple of 128; the Philox counters start there)."""

    out: torch.Tensor
    inputs: Sequence[torch.Tensor]
    coeffs: Sequence[float]
    base: Optional[torch.Tensor] = None
    threshold: int = 0
    keys: Optional[Sequence[int]] = None
    first: int = 0

    @property
    def acc_dtype(self) -> torch.dtype:
        tensors = list(self.inputs) + ([self.base] if self.base is not None else [])
        return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def combine_reference(job: CombineJob) -> torch.Tensor:
    """The linear combination of one job, computed in plain torch as the module docstring defines it."""
    acc_dtype = job.acc_dtype
    base = job.base.to(acc_dtype) if job.base is not None else None
    acc = None
    for i, (c, x) in enumerate(zip(job.coeffs, job.inputs)):
        d = x.to(acc_dtype)
        if base is not None:
            d = d - base
        d = d * torch.tensor(c, dtype=acc_dtype, device=d.device)
        if job.threshold:
            keep = keep_mask(job.keys[i], d.numel(), job.threshold, d.device, job.first).reshape(d.shape)
            d = torch.where(keep, d, torch.zeros((), dtype=acc_dtype, device=d.device))
        acc = d if acc is None else acc + d
    if base is not None:
        acc = base + acc
    if acc_dtype == torch.float64 and job.out.dtype in (torch.float16, torch.bfloat16):
        acc = acc.to(torch.float32)
    return acc.to(job.out.dtype)


def combine(jobs: Sequence[CombineJob]) -> None:
    """Backend entry point of the reference: writes every job's output."""
    for job in jobs:
        job.out.copy_(combine_reference(job))


# ---------------------------------------------------------------------------------------------------------
# TIES: trim, elect sign, disjoint merge
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TiesSpec:
    """Options of one TIES merge, resolved to numbers (see fusedmerge/ties.py for their meaning)."""

    weights: Sequence[float]
    scaling: float
    ks: Sequence[Sequence[int]]  # per scope, per model: how many of the largest |τ| are kept (magnitude trim)
    scope: str = "tensor"  # "tensor": one scope per job; "model": one scope over all jobs
    elect: str = "sum"  # "sum" | "count"
    merge: str = "sum"  # "sum" | "mean" | "max"
    weighted_vote: bool = True
    vote_tie: str = "+"  # "+" | "majority"
    drop_threshold: int = 0  # DARE-TIES: random drop instead of the magnitude trim
    drop_rescale: float = 1.0
    keys: Optional[Sequence[Sequence[int]]] = None  # per job, per model Philox keys (DARE-TIES)
    thresholds: Optional[Sequence[Sequence[int]]] = None  # per scope, per model: the trim thresholds (magnitude
    # bits) when already known — a row block of a tensor whose thresholds were selected over the whole tensor

    def trims(self, jobs: Sequence[CombineJob]) -> bool:
        """Whether the magnitude trim keeps fewer than all entries of some scope (else no selection is needed:
        a threshold of 0 keeps everything)."""
        sizes = [j.out.numel() for j in jobs] if self.scope == "tensor" else [sum(j.out.numel() for j in jobs)]
        return self.drop_threshold == 0 and any(k < n for ks, n in zip(self.ks, sizes) for k in ks)


def magnitude_view(t: torch.Tensor) -> torch.Tensor:
    """|t| as ordered integers of t's width and shape (the bit pattern of a non-negative float orders like its
    value; NaN largest)."""
    return t.abs().view(torch.int64 if t.dtype == torch.float64 else torch.int32)


def magnitude_bits(t: torch.Tensor) -> torch.Tensor:
    """magnitude_view flattened, as int64."""
    return magnitude_view(t).reshape(-1).to(torch.int64)


def ties_thresholds_reference(taus: Sequence[Sequence[torch.Tensor]], spec: TiesSpec) -> list:
    """Per scope and model, the magnitude (as bits) of the k-th largest |τ| — by a full sort."""
    scopes = [[i] for i in range(len(taus))] if spec.scope == "tensor" else [list(range(len(taus)))]
    out = []
    for s, jobs in enumerate(scopes):
        row = []
        for m in range(len(spec.weights)):
            bits = torch.cat([magnitude_bits(taus[j][m]) for j in jobs])
            row.append(int(torch.sort(bits, descending=True).values[spec.ks[s][m] - 1]))
        out.append(row)
    return out


def _sign(x: torch.Tensor) -> torch.Tensor:
    """+1, −1 or 0 (for 0 and NaN), in x's dtype."""
    return (x > 0).to(x.dtype) - (x < 0).to(x.dtype)


def ties_reference(jobs: Sequence[CombineJob], spec: TiesSpec) -> None:
    """TIES of every job, written to job.out. Per element, in the accumulation dtype (left folds over the
    models, each operation rounded)::

        τᵢ = xᵢ − b
        τ̂ᵢ = τᵢ if |τᵢ| ≥ tᵢ (k-th largest |τᵢ| of the scope)   — or, for DARE-TIES, keepᵢ ? τᵢ·r : 0
        vᵢ = wᵢ·τ̂ᵢ  (weighted_vote)  or  τ̂ᵢ
        s  = v₀ + v₁ + …  (elect="sum")  or  sign(v₀) + sign(v₁) + …  (elect="count");  σ = sign(s)
        σ  = +1 where s = 0 (vote_tie="+"),  or the sign of Σ sign(s) over the whole state dict ("majority")
        agreeᵢ = sign(vᵢ) = σ ≠ 0;   uᵢ = τ̂ᵢ·wᵢ          (sign(NaN) = 0)
        m  = Σ agreeᵢ·uᵢ  ("sum");  that / Σ agreeᵢ·wᵢ (0 if that is 0) ("mean");  σ·max agreeᵢ·|uᵢ| ("max")
        out = round(b + λ·m)
    """
    acc_dtypes = [job.acc_dtype for job in jobs]
    taus = [[x.to(a) - job.base.to(a) for x in job.inputs] for job, a in zip(jobs, acc_dtypes)]
    thresholds = (spec.thresholds if spec.thresholds is not None
                  else ties_thresholds_reference(taus, spec) if spec.drop_threshold == 0 else None)
    elected, votes = [], []
    for j, (job, acc) in enumerate(zip(jobs, acc_dtypes)):
        c = lambda v: torch.tensor(v, dtype=acc, device=job.base.device)  # noqa: E731
        trimmed = []
        for m, tau in enumerate(taus[j]):
            if thresholds is not None:
                scope = j if spec.scope == "tensor" else 0
                keep = magnitude_bits(tau).reshape(tau.shape) >= thresholds[scope][m]
                trimmed.append(torch.where(keep, tau, c(0.0)))
            else:
                keep = keep_mask(spec.keys[j][m], tau.numel(), spec.drop_threshold, tau.device,
                                 job.first).reshape(tau.shape)
                scaled = tau * c(spec.drop_rescale) if spec.drop_rescale != 1.0 else tau
                trimmed.append(torch.where(keep, scaled, c(0.0)))
        v = [t * c(w) for t, w in zip(trimmed, spec.weights)] if spec.weighted_vote else trimmed
        s = v[0] if spec.elect == "sum" else _sign(v[0])
        for vi in v[1:]:
            s = s + (vi if spec.elect == "sum" else _sign(vi))
        elected.append(_sign(s))
        votes.append((trimmed, v))
    if spec.vote_tie == "majority":
        total = sum(int(e.sum()) for e in elected)
        tie_sign = (total > 0) - (total < 0)
    else:
        tie_sign = 1
    for job, acc, sigma, (trimmed, v) in zip(jobs, acc_dtypes, elected, votes):
        c = lambda x: torch.tensor(x, dtype=acc, device=job.base.device)  # noqa: E731
        sigma = torch.where(sigma == 0, c(float(tie_sign)), sigma)
        agree = [((vi > 0) & (sigma > 0)) | ((vi < 0) & (sigma < 0)) for vi in v]
        u = [t * c(w) for t, w in zip(trimmed, spec.weights)]
        if spec.merge == "max":
            m = None
            for a, ui in zip(agree, u):
                mag = torch.where(a, ui.abs(), c(0.0))
                m = mag if m is None else torch.maximum(m, mag)
            merged = sigma * m
        else:
            merged = None
            for a, ui in zip(agree, u):
                term = torch.where(a, ui, c(0.0))
                merged = term if merged is None else merged + term
            if spec.merge == "mean":
                den = None
                for a, w in zip(agree, spec.weights):
                    term = torch.where(a, c(w), c(0.0))
                    den = term if den is None else den + term
                merged = torch.where(den != 0, merged / torch.where(den != 0, den, c(1.0)), c(0.0))
        result = job.base.to(acc) + merged * c(spec.scaling)
        if acc == torch.float64 and job.out.dtype in (torch.float16, torch.bfloat16):
            result = result.to(torch.float32)
        job.out.copy_(result.to(job.out.dtype))


# ---------------------------------------------------------------------------------------------------------
# Exact L1 norms for DARE's L1 rescale (mergekit's `rescale`)
# ---------------------------------------------------------------------------------------------------------


def l1_buckets_reference(job: CombineJob) -> torch.Tensor:
    """Σ|τᵢ| and Σ keepᵢ·|τᵢ| (τᵢ = xᵢ − b in fp32) of one job as int64 sums of the fp32 mantissas per
    exponent, shape [N, 2, 256]: integer sums do not depend on the order, so every backend agrees."""
    out = torch.zeros((len(job.inputs), 2, 256), dtype=torch.int64)
    for i, x in enumerate(job.inputs):
        tau = (x.float() - job.base.float()).reshape(-1).cpu()
        out[i, 0] = abs_buckets(tau)
        keep = (keep_mask(job.keys[i], tau.numel(), job.threshold, first=job.first) if job.threshold
                else torch.ones_like(tau, dtype=torch.bool))
        out[i, 1] = abs_buckets(tau[keep])
    return out


def abs_buckets(t: torch.Tensor) -> torch.Tensor:
    """Σ|t| of an fp32 tensor as int64 sums of the mantissas per exponent, [256] on t's device: exact, so
    independent of the order of summation (bucket_value gives the value)."""
    bits = t.abs().view(torch.int32).reshape(-1).to(torch.int64)
    e = bits >> 23
    mant = (bits & 0x7FFFFF) | ((e != 0).to(torch.int64) << 23)
    return torch.zeros(256, dtype=torch.int64, device=t.device).index_add_(0, e, mant)


def bucket_value(buckets: torch.Tensor) -> float:
    """The exact sum held by 256 exponent buckets, rounded once to a Python float (inf if any |τ| was)."""
    counts = [int(v) for v in buckets.tolist()]
    if counts[255]:
        return math.inf
    total = sum(c << (max(e, 1) - 1) for e, c in enumerate(counts))  # in units of 2**-149, < 2**320
    return math.ldexp(float(total), -149)


# ---------------------------------------------------------------------------------------------------------
# Selection of k-th largest magnitudes, as a primitive of its own (breadcrumbs, sce, arcee_fusion)
# ---------------------------------------------------------------------------------------------------------


def select_reference(jobs: Sequence[CombineJob], spec: TiesSpec) -> torch.Tensor:
    """Per scope and model, the bits of the ks[scope][model]-th largest |xᵢ − b| (in the accumulation dtype,
    by a full sort), as int64 [scopes, N]: the thresholds of ties_reference."""
    taus = [[x.to(j.acc_dtype) - j.base.to(j.acc_dtype) for x in j.inputs] for j in jobs]
    return torch.tensor(ties_thresholds_reference(taus, spec), dtype=torch.int64)


# ---------------------------------------------------------------------------------------------------------
# Segmented rank: the rank of every |value| within its row (DELLA)
# ---------------------------------------------------------------------------------------------------------


@dataclass
class RankJob:
    """One tensor's rows: ``values`` [rows, n] (fp32, contiguous), ``out`` int32 [rows, n] written."""

    values: torch.Tensor
    out: torch.Tensor


def row_rank_reference(job: RankJob) -> torch.Tensor:
    """out[r, j] = #{k : |v[r,k]| < |v[r,j]|, or equal with k < j}: the 0-based ascending rank of each
    magnitude in its row, equal magnitudes in column order (a stable argsort of the magnitude bits; NaN
    ranks last)."""
    bits = magnitude_bits(job.values).reshape(job.values.shape)
    order = torch.argsort(bits, dim=1, stable=True)
    positions = torch.arange(bits.shape[1], dtype=torch.int32, device=bits.device).expand_as(order)
    return torch.empty_like(order, dtype=torch.int32).scatter_(1, order, positions.contiguous())


def row_rank(jobs: Sequence[RankJob]) -> None:
    """Backend entry point of the reference: writes every job's ranks."""
    for job in jobs:
        job.out.copy_(row_rank_reference(job))


@dataclass
class UniformsJob:
    """Every element's 32-bit Philox uniform for one 64-bit key, into ``out`` (int32 holding the uint32 bits,
    contiguous; its numel is the element count). `first`: the index of out's first element in the whole tensor
    when out is a row block of it (a multiple of 128; the Philox counters start there, as CombineJob's)."""

    key: int
    out: torch.Tensor
    first: int = 0


def uniforms(jobs: Sequence[UniformsJob]) -> None:
    """Backend entry point of the reference (fusedmerge.philox.random_words): writes every job's out."""
    for job in jobs:
        u = random_words(job.key, job.out.numel(), job.out.device, job.first)
        job.out.copy_(torch.where(u >= 2**31, u - 2**32, u).to(torch.int32).reshape(job.out.shape))
