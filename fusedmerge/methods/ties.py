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
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .. import dispatch, reference
from .. import options as opt
from .._forms import gather, gather_like, prepare
from ..philox import GROUP, drop_threshold, mask_key
from ..reference import CombineJob, TiesSpec
from . import breadcrumbs
from ._sparse import radix_passes
from ._spec import REQUIRED, ConfigMethod, FusionBenchAlgorithm, GroupCall, Method, Param, RowBlocks, Span
from .breadcrumbs import BreadcrumbsOptions
from .dare import DARE_MODEL_PARAMS, one_density
from .task_arithmetic import GTA_PARAMS

CHOICES = {"scope": ("tensor", "model"), "elect": ("sum", "count"), "merge": ("sum", "mean", "max"),
           "k_rule": ("floor", "fusionbench"), "vote_tie": ("+", "majority")}


@dataclass(frozen=True)
class TiesOptions:
    density: Union[float, Tuple[float, ...]] = opt.option(0.2, op=float)
    scaling: float = opt.option(1.0, op=float)
    weights: Optional[Tuple[float, ...]] = opt.option(None, op=Optional[List[float]])
    merge: str = opt.option("sum", op=str)
    dare_p: Optional[float] = opt.option(None, op=Optional[float])
    seed: int = opt.option(0, op=int)
    name: str = opt.option("tensor", op=str)
    scope: str = opt.option("tensor", op=str)
    elect: str = opt.option("sum", op=str)
    rescale: bool = opt.option(True, op=bool)
    k_rule: str = opt.option("floor", op=str)
    weighted_vote: bool = opt.option(True, op=bool)
    vote_tie: str = opt.option("+", op=str)
    out_dtype: Optional[torch.dtype] = opt.option(None, op=Optional[torch.dtype])

    def __post_init__(self):
        for arg in ("scope", "elect", "merge", "k_rule", "vote_tie"):
            opt.choice(getattr(self, arg), arg, CHOICES[arg])
        values = self.density.tolist() if isinstance(self.density, torch.Tensor) else self.density
        single = isinstance(values, (int, float)) and not isinstance(values, bool)
        densities = tuple(opt.kept_fraction(d) for d in ([values] if single else list(values)))
        opt.canonical(self, density=densities[0] if single else densities,
                      dare_p=None if self.dare_p is None else opt.drop_probability(self.dare_p, "dare_p"),
                      rescale=opt.boolean(self.rescale, "rescale"),
                      weighted_vote=opt.boolean(self.weighted_vote, "weighted_vote"),
                      seed=opt.integer(self.seed, "seed"), name=opt.text(self.name, "name"),
                      scaling=opt.real(self.scaling, "scaling"), weights=opt.optional_numbers(self.weights, "weights"),
                      out_dtype=opt.out_dtype(self.out_dtype))

    def densities(self, n: int) -> List[float]:
        """One kept fraction per input."""
        if not isinstance(self.density, tuple):
            return [self.density] * n
        if len(self.density) == 1:
            return list(self.density) * n
        if len(self.density) != n:
            raise ValueError(f"density has {len(self.density)} entries but there are {n} inputs")
        return list(self.density)


def kept_count(density: float, n: int, rule: str) -> int:
    """How many of the n largest magnitudes a scope keeps."""
    k = math.floor(density * n) + (1 if rule == "fusionbench" else 0)
    return min(n, max(1, k))


@torch.no_grad()
def ties(base, inputs, *, density: Union[float, Sequence[float]] = 0.2, weights: Optional[Sequence[float]] = None,
         scaling: float = 1.0, scope: str = "tensor", elect: str = "sum", merge: str = "sum", dare_p: Optional[float] = None,
         rescale: bool = True, seed: int = 0, k_rule: str = "floor", weighted_vote: bool = True,
         vote_tie: str = "+", name: str = "tensor", out_dtype: Optional[torch.dtype] = None, out=None,
         backend: str = "auto"):
    """TIES merge of tensors, state dicts or modules onto `base`: θ0 + λ·disjoint_merge(trim(τ), elect(τ)).
    See the module docstring for the options."""
    return _ties(TiesOptions(density, scaling, weights, merge, dare_p, seed, name, scope, elect, rescale, k_rule,
                             weighted_vote, vote_tie, out_dtype), base, inputs, out, backend)


