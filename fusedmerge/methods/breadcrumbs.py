"""Model Breadcrumbs (mergekit's ``breadcrumbs`` and ``breadcrumbs_ties``): drop the largest γ and the
smallest magnitudes of each task vector, keeping the band of the `density` fraction just below the top.

Per tensor (n entries) and model, in the accumulation dtype (fp32; fp64 for fp64 models)::

    target = ⌊d·n⌋,  n_top = ⌊γ·n⌋,  n_bot = max(0, n − target − n_top)     (mergekit's magnitude_outliers)
    keep |τ| with ascending position in [n_bot, n_bot + target): between t_lo, the (n − n_bot)-th largest
    |τ|, and t_hi, the (n − n_bot − target + 1)-th largest — two order statistics of one `select` launch
    (the TIES selection: a sampled bracket and one counting pass, never a sort)
    δ = τ where d ≥ 1 (γ ignored: mergekit's default density 1.0 is task arithmetic); 0 where target = 0
    δ ·= ‖τ‖₁/‖δ‖₁ with `rescale` (mergekit's L1 option, off by default)
    then the generalized-task-arithmetic tail of _sparse.py (breadcrumbs_ties: TIES's sign vote)

Entries equal to a threshold are all kept (mergekit keeps those its argsort puts inside the band: the same
set unless magnitudes tie at a threshold, where its choice is the sort's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch

from .. import dispatch
from .. import options as opt
from .._forms import Slot, gather, gather_like, prepare
from ..reference import CombineJob, TiesSpec, magnitude_bits
from ._sparse import acc_tau, gta_tail, l1_rescaled, per_model_values, spread
from ._spec import ConfigMethod, GroupCall, Method, Param
from .task_arithmetic import GTA_PARAMS


def _gamma(value, arg: str) -> float:
    g = opt.real(value, arg)
    if not 0.0 <= g <= 1.0:
        raise ValueError(f"{arg} is the fraction of largest magnitudes dropped and must be in [0, 1], got {g}")
    return g


@dataclass(frozen=True)
class BreadcrumbsOptions:
    """Options of breadcrumbs (see the module docstring); density and gamma: one value or one per model."""

    weights: Optional[Tuple[float, ...]] = opt.option(None, op=Optional[List[float]])
    density: Union[float, Tuple[float, ...]] = opt.option(1.0, op=float)
    gamma: Union[float, Tuple[float, ...]] = opt.option(0.01, op=float)
    scaling: float = opt.option(1.0, op=float)
    normalize: bool = opt.option(False, op=bool)
    consensus: bool = opt.option(False, op=bool)
    rescale: bool = opt.option(False, op=bool)
    out_dtype: Optional[torch.dtype] = opt.option(None, op=Optional[torch.dtype])

    def __post_init__(self):
        opt.canonical(self, weights=opt.optional_numbers(self.weights, "weights"),
                      density=per_model_values(self.density, "density", opt.kept_fraction),
                      gamma=per_model_values(self.gamma, "gamma", _gamma), scaling=opt.real(self.scaling, "scaling"),
                      normalize=opt.boolean(self.normalize, "normalize"),
                      consensus=opt.boolean(self.consensus, "consensus"), rescale=opt.boolean(self.rescale, "rescale"),
                      out_dtype=opt.out_dtype(self.out_dtype))


def band(n: int, density: float, gamma: float) -> Tuple[int, int]:
    """(k_hi, k_lo): the kept band runs from the k_hi-th to the k_lo-th largest magnitude (1-based); k_hi >
    k_lo when nothing is kept."""
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    return n - n_bot - target + 1, n - n_bot


def _breadcrumbs_slot(slot: Slot, o: BreadcrumbsOptions, w: List[float], pairs, backend: str) -> None:
    acc = CombineJob(slot.out, slot.inputs, w, slot.base).acc_dtype
    n = slot.out.numel()
    pruned = [i for i, (d, _) in enumerate(pairs) if d < 1 and band(n, *pairs[i])[0] <= band(n, *pairs[i])[1]]
    thresholds = None
    if pruned:
        bands = [band(n, *pairs[i]) for i in pruned]
        spec = TiesSpec(weights=[1.0] * 2 * len(pruned), scaling=1.0,
                        ks=[[hi for hi, _ in bands] + [lo for _, lo in bands]])
        inputs = [slot.inputs[i] for i in pruned] * 2
        thresholds = dispatch.run("select", [CombineJob(slot.out, inputs, spec.weights, slot.base)], backend, spec)[0]
    deltas = []
    for i, (d, _) in enumerate(pairs):
        tau = acc_tau(slot, i, acc)
        if d < 1:
            kept = torch.zeros_like(tau)
            if i in pruned:
                j = pruned.index(i)
                bits = magnitude_bits(tau).reshape(tau.shape)
                inside = (bits <= int(thresholds[j])) & (bits >= int(thresholds[len(pruned) + j]))
                kept = torch.where(inside, tau, kept)
            tau = l1_rescaled(tau, kept, backend) if o.rescale else kept
        deltas.append(tau)
    gta_tail(slot, deltas, w, o.scaling, o.normalize, o.consensus, backend)


@torch.no_grad()
def breadcrumbs(base, inputs, *, weights: Optional[Sequence[float]] = None,
                density: Union[float, Sequence[float]] = 1.0, gamma: Union[float, Sequence[float]] = 0.01,
                scaling: float = 1.0, normalize: bool = False, consensus: bool = False, rescale: bool = False,
                out_dtype: Optional[torch.dtype] = None, backend: str = "auto"):
    """Model Breadcrumbs over tensors, state dicts or modules onto `base`: per tensor and model keep the
    `density` fraction of |τ| just below the top `gamma` fraction, then θ0 + λ·Σ wᵢδᵢ (/ Σ wᵢ with
    `normalize`), or with `consensus` (breadcrumbs_ties) TIES's sign vote on wᵢδᵢ. `scaling` is λ."""
    o = BreadcrumbsOptions(weights, density, gamma, scaling, normalize, consensus, rescale, out_dtype)
    forms = gather(inputs)
    base_dict = gather_like(base, forms, "base")
    w = opt.count_weights(o.weights, len(forms.dicts), normalise=False)
    pairs = list(zip(spread(o.density, len(w), "density"), spread(o.gamma, len(w), "gamma")))
    merged, slots = prepare(forms, base_dict, o.out_dtype)
    for slot in slots:
        if slot.out.numel():
            _breadcrumbs_slot(slot, o, w, pairs, backend)
    return forms.wrap(merged)


