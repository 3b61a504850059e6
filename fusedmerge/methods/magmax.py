"""MagMax (arXiv 2407.06322), as FusionBench's MagMaxAlgorithm (magmax/magmax.py): per entry, the task
vector of largest magnitude, folding in model order with ``>=`` (a later model wins ties)::

    τ_max = τ₁;  τ_max ← where(|τᵢ| ≥ |τ_max|, τᵢ, τ_max)  for i = 2..T;   out = θ0 + λ·τ_max

τᵢ = xᵢ − θ0 in the models' dtype, as FusionBench; θ0 + λ·τ_max is one fused launch (accumulated in fp32,
rounded once: for fp32 models exactly FusionBench's result, tested). Integer entries are the base's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from .. import dispatch
from .. import options as opt
from .._forms import gather, gather_like, prepare
from ..reference import CombineJob
from ._spec import ConfigMethod, FusionBenchAlgorithm, GroupCall, Method, Param
from .svd_reference import magmax_reference


@dataclass(frozen=True)
class MagMaxOptions:
    scaling: float = opt.option(0.5)
    name: str = opt.option("tensor")
    out_dtype: Optional[torch.dtype] = opt.option(None)

    def __post_init__(self):
        opt.canonical(self, scaling=opt.real(self.scaling, "scaling"), name=opt.text(self.name, "name"),
                      out_dtype=opt.out_dtype(self.out_dtype))


def select(base: torch.Tensor, inputs: List[torch.Tensor]) -> torch.Tensor:
    """τ_max of one entry (module docstring)."""
    best = inputs[0] - base
    for x in inputs[1:]:
        tau = x - base
        best = torch.where(tau.abs() >= best.abs(), tau, best)
    return best


@torch.no_grad()
def magmax(base, inputs, scaling: float = 0.5, *, name: str = "tensor", out_dtype: Optional[torch.dtype] = None,
           backend: str = "auto"):
    """MagMax of fine-tuned models onto `base` over tensors, state dicts or modules (the forms of `average`):
    per entry the task vector of largest magnitude (later models win ties), θ0 + scaling·τ_max."""
    o = MagMaxOptions(scaling, name, out_dtype)
    forms = gather(inputs, name=o.name)
    merged, slots = prepare(forms, gather_like(base, forms, "base"), o.out_dtype)
    jobs: Dict[torch.device, List[CombineJob]] = {}
    for slot in slots:
        if slot.out.numel():
            job = CombineJob(slot.out, [select(slot.base, slot.inputs), slot.base], [o.scaling, 1.0])
            jobs.setdefault(slot.out.device, []).append(job)
    for device_jobs in jobs.values():
        dispatch.run("combine", device_jobs, backend)
    return forms.wrap(merged)


# --- peers --------------------------------------------------------------------------------------------------


def _config_magmax(call: GroupCall):
    return magmax(call.base, call.models, call.param("scaling_factor", MAGMAX_CONFIG), name=call.name,
                  out_dtype=call.out_dtype, backend=call.backend)


MAGMAX_CONFIG = ConfigMethod(
    "magmax", None, needs_base=True, model_params={},
    global_params={"scaling_factor": Param("number", 0.5, doc="λ, scales the selected task vector")},
    merge=_config_magmax, doc="per entry the task vector of largest magnitude (MagMax)")


def _fb_magmax(algo, pool):
    """FusionBench's MagMaxAlgorithm: inplace=True writes the result into the pretrained model it loaded."""
    pretrained = pool.pretrained()
    merged = magmax(pretrained.state_dict(), [m.state_dict() for m in pool.finetuned()], algo.scaling_factor,
                    backend=algo.backend)
    if algo.inplace:
        pretrained.load_state_dict(merged)
        return pretrained
    return pool.with_state(pretrained, merged)


MAGMAX = Method(
    "magmax", magmax, MagMaxOptions, magmax_reference, ("combine",),
    config=(MAGMAX_CONFIG,),
    fusionbench=(FusionBenchAlgorithm("FusedMagMax", "MagMaxAlgorithm", (("scaling_factor", 0.5), ("inplace", True)),
                                      _fb_magmax, "MagMax, one fused launch for θ0 + λ·τ_max."),),
    grid=({}, {"scaling": 1.0, "out_dtype": torch.float32}))
