"""Arcee Fusion (mergekit's ``arcee_fusion``): take the other model's value where its change matters most.

Per tensor, with the base θ0 and the other model x (rows along the last dim; 1-D: one row)::

    importance = |x − θ0| · KL_row,   KL_row = Σ p·log(p/q),  p = softmax(x) + 1e-8, q = softmax(θ0) + 1e-8
    q25, q50, q75 = sorted(importance)[⌊q·(n−1)⌋]   (of a sample of 10⁶ entries drawn with replacement when
                                                     n > 10⁶, as mergekit, but keyed by (seed, name))
    out = θ0 + (x − θ0)·[importance ≥ q50 + 1.5·(q75 − q25)]

The quantiles are three order statistics of one `select` launch (importance is never negative unless the
KL rounds below zero; then, and for fp64, a sort finds them). As mergekit, everything is in the models'
dtype and the fp32 mask makes the result fp32 for 16-bit models (mergekit's output dtype; out_dtype
casts), so the result is mergekit's bit for bit up to its sample. The sample is drawn from the name-keyed
Philox stream (element j of the sample is entry ⌊U_j·n / 2³²⌋), so results are reproducible everywhere,
not mergekit's (a torch.randint draw); tested by statistics.

`fusedmerge merge` merges a tensor over its budget in blocks of whole rows (RowBlocks, below): a pass gathers
the sample's entries block by block, the merge pass recomputes each block's importance; the whole tensor's bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from .. import dispatch
from .. import options as opt
from .._forms import gather, gather_like, prepare
from ..philox import mask_key
from ..reference import CombineJob, TiesSpec, UniformsJob
from ._spec import BlockPass, ConfigMethod, GroupCall, Method, RowBlocks, Span, StateDict

SAMPLE = 1_000_000
QUANTILES = (0.25, 0.5, 0.75)


@dataclass(frozen=True)
class ArceeFusionOptions:
    """Options of arcee_fusion: the seed and name that key the quantile sample of tensors over 10⁶ entries."""

    seed: int = opt.option(0)
    name: str = opt.option("tensor")
    out_dtype: Optional[torch.dtype] = opt.option(None)  # no custom op: its fake would need mergekit's fp32 rule

    def __post_init__(self):
        opt.canonical(self, seed=opt.integer(self.seed, "seed"), name=opt.text(self.name, "name"),
                      out_dtype=opt.out_dtype(self.out_dtype))


def importance(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|x − θ0|·KL_row in the models' dtype (mergekit's _compute_importance, in place where it can be: the same
    operations on the same operands in the same order, down to which NaN a product passes on)."""
    p = torch.softmax(x, dim=-1).add_(1e-8)
    log_ratio = torch.div(p, torch.softmax(base, dim=-1).add_(1e-8)).log_()
    kl = torch.mul(p, log_ratio, out=log_ratio).sum(dim=-1, keepdim=True)
    del p, log_ratio
    return (x - base).abs_().mul_(kl)


def sample_indices(n: int, seed: int, name: str, backend: str, device=None) -> torch.Tensor:
    """The flat indices of the sample: 0 .. n − 1 when n ≤ 10⁶, else ⌊U_j·n / 2³²⌋ for the 10⁶ uniforms U_j of
    the (seed, name) Philox stream (one `uniforms` launch)."""
    if n <= SAMPLE:
        return torch.arange(n, device=device)
    words = torch.empty(SAMPLE, dtype=torch.int32, device=device)
    dispatch.run("uniforms", [UniformsJob(mask_key(seed, 0, f"arcee_fusion:{name}"), words)], backend)
    return ((words.long() & 0xFFFFFFFF) * n) >> 32


def sample(values: torch.Tensor, seed: int, name: str, backend: str = "auto") -> torch.Tensor:
    """values flattened, or 10⁶ of its entries drawn with replacement from the (seed, name) stream."""
    flat = values.reshape(-1)
    return flat[sample_indices(flat.numel(), seed, name, backend, flat.device)]


def quantiles(values: torch.Tensor, backend: str) -> torch.Tensor:
    """q25, q50, q75 of a flat tensor at ⌊q·(n−1)⌋ of its ascending order (fp32 index arithmetic, as
    mergekit), by selection when no value is negative."""
    n = values.numel()
    at = (torch.tensor(QUANTILES, dtype=torch.float32) * (n - 1)).long().tolist()
    if values.dtype == torch.float64 or bool((values < 0).any()):
        return values.sort().values[at]
    spec = TiesSpec(weights=[1.0] * 3, scaling=1.0, ks=[[n - i for i in at]])
    job = CombineJob(values, [values] * 3, spec.weights, torch.zeros_like(values))  # select writes nothing
    bits = dispatch.run("select", [job], backend, spec)[0].to(torch.int32)  # |values| in fp32: exact
    return bits.view(torch.float32).to(values.dtype).to(values.device)


def threshold(sampled: torch.Tensor, backend: str) -> torch.Tensor:
    """q50 + 1.5·(q75 − q25) of the sample, in its dtype."""
    q1, median, q3 = quantiles(sampled, backend)
    return median + 1.5 * (q3 - q1)


def arcee_fusion(base, inputs, *, seed: int = 0, name: str = "tensor", out_dtype: Optional[torch.dtype] = None,
                 backend: str = "auto"):
    """Arcee Fusion of one model (inputs = [x], tensors, state dicts or modules) with `base`: see the module
    docstring. The result is fp32 for 16-bit models unless `out_dtype` says otherwise (mergekit's)."""
    return _fused(base, inputs, ArceeFusionOptions(seed, name, out_dtype), backend)


