"""DELLA and DELLA-linear (mergekit's ``della``, ``della_linear``): magnitude-ranked random drop per row,
L1 rescale, then TIES's sign consensus (della) or a linear sum (della_linear).

Per tensor and model, in the accumulation dtype (fp32; fp64 for fp64 models), with dᵢ, εᵢ the density and
epsilon::

    τᵢ = xᵢ − θ0, viewed as rows as mergekit ranks it (1-D: one row; 2-D: its rows; more dims: along dim 1)
    rᵢ = rank of |τᵢ| in its row, 0 = smallest (row_rank primitive; equal magnitudes in column order)
    Kᵢ = K_lo + ⌊(K_hi − K_lo)·r/(n−1)⌋,  K_lo = ⌊(dᵢ−εᵢ)·2³²⌋, K_hi = ⌊(dᵢ+εᵢ)·2³²⌋   (n = 1: ⌊dᵢ·2³²⌋)
    keepᵢ = Uᵢ < Kᵢ    (U: the element's 32-bit Philox uniform keyed by (seed, i, name), as DARE's masks)
    δᵢ = keepᵢ·τᵢ·‖τᵢ‖₁/‖keepᵢ·τᵢ‖₁   (rescale; the norms summed exactly; factor 1 when one is < 1e-7)
    δᵢ = τᵢ where dᵢ ≥ 1 (mergekit's default density 1.0 prunes nothing)
    then the generalized-task-arithmetic tail of _sparse.py (vote on wᵢδᵢ, normalize, λ)

So the keep probability of rank r is (d−ε) + 2ε·r/(n−1) within 2⁻³² — mergekit's ladder, whose fp32
arithmetic it equals within 2⁻²⁴ (bf16 on CPU and any GPU dtype: mergekit quantizes ranks and
probabilities to the model's dtype; fusedmerge does not) — and the mask is reproducible on every backend,
in any key order and whether tensors are merged together or one by one.

The new primitive is the segmented rank (``row_rank``): rows are independent sorts of up to a few tens of
thousands of 31-bit magnitudes. The C++ kernel is an LSD radix sort per row (3 passes of 11/11/9 bits,
passes with one digit skipped; O(n) and stable, which gives the column tie break for free) with OpenMP
over rows; the Triton kernel sorts (magnitude << 32 | column) keys with tl.sort in one program per row
(a bitonic network; the column in the key makes stability unnecessary), rows up to 2¹⁶; the reference is
torch's stable argsort. The uniforms come from a second small primitive (``uniforms``: both Philox
streams of every element, C++ with OpenMP and Triton; the reference is fusedmerge.philox). mergekit's
argsort is not stable, so its order among equal magnitudes is unspecified; the set of ranks a group of
equal magnitudes receives is the same (tested).

Peers: mergekit 0.1.5 ``della`` (normalize true by default) and ``della_linear`` (normalize false).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch

from .. import dispatch
from .. import options as opt
from .._forms import Slot, gather, gather_like, prepare
from ..philox import mask_key
from ..reference import CombineJob, RankJob, UniformsJob
from ._sparse import acc_tau, gta_tail, l1_factors, per_model_values, spread
from ._spec import ConfigMethod, GroupCall, Method, Param
from .task_arithmetic import GTA_PARAMS


@dataclass(frozen=True)
class DellaOptions:
    """Options of della (see the module docstring); density and epsilon: one value or one per model."""

    weights: Optional[Tuple[float, ...]] = opt.option(None, op=Optional[List[float]])
    density: Union[float, Tuple[float, ...]] = opt.option(1.0, op=float)
    epsilon: Union[float, Tuple[float, ...]] = opt.option(0.15, op=float)
    scaling: float = opt.option(1.0, op=float)
    normalize: bool = opt.option(True, op=bool)
    consensus: bool = opt.option(True, op=bool)
    rescale: bool = opt.option(True, op=bool)
    seed: int = opt.option(0, op=int)
    name: str = opt.option("tensor", op=str)
    out_dtype: Optional[torch.dtype] = opt.option(None, op=Optional[torch.dtype])

    def __post_init__(self):
        opt.canonical(self, weights=opt.optional_numbers(self.weights, "weights"),
                      density=per_model_values(self.density, "density", opt.kept_fraction),
                      epsilon=per_model_values(self.epsilon, "epsilon"), scaling=opt.real(self.scaling, "scaling"),
                      normalize=opt.boolean(self.normalize, "normalize"),
                      consensus=opt.boolean(self.consensus, "consensus"), rescale=opt.boolean(self.rescale, "rescale"),
                      seed=opt.integer(self.seed, "seed"), name=opt.text(self.name, "name"),
                      out_dtype=opt.out_dtype(self.out_dtype))
        sizes = [len(v) for v in (self.density, self.epsilon) if isinstance(v, tuple)]
        self.ladders(max(sizes, default=1))

    def ladders(self, n: int) -> List[Tuple[float, float]]:
        """(density, epsilon) per model; refused unless 0 < d − ε and d + ε < 1 where d < 1 (mergekit's rule)."""
        pairs = list(zip(spread(self.density, n, "density"), spread(self.epsilon, n, "epsilon")))
        for i, (d, e) in enumerate(pairs):
            if d < 1 and not (d - e > 0 and d + e < 1):
                raise ValueError(f"epsilon: density ± epsilon must lie in (0, 1), got density {d} and epsilon {e} "
                                 f"(model {i})")
        return pairs


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """t as the [rows, n] matrix mergekit ranks along dim 1 (0-/1-D: one row; >2-D: dim 1 moved last)."""
    if t.dim() <= 1:
        return t.reshape(1, -1)
    if t.dim() == 2:
        return t.contiguous()
    return t.movedim(1, -1).reshape(-1, t.shape[1]).contiguous()


def from_rows(rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The inverse of as_rows."""
    if len(shape) <= 2:
        return rows.reshape(shape)
    return rows.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)


def keep_ladder(ranks: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """K per element (int64): element kept when its uniform U < K."""
    n = ranks.shape[1]
    if n <= 1:
        return torch.full(ranks.shape, math.floor(density * 2**32), dtype=torch.int64, device=ranks.device)
    lo, hi = math.floor((density - epsilon) * 2**32), math.floor((density + epsilon) * 2**32)
    return lo + torch.div(ranks.to(torch.int64) * (hi - lo), n - 1, rounding_mode="floor")


def della_masks(rows: Sequence[torch.Tensor], ladders: Sequence[Tuple[float, float]], keys: Sequence[int],
                backend: str) -> List[Optional[torch.Tensor]]:
    """Keep masks (bool, rows layout) of the models' τ rows; None where the density is 1 (nothing dropped)."""
    ranked = [i for i, (d, _) in enumerate(ladders) if d < 1]
    jobs = [RankJob(rows[i], torch.empty(rows[i].shape, dtype=torch.int32, device=rows[i].device)) for i in ranked]
    words = [UniformsJob(keys[i], torch.empty(rows[i].shape, dtype=torch.int32, device=rows[i].device))
             for i in ranked]
    if jobs:
        dispatch.run("row_rank", jobs, backend)
        dispatch.run("uniforms", words, backend)
    masks: List[Optional[torch.Tensor]] = [None] * len(rows)
    for i, job, u in zip(ranked, jobs, words):
        masks[i] = (u.out.to(torch.int64) & 0xFFFFFFFF) < keep_ladder(job.out, *ladders[i])
    return masks


def _della_slot(slot: Slot, o: DellaOptions, w: List[float], ladders, backend: str) -> None:
    acc = CombineJob(slot.out, slot.inputs, w, slot.base).acc_dtype
    rows = [as_rows(acc_tau(slot, i, acc)) for i in range(len(w))]
    keys = [mask_key(o.seed, i, slot.key) for i in range(len(w))]
    masks = della_masks(rows, ladders, keys, backend)
    zero = torch.zeros((), dtype=acc, device=slot.out.device)
    kept = [tau if m is None else torch.where(m, tau, zero) for tau, m in zip(rows, masks)]
    if o.rescale:
        pruned = [i for i, m in enumerate(masks) if m is not None]
        factors = l1_factors([rows[i] for i in pruned], [kept[i] for i in pruned], backend)
        for i, f in zip(pruned, factors):
            kept[i] = kept[i] * torch.tensor(f, dtype=acc, device=zero.device) if f != 1.0 else kept[i]
    deltas = [from_rows(k, slot.out.shape).contiguous() for k in kept]
    gta_tail(slot, deltas, w, o.scaling, o.normalize, o.consensus, backend)


@torch.no_grad()
def della(base, inputs, *, weights: Optional[Sequence[float]] = None,
          density: Union[float, Sequence[float]] = 1.0, epsilon: Union[float, Sequence[float]] = 0.15,
          scaling: float = 1.0, normalize: bool = True, consensus: bool = True, rescale: bool = True, seed: int = 0,
          name: str = "tensor", out_dtype: Optional[torch.dtype] = None, backend: str = "auto"):
    """DELLA merge of tensors, state dicts or modules onto `base` (the forms of `average`): per row, keep each
    task-vector entry with probability (d−ε) + 2ε·(its magnitude rank)/(n−1), rescale to the task vector's
    L1 norm (`rescale`), then θ0 + λ·Σ agreeᵢ·wᵢδᵢ / Σ agreeᵢ·wᵢ (`consensus`, `normalize`) or θ0 +
    λ·Σ wᵢδᵢ / Σ wᵢ (della_linear: consensus=False, normalize as wished). `scaling` is mergekit's λ; masks are
    keyed by (seed, model index, tensor name). Tensor by tensor: N task vectors of one tensor are held."""
    o = DellaOptions(weights, density, epsilon, scaling, normalize, consensus, rescale, seed, name, out_dtype)
    forms = gather(inputs, name=o.name)
    base_dict = gather_like(base, forms, "base")
    w = opt.count_weights(o.weights, len(forms.dicts), normalise=False)
    ladders = o.ladders(len(w))
    merged, slots = prepare(forms, base_dict, o.out_dtype)
    for slot in slots:
        if slot.out.numel():
            _della_slot(slot, o, w, ladders, backend)
    return forms.wrap(merged)


def della_reference(base, inputs, **options):
    """The definition: della on the references of its primitives (row_rank, uniforms, ties, combine, l1_buckets)."""
    return della(base, inputs, **{**options, "backend": "torch"})


# --- peers --------------------------------------------------------------------------------------------------

DELLA_MODEL_PARAMS = {"weight": Param("number", 1.0, doc="wᵢ, before the vote"),
                      "density": Param("fraction", 1.0, doc="mean kept fraction per row (1: no drop)"),
                      "epsilon": Param("number", 0.15, doc="keep probabilities span density ± epsilon by rank")}


def _mergekit_della(call: GroupCall, method: ConfigMethod, consensus: bool):
    return della(call.base, call.models, weights=call.weights,
                 density=[1.0 if d is None else d for d in call.densities],
                 epsilon=call.model_values("epsilon", method), scaling=call.param("lambda", method),
                 normalize=call.param("normalize", method), consensus=consensus,
                 rescale=call.param("rescale", method), seed=call.seed, name=call.name, out_dtype=call.out_dtype,
                 backend=call.backend)


def _della_config(name: str, consensus: bool, normalize: bool, doc: str) -> ConfigMethod:
    method = ConfigMethod(
        name, "mergekit", needs_base=True, model_params=DELLA_MODEL_PARAMS,
        global_params={**GTA_PARAMS, "normalize": Param("bool", normalize, doc="divide by the (agreeing) Σ wᵢ"),
                       "rescale": Param("bool", True, doc="keep each task vector's L1 norm")},
        merge=lambda call: _mergekit_della(call, method, consensus), doc=doc,
        check=lambda models: DellaOptions(density=[m.get("density", 1.0) for m in models] or 1.0,
                                          epsilon=[m.get("epsilon", 0.15) for m in models] or 0.15))
    return method


MERGEKIT_DELLA = _della_config("della", True, True, "magnitude-ranked drop per row, L1 rescale, TIES vote")
MERGEKIT_DELLA_LINEAR = _della_config("della_linear", False, False, "magnitude-ranked drop per row, L1 rescale, sum")

DELLA = Method(
    "della", della, DellaOptions, della_reference, ("row_rank", "uniforms", "ties", "combine", "l1_buckets"),
    config=(MERGEKIT_DELLA, MERGEKIT_DELLA_LINEAR),
    grid=({"density": 0.5, "epsilon": 0.2, "seed": 1}, {"density": 0.3, "epsilon": 0.1, "consensus": False},
          {"density": 0.6, "weights": [1.0, 0.5, 2.0], "normalize": False, "rescale": False, "scaling": 0.7}))

