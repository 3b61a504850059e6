"""Passthrough: one model's tensors, optionally scaled (mergekit's ``passthrough``, merge_methods/passthrough.py).

    out = scale·x   (x itself where no scale is given)

One input per output tensor; what makes it useful is the `slices:` planner, which stacks layers taken from
different models and layer ranges ("frankenmerges", checkpoint/plan.py), with `scale` often given per filter
(e.g. halving o_proj and down_proj). The product is one fused linear combination (reference.combine_reference,
the coefficient rounded once to the accumulation dtype): bf16 and fp16 inputs give mergekit's bits (torch
multiplies them by the scale in fp32), fp32 inputs are within one rounding of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import options as opt
from .. import reference
from .._forms import gather, merge_linear
from ._spec import ELEMENTWISE, ConfigMethod, GroupCall, Method, Param


@dataclass(frozen=True)
class PassthroughOptions:
    scale: Optional[float] = opt.option(None, op=Optional[float])
    out_dtype: Optional[torch.dtype] = opt.option(None, op=Optional[torch.dtype])

    def __post_init__(self):
        opt.canonical(self, scale=None if self.scale is None else opt.real(self.scale, "scale"),
                      out_dtype=opt.out_dtype(self.out_dtype))


def passthrough(inputs, scale: Optional[float] = None, *, out_dtype: Optional[torch.dtype] = None,
                backend: str = "auto"):
    """scale·x of the one tensor, state dict or module in `inputs` (x itself, cast to out_dtype, without a
    scale): mergekit's passthrough."""
    o = PassthroughOptions(scale, out_dtype)
    forms = gather(inputs)
    if len(forms.dicts) != 1:
        raise ValueError(f"passthrough takes exactly one model, got {len(forms.dicts)}")
    coeff = 1.0 if o.scale is None else o.scale
    return forms.wrap(merge_linear(forms, [coeff], None, o.out_dtype, backend, arg="scale"))


def _mergekit_passthrough(call: GroupCall):
    scale = call.per_model[0].get("scale") if call.per_model else None
    return passthrough(call.models, scale, out_dtype=call.out_dtype, backend=call.backend)


def _check_one(models) -> None:
    if len(models) != 1:
        raise opt.ConfigError(f"passthrough takes exactly one model per slice (mergekit's limit), got {len(models)}")


MERGEKIT_PASSTHROUGH = ConfigMethod(
    "passthrough", "mergekit", needs_base=False,
    model_params={"scale": Param("number", None, doc="multiplies the model's tensors (none: copied)")},
    global_params={}, merge=_mergekit_passthrough, check=_check_one,
    doc="one model's tensors, times scale; with slices: stacks layers of several models", blocks=ELEMENTWISE)

PASSTHROUGH = Method(
    "passthrough", passthrough, PassthroughOptions, reference.combine, ("combine",), takes_base=False, n_inputs=1,
    config=(MERGEKIT_PASSTHROUGH,), grid=({}, {"scale": 0.5}, {"scale": -1.25, "out_dtype": torch.bfloat16}))
