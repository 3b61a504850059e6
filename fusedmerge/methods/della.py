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
from ..philox import GROUP, mask_key
from ..reference import CombineJob, RankJob, UniformsJob
from ._sparse import gta_tail, l1_factor, l1_sum, per_model_values, spread
from ._spec import REQUIRED, BlockPass, ConfigMethod, GroupCall, Method, Param, RowBlocks, Span
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


def keep_table(n: int, density: float, epsilon: float, device) -> torch.Tensor:
    """K − 2³¹ for each rank r < n (int32, keep_ladder's K): U < K ⇔ (U − 2³¹) < K − 2³¹ in int32, so the
    mask is a table look-up and one signed comparison (no int64 temporaries per element)."""
    ranks = torch.arange(n, dtype=torch.int64, device=device).reshape(1, n)
    return (keep_ladder(ranks, density, epsilon) - 2**31).to(torch.int32).reshape(n)


def della_masks(rows: Sequence[torch.Tensor], ladders: Sequence[Tuple[float, float]], keys: Sequence[int],
                backend: str, first: int = 0) -> List[Optional[torch.Tensor]]:
    """Keep masks (bool, rows layout) of the models' τ rows; None where the density is 1 (nothing dropped).
    first: the rows' first element in the whole tensor (a row block; a multiple of 128)."""
    return [None if d >= 1 else _drops(tau, d, e, key, backend, first, _scratch(tau)).logical_not()
            for tau, (d, e), key in zip(rows, ladders, keys)]