def breadcrumbs_reference(base, inputs, **options):
    """The definition: breadcrumbs on the references of its primitives (select, ties, combine, l1_buckets)."""
    return breadcrumbs(base, inputs, **{**options, "backend": "torch"})


# --- peers --------------------------------------------------------------------------------------------------

BREADCRUMBS_MODEL_PARAMS = {"weight": Param("number", 1.0, doc="wᵢ"),
                            "density": Param("fraction", 1.0, doc="kept fraction of |τᵢ| per tensor (1: all)"),
                            "gamma": Param("number", 0.01, doc="fraction of the largest |τᵢ| dropped")}


def _mergekit_breadcrumbs(call: GroupCall, method: ConfigMethod, consensus: bool):
    return breadcrumbs(call.base, call.models, weights=call.weights,
                       density=[1.0 if d is None else d for d in call.densities],
                       gamma=call.model_values("gamma", method), scaling=call.param("lambda", method),
                       normalize=call.param("normalize", method), consensus=consensus,
                       rescale=call.param("rescale", method), out_dtype=call.out_dtype, backend=call.backend)


def _breadcrumbs_config(name: str, consensus: bool, doc: str) -> ConfigMethod:
    method = ConfigMethod(
        name, "mergekit", needs_base=True, model_params=BREADCRUMBS_MODEL_PARAMS,
        global_params={**GTA_PARAMS, "rescale": Param("bool", False, doc="keep each task vector's L1 norm")},
        merge=lambda call: _mergekit_breadcrumbs(call, method, consensus), doc=doc,
        check=lambda models: BreadcrumbsOptions(gamma=[m.get("gamma", 0.01) for m in models] or 0.01))
    return method


MERGEKIT_BREADCRUMBS = _breadcrumbs_config("breadcrumbs", False, "θ0 + λ·Σ wᵢ·band(τᵢ): largest γ and smallest dropped")
MERGEKIT_BREADCRUMBS_TIES = _breadcrumbs_config("breadcrumbs_ties", True, "breadcrumbs band, then TIES's sign vote")

BREADCRUMBS = Method(
    "breadcrumbs", breadcrumbs, BreadcrumbsOptions, breadcrumbs_reference, ("select", "ties", "combine", "l1_buckets"),
    config=(MERGEKIT_BREADCRUMBS, MERGEKIT_BREADCRUMBS_TIES),
    grid=({"density": 0.3, "gamma": 0.05, "consensus": True, "normalize": True},
          {"density": 0.9, "gamma": 0.2, "weights": [1.0, -0.5, 2.0], "rescale": True, "scaling": 0.6}))
