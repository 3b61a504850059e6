"""Task arithmetic: out = θ0 + Σ (λ·wᵢ)·(θᵢ − θ0), one fused linear combination per state dict.

wᵢ = 1 by default and not normalised (λ carries any 1/N, as in FusionBench). The result is
reference.combine_reference. Peers: FusionBench's TaskArithmeticAlgorithm (in place into the pretrained
model by default), mergekit's ``task_arithmetic`` (``lambda``, ``normalize`` dividing by Σ wᵢ).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .. import options as opt
from .. import reference
from .._forms import gather, gather_like, merge_linear
from ._spec import ELEMENTWISE, REQUIRED, ConfigMethod, FusionBenchAlgorithm, GroupCall, Method, Param


@dataclass(frozen=True)
class TaskArithmeticOptions:
    scaling: float = opt.option(1.0, op=float)
    weights: Optional[Tuple[float, ...]] = opt.option(None, op=Optional[List[float]])
    out_dtype: Optional[torch.dtype] = opt.option(None, op=Optional[torch.dtype])

    def __post_init__(self):
        opt.canonical(self, scaling=opt.real(self.scaling, "scaling"),
                      weights=opt.optional_numbers(self.weights, "weights"), out_dtype=opt.out_dtype(self.out_dtype))


def task_arithmetic(base, inputs, scaling: float = 1.0, *, weights: Optional[Sequence[float]] = None,
                    out_dtype: Optional[torch.dtype] = None, out=None, backend: str = "auto"):
    """Task arithmetic θ0 + λ·Σ w_i·(θ_i − θ0) over tensors, state dicts or modules (w_i = 1 by default,
    not normalised: λ carries any 1/N, as in FusionBench). `out` as in `average`."""
    o = TaskArithmeticOptions(scaling, weights, out_dtype)
    forms = gather(inputs)
    base_dict = gather_like(base, forms, "base")
    coeffs = [o.scaling * w for w in opt.count_weights(o.weights, len(forms.dicts), normalise=False)]
    out_dict = gather_like(out, forms, "out") if out is not None else None
    return forms.wrap(merge_linear(forms, coeffs, base_dict, o.out_dtype, backend, out_dict, "scaling·weights"), out)


# --- peers --------------------------------------------------------------------------------------------------


def mergekit_divisor(weights: Sequence[float], normalize: bool) -> float:
    """What mergekit's generalized task arithmetic divides the mixed delta by: Σ wᵢ when `normalize`, with a
    sum within 1e-8 of zero taken as 1 (generalized_task_arithmetic.py), else 1."""
    total = math.fsum(weights)
    return total if normalize and abs(total) >= 1e-8 else 1.0


GTA_PARAMS = {"lambda": Param("number", 1.0, doc="λ, scales the merged task vector"),
              "normalize": Param("bool", False, doc="divide by Σ wᵢ"),
              "int8_mask": Param("bool", False, doc="mergekit's mask storage; no effect on the result")}


def _mergekit_task_arithmetic(call: GroupCall):
    method = MERGEKIT_TASK_ARITHMETIC
    lam = call.param("lambda", method) / mergekit_divisor(call.weights, call.param("normalize", method))
    return task_arithmetic(call.base, call.models, lam, weights=call.weights, out_dtype=call.out_dtype,
                           backend=call.backend)


MERGEKIT_TASK_ARITHMETIC = ConfigMethod(
    "task_arithmetic", "mergekit", needs_base=True, model_params={"weight": Param("number", REQUIRED, doc="wᵢ")},
    global_params={**GTA_PARAMS, "rescale": Param("bool", False, doc="no effect: task_arithmetic trims nothing")},
    merge=_mergekit_task_arithmetic,
    doc="θ0 + λ·Σ wᵢ·τᵢ", blocks=ELEMENTWISE)


def _fb_task_arithmetic(algo, pool):
    pretrained = pool.pretrained()
    return task_arithmetic(pretrained, pool.finetuned(), algo.scaling_factor,
                           out=pretrained if algo.inplace else None, backend=algo.backend)


TASK_ARITHMETIC = Method(
    "task_arithmetic", task_arithmetic, TaskArithmeticOptions, reference.combine, ("combine",),
    config=(MERGEKIT_TASK_ARITHMETIC,),
    fusionbench=(FusionBenchAlgorithm("FusedTaskArithmetic", "TaskArithmeticAlgorithm",
                                      (("scaling_factor", REQUIRED), ("inplace", True)), _fb_task_arithmetic,
                                      "θ0 + λ·Σ τᵢ; inplace=True writes it into the pretrained model."),),
    grid=({"scaling": 0.3}, {"scaling": 0.7, "weights": [1.0, -0.5, 2.0], "out_dtype": torch.float32}))
