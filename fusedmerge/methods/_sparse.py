"""What the sparsification methods (della, breadcrumbs, sce) share: per-model option values, mergekit's
generalized-task-arithmetic tail on pruned task vectors, and mergekit's L1 rescale with exact norms.

The tail, for one tensor with pruned task vectors δᵢ (in the accumulation dtype) and weights wᵢ::

    consensus (TIES's "sum" vote):  m = Σ agreeᵢ·wᵢδᵢ, divided by Σ agreeᵢ·wᵢ when `normalize`
                                    (the `ties` primitive with nothing trimmed, base 0), then out = θ0 + λ·m
    linear:                         out = Σ (λ·wᵢ/div)·δᵢ + θ0, div = Σ wᵢ when `normalize` (mergekit's
                                    |Σ wᵢ| < 1e-8 → 1), one `combine` launch

so every backend gives the bits of the references of those primitives.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from .. import dispatch
from .. import options as opt
from .._forms import Slot
from ..reference import CombineJob, TiesSpec, bucket_value, magnitude_bits
from ._spec import BlockPass, GroupCall, Span
from .task_arithmetic import mergekit_divisor


def per_model_values(value, arg: str, check=opt.real) -> Union[float, Tuple[float, ...]]:
    """A number, or one number per model (a sequence or 1-D tensor), each checked by `check`."""
    values = value.tolist() if isinstance(value, torch.Tensor) else value
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        return check(values, arg)
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{arg} must be a number or one number per model, got {value!r}")
    return tuple(check(v, arg) for v in values)


def spread(value: Union[float, Tuple[float, ...]], n: int, arg: str) -> List[float]:
    """One value per model from a number or a per-model tuple."""
    if not isinstance(value, tuple):
        return [value] * n
    if len(value) == 1:
        return list(value) * n
    if len(value) != n:
        raise ValueError(f"{arg} has {len(value)} entries but there are {n} inputs")
    return list(value)


def acc_tau(slot: Slot, i: int, acc: torch.dtype) -> torch.Tensor:
    """τᵢ = xᵢ − θ0 in the accumulation dtype."""
    return slot.inputs[i].to(acc) - slot.base.to(acc)


def slot_chunks(slot: Slot, step: int) -> List[Slot]:
    """slot as consecutive 1-D slots of `step` elements (the last one what remains)."""
    flat = lambda t: t.reshape(-1)  # noqa: E731
    out, inputs, base = slot.out.view(-1), [flat(x) for x in slot.inputs], flat(slot.base)  # out: written
    return [Slot(slot.key, out[a:a + step], [x[a:a + step] for x in inputs], base[a:a + step])
            for a in range(0, out.numel(), step)]


def l1_sum(t: torch.Tensor, backend: str, zeros: Optional[torch.Tensor] = None) -> torch.Tensor:
    """‖t‖₁, for mergekit's rescaled_masked_tensor with the L1 norm. fp32: summed exactly (the `l1_buckets`
    primitive: int64 [256] exponent buckets, the same on every backend and device; the sums of a tensor's row
    blocks add up to the whole tensor's bits); fp64: a 0-d fp64 sum by torch. zeros: fp32 zeros of t's shape
    (else allocated)."""
    if t.dtype != torch.float32:
        return t.abs().sum()
    zeros = torch.zeros_like(t) if zeros is None else zeros
    return dispatch.run("l1_buckets", [CombineJob(t, [t], [1.0], zeros)], backend)[0][0, 0]


def l1_sums(tau: torch.Tensor, kept: torch.Tensor, backend: str) -> torch.Tensor:
    """(‖τ‖₁, ‖kept‖₁) by l1_sum."""
    zeros = torch.zeros_like(tau) if tau.dtype == torch.float32 else None
    return torch.stack([l1_sum(tau, backend, zeros), l1_sum(kept, backend, zeros)])


def l1_factor(sums: torch.Tensor) -> float:
    """‖τ‖₁/‖kept‖₁ from l1_sums, 1 when a norm is below 1e-7 (or not finite)."""
    a, b = (bucket_value(s) for s in sums) if sums.dtype == torch.int64 else (float(s) for s in sums)
    return 1.0 if not (math.isfinite(a) and math.isfinite(b)) or a < 1e-7 or b < 1e-7 else a / b


def store(out: torch.Tensor, value: torch.Tensor) -> None:
    """out = value rounded once to out's dtype (fp64 meets a 16-bit output through fp32, as torch's casts)."""
    if value.dtype == torch.float64 and out.dtype in (torch.float16, torch.bfloat16):
        value = value.to(torch.float32)
    out.copy_(value)  # copy_ rounds as .to(out.dtype) does


def gta_tail(slot: Slot, deltas: Sequence[torch.Tensor], weights: Sequence[float], lam: float, normalize: bool,
             consensus: bool, backend: str, weighted_vote: bool = True, zeros: Optional[torch.Tensor] = None) -> None:
    """Write slot.out from the pruned task vectors `deltas` (module docstring); the vote is on wᵢδᵢ
    (mergekit's GTA) or, without `weighted_vote`, on δᵢ (sce). zeros: zeros of the deltas' dtype and size
    (else allocated)."""
    acc = deltas[0].dtype
    for arg, values in (("weights", weights), ("scaling", [lam])):
        opt.finite_coefficients(values, acc, arg, slot.key, deltas)
    if consensus:
        merged = torch.empty(slot.out.shape, dtype=acc, device=slot.out.device)
        zeros = torch.zeros_like(merged) if zeros is None else zeros.reshape(merged.shape)
        spec = TiesSpec(weights=list(weights), scaling=lam, ks=[[merged.numel()] * len(deltas)],
                        merge="mean" if normalize else "sum", weighted_vote=weighted_vote)
        dispatch.run("ties", [CombineJob(merged, list(deltas), list(weights), zeros)], backend, spec)
        store(slot.out, merged.add_(slot.base))  # θ0 + merged (θ0 promoted to acc), in place
        return
    div = mergekit_divisor(weights, normalize)
    coeffs = [lam * w / div for w in weights] + [1.0]
    opt.finite_coefficients(coeffs, acc, "scaling·weights")
    dispatch.run("combine", [CombineJob(slot.out, [*deltas, slot.base], coeffs)], backend)


# Order statistics over row blocks: the exact k-th largest magnitude bits of a whole tensor for each selection
# (m, k) (TIES's trim thresholds, breadcrumbs' band, sce's variance threshold), selected digit by digit (16
# bits per pass, most significant first) from histograms of the blocks summed as integers — a radix
# selection, exact and independent of the blocks; 32-bit magnitudes (fp32 accumulation) skip the two upper
# digits.
DIGIT = 16
SELECT_CHUNK = 1 << 18  # elements whose magnitudes are histogrammed at once

Rank = Union[int, Callable[[int], int]]
Values = Callable[[torch.Tensor, Sequence[torch.Tensor], int], torch.Tensor]


def task_values(base: torch.Tensor, inputs: Sequence[torch.Tensor], m: int) -> torch.Tensor:
    """τ_m = x_m − θ0 of a chunk (base: in the accumulation dtype; inputs: as stored)."""
    return inputs[m].to(base.dtype) - base


def radix_passes(selections: Callable[[GroupCall, Span], Tuple[List[Rank], List[int]]],
                 values: Values = task_values) -> Tuple[BlockPass, ...]:
    """The passes of a radix selection; selections(call, span) gives (ks, models): the rank k and the model
    index of each selection (the same for every block), a rank either a number or a function of the count of
    nonzero magnitudes of its model's values in the whole tensor (counted in the first pass that reads them).
    values(base, inputs, m): model m's values in one chunk (base in the accumulation dtype, inputs as stored;
    default τ_m), whose magnitudes are selected.
    The last pass's statistics are (thresholds, ks, models): thresholds[j] the bits of the ks[j]-th largest
    magnitude of models[j]'s values (0 for integer tensors, not selected; None for a rank of 0: nothing)."""
    return tuple(_digit_pass(d, selections, values) for d in (3, 2, 1, 0))


