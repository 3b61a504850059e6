"""DARE (drop and rescale), fused into the task-arithmetic launch, with name-keyed reproducible masks.

    out = θ0 + Σ cᵢ · keepᵢ ⊙ (θᵢ − θ0),   cᵢ = λ·wᵢ·r,   r = 1/(1−p) (rescale=True) or 1 (rescale=False)

keepᵢ is drawn from Philox4x32-10 with a key made of (seed, i, tensor name) (fusedmerge/philox.py): the
same seed gives the same masks on every backend and device, in any order of keys, whether a state dict
is merged whole or tensor by tensor. DARE simple average is ``scaling=1/N``. p is the drop probability.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import List, Optional, Sequence, Union

import torch

from . import dispatch
from ._forms import Slot, Terms, gather, gather_like, merge_linear
from .linear import _scalar, _weights
from .philox import drop_threshold, mask_key
from .reference import CombineJob, bucket_value


def check_drop_probability(p, arg: str = "p") -> float:
    p = _scalar(p, arg)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{arg} is the drop probability and must be in [0, 1), got {p}"
                         + (" (p = 1 would drop every delta)" if p == 1.0 else ""))
    return p


def dare(base, inputs, p: float, *, weights: Optional[Sequence[float]] = None, scaling: float = 1.0,
         rescale: Union[bool, str] = True, seed: int = 0, linear_only: Union[bool, Collection[str]] = False,
         name: str = "tensor",
         out_dtype: Optional[torch.dtype] = None, out=None, backend: str = "auto"):
    """DARE task arithmetic over tensors, state dicts or modules (the forms of `average`).

    p: drop probability in [0, 1). rescale: True multiplies kept deltas by 1/(1−p) (the paper, FusionBench);
    "l1" by ‖τᵢ‖₁/‖keepᵢ⊙τᵢ‖₁ per tensor and model (mergekit; left at 1 when a norm is below 1e-7 or not
    finite), the norms summed exactly; False keeps them as they are. seed: with the tensor's name (`name`
    for plain tensors) and the model's index, decides every mask. linear_only: True drops only in 2-D
    weights (Linear layers), or give the collection of keys to drop in (e.g. fusedmerge.opcm.linear_weights
    of a module); other tensors are merged by plain task arithmetic.
    """
    p = check_drop_probability(p)
    if rescale not in (True, False, "l1") or isinstance(rescale, int) and not isinstance(rescale, bool):
        raise TypeError(f"rescale must be True, False or 'l1', got {rescale!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, got {name!r}")
    if isinstance(linear_only, bool):
        droppable = lambda slot: not linear_only or slot.inputs[0].dim() == 2  # noqa: E731
    elif isinstance(linear_only, str) or not isinstance(linear_only, Collection):
        raise TypeError(f"linear_only must be True, False or a collection of keys, got {linear_only!r}")
    else:
        chosen = set(linear_only)
        droppable = lambda slot: slot.key in chosen  # noqa: E731
    forms = gather(inputs, name=name)
    base_dict = gather_like(base, forms, "base")
    lam = _scalar(scaling, "scaling")
    plain = [lam * w for w in _weights(weights, len(forms.dicts), normalise=False)]
    threshold = drop_threshold(p)

    def terms(slots: List[Slot]) -> List[Terms]:
        out_terms = [Terms(plain) for _ in slots]
        dropped = [k for k, s in enumerate(slots) if threshold and droppable(s)]
        for k in dropped:
            keys = [mask_key(seed, i, slots[k].key) for i in range(len(plain))]
            coeffs = [c / (1.0 - p) for c in plain] if rescale is True else plain
            out_terms[k] = Terms(coeffs, threshold, keys)
        if rescale == "l1" and dropped:
            jobs = [CombineJob(slots[k].out, slots[k].inputs, plain, slots[k].base, threshold, out_terms[k].keys)
                    for k in dropped]
            buckets = dispatch.l1_buckets(jobs, backend)
            for k, b in zip(dropped, buckets):
                out_terms[k].coeffs = [c * _l1_factor(b[i]) for i, c in enumerate(plain)]
        return out_terms

    out_dict = gather_like(out, forms, "out") if out is not None else None
    return forms.wrap(merge_linear(forms, terms, base_dict, out_dtype, backend, out_dict), out)


def _l1_factor(buckets: torch.Tensor) -> float:
    """‖τ‖₁ / ‖keep⊙τ‖₁ from exact norm buckets [2, 256]; 1 when a norm is below 1e-7 or not finite."""
    before, after = bucket_value(buckets[0]), bucket_value(buckets[1])
    if not (math.isfinite(before) and math.isfinite(after)) or before < 1e-7 or after < 1e-7:
        return 1.0
    return before / after