def _ties(o: TiesOptions, base, inputs, out=None, backend: str = "auto", first: int = 0, thresholds=None):
    """`ties` with its options; `first` and `thresholds` when the inputs are one row block of a tensor: the
    block's first element in the tensor (DARE-TIES' masks), and the trim thresholds selected over the whole
    tensor (magnitude bits per model, by `threshold_passes`)."""
    forms = gather(inputs, name=o.name)
    base_dict = gather_like(base, forms, "base")
    w = opt.count_weights(o.weights, len(forms.dicts), normalise=False)
    densities = o.densities(len(w))
    out_dict = gather_like(out, forms, "out") if out is not None else None
    merged, slots = prepare(forms, base_dict, o.out_dtype, out_dict)
    slots = [slot for slot in slots if slot.out.numel() > 0]
    if not slots:
        return forms.wrap(merged, out)
    devices = {slot.out.device for slot in slots}
    if len(devices) > 1:
        raise ValueError(f"TIES needs every floating tensor on one device, got {sorted(map(str, devices))}")
    sizes = [slot.out.numel() for slot in slots]
    scope_sizes = sizes if o.scope == "tensor" else [sum(sizes)]
    spec = TiesSpec(weights=w, scaling=o.scaling,
                    ks=[[kept_count(d, n, o.k_rule) for d in densities] for n in scope_sizes],
                    scope=o.scope, elect=o.elect, merge=o.merge, weighted_vote=o.weighted_vote, vote_tie=o.vote_tie,
                    thresholds=None if thresholds is None else [thresholds])
    if o.dare_p is not None:
        spec.drop_threshold = drop_threshold(o.dare_p)
        spec.drop_rescale = 1.0 / (1.0 - o.dare_p) if o.rescale else 1.0
        spec.keys = [[mask_key(o.seed, i, slot.key) for i in range(len(w))] for slot in slots]
        if spec.drop_threshold == 0:  # p = 0 drops nothing: keep every delta
            spec.ks = [[n] * len(w) for n in scope_sizes]
            spec.keys = None
    jobs = [CombineJob(slot.out, slot.inputs, w, slot.base, first=first) for slot in slots]
    for acc_dtype in {job.acc_dtype for job in jobs}:
        opt.finite_coefficients(w, acc_dtype, "weights")
        opt.finite_coefficients([o.scaling], acc_dtype, "scaling")
    dispatch.run("ties", jobs, backend, spec)
    return forms.wrap(merged, out)


# --- peers --------------------------------------------------------------------------------------------------


def _mergekit_options(call: GroupCall, random: bool) -> TiesOptions:
    method = MERGEKIT_DARE_TIES if random else MERGEKIT_TIES
    merge = "mean" if call.param("normalize", method) else "sum"
    common = dict(weights=tuple(call.weights), scaling=call.param("lambda", method), merge=merge, name=call.name,
                  out_dtype=call.out_dtype)
    if random:
        return TiesOptions(dare_p=1.0 - one_density(call.densities, method.name),
                           rescale=bool(call.param("rescale", method)), seed=call.seed, **common)
    return TiesOptions(density=tuple(1.0 if d is None else d for d in call.densities), **common)


def _rescaled(call: GroupCall) -> bool:
    return bool(call.param("rescale", MERGEKIT_TIES))


def _rescaled_options(call: GroupCall) -> BreadcrumbsOptions:
    """mergekit's ties with `rescale`: each trimmed τᵢ scaled back to its L1 norm before the weighted vote, which
    is breadcrumbs_ties' band with γ = 0 and at least one entry kept (mergekit's magnitude trim); its kernels."""
    o = _mergekit_options(call, random=False)
    return BreadcrumbsOptions(o.weights, tuple(o.densities(len(call.models))), 0.0, o.scaling, o.merge == "mean",
                              True, _rescaled(call), o.out_dtype, at_least_one=True)


def _mergekit_ties(call: GroupCall):
    if _rescaled(call):
        return breadcrumbs.merge_call(call, _rescaled_options(call))
    return _ties(_mergekit_options(call, random=False), call.base, call.models, backend=call.backend)


# Row blocks (RowBlocks): the trim thresholds are the exact k-th largest |τᵢ| bits of the whole tensor, by the
# radix selection over blocks of _sparse.radix_passes; then each block is merged with those thresholds
# (DARE-TIES: its masks keyed by the elements' indices in the whole tensor). With `rescale`, breadcrumbs'
# passes (its band's thresholds, then the L1 sums) and merge.


def _trims(call: GroupCall, span: Span):
    """(ks, models) of the trim: each model's kept count in the whole tensor."""
    if _rescaled(call):
        return breadcrumbs.band_selections(call, span, _rescaled_options(call))
    o = _mergekit_options(call, random=False)
    n = len(call.models)
    return [kept_count(x, math.prod(span.shape), o.k_rule) for x in o.densities(n)], list(range(n))


TIES_BLOCKS = RowBlocks(
    passes=(*radix_passes(_trims), breadcrumbs.l1_pass(_rescaled_options)),
    merge=lambda call, span, stats: breadcrumbs.merge_call(call, _rescaled_options(call), span, stats)
    if _rescaled(call) else _ties(_mergekit_options(call, random=False), call.base, call.models, backend=call.backend,
                                  thresholds=stats[0]))
DARE_TIES_BLOCKS = RowBlocks(
    merge=lambda call, span, stats: _ties(_mergekit_options(call, random=True), call.base, call.models,
                                          backend=call.backend, first=span.first),
    align=lambda shape, call: GROUP)