def _digit_pass(d: int, selections, values: Values) -> BlockPass:
    shift = DIGIT * d

    def partial(call: GroupCall, span: Span, stats):
        _, base, inputs = call.block()
        ks, models = (stats[1], stats[2]) if stats else selections(call, span)
        acc = torch.float64 if any(t.dtype == torch.float64 for t in [base, *inputs]) else torch.float32
        if not base.is_floating_point() or acc == torch.float32 and shift >= 32:
            return ks, models, None, None  # integer tensors are not selected; 32-bit magnitudes have no upper digits
        # selections of one model with the same higher digits share a histogram; none to filter on in the
        # first pass, nor above the magnitudes' width (fp32's 32 bits)
        filtered = stats is not None and shift + DIGIT < (64 if acc == torch.float64 else 32)
        shared = [(m, stats[0][j] >> (shift + DIGIT) if filtered else None) for j, m in enumerate(models)]
        hists = {key: torch.zeros(1 << DIGIT, dtype=torch.int64, device=base.device) for key in shared}
        counted = any(callable(k) for k in ks)  # ranks still to be resolved: the first pass that reads
        nonzero = torch.zeros(len(inputs), dtype=torch.int64)
        for start in range(0, base.numel() if models else 0, SELECT_CHUNK):  # temporaries of one chunk at a time
            b = base[start:start + SELECT_CHUNK].to(acc)
            chunk = [x[start:start + SELECT_CHUNK] for x in inputs]
            for m in sorted(set(models)):
                bits = magnitude_bits(values(b, chunk, m))
                nonzero[m] += int(torch.count_nonzero(bits)) if counted else 0
                for (mk, high), h in hists.items():
                    if mk == m:
                        mine = bits if high is None else bits[(bits >> (shift + DIGIT)) == high]
                        h += torch.bincount((mine >> shift) & 0xFFFF, minlength=1 << DIGIT)
        empty = torch.zeros((0, 1 << DIGIT), dtype=torch.int64, device=base.device)
        return ks, models, torch.stack([hists[key] for key in shared]) if shared else empty, nonzero

    def combine(a, b):
        return (a[0], a[1]) + ((None, None) if a[2] is None else (a[2] + b[2], a[3] + b[3]))

    def finish(total, stats):
        ks, models, hists, nonzero = total
        prefixes = list(stats[0]) if stats else [0] * len(ks)
        if hists is None:
            return prefixes, ks, models
        ks = [k(int(nonzero[m])) if callable(k) else k for k, m in zip(ks, models)]
        for j, h in enumerate(hists):
            above = torch.flip(torch.cumsum(torch.flip(h, [0]), 0), [0])  # above[g]: count with digit ≥ g
            g = int(torch.nonzero(above >= ks[j]).max())
            prefixes[j] |= g << shift
            ks[j] -= int(above[g]) - int(h[g])
        if shift == 0:  # a rank of 0 keeps 0 to the end (any other at least 1): its digits say nothing
            prefixes = [None if k == 0 else p for p, k in zip(prefixes, ks)]
        return prefixes, ks, models

    return BlockPass(partial, combine, finish)