def _scratch(tau: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Ranks, uniforms, looked-up K (int32) and the drop mask (bool) for τ rows of this shape: allocated once
    per tensor and reused by each model (fresh pages cost more to write than the operations themselves)."""
    new = lambda dtype: torch.empty(tau.shape, dtype=dtype, device=tau.device)  # noqa: E731
    return new(torch.int32), new(torch.int32), new(torch.int32), new(torch.bool)


def _drops(tau: torch.Tensor, density: float, epsilon: float, key: int, backend: str, first: int,
           scratch: Tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Where τ's entries are dropped: U ≥ K(rank) (bool, in scratch)."""
    ranks, words, ks, drops = scratch
    dispatch.run("row_rank", [RankJob(tau, ranks)], backend)
    dispatch.run("uniforms", [UniformsJob(key, words, first)], backend)
    torch.index_select(keep_table(tau.shape[1], density, epsilon, tau.device), 0, ranks.view(-1), out=ks.view(-1))
    return torch.ge(words.bitwise_xor_(-(2**31)), ks, out=drops)


def _pruned(slot: Slot, o: DellaOptions, ladders, backend: str, first: int, with_sums: bool, zeros: torch.Tensor):
    """The models' kept task vectors δᵢ before the rescale (rows layout, accumulation dtype; τᵢ where dᵢ = 1)
    and, `with_sums`, each pruned model's L1 sums of (τᵢ, δᵢ) (_sparse.l1_sum; else and where dᵢ = 1: None).
    A model at a time, τᵢ pruned in place; zeros: the accumulation dtype's, of the rows' shape."""
    base = slot.base.to(zeros.dtype)
    kept, sums, scratch = [], [], None
    for i, (x, (d, e)) in enumerate(zip(slot.inputs, ladders)):
        tau = as_rows(x - base)  # x promoted to acc (base is acc), as acc_tau
        kept.append(tau)
        sums.append(None)
        if d >= 1:
            continue
        scratch = scratch or _scratch(tau)
        before = l1_sum(tau, backend, zeros) if with_sums else None
        tau.masked_fill_(_drops(tau, d, e, mask_key(o.seed, i, slot.key), backend, first, scratch), 0.0)
        if with_sums:
            sums[-1] = torch.stack([before, l1_sum(tau, backend, zeros)])
    return kept, sums


CHUNK = 1 << 20  # elements of a 2-D fp32-accumulated tensor pruned and merged at once (_della_rows)


def _della_slot(slot: Slot, o: DellaOptions, w: List[float], ladders, backend: str, first: int = 0,
                sums=None) -> None:
    """slot.out from slot's tensors; first and sums when the slot is a row block: its first element in the
    whole tensor and the whole tensor's L1 sums (else this slot's own)."""
    acc = CombineJob(slot.out, slot.inputs, w, slot.base).acc_dtype
    if acc == torch.float32 and slot.out.dim() == 2 and slot.out.numel() > CHUNK:
        return _della_rows(slot, o, w, ladders, backend, first, sums)
    zeros = torch.zeros(as_rows(slot.out).shape, dtype=acc, device=slot.out.device)
    kept, own = _pruned(slot, o, ladders, backend, first, o.rescale and sums is None, zeros)
    for i, s in enumerate(own if sums is None else sums):
        f = 1.0 if s is None else l1_factor(s)
        if f != 1.0:
            kept[i].mul_(torch.tensor(f, dtype=kept[i].dtype, device=kept[i].device))
    deltas = [from_rows(k, slot.out.shape).contiguous() for k in kept]
    gta_tail(slot, deltas, w, o.scaling, o.normalize, o.consensus, backend, zeros=zeros)


def _della_rows(slot: Slot, o: DellaOptions, w: List[float], ladders, backend: str, first: int, sums) -> None:
    """_della_slot of a 2-D fp32-accumulated tensor, CHUNK elements of whole rows (of whole Philox groups) at a
    time, so that N task vectors are never held whole: a first pass draws each chunk's masks (its elements'
    uniforms, as in row blocks) and keeps only the drop masks (1 byte an element per model) and the exact L1
    sums; the second prunes, rescales and merges chunk after chunk. The whole slot's bits."""
    n = slot.out.shape[1]
    step = max(CHUNK // math.lcm(n, GROUP), 1) * math.lcm(n, GROUP) // n  # rows
    pieces = [(r, Slot(slot.key, slot.out[r:r + step], [x[r:r + step] for x in slot.inputs], slot.base[r:r + step]))
              for r in range(0, slot.out.shape[0], step)]
    pruned = [i for i, (d, _) in enumerate(ladders) if d < 1]
    drops = {i: torch.empty(slot.out.shape, dtype=torch.bool, device=slot.out.device) for i in pruned}
    own = [None] * len(ladders)
    for r, piece in pieces:
        base, scratch = piece.base.to(torch.float32), None
        for i in pruned:
            tau = piece.inputs[i] - base
            scratch = scratch or _scratch(tau)
            d, e = ladders[i]
            drop = drops[i][r:r + step].copy_(_drops(tau, d, e, mask_key(o.seed, i, slot.key), backend, first + r * n,
                                                     scratch))
            if o.rescale and sums is None:
                part = torch.stack([l1_sum(tau, backend), l1_sum(tau.masked_fill_(drop, 0.0), backend)])
                own[i] = part if own[i] is None else own[i] + part
    factors = [1.0 if s is None else l1_factor(s) for s in (own if sums is None else sums)]
    for r, piece in pieces:
        base = piece.base.to(torch.float32)
        deltas = []
        for i, x in enumerate(piece.inputs):
            tau = x - base
            if i in drops:
                tau.masked_fill_(drops[i][r:r + step], 0.0)
            if factors[i] != 1.0:
                tau.mul_(torch.tensor(factors[i], dtype=tau.dtype, device=tau.device))
            deltas.append(tau)
        gta_tail(piece, deltas, w, o.scaling, o.normalize, o.consensus, backend,
                 zeros=torch.zeros(piece.out.shape, dtype=torch.float32, device=piece.out.device))


@torch.no_grad()
def della(base, inputs, *, weights: Optional[Sequence[float]] = None,
          density: Union[float, Sequence[float]] = 1.0, epsilon: Union[float, Sequence[float]] = 0.15,
          scaling: float = 1.0, normalize: bool = True, consensus: bool = True, rescale: bool = True, seed: int = 0,
          name: str = "tensor", out_dtype: Optional[torch.dtype] = None, backend: str = "auto"):
    """DELLA merge of tensors, state dicts or modules onto `base` (the forms of `average`): per row, keep each
    task-vector entry with probability (d−ε) + 2ε·(its magnitude rank)/(n−1), rescale to the task vector's
    L1 norm (`rescale`), then θ0 + λ·Σ agreeᵢ·wᵢδᵢ / Σ agreeᵢ·wᵢ (`consensus`, `normalize`) or θ0 +
    λ·Σ wᵢδᵢ / Σ wᵢ (della_linear: consensus=False, normalize as wished). `scaling` is mergekit's λ; masks are
    keyed by (seed, model index, tensor name). Tensor by tensor; a 2-D fp32-accumulated tensor over CHUNK
    elements CHUNK at a time (_della_rows), others with N task vectors held (`fusedmerge merge` merges a tensor
    over its budget in row blocks: the module's RowBlocks)."""
    o = DellaOptions(weights, density, epsilon, scaling, normalize, consensus, rescale, seed, name, out_dtype)
    forms, merged, slots, w, ladders = _prepared(o, base, inputs)
    for slot in slots:
        _della_slot(slot, o, w, ladders, backend)
    return forms.wrap(merged)


def _prepared(o: DellaOptions, base, inputs):
    """(forms, merged, non-empty slots, weights, ladders) of a della call."""
    forms = gather(inputs, name=o.name)
    base_dict = gather_like(base, forms, "base")
    w = opt.count_weights(o.weights, len(forms.dicts), normalise=False)
    merged, slots = prepare(forms, base_dict, o.out_dtype)
    return forms, merged, [s for s in slots if s.out.numel()], w, o.ladders(len(w))


def della_reference(base, inputs, **options):
    """The definition: della on the references of its primitives (row_rank, uniforms, ties, combine, l1_buckets)."""
    return della(base, inputs, **{**options, "backend": "torch"})


# --- peers --------------------------------------------------------------------------------------------------

DELLA_MODEL_PARAMS = {"weight": Param("number", REQUIRED, doc="wᵢ, before the vote"),
                      "density": Param("kept", 1.0, doc="mean kept fraction per row (1: no drop)"),
                      "epsilon": Param("number", 0.15, doc="keep probabilities span density ± epsilon by rank")}


def _mergekit_options(call: GroupCall, method: ConfigMethod, consensus: bool) -> DellaOptions:
    return DellaOptions(tuple(call.weights), tuple(1.0 if d is None else d for d in call.densities),
                        tuple(call.model_values("epsilon", method)), call.param("lambda", method),
                        call.param("normalize", method), consensus, call.param("rescale", method), call.seed,
                        call.name, call.out_dtype)


def _mergekit_della(call: GroupCall, method: ConfigMethod, consensus: bool):
    o = _mergekit_options(call, method, consensus)
    forms, merged, slots, w, ladders = _prepared(o, call.base, call.models)
    for slot in slots:
        _della_slot(slot, o, w, ladders, call.backend)
    return forms.wrap(merged)


# Row blocks: ranks are per row, so a block of whole rows (2-D tensors; other shapes are one block) draws its
# masks alone, from the uniforms of its elements' indices in the whole tensor (UniformsJob.first; blocks of
# whole 128-element Philox groups). Only the L1 rescale needs the whole tensor: a first pass adds up each
# block's l1_sums (exact integer sums for fp32 accumulation, so bit for bit the whole tensor's; fp64 models'
# fp64 sums are added in block order, within an ulp or two of the whole tensor's), then the merge pass draws
# each block's masks again and rescales by the whole tensor's factors.


def _block(call: GroupCall, span: Span, method: ConfigMethod, consensus: bool):
    """(options, merged, slots, weights, ladders) of a row block, its tensors viewed as rows."""
    name, base, inputs = call.block()
    rows = (lambda t: t.reshape(-1, span.shape[1])) if len(span.shape) == 2 else (lambda t: t.reshape(span.shape))
    o = _mergekit_options(call, method, consensus)
    _, merged, slots, w, ladders = _prepared(o, {name: rows(base)}, [{name: rows(x)} for x in inputs])
    return o, merged, slots, w, ladders


def _block_sums(call: GroupCall, span: Span, method: ConfigMethod, consensus: bool):
    """Each model's L1 sums of one block (None: no rescale, or nothing pruned)."""
    o, _, slots, w, ladders = _block(call, span, method, consensus)
    if not o.rescale or not slots or all(d >= 1 for d, _ in ladders):
        return None
    slot = slots[0]
    acc = CombineJob(slot.out, slot.inputs, w, slot.base).acc_dtype
    zeros = torch.zeros(as_rows(slot.out).shape, dtype=acc, device=slot.out.device)
    return _pruned(slot, o, ladders, call.backend, span.first, True, zeros)[1]


def _add_sums(total, part):
    return None if total is None else [a if a is None else a + b for a, b in zip(total, part)]


def _block_merge(call: GroupCall, span: Span, sums, method: ConfigMethod, consensus: bool):
    o, merged, slots, w, ladders = _block(call, span, method, consensus)
    for slot in slots:
        _della_slot(slot, o, w, ladders, call.backend, span.first, sums)
    return {k: v.reshape(-1) for k, v in merged.items()}


def _align(shape, call) -> int:
    """Whole rows of whole Philox groups (2-D); other shapes in one block."""
    return math.lcm(shape[1], GROUP) if len(shape) == 2 else math.prod(shape)


def _della_config(name: str, consensus: bool, normalize: bool, doc: str) -> ConfigMethod:
    method = ConfigMethod(
        name, "mergekit", needs_base=True, model_params=DELLA_MODEL_PARAMS,
        global_params={**GTA_PARAMS, "normalize": Param("bool", normalize, doc="divide by the (agreeing) Σ wᵢ"),
                       "rescale": Param("bool", True, doc="keep each task vector's L1 norm")},
        merge=lambda call: _mergekit_della(call, method, consensus), doc=doc,
        blocks=RowBlocks(passes=(BlockPass(lambda call, span, _: _block_sums(call, span, method, consensus), _add_sums),),
                         merge=lambda call, span, sums: _block_merge(call, span, sums, method, consensus), align=_align),
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

