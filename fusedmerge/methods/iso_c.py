"""Iso-C, isotropic merging in the common subspace (arXiv 2502.04959), as FusionBench's
IsotropicMergingInCommonSubspace (isotropic_merging/iso_utils.py::iso_c). Per task matrix (k = min(m, n))::

    M = Σᵢ τᵢ = U Σ Vᵀ,   Δ = mean(σ)·U Vᵀ = (‖M‖_*/k)·polar(M),   out = θ0 + λ·Δ
    other entries: θ0 + λ·mean(τᵢ)

Factorisation: the polar factor as M·(MᵀM)^{-1/2} from the batched fp64 Gram eigensolver (methods/_svd.py):
Δ = (M V diag(mean(σ)/σᵢ))·Vᵀ, the first GEMM in fp64, the second (well-conditioned factors) in the work
dtype: one eigensolver and two GEMMs per batch. The Gram route rather than Newton–Schulz or QDWH because
task sums are ill-conditioned (low rank plus noise: iterative polar methods need many steps there, and
diverge on rank-deficient sums) while an n×n fp64 eigensolver resolves every direction above σ₁·√(m·ε₆₄),
and it is the same call OPCM and TSV-M use. Numerically null directions of M (rank-deficient or zero sums)
are left out: FusionBench fills them with whatever orthonormal completion LAPACK returns, times mean(σ);
the two agree on M's row and column spaces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .. import options as opt
from ..opcm.projection import gram_eigh
from ._spec import REQUIRED, ConfigMethod, FusionBenchAlgorithm, GroupCall, Method, Param
from ._svd import keys_option, merge_matrices
from .svd_reference import iso_c_reference


@dataclass(frozen=True)
class IsoCOptions:
    scaling: float = opt.option(1.0)
    exclude_keys: Tuple[str, ...] = opt.option(())
    name: str = opt.option("tensor")
    out_dtype: Optional[torch.dtype] = opt.option(None)

    def __post_init__(self):
        opt.canonical(self, scaling=opt.real(self.scaling, "scaling"), exclude_keys=keys_option(self.exclude_keys),
                      name=opt.text(self.name, "name"), out_dtype=opt.out_dtype(self.out_dtype))


def iso_c_batch(taus: torch.Tensor, wide: bool = False) -> torch.Tensor:
    """Δ for a tall batch [b, T, m, n] (module docstring): Q = M V diag(mean σ/σᵢ) in fp64, Δ = Q Vᵀ in the
    work dtype (Q and V are well-conditioned, so that GEMM loses nothing)."""
    M = taus.sum(1).to(torch.float64)
    s, V, live = gram_eigh(M)
    mean = s.sum(-1, keepdim=True) / s.shape[-1]
    scale = torch.where(live, mean / torch.where(live, s, 1.0), 0.0)
    return ((M @ V) * scale.unsqueeze(-2)).to(taus.dtype) @ V.mT.to(taus.dtype)


@torch.no_grad()
def iso_c(base, inputs, scaling: float = 1.0, *, exclude_keys=(), name: str = "tensor",
          out_dtype: Optional[torch.dtype] = None, backend: str = "auto"):
    """Iso-C of fine-tuned models onto `base` over tensors (matrices), state dicts or modules (the forms of
    `average`): each summed task matrix with its spectrum flattened to the mean singular value, every
    matrix of one shape in one batch; see the module docstring."""
    o = IsoCOptions(scaling, exclude_keys, name, out_dtype)
    return merge_matrices("iso_c", base, inputs, iso_c_batch, scaling=o.scaling, exclude_keys=o.exclude_keys,
                          name=o.name, out_dtype=o.out_dtype, backend=backend)


# --- peers --------------------------------------------------------------------------------------------------


def _config_iso_c(call: GroupCall):
    return iso_c(call.base, call.models, call.param("scaling_factor", ISO_C_CONFIG), name=call.name,
                 out_dtype=call.out_dtype, backend=call.backend)


ISO_C_CONFIG = ConfigMethod(
    "iso_c", None, needs_base=True, model_params={},
    global_params={"scaling_factor": Param("number", 1.0, doc="λ, scales the merged task vector")},
    merge=_config_iso_c, doc="isotropic merge: Σ τᵢ with its singular values flattened to their mean (Iso-C)")


def _fb_iso_c(algo, pool):
    return iso_c(pool.pretrained(), pool.finetuned(), algo.scaling_factor, exclude_keys=algo.exclude_keys,
                 backend=algo.backend)


ISO_C = Method(
    "iso_c", iso_c, IsoCOptions, iso_c_reference, ("combine",),
    config=(ISO_C_CONFIG,),
    fusionbench=(FusionBenchAlgorithm("FusedIsoC", "IsotropicMergingInCommonSubspace",
                                      (("scaling_factor", REQUIRED), ("exclude_keys", None)), _fb_iso_c,
                                      "Iso-C through the batched fp64 Gram eigensolver. A new module."),),
    grid=({}, {"scaling": 0.4, "exclude_keys": ["enc.0.fc.weight"]}))
