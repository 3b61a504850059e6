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
from typing import List, Sequence, Tuple, Union

import torch

from .. import dispatch
from .. import options as opt
from .._forms import Slot
from ..reference import CombineJob, TiesSpec, bucket_value
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


def l1_factors(taus: Sequence[torch.Tensor], kept: Sequence[torch.Tensor], backend: str) -> List[float]:
    """mergekit's rescaled_masked_tensor factors with the L1 norm: ‖τᵢ‖₁/‖keptᵢ‖₁ per model, 1 when a norm is
    below 1e-7 (or not finite). fp32 norms are summed exactly (the `l1_buckets` primitive, one launch), so
    the factors are the same on every backend and device; fp64 ones by torch."""
    if not taus:
        return []
    if taus[0].dtype == torch.float32:
        zeros = torch.zeros_like(taus[0])
        jobs = [CombineJob(t, [t, k], [1.0, 1.0], zeros) for t, k in zip(taus, kept)]
        norms = [(bucket_value(b[0, 0]), bucket_value(b[1, 0])) for b in dispatch.run("l1_buckets", jobs, backend)]
    else:
        norms = [(float(t.abs().sum()), float(k.abs().sum())) for t, k in zip(taus, kept)]
    return [1.0 if not (math.isfinite(a) and math.isfinite(b)) or a < 1e-7 or b < 1e-7 else a / b for a, b in norms]


def l1_rescaled(tau: torch.Tensor, kept: torch.Tensor, backend: str) -> torch.Tensor:
    """kept·(‖τ‖₁/‖kept‖₁) as l1_factors says."""
    (f,) = l1_factors([tau], [kept], backend)
    return kept * torch.tensor(f, dtype=kept.dtype, device=kept.device) if f != 1.0 else kept


def store(out: torch.Tensor, value: torch.Tensor) -> None:
    """out = value rounded once to out's dtype (fp64 meets a 16-bit output through fp32, as torch's casts)."""
    if value.dtype == torch.float64 and out.dtype in (torch.float16, torch.bfloat16):
        value = value.to(torch.float32)
    out.copy_(value.to(out.dtype))


def gta_tail(slot: Slot, deltas: Sequence[torch.Tensor], weights: Sequence[float], lam: float, normalize: bool,
             consensus: bool, backend: str, weighted_vote: bool = True) -> None:
    """Write slot.out from the pruned task vectors `deltas` (module docstring); the vote is on wᵢδᵢ
    (mergekit's GTA) or, without `weighted_vote`, on δᵢ (sce)."""
    acc = deltas[0].dtype
    for arg, values in (("weights", weights), ("scaling", [lam])):
        opt.finite_coefficients(values, acc, arg)
    if consensus:
        merged = torch.empty(slot.out.shape, dtype=acc, device=slot.out.device)
        zeros = torch.zeros_like(merged)
        spec = TiesSpec(weights=list(weights), scaling=lam, ks=[[merged.numel()] * len(deltas)],
                        merge="mean" if normalize else "sum", weighted_vote=weighted_vote)
        dispatch.run("ties", [CombineJob(merged, list(deltas), list(weights), zeros)], backend, spec)
        store(slot.out, slot.base.to(acc) + merged)
        return
    div = mergekit_divisor(weights, normalize)
    coeffs = [lam * w / div for w in weights] + [1.0]
    opt.finite_coefficients(coeffs, acc, "scaling·weights")
    dispatch.run("combine", [CombineJob(slot.out, [*deltas, slot.base], coeffs)], backend)
