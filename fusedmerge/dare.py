"""DARE (drop and rescale), fused into the task-arithmetic launch, with name-keyed reproducible masks.

    out = θ0 + Σ cᵢ · keepᵢ ⊙ (θᵢ − θ0),   cᵢ = λ·wᵢ·r,   r = 1/(1−p) (rescale=True) or 1 (rescale=False)

keepᵢ is drawn from Philox4x32-10 with a key made of (seed, i, tensor name) (fusedmerge/philox.py): the
same seed gives the same masks on every backend and device, in any order of keys, whether a state dict
is merged whole or tensor by tensor. DARE simple average is ``scaling=1/N``. p is the drop probability.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ._forms import Terms, gather, gather_like, merge_linear
from .linear import _scalar, _weights
from .philox import drop_threshold, mask_key


def check_drop_probability(p, arg: str = "p") -> float:
    p = _scalar(p, arg)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{arg} is the drop probability and must be in [0, 1), got {p}"
                         + (" (p = 1 would drop every delta)" if p == 1.0 else ""))
    return p


def dare(base, inputs, p: float, *, weights: Optional[Sequence[float]] = None, scaling: float = 1.0,
         rescale: bool = True, seed: int = 0, linear_only: bool = False, name: str = "tensor",
         out_dtype: Optional[torch.dtype] = None, out=None, backend: str = "auto"):
    """DARE task arithmetic over tensors, state dicts or modules (the forms of `average`).

    p: drop probability in [0, 1). rescale: kept deltas × 1/(1−p) (the paper, FusionBench). seed: with the
    tensor's name (`name` for plain tensors) and the model's index, decides every mask. linear_only: drop
    only in 2-D weights (Linear layers); other tensors are merged by plain task arithmetic.
    """
    p = check_drop_probability(p)
    if not isinstance(rescale, bool):
        raise TypeError(f"rescale must be True or False, got {rescale!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, got {name!r}")
    forms = gather(inputs, name=name)
    base_dict = gather_like(base, forms, "base")
    lam = _scalar(scaling, "scaling")
    plain = [lam * w for w in _weights(weights, len(forms.dicts), normalise=False)]
    threshold = drop_threshold(p)
    rescaled = [c / (1.0 - p) for c in plain] if rescale else plain

    def terms(key: str, like: torch.Tensor) -> Terms:
        if threshold == 0 or (linear_only and like.dim() != 2):
            return Terms(plain)
        return Terms(rescaled, threshold, [mask_key(seed, i, key) for i in range(len(plain))])

    out_dict = gather_like(out, forms, "out") if out is not None else None
    return forms.wrap(merge_linear(forms, terms, base_dict, out_dtype, backend, out_dict), out)
