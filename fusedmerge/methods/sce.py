"""SCE (mergekit's ``sce``, FuseChat): select the entries where the task vectors vary most, weight each
model by its mean square, erase minority signs, average.

Per tensor (n entries), T task vectors τᵢ = xᵢ − θ0 in the accumulation dtype (fp32; fp64 for fp64 models)::

    select_topk < 1:  v = Σᵢ (τᵢ − μ)² / T,  μ = (Σᵢ τᵢ) / T      per entry, both sums in the order i = 0..T−1,
                      every operation in fp64 (fp32 τᵢ widen exactly), v rounded once to the accumulation dtype
                      k = ⌊count_nonzero(v)·select_topk⌋;  keep the entries with |v| ≥ the k-th largest |v|
                      (k = 0 keeps nothing);  τ̂ᵢ = τᵢ·keep
    sᵢ = Σₑ τ̂ᵢ[e]² / n   the `dots` primitive's fp64 pairwise tree over each tensor (pairs (i, i)), gathered
                         as the sums of its aligned _reduce.BLOCK_CHUNK-element chunks reduced by the same tree
    wᵢ = sᵢ / Σⱼ sⱼ (fp64, Σ in order j = 0..T−1), or 1/T when |Σⱼ sⱼ| < 1e-6
    out = θ0 + Σ agreeᵢ·wᵢτ̂ᵢ / Σ agreeᵢ·wᵢ   (agree: sign of τ̂ᵢ = sign of Σ τ̂ⱼ, zero sums electing +;
                                               the `ties` primitive, vote unweighted)

Why fp64 for v: the fp64 two-pass value, accurate to ~10⁻¹⁵ before its one rounding, is nearly always the
correctly rounded fp32 variance, and it equalled torch.var's fp32 result (mergekit's) on every entry tested
(tests/test_sce.py states ≤ 1 ulp, > 99.9 % equal), so the top-k selection is mergekit's; the same sums in
fp32 differ from torch.var by up to 3 ulps on up to 45 % of the entries, which can move an entry across the
k-th variance. The cost: 4-10× the fp32 arithmetic (measured 7-18 ms per 10⁶ entries for 3 models on one
loaded core), well below torch.var of a stacked copy (125 ms). fp64 models: the same formula in fp64, within
2·T·ε₆₄·(v + |μ|·√v) of torch.var (measured ≤ 0.91·T·ε₆₄·(…), largest where two τᵢ nearly coincide).

Every output entry depends on its own inputs once the k-th variance and the sᵢ are known, so a tensor is
worked on CHUNK elements at a time: its τᵢ and τ̂ᵢ are never held whole, nor stacked (v is, once, for the
whole tensor's `select` launch; then only where it is below the k-th, as one bool mask that the two
later passes reuse). `fusedmerge merge` streams a tensor over the budget in row blocks
(MERGEKIT_SCE.blocks): the k-th variance by the radix selection over blocks of _sparse.radix_passes (the
nonzero count gathered in its first pass), then the sᵢ's chunk sums, then the merge — the whole tensor's
bits (tests/test_sce.py, tests/test_blocks.py).

Differences from mergekit: its sᵢ are fp32 means (torch's order) and its wᵢ fp32 quotients — here fp64 tree
sums and fp64 quotients, so fp32 results differ by ≤ 1 fp32 ulp of the largest input (measured ≤ 0.65,
≥ 87 % of the entries equal: tests/test_sce.py); entries tied with the k-th variance are all kept
(torch.topk picks among them); where the agreeing weights sum to less than 1e-6 but not 0, mergekit divides
by 1e-6 (its clamp) and fusedmerge by the sum; bf16 models are computed in fp32 and rounded once (mergekit
works in bf16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .. import dispatch
from .. import options as opt
from .._forms import Slot, gather, gather_like, prepare
from ..reductions import DotsSpec
from ..reference import CombineJob, TiesSpec, magnitude_view
from . import _reduce
from ._reduce import chunk_sums, tensor_sums
from ._sparse import acc_tau, gta_tail, radix_passes, slot_chunks
from ._spec import BlockPass, ConfigMethod, GroupCall, Method, Param, RowBlocks, Span


@dataclass(frozen=True)
class SceOptions:
    """Options of sce: select_topk, the fraction of highest-variance entries kept (1: all)."""

    select_topk: float = opt.option(1.0, op=float)
    out_dtype: Optional[torch.dtype] = opt.option(None, op=Optional[torch.dtype])

    def __post_init__(self):
        opt.canonical(self, select_topk=opt.kept_fraction(self.select_topk, "select_topk"),
                      out_dtype=opt.out_dtype(self.out_dtype))


def variance(taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """v = Σᵢ (τᵢ − μ)²/T, μ = (Σᵢ τᵢ)/T per entry: sums in order i = 0..T−1, each operation in fp64, v
    rounded once to the τᵢ's dtype (module docstring)."""
    mu = taus[0].to(torch.float64, copy=True)
    wide = torch.empty_like(mu)
    for t in taus[1:]:
        mu += wide.copy_(t)
    mu /= len(taus)
    v = torch.zeros_like(mu)
    for t in taus:
        v += wide.copy_(t).sub_(mu).square_()
    return v.div_(len(taus)).to(taus[0].dtype)