MERGEKIT_TIES = ConfigMethod(
    "ties", "mergekit", needs_base=True,
    model_params={"weight": Param("number", REQUIRED, doc="wᵢ, before the vote"),
                  "density": Param("kept", 1.0, doc="kept fraction of |τᵢ| per tensor, per model")},
    global_params={**GTA_PARAMS, "normalize": Param("bool", True, doc="divide by the agreeing Σ wᵢ"),
                   "rescale": Param("bool", False, doc="scale each trimmed τᵢ back to its L1 norm")},
    merge=_mergekit_ties,
    doc="θ0 + λ·Σ wᵢ·τ̂ᵢ·agreeᵢ / Σ wᵢ·agreeᵢ, per-tensor top-density trim, weighted vote, ties to +",
    blocks=TIES_BLOCKS)

MERGEKIT_DARE_TIES = ConfigMethod(
    "dare_ties", "mergekit", needs_base=True, model_params=DARE_MODEL_PARAMS,
    global_params={**GTA_PARAMS, "rescale": Param("bool", True, doc="kept deltas × 1/density")},
    merge=lambda call: _ties(_mergekit_options(call, random=True), call.base, call.models, backend=call.backend),
    check=lambda models: one_density([m.get("density") for m in models], "dare_ties"),
    doc="TIES with DARE's random keep instead of the trim, rescaled by 1/density",
    blocks=DARE_TIES_BLOCKS)


def fusionbench_options(threshold: float, merge_func: str) -> Dict[str, Any]:
    """FusionBench's TIES: global top-k over the whole state dict (threshold in % when > 1), its kthvalue
    count, sign votes tied at zero going to the majority sign."""
    density = threshold / 100 if threshold > 1 else threshold
    return dict(density=density, scope="model", k_rule="fusionbench", vote_tie="majority", merge=merge_func)


def _fb_ties_model(pool, pretrained, finetuned: Sequence[Dict[str, torch.Tensor]], algo):
    base = pretrained.state_dict()
    removed = set(algo.remove_keys or [])
    keys = [k for k in base if k not in removed]
    pick = lambda sd: {k: sd[k] for k in keys}  # noqa: E731
    merged = ties(pick(base), [pick(sd) for sd in finetuned], scaling=algo.scaling_factor, backend=algo.backend,
                  **fusionbench_options(algo.threshold, algo.merge_func))
    return pool.with_state(pretrained, {**{k: v.clone() for k, v in base.items()}, **merged})


def _fb_ties(algo, pool):
    return _fb_ties_model(pool, pool.pretrained(), [m.state_dict() for m in pool.finetuned()], algo)


def _fb_dare_ties(algo, pool):
    """Drop and rescale each task vector (model i's mask keyed by its position, as in one fused DARE call),
    then TIES on the dropped vectors: N model copies are held, as FusionBench holds them."""
    from ..opcm import linear_weights
    from .dare import dare

    pretrained = pool.pretrained()
    models = [m.state_dict() for m in pool.finetuned()]
    base = pretrained.state_dict()
    linear = linear_weights(pretrained) if algo.only_on_linear_weights else False
    dropped = []
    for i in range(len(models)):
        one_hot = [1.0 if j == i else 0.0 for j in range(len(models))]
        dropped.append(dare(base, models, algo.sparsity_ratio, weights=one_hot, rescale=bool(algo.rescale),
                            seed=algo.seed, linear_only=linear, backend=algo.backend))
    return _fb_ties_model(pool, pretrained, dropped, algo)


FB_TIES_ARGS = (("scaling_factor", REQUIRED), ("threshold", REQUIRED), ("remove_keys", ()), ("merge_func", "sum"))

TIES = Method(
    "ties", ties, TiesOptions, reference.ties_reference, ("ties",),
    config=(MERGEKIT_TIES, MERGEKIT_DARE_TIES),
    fusionbench=(
        FusionBenchAlgorithm("FusedTiesMerging", "TiesMergingAlgorithm", FB_TIES_ARGS, _fb_ties,
                             "FusionBench's TIES merging (global threshold); removed keys keep the pretrained "
                             "values. A new module."),
        FusionBenchAlgorithm("FusedDareTies", "DareTiesMerging",
                             (("sparsity_ratio", REQUIRED), ("only_on_linear_weights", REQUIRED), ("rescale", REQUIRED),
                              *FB_TIES_ARGS, ("seed", 0)), _fb_dare_ties,
                             "FusionBench's DARE-TIES: drop and rescale each task vector, then TIES.")),
    op_extras=(("densities", Optional[List[float]], None),),
    op_call=lambda base, inputs, density=0.2, densities=None, **kw: ties(
        base, inputs, density=density if densities is None else densities, **kw),
    grid=({"density": 0.3}, {"density": [0.2, 0.5, 0.4], "merge": "mean", "weights": [1.0, 0.5, 2.0]},
          {"density": 0.2, "scope": "model", "k_rule": "fusionbench", "vote_tie": "majority", "merge": "max"},
          {"dare_p": 0.6, "seed": 2, "elect": "count", "rescale": False}))
