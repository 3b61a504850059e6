"""NearSwap (mergekit's ``nearswap``): interpolate from the base a towards the other model b where they are
close, per entry::

    w = clamp(t / max(|a − b|, 1e-6), 0, 1);   out = w·b + (1 − w)·a

Element-wise, in the accumulation dtype (fp32; fp64 for fp64 models), rounded once to the output dtype
(mergekit computes in the models' dtype: bf16 maths for bf16 models). One torch expression: it reads two
tensors and writes one, which torch's own element-wise kernels already do at memory speed, so it has no
kernel primitive; every backend runs this reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import options as opt
from .._forms import gather, gather_like, prepare
from ..reference import CombineJob
from ._sparse import store
from ._spec import ELEMENTWISE, REQUIRED, ConfigMethod, Method, Param


@dataclass(frozen=True)
class NearswapOptions:
    """Options of nearswap: t, the distance below which b is taken whole."""

    t: float = opt.option(op=float)
    out_dtype: Optional[torch.dtype] = opt.option(None, op=Optional[torch.dtype])

    def __post_init__(self):
        opt.canonical(self, t=opt.real(self.t, "t"), out_dtype=opt.out_dtype(self.out_dtype))


@torch.no_grad()
def nearswap(base, inputs, t: float, *, out_dtype: Optional[torch.dtype] = None, backend: str = "auto"):
    """NearSwap of one model (inputs = [b], tensors, state dicts or modules) with `base` (a): see the module
    docstring. `backend` is accepted for uniformity (no kernel)."""
    o = NearswapOptions(t, out_dtype)
    forms = gather(inputs)
    if len(forms.dicts) != 1:
        raise ValueError(f"inputs: nearswap takes exactly one model besides the base, got {len(forms.dicts)}")
    base_dict = gather_like(base, forms, "base")
    merged, slots = prepare(forms, base_dict, o.out_dtype)
    for slot in slots:
        acc = CombineJob(slot.out, slot.inputs, [1.0], slot.base).acc_dtype
        a, b = slot.base.to(acc), slot.inputs[0].to(acc)
        w = (o.t / (a - b).abs().clamp(min=1e-6)).clamp(0, 1)
        store(slot.out, w * b + (1 - w) * a)
    return forms.wrap(merged)


MERGEKIT_NEARSWAP = ConfigMethod(
    "nearswap", "mergekit", needs_base=True, model_params={},
    global_params={"t": Param("number", REQUIRED, doc="distance below which the other model is taken whole")},
    merge=lambda call: nearswap(call.base, call.models, call.param("t", MERGEKIT_NEARSWAP),
                                out_dtype=call.out_dtype, backend=call.backend),
    doc="w = clamp(t/|a−b|, 0, 1), out = w·b + (1−w)·a", blocks=ELEMENTWISE)

NEARSWAP = Method("nearswap", nearswap, NearswapOptions, nearswap, (), n_inputs=1, config=(MERGEKIT_NEARSWAP,),
                  grid=({"t": 0.05}, {"t": 1e-4, "out_dtype": torch.float32}))
