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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import dispatch
from .. import options as opt
from .._forms import gather, gather_like, prepare
from ..philox import mask_key, random_words
from ..reference import CombineJob, TiesSpec
from ._spec import ConfigMethod, Method

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
    """|x − θ0|·KL_row in the models' dtype (mergekit's _compute_importance)."""
    p = torch.softmax(x, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    return (x - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def sample(values: torch.Tensor, seed: int, name: str) -> torch.Tensor:
    """values flattened, or 10⁶ of its entries drawn with replacement from the (seed, name) stream."""
    flat = values.reshape(-1)
    if flat.numel() <= SAMPLE:
        return flat
    u = random_words(mask_key(seed, 0, f"arcee_fusion:{name}"), SAMPLE, flat.device)
    return flat[(u * flat.numel()) >> 32]


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


@torch.no_grad()
def arcee_fusion(base, inputs, *, seed: int = 0, name: str = "tensor", out_dtype: Optional[torch.dtype] = None,
                 backend: str = "auto"):
    """Arcee Fusion of one model (inputs = [x], tensors, state dicts or modules) with `base`: see the module
    docstring. The result is fp32 for 16-bit models unless `out_dtype` says otherwise (mergekit's)."""
    o = ArceeFusionOptions(seed, name, out_dtype)
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
        q1, median, q3 = quantiles(sample(score, o.seed, slot.key), backend)
        mask = (score >= median + 1.5 * (q3 - q1)).float()
        slot.out.copy_(b + (x - b) * mask)
    return forms.wrap(merged)


def arcee_fusion_reference(base, inputs, **options):
    """The definition: arcee_fusion with the reference selection."""
    return arcee_fusion(base, inputs, **{**options, "backend": "torch"})


MERGEKIT_ARCEE_FUSION = ConfigMethod(
    "arcee_fusion", "mergekit", needs_base=True, model_params={}, global_params={},
    merge=lambda call: arcee_fusion(call.base, call.models, seed=call.seed, name=call.name,
                                    out_dtype=call.out_dtype, backend=call.backend),
    doc="θ0 + (x−θ0)·[|x−θ0|·KL_row ≥ q50 + 1.5·IQR]",
    result_dtype=lambda dtype: torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)

ARCEE_FUSION = Method("arcee_fusion", arcee_fusion, ArceeFusionOptions, arcee_fusion_reference, ("select",),
                      n_inputs=1, config=(MERGEKIT_ARCEE_FUSION,), grid=({}, {"seed": 3, "out_dtype": torch.float64}))
