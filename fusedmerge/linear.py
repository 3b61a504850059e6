"""Averaging, weighted averaging and task arithmetic: one fused linear combination per state dict.

    average:          out = Σ w_i·x_i            with w normalised to Σ w_i = 1 (default uniform)
    task_arithmetic:  out = θ0 + Σ (λ·w_i)·(θ_i − θ0)   with w_i = 1 by default, not normalised

Coefficients are computed in fp64 on the host and rounded once to the accumulation dtype; the arithmetic
is reference.combine_reference, equal on every backend.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

from ._forms import gather, gather_like, merge_linear


def _weights(weights, n: int, normalise: bool) -> List[float]:
    if weights is None:
        w = [1.0] * n
    else:
        if isinstance(weights, torch.Tensor):
            weights = weights.detach().cpu().reshape(-1).tolist()
        try:
            w = [float(x) for x in weights]
        except (TypeError, ValueError):
            raise TypeError(f"weights must be a sequence of numbers, got {weights!r}") from None
        if len(w) != n:
            raise ValueError(f"weights has {len(w)} entries but there are {n} inputs")
        if not all(math.isfinite(x) for x in w):
            raise ValueError(f"weights must be finite, got {w}")
    if normalise:
        total = math.fsum(w)
        if total == 0.0:
            raise ValueError(f"weights sum to zero and cannot be normalised: {w}")
        w = [x / total for x in w]
    return w


def _scalar(value, arg: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{arg} must be a real number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{arg} must be finite, got {value}")
    return value


def average(inputs, weights: Optional[Sequence[float]] = None, *, out_dtype: Optional[torch.dtype] = None,
            out=None, backend: str = "auto"):
    """(Weighted) average of tensors, state dicts or modules: Σ w_i·x_i with weights normalised to sum 1.

    A drop-in for ``torch.stack(ts).mean(0)`` and FusionBench's simple/weighted averages. Returns a tensor,
    a new state dict, or a new module of the first module's class. Inputs are never modified, unless given
    as `out` (a tensor, state dict or module of the inputs' form, written in place and returned).
    """
    forms = gather(inputs)
    coeffs = _weights(weights, len(forms.dicts), normalise=True)
    out_dict = gather_like(out, forms, "out") if out is not None else None
    return forms.wrap(merge_linear(forms, coeffs, None, out_dtype, backend, out_dict), out)


def weighted_sum(inputs, coeffs: Sequence[float], *, out_dtype: Optional[torch.dtype] = None, backend: str = "auto"):
    """Σ cᵢ·xᵢ with the coefficients as given (not normalised), in the forms of `average` (FusionBench's
    weighted average without `normalize`, mergekit's linear without it)."""
    forms = gather(inputs)
    return forms.wrap(merge_linear(forms, _weights(coeffs, len(forms.dicts), normalise=False), None, out_dtype, backend))


def task_arithmetic(base, inputs, scaling: float = 1.0, *, weights: Optional[Sequence[float]] = None,
                    out_dtype: Optional[torch.dtype] = None, out=None, backend: str = "auto"):
    """Task arithmetic θ0 + λ·Σ w_i·(θ_i − θ0) over tensors, state dicts or modules (w_i = 1 by default,
    not normalised: λ carries any 1/N, as in FusionBench). `out` as in `average`."""
    forms = gather(inputs)
    base_dict = gather_like(base, forms, "base")
    lam = _scalar(scaling, "scaling")
    coeffs = [lam * w for w in _weights(weights, len(forms.dicts), normalise=False)]
    out_dict = gather_like(out, forms, "out") if out is not None else None
    return forms.wrap(merge_linear(forms, coeffs, base_dict, out_dtype, backend, out_dict), out)