CHUNK = 1 << 20  # elements worked on at once (a multiple of _reduce.BLOCK_CHUNK: _step)


def _step() -> int:
    """CHUNK, or BLOCK_CHUNK when larger (both powers of two): pieces start at aligned chunk boundaries."""
    return max(CHUNK, _reduce.BLOCK_CHUNK)


def _masked(piece: Slot, threshold: Optional[int], select: bool,
            drop: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
    """τ̂ᵢ of a piece in the accumulation dtype: τᵢ where |v| ≥ threshold (bits), all of them without
    `select`, none for a threshold None (k = 0); drop: the piece's |v| < threshold when already known."""
    acc = CombineJob(piece.out, piece.inputs, [1.0] * len(piece.inputs), piece.base).acc_dtype
    taus = [acc_tau(piece, i, acc) for i in range(len(piece.inputs))]
    if select:
        if threshold is not None and drop is None:
            drop = magnitude_view(variance(taus)) < threshold
        for t in taus:
            t.zero_() if threshold is None else t.masked_fill_(drop, 0)
    return taus


def _pieces(slot: Slot, drop: Optional[torch.Tensor]) -> List[Tuple[Slot, Optional[torch.Tensor]]]:
    """The slot's pieces of _step() elements, each with its part of the flat `drop` mask (None: not known)."""
    step = _step()
    return [(p, None if drop is None else drop[j * step:(j + 1) * step]) for j, p in enumerate(slot_chunks(slot, step))]


def _chunk_sums(slot: Slot, threshold: Optional[int], select: bool, backend: str,
                drop: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The chunk sums of Σ τ̂ᵢ² (i = 0..T−1) over slot (a tensor, or a block of it starting at a multiple of
    BLOCK_CHUNK): fp64 [chunks, T], piece by piece."""
    spec = DotsSpec(tuple((i, i) for i in range(len(slot.inputs))))
    return torch.cat([chunk_sums(spec, _masked(p, threshold, select, d), None, backend) for p, d in _pieces(slot, drop)])


def _threshold(slot: Slot, topk: float, backend: str) -> Tuple[Optional[int], Optional[torch.Tensor]]:
    """The bits of the k-th largest |v| of the whole slot (one `select` launch), None when k = 0, and where
    |v| is below them (flat bool, kept for the later passes instead of computing v again)."""
    acc = CombineJob(slot.out, slot.inputs, [1.0] * len(slot.inputs), slot.base).acc_dtype
    v = torch.cat([variance([acc_tau(p, i, acc) for i in range(len(p.inputs))]) for p in slot_chunks(slot, _step())])
    k = _rank(topk)(int(torch.count_nonzero(v)))
    if k == 0:
        return None, None
    spec = TiesSpec(weights=[1.0], scaling=1.0, ks=[[k]])
    threshold = int(dispatch.run("select", [CombineJob(v, [v], [1.0], torch.zeros_like(v))], backend, spec)[0, 0])
    return threshold, magnitude_view(v) < threshold


def _rank(topk: float):
    """k as a function of the count of nonzero variances."""
    return lambda nonzero: int(nonzero * topk)


def _weights(sums: torch.Tensor, n: int) -> List[float]:
    """wᵢ from the tensor's Σ τ̂ᵢ² [1, T] and its size n (module docstring)."""
    s = [float(x) / n for x in sums.reshape(-1)]
    total = sum(s)
    return [1.0 / len(s)] * len(s) if abs(total) < 1e-6 else [x / total for x in s]


def _sce_slot(slot: Slot, topk: float, backend: str, stats=None, n: Optional[int] = None) -> None:
    """slot.out, CHUNK elements at a time; stats and n when the slot is a row block: the whole tensor's
    (threshold, sums) and size (else the slot's own)."""
    select, drop = topk < 1, None
    if stats is None:
        threshold, drop = _threshold(slot, topk, backend) if select else (None, None)
        stats = threshold, tensor_sums(_chunk_sums(slot, threshold, select, backend, drop))
    threshold, sums = stats
    w = _weights(sums, slot.out.numel() if n is None else n)
    for piece, d in _pieces(slot, drop):
        gta_tail(piece, _masked(piece, threshold, select, d), w, 1.0, True, True, backend, weighted_vote=False)


def _sce(o: SceOptions, base, inputs, backend: str, span: Optional[Span] = None, stats=None):
    """sce with its options; span and stats when the inputs are one row block of a tensor (RowBlocks)."""
    forms = gather(inputs)
    base_dict = gather_like(base, forms, "base")
    merged, slots = prepare(forms, base_dict, o.out_dtype)
    for slot in slots:
        if slot.out.numel():
            _sce_slot(slot, o.select_topk, backend, stats, None if span is None else math.prod(span.shape))
    return forms.wrap(merged)


@torch.no_grad()
def sce(base, inputs, *, select_topk: float = 1.0, out_dtype: Optional[torch.dtype] = None, backend: str = "auto"):
    """SCE merge of tensors, state dicts or modules onto `base` (see the module docstring): top-variance
    selection (`select_topk` < 1), mean-square model weights, TIES's sign erase, weighted mean."""
    return _sce(SceOptions(select_topk, out_dtype), base, inputs, backend)


def sce_reference(base, inputs, **options):
    """The definition: sce on the references of its primitives (select, dots, ties)."""
    return sce(base, inputs, **{**options, "backend": "torch"})


def _options(call: GroupCall) -> SceOptions:
    return SceOptions(call.param("select_topk", MERGEKIT_SCE), call.out_dtype)


# Row blocks: the k-th variance by the radix selection over blocks (exact; k from the nonzero count of its
# first pass), then the chunk sums of Σ τ̂ᵢ² per block (blocks start at multiples of BLOCK_CHUNK), reduced
# by the tree at the end, then each block merged with the whole tensor's threshold and weights.


def _selections(call: GroupCall, span: Span) -> Tuple[list, List[int]]:
    topk = _options(call).select_topk
    return ([_rank(topk)], [0]) if topk < 1 else ([], [])


def _block_sums(call: GroupCall, span: Span, stats) -> torch.Tensor:
    o = _options(call)
    forms = gather(call.models)
    _, slots = prepare(forms, gather_like(call.base, forms, "base"), o.out_dtype)
    threshold = stats[0][0] if stats[0] else None
    parts = [_chunk_sums(s, threshold, o.select_topk < 1, call.backend) for s in slots if s.out.numel()]
    return torch.cat(parts) if parts else torch.zeros((0, len(call.models)), dtype=torch.float64)


SCE_BLOCKS = RowBlocks(
    passes=(*radix_passes(_selections, lambda base, inputs, m: variance([x.to(base.dtype) - base for x in inputs])),
            BlockPass(_block_sums, lambda total, part: torch.cat([total, part]),
                      lambda total, stats: (stats[0][0] if stats[0] else None,
                                            tensor_sums(total) if total.shape[0] else None))),
    merge=lambda call, span, stats: _sce(_options(call), call.base, call.models, call.backend, span, stats),
    align=lambda shape, call: _reduce.BLOCK_CHUNK)

MERGEKIT_SCE = ConfigMethod(
    "sce", "mergekit", needs_base=True, model_params={},
    global_params={"select_topk": Param("kept", 1.0, doc="fraction of highest-variance entries kept"),
                   "int8_mask": Param("bool", False, doc="mergekit's mask storage; no effect on the result")},
    merge=lambda call: _sce(_options(call), call.base, call.models, call.backend),
    doc="top-variance selection, mean-square weights, sign erase, weighted mean", blocks=SCE_BLOCKS)

SCE = Method("sce", sce, SceOptions, sce_reference, ("select", "dots", "ties"), config=(MERGEKIT_SCE,),
             grid=({}, {"select_topk": 0.3, "out_dtype": torch.float32}))