@torch.no_grad()
def _fused(base, inputs, o: ArceeFusionOptions, backend: str, cut: Optional[torch.Tensor] = None):
    """arcee_fusion; cut: the whole tensor's threshold, when inputs hold one row block of it (None: each
    tensor's own, from its sample)."""
    forms = gather(inputs, name=o.name)
    if len(forms.dicts) != 1:
        raise ValueError(f"inputs: arcee_fusion takes exactly one model besides the base, got {len(forms.dicts)}")
    base_dict = gather_like(base, forms, "base")
    first = forms.dicts[0]
    promoted = o.out_dtype or (torch.float32 if any(t.dtype in (torch.float16, torch.bfloat16) for t in first.values())
                               else None)
    merged, slots = prepare(forms, base_dict, promoted)
    for slot in slots:
        if not slot.out.numel():
            continue
        x, b = slot.inputs[0], slot.base
        score = importance(x, b)
        at = threshold(sample(score, o.seed, slot.key, backend), backend) if cut is None else cut
        mask = (score >= at).to(torch.promote_types(torch.promote_types(x.dtype, b.dtype), torch.float32))
        del score  # θ0 + (x − θ0)·mask (mergekit's fp32 mask; the same operations) in the mask's memory
        slot.out.copy_(torch.add(b, torch.mul(x - b, mask, out=mask), out=mask))
    return forms.wrap(merged)


def arcee_fusion_reference(base, inputs, **options):
    """The definition: arcee_fusion with the reference selection."""
    return arcee_fusion(base, inputs, **{**options, "backend": "torch"})


# Row blocks: blocks of whole rows (a 1-D tensor is one row: one block). A first pass draws the sample's indices
# into the whole tensor once (in the first block's call: it reads no block), sorted, with their positions in the
# sample; the second computes each block's importance and keeps its entries at the indices that fall in the
# block (a contiguous range of the sorted indices), which finish puts in sample order for the threshold. The
# merge pass computes each block's importance again.


def _align(shape: Tuple[int, ...], call) -> int:
    """Whole rows (the last dim); a 1-D or 0-D tensor is one row, one block."""
    return shape[-1] if len(shape) >= 2 else max(math.prod(shape), 1)


def _rows(t: torch.Tensor, span: Span) -> torch.Tensor:
    """The block as rows [rows, last dim]; a lone row of a tensor of several twice, as [2, last dim]: torch sums
    a lone row of 2¹⁵ entries or more across threads, in another order than each row of several."""
    cols = _align(span.shape, None)
    rows = t.reshape(-1, cols)
    return torch.cat([rows, rows]) if rows.shape[0] == 1 < math.prod(span.shape) // cols else rows


def _draw(call: GroupCall, span: Span, stats):
    """(the sample's indices ascending, their positions in the sample, the backend), drawn for the first block."""
    if span.first:
        return None
    name, _, (x,) = call.block()
    at, positions = sample_indices(math.prod(span.shape), call.seed, name, call.backend, x.device).sort()
    return at, positions, call.backend


def _block_sample(call: GroupCall, span: Span, drawn) -> List[torch.Tensor]:
    """The block's entries of the sample, in the order of their indices."""
    name, base, (x,) = call.block()
    at = drawn[0]
    lo, hi = torch.searchsorted(at, torch.tensor([span.first, span.first + span.numel], device=at.device)).tolist()
    score = importance(_rows(x, span), _rows(base, span)).reshape(-1)
    return [score[at[lo:hi] - span.first]]


def _sample_threshold(values: List[torch.Tensor], drawn) -> torch.Tensor:
    """The threshold of the sample put together in sample order."""
    _, positions, backend = drawn
    gathered = torch.cat(values)
    sampled = torch.empty_like(gathered)
    sampled[positions] = gathered
    return threshold(sampled, backend)


def _block_merge(call: GroupCall, span: Span, cut: torch.Tensor) -> StateDict:
    name, base, (x,) = call.block()
    merged = _fused({name: _rows(base, span)}, [{name: _rows(x, span)}],
                    ArceeFusionOptions(call.seed, name, call.out_dtype), call.backend, cut)
    return {name: merged[name].reshape(-1)[:span.numel]}


MERGEKIT_ARCEE_FUSION = ConfigMethod(
    "arcee_fusion", "mergekit", needs_base=True, model_params={}, global_params={},
    merge=lambda call: arcee_fusion(call.base, call.models, seed=call.seed, name=call.name,
                                    out_dtype=call.out_dtype, backend=call.backend),
    doc="θ0 + (x−θ0)·[|x−θ0|·KL_row ≥ q50 + 1.5·IQR]",
    blocks=RowBlocks(passes=(BlockPass(_draw, lambda total, part: total),
                             BlockPass(_block_sample, lambda total, part: total + part, _sample_threshold)),
                     merge=_block_merge, align=_align),
    result_dtype=lambda dtype: torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)

ARCEE_FUSION = Method("arcee_fusion", arcee_fusion, ArceeFusionOptions, arcee_fusion_reference, ("select", "uniforms"),
                      n_inputs=1, config=(MERGEKIT_ARCEE_FUSION,), grid=({}, {"seed": 3, "out_dtype": torch.float64}))
