"""TIES merging (trim, elect sign, disjoint merge), with DARE-TIES, without N×P temporaries.

The result is defined by reference.ties_reference. Conventions of the peers, as options:

- ``density`` (one value, or one per input as mergekit allows): ``scope="tensor"`` keeps the top ``density`` of
  |τᵢ| per tensor (mergekit); ``scope="model"`` over each
  model's whole state dict (FusionBench). Ties at the threshold are kept. ``k_rule="floor"`` keeps
  k = max(1, ⌊density·n⌋) values; ``k_rule="fusionbench"`` k = ⌊density·n⌋ + 1 (FusionBench's kthvalue
  count: 201 of 1000 at 20 %). mergekit breaks ties at the threshold by sort order (exactly k kept).
- ``elect="sum"`` (sign of the summed mass, both peers) or ``"count"`` (sign of the count).
- ``weighted_vote=True`` multiplies the deltas by their weights before the vote (mergekit);
  FusionBench has no weights (leave them at 1).
- ``vote_tie="+"``: a zero vote elects + (mergekit); ``"majority"``: the sign of the summed signs over the
  whole state dict (FusionBench).
- ``merge="sum"`` (FusionBench default), ``"mean"`` (divided by the agreeing weights: mergekit's
  ``normalize``, FusionBench's ``mean``), ``"max"`` (FusionBench).
- ``dare_p`` replaces the magnitude trim by DARE's random drop (rescaled by 1/(1−p) unless
  ``rescale=False``), keyed like fusedmerge.dare.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import torch

from . import dispatch
from ._forms import gather, gather_like, prepare
from .dare import check_drop_probability
from .linear import _scalar, _weights
from .philox import drop_threshold, mask_key
from .reference import CombineJob, TiesSpec

OPTIONS = {"scope": ("tensor", "model"), "elect": ("sum", "count"), "merge": ("sum", "mean", "max"),
           "k_rule": ("floor", "fusionbench"), "vote_tie": ("+", "majority")}


def kept_count(density: float, n: int, rule: str) -> int:
    """How many of the n largest magnitudes a scope keeps."""
    k = math.floor(density * n) + (1 if rule == "fusionbench" else 0)
    return min(n, max(1, k))


def _densities(density) -> List[float]:
    """One kept fraction for every input, or one per input (mergekit's per-model densities)."""
    values = density.tolist() if isinstance(density, torch.Tensor) else density
    values = [values] if isinstance(values, (int, float)) and not isinstance(values, bool) else list(values)
    out = [_scalar(d, "density") for d in values]
    for d in out:
        if not 0.0 < d <= 1.0:
            raise ValueError(f"density is the kept fraction and must be in (0, 1], got {d}")
    return out


@torch.no_grad()
def ties(base, inputs, *, density: Union[float, Sequence[float]] = 0.2, weights: Optional[Sequence[float]] = None,
         scaling: float = 1.0, scope: str = "tensor", elect: str = "sum", merge: str = "sum", dare_p: Optional[float] = None,
         rescale: bool = True, seed: int = 0, k_rule: str = "floor", weighted_vote: bool = True,
         vote_tie: str = "+", name: str = "tensor", out_dtype: Optional[torch.dtype] = None, out=None,
         backend: str = "auto"):
    """TIES merge of tensors, state dicts or modules onto `base`: θ0 + λ·disjoint_merge(trim(τ), elect(τ)).
    See the module docstring for the options."""
    options = dict(scope=scope, elect=elect, merge=merge, k_rule=k_rule, vote_tie=vote_tie)
    for arg, value in options.items():
        if value not in OPTIONS[arg]:
            raise ValueError(f"unknown {arg} {value!r}; choose one of {OPTIONS[arg]}")
    densities = _densities(density)
    if dare_p is not None:
        dare_p = check_drop_probability(dare_p, "dare_p")
    for arg, value in (("rescale", rescale), ("weighted_vote", weighted_vote)):
        if not isinstance(value, bool):
            raise TypeError(f"{arg} must be True or False, got {value!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    forms = gather(inputs, name=name)
    base_dict = gather_like(base, forms, "base")
    lam = _scalar(scaling, "scaling")
    w = _weights(weights, len(forms.dicts), normalise=False)
    if len(densities) == 1:
        densities *= len(w)
    elif len(densities) != len(w):
        raise ValueError(f"density has {len(densities)} entries but there are {len(w)} inputs")
    out_dict = gather_like(out, forms, "out") if out is not None else None
    merged, slots = prepare(forms, base_dict, out_dtype, out_dict)
    slots = [slot for slot in slots if slot.out.numel() > 0]
    if not slots:
        return forms.wrap(merged, out)
    devices = {slot.out.device for slot in slots}
    if len(devices) > 1:
        raise ValueError(f"TIES needs every floating tensor on one device, got {sorted(map(str, devices))}")
    sizes = [slot.out.numel() for slot in slots]
    scope_sizes = sizes if scope == "tensor" else [sum(sizes)]
    spec = TiesSpec(weights=w, scaling=lam, ks=[[kept_count(d, n, k_rule) for d in densities] for n in scope_sizes],
                    scope=scope, elect=elect, merge=merge, weighted_vote=weighted_vote, vote_tie=vote_tie)
    if dare_p is not None:
        spec.drop_threshold = drop_threshold(dare_p)
        spec.drop_rescale = 1.0 / (1.0 - dare_p) if rescale else 1.0
        spec.keys = [[mask_key(seed, i, slot.key) for i in range(len(w))] for slot in slots]
        if spec.drop_threshold == 0:  # p = 0 drops nothing: keep every delta
            spec.ks = [[n] * len(w) for n in scope_sizes]
            spec.keys = None
    jobs = [CombineJob(slot.out, slot.inputs, w, slot.base) for slot in slots]
    dispatch.ties(jobs, spec, backend)
    return forms.wrap(merged, out)
