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

Once the thresholds (and the L1 sums, added up chunk by chunk) are known every output element depends on
its own inputs only, so a tensor is merged 2²⁰ elements at a time (CHUNK): its fp32 task vectors, bands
and vote are never held whole.

Entries equal to a threshold are all kept (mergekit keeps those its argsort puts inside the band: the same
set unless magnitudes tie at a threshold, where its choice is the sort's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch

from .. import dispatch
from .. import options as opt
from .._forms import Slot, gather, gather_like, prepare
from ..reference import CombineJob, TiesSpec, magnitude_view
from ._sparse import gta_tail, l1_factor, l1_sums, per_model_values, radix_passes, slot_chunks, spread
from ._spec import REQUIRED, BlockPass, ConfigMethod, GroupCall, Method, Param, RowBlocks, Span
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
    at_least_one: bool = opt.option(False, op=bool)  # mergekit's magnitude trim (ties): max(1, ⌊d·n⌋) kept

    def __post_init__(self):
        opt.canonical(self, weights=opt.optional_numbers(self.weights, "weights"),
                      density=per_model_values(self.density, "density", opt.kept_fraction),
                      gamma=per_model_values(self.gamma, "gamma", _gamma), scaling=opt.real(self.scaling, "scaling"),
                      normalize=opt.boolean(self.normalize, "normalize"),
                      consensus=opt.boolean(self.consensus, "consensus"), rescale=opt.boolean(self.rescale, "rescale"),
                      out_dtype=opt.out_dtype(self.out_dtype), at_least_one=opt.boolean(self.at_least_one, "at_least_one"))


def band(n: int, density: float, gamma: float, at_least_one: bool = False) -> Tuple[int, int]:
    """(k_hi, k_lo): the kept band runs from the k_hi-th to the k_lo-th largest magnitude (1-based); k_hi >
    k_lo when nothing is kept. at_least_one: ⌊d·n⌋ raised to 1 (mergekit's magnitude trim, TIES)."""
    target, n_top = int(density * n), int(gamma * n)
    target = max(1, target) if at_least_one else target
    n_bot = max(0, n - target - n_top)
    return n - n_bot - target + 1, n - n_bot


def _pruned(n: int, pairs) -> List[int]:
    """The models whose band is pruned and not empty, in a tensor of n entries."""
    return [i for i, p in enumerate(pairs) if p[0] < 1 and band(n, *p)[0] <= band(n, *p)[1]]


def _selections(n: int, pairs) -> Tuple[List[int], List[int]]:
    """(ks, models) of the band's order statistics: each pruned model's k_hi, then each one's k_lo."""
    pruned = _pruned(n, pairs)
    bands = [band(n, *pairs[i]) for i in pruned]
    return [hi for hi, _ in bands] + [lo for _, lo in bands], pruned * 2


def _thresholds(slot: Slot, pairs, n: int, backend: str):
    """The bits of _selections over the whole slot (one `select` launch; None when nothing is pruned)."""
    ks, models = _selections(n, pairs)
    if not ks:
        return None
    spec = TiesSpec(weights=[1.0] * len(ks), scaling=1.0, ks=[ks])
    job = CombineJob(slot.out, [slot.inputs[m] for m in models], spec.weights, slot.base)
    return dispatch.run("select", [job], backend, spec)[0].tolist()


def _kept(slot: Slot, pairs, n: int, thresholds) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Per model (τ, its band; None where d ≥ 1) in the accumulation dtype; thresholds: the bits of
    _selections (_thresholds) in a tensor of n entries."""
    acc = CombineJob(slot.out, slot.inputs, [1.0] * len(slot.inputs), slot.base).acc_dtype
    _, models = _selections(n, pairs)
    base = slot.base.to(acc)
    half = len(models) // 2

    def _band(tau: torch.Tensor, j: int) -> torch.Tensor:
        bits = magnitude_view(tau)
        inside = (bits <= int(thresholds[j])) & (bits >= int(thresholds[half + j]))
        return torch.where(inside, tau, torch.zeros((), dtype=acc, device=tau.device))

    for i, (d, *_) in enumerate(pairs):
        tau = slot.inputs[i] - base  # promoted to acc, as acc_tau
        kept = None if d >= 1 else torch.zeros_like(tau) if i not in models else _band(tau, models.index(i))
        yield tau, kept


CHUNK = 1 << 20  # elements merged at once (the module docstring; same bits: tests/test_breadcrumbs.py)


def _sums(slot: Slot, pairs, n: int, thresholds, backend: str) -> List[Optional[torch.Tensor]]:
    """Per model l1_sums (None where d ≥ 1) of slot, chunk by chunk: fp32's are exact integer sums, so the
    chunks' add up to the slot's bits; fp64's are not, and are taken over the whole slot."""
    acc = CombineJob(slot.out, slot.inputs, [1.0] * len(slot.inputs), slot.base).acc_dtype
    chunks = slot_chunks(slot, slot.out.numel() if acc == torch.float64 else CHUNK)
    parts = [[None if kept is None else l1_sums(tau, kept, backend) for tau, kept in _kept(c, pairs, n, thresholds)]
             for c in chunks]
    return [None if s[0] is None else sum(s[1:], s[0]) for s in zip(*parts)]


def _breadcrumbs_slot(slot: Slot, o: BreadcrumbsOptions, w: List[float], pairs, backend: str, n: Optional[int] = None,
                      thresholds=None, sums=None) -> None:
    """slot.out from slot's tensors, CHUNK elements at a time; n, thresholds and sums when the slot is a row
    block: the whole tensor's size, band thresholds and L1 sums (else the slot's own)."""
    n = slot.out.numel() if n is None else n
    thresholds = _thresholds(slot, pairs, n, backend) if thresholds is None else thresholds
    if o.rescale and sums is None:
        sums = _sums(slot, pairs, n, thresholds, backend)
    factors = [1.0 if s is None else l1_factor(s) for s in (sums if o.rescale else [None] * len(pairs))]
    for chunk in slot_chunks(slot, CHUNK):
        deltas = []
        for (tau, kept), f in zip(_kept(chunk, pairs, n, thresholds), factors):
            if kept is not None and f != 1.0:
                kept = kept.mul_(torch.tensor(f, dtype=kept.dtype, device=kept.device))
            deltas.append(tau if kept is None else kept)
        gta_tail(chunk, deltas, w, o.scaling, o.normalize, o.consensus, backend)


@torch.no_grad()
def breadcrumbs(base, inputs, *, weights: Optional[Sequence[float]] = None,
                density: Union[float, Sequence[float]] = 1.0, gamma: Union[float, Sequence[float]] = 0.01,
                scaling: float = 1.0, normalize: bool = False, consensus: bool = False, rescale: bool = False,
                out_dtype: Optional[torch.dtype] = None, at_least_one: bool = False, backend: str = "auto"):
    """Model Breadcrumbs over tensors, state dicts or modules onto `base`: per tensor and model keep the
    `density` fraction of |τ| just below the top `gamma` fraction, then θ0 + λ·Σ wᵢδᵢ (/ Σ wᵢ with
    `normalize`), or with `consensus` (breadcrumbs_ties) TIES's sign vote on wᵢδᵢ. `scaling` is λ.
    `at_least_one` keeps max(1, ⌊d·n⌋) entries (with gamma=0: mergekit's TIES trim, used for its `rescale`)."""
    o = BreadcrumbsOptions(weights, density, gamma, scaling, normalize, consensus, rescale, out_dtype, at_least_one)
    forms, merged, slots, w, pairs = _prepared(o, base, inputs)
    for slot in slots:
        _breadcrumbs_slot(slot, o, w, pairs, backend)
    return forms.wrap(merged)


def _prepared(o: BreadcrumbsOptions, base, inputs):
    """(forms, merged, non-empty slots, weights, (density, gamma) per model) of a breadcrumbs call."""
    forms = gather(inputs)
    base_dict = gather_like(base, forms, "base")
    w = opt.count_weights(o.weights, len(forms.dicts), normalise=False)
    merged, slots = prepare(forms, base_dict, o.out_dtype)
    return forms, merged, [s for s in slots if s.out.numel()], w, _pairs(o, len(w))


def _pairs(o: BreadcrumbsOptions, n: int) -> List[Tuple[float, float, bool]]:
    """band()'s (density, gamma, at_least_one) per model."""
    return [(d, g, o.at_least_one) for d, g in zip(spread(o.density, n, "density"), spread(o.gamma, n, "gamma"))]


def breadcrumbs_reference(base, inputs, **options):
    """The definition: breadcrumbs on the references of its primitives (select, ties, combine, l1_buckets)."""
    return breadcrumbs(base, inputs, **{**options, "backend": "torch"})


# --- peers --------------------------------------------------------------------------------------------------

BREADCRUMBS_MODEL_PARAMS = {"weight": Param("number", REQUIRED, doc="wᵢ"),
                            "density": Param("kept", 1.0, doc="kept fraction of |τᵢ| per tensor (1: all)"),
                            "gamma": Param("number", 0.01, doc="fraction of the largest |τᵢ| dropped")}


def _mergekit_options(call: GroupCall, method: ConfigMethod, consensus: bool) -> BreadcrumbsOptions:
    return BreadcrumbsOptions(tuple(call.weights), tuple(1.0 if d is None else d for d in call.densities),
                              tuple(call.model_values("gamma", method)), call.param("lambda", method),
                              call.param("normalize", method), consensus, call.param("rescale", method),
                              call.out_dtype)


def merge_call(call: GroupCall, o: BreadcrumbsOptions, span: Optional[Span] = None, stats=None):
    """The merge of a call with options `o`, or with span and stats of a row block: stats are (band thresholds,
    L1 sums)."""
    forms, merged, slots, w, pairs = _prepared(o, call.base, call.models)
    for slot in slots:
        if span is None:
            _breadcrumbs_slot(slot, o, w, pairs, call.backend)
        else:
            _breadcrumbs_slot(slot, o, w, pairs, call.backend, math.prod(span.shape), *stats)
    return forms.wrap(merged)


# Row blocks: the band's two order statistics per model are selected over the blocks by the radix selection
# of _sparse.radix_passes (exact), then, with `rescale`, a pass adds up each block's exact L1 sums (l1_sums),
# then each block is merged elementwise with the whole tensor's thresholds and factors. options_of(call): the
# call's BreadcrumbsOptions.


def band_selections(call: GroupCall, span: Span, o: BreadcrumbsOptions) -> Tuple[List[int], List[int]]:
    """(ks, models) of the band's order statistics in the whole tensor of `span` (radix_passes' selections)."""
    return _selections(math.prod(span.shape), _pairs(o, len(call.models)))


def l1_pass(options_of) -> BlockPass:
    """The pass adding up the blocks' L1 sums (None without `rescale`); it finishes as (thresholds, sums)."""

    def partial(call: GroupCall, span: Span, stats):
        o = options_of(call)
        if not o.rescale:
            return None
        _, _, slots, _, pairs = _prepared(o, call.base, call.models)
        n = math.prod(span.shape)
        return [s for slot in slots for s in _sums(slot, pairs, n, stats[0], call.backend)]

    add = lambda total, part: None if total is None else [a if a is None else a + b for a, b in zip(total, part)]  # noqa: E731
    return BlockPass(partial, add, lambda total, stats: (stats[0], total))


def row_blocks(options_of) -> RowBlocks:
    """The RowBlocks of a breadcrumbs merge."""
    return RowBlocks(passes=(*radix_passes(lambda call, span: band_selections(call, span, options_of(call))),
                             l1_pass(options_of)),
                     merge=lambda call, span, stats: merge_call(call, options_of(call), span, stats))


def _breadcrumbs_config(name: str, consensus: bool, doc: str) -> ConfigMethod:
    options_of = lambda call: _mergekit_options(call, method, consensus)  # noqa: E731
    method = ConfigMethod(
        name, "mergekit", needs_base=True, model_params=BREADCRUMBS_MODEL_PARAMS,
        global_params={**GTA_PARAMS, "rescale": Param("bool", False, doc="keep each task vector's L1 norm")},
        merge=lambda call: merge_call(call, options_of(call)), doc=doc, blocks=row_blocks(options_of),
        check=lambda models: BreadcrumbsOptions(gamma=[m.get("gamma", 0.01) for m in models] or 0.01))
    return method


MERGEKIT_BREADCRUMBS = _breadcrumbs_config("breadcrumbs", False, "θ0 + λ·Σ wᵢ·band(τᵢ): largest γ and smallest dropped")
MERGEKIT_BREADCRUMBS_TIES = _breadcrumbs_config("breadcrumbs_ties", True, "breadcrumbs band, then TIES's sign vote")

BREADCRUMBS = Method(
    "breadcrumbs", breadcrumbs, BreadcrumbsOptions, breadcrumbs_reference, ("select", "ties", "combine", "l1_buckets"),
    config=(MERGEKIT_BREADCRUMBS, MERGEKIT_BREADCRUMBS_TIES),
    grid=({"density": 0.3, "gamma": 0.05, "consensus": True, "normalize": True},
          {"density": 0.9, "gamma": 0.2, "weights": [1.0, -0.5, 2.0], "rescale": True, "scaling": 0.6}))
