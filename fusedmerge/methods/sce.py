"""SCE (mergekit's ``sce``, FuseChat): select the entries where the task vectors vary most, weight each
model by its mean square, erase minority signs, average.

Per tensor (n entries), T task vectors τᵢ = xᵢ − θ0 in the accumulation dtype::

    select_topk < 1:  v = population variance of the τᵢ per entry (torch.var, unbiased=False, as mergekit)
                      k = ⌊count_nonzero(v)·select_topk⌋;  keep the entries with |v| ≥ the k-th largest |v|
                      (one `select` launch; k = 0 keeps nothing);  τ̂ᵢ = τᵢ·keep
    sᵢ = mean(τ̂ᵢ²);   wᵢ = sᵢ/Σ sⱼ, or 1/T when |Σ sⱼ| < 1e-6
    out = θ0 + Σ agreeᵢ·wᵢτ̂ᵢ / Σ agreeᵢ·wᵢ   (agree: sign of τ̂ᵢ = sign of Σ τ̂ⱼ, zero sums electing +;
                                               the `ties` primitive, vote unweighted)

Differences from mergekit: entries tied with the k-th variance are all kept (torch.topk picks among them);
where the agreeing weights sum to less than 1e-6 but not 0, mergekit divides by 1e-6 (its clamp) and
fusedmerge by the sum; bf16 models are computed in fp32 and rounded once (mergekit works in bf16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import dispatch
from .. import options as opt
from .._forms import Slot, gather, gather_like, prepare
from ..reference import CombineJob, TiesSpec, magnitude_bits
from ._sparse import acc_tau, gta_tail
from ._spec import ConfigMethod, GroupCall, Method, Param


@dataclass(frozen=True)
class SceOptions:
    """Options of sce: select_topk, the fraction of highest-variance entries kept (1: all)."""

    select_topk: float = opt.option(1.0, op=float)
    out_dtype: Optional[torch.dtype] = opt.option(None, op=Optional[torch.dtype])

    def __post_init__(self):
        opt.canonical(self, select_topk=opt.kept_fraction(self.select_topk, "select_topk"),
                      out_dtype=opt.out_dtype(self.out_dtype))


def _selected(taus, slot: Slot, topk: float, backend: str) -> torch.Tensor:
    """The entries of the top ⌊nnz(v)·topk⌋ variances (bool)."""
    var = torch.var(torch.stack(taus), dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * topk)
    if k == 0:
        return torch.zeros(var.shape, dtype=torch.bool, device=var.device)
    spec = TiesSpec(weights=[1.0], scaling=1.0, ks=[[k]])
    job = CombineJob(slot.out, [var], [1.0], torch.zeros_like(var))
    threshold = int(dispatch.run("select", [job], backend, spec)[0, 0])
    return magnitude_bits(var).reshape(var.shape) >= threshold


def _sce_slot(slot: Slot, n: int, topk: float, backend: str) -> None:
    acc = CombineJob(slot.out, slot.inputs, [1.0] * n, slot.base).acc_dtype
    taus = [acc_tau(slot, i, acc) for i in range(n)]
    if topk < 1:
        keep = _selected(taus, slot, topk, backend)
        taus = [torch.where(keep, t, torch.zeros((), dtype=acc, device=t.device)) for t in taus]
    s = torch.stack([t.square().reshape(-1).mean() for t in taus])
    total = float(s.sum())
    w = [1.0 / n] * n if abs(total) < 1e-6 else [float(x) for x in s / s.sum()]
    gta_tail(slot, taus, w, 1.0, True, True, backend, weighted_vote=False)


@torch.no_grad()
def sce(base, inputs, *, select_topk: float = 1.0, out_dtype: Optional[torch.dtype] = None, backend: str = "auto"):
    """SCE merge of tensors, state dicts or modules onto `base` (see the module docstring): top-variance
    selection (`select_topk` < 1), mean-square model weights, TIES's sign erase, weighted mean."""
    o = SceOptions(select_topk, out_dtype)
    forms = gather(inputs)
    base_dict = gather_like(base, forms, "base")
    merged, slots = prepare(forms, base_dict, o.out_dtype)
    for slot in slots:
        if slot.out.numel():
            _sce_slot(slot, len(forms.dicts), o.select_topk, backend)
    return forms.wrap(merged)


def sce_reference(base, inputs, **options):
    """The definition: sce on the references of its primitives (select, ties)."""
    return sce(base, inputs, **{**options, "backend": "torch"})


def _mergekit_sce(call: GroupCall):
    return sce(call.base, call.models, select_topk=call.param("select_topk", MERGEKIT_SCE),
               out_dtype=call.out_dtype, backend=call.backend)


MERGEKIT_SCE = ConfigMethod(
    "sce", "mergekit", needs_base=True, model_params={},
    global_params={"select_topk": Param("fraction", 1.0, doc="fraction of highest-variance entries kept"),
                   "int8_mask": Param("bool", False, doc="mergekit's mask storage; no effect on the result")},
    merge=_mergekit_sce, doc="top-variance selection, mean-square weights, sign erase, weighted mean")

SCE = Method("sce", sce, SceOptions, sce_reference, ("select", "ties"), config=(MERGEKIT_SCE,),
             grid=({}, {"select_topk": 0.3, "out_dtype": torch.float32}))
