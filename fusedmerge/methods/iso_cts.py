"""Iso-CTS, isotropic merging in common and task-specific subspaces (arXiv 2502.04959), as FusionBench's
IsotropicMergingInCommonAndTaskSubspace (isotropic_merging/iso_utils.py::iso_cts). Per task matrix
(m×n, k = min(m, n), T tasks, f = common_space_fraction; c, s as FusionBench splits k: c + T·s = k)::

    M = Σᵢ τᵢ = U Σ Vᵀ;  common: U_c, Σ_c, V_c (first c)
    wᵢ = τᵢ − U_c U_cᵀ τᵢ;  task i: the top s triplets of wᵢ
    U_all = [u₁ … u_T U_c] (m×k), V_all = [v₁ … v_T V_c] (n×k), S_all likewise
    Δ = mean(S_all) · polar(U_all) · polar(V_allᵀ),  out = θ0 + λ·Δ;  other entries θ0 + λ·mean(τᵢ)

Batched (methods/_svd.py): M's Gram eigensolver gives V (and U_c = M V_c Σ_c⁻¹). When the projected side
(U's, the rows) is the short side, wᵢ = τᵢ V⊥V⊥ᵀ in tall orientation and the task factorisations shrink to
(k − c)×(k − c) Grams of τᵢV⊥; otherwise they are n×n Grams of wᵢ. U_c and V_c are orthonormal, so each
polar factor is a low-rank update of the identity's (``polar_with_frame``): an eigensolver of size
T·s + min(c, T·s), not k. Everything but the last GEMM (well-conditioned factors) runs in fp64. A fraction
so small that FusionBench's split gives c < 0 is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .. import options as opt
from ..opcm.projection import gram_eigh
from ._spec import REQUIRED, ConfigMethod, FusionBenchAlgorithm, GroupCall, Method, Param
from ._svd import keys_option, merge_matrices, polar_with_frame, top_triplets
from .svd_reference import iso_cts_reference, iso_cts_split


@dataclass(frozen=True)
class IsoCtsOptions:
    scaling: float = opt.option(1.0)
    common_space_fraction: float = opt.option(0.8)
    exclude_keys: Tuple[str, ...] = opt.option(())
    name: str = opt.option("tensor")
    out_dtype: Optional[torch.dtype] = opt.option(None)

    def __post_init__(self):
        f = opt.real(self.common_space_fraction, "common_space_fraction")
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"common_space_fraction must be in [0, 1], got {f}")
        opt.canonical(self, scaling=opt.real(self.scaling, "scaling"), common_space_fraction=f,
                      exclude_keys=keys_option(self.exclude_keys), name=opt.text(self.name, "name"),
                      out_dtype=opt.out_dtype(self.out_dtype))


def iso_cts_batch(fraction: float):
    def batch(taus: torch.Tensor, wide: bool) -> torch.Tensor:
        """Δ for a tall batch [b, T, m, n]; `wide`: the rows (the projected side) are the short side."""
        b, t, m, n = taus.shape
        c, sd = iso_cts_split(n, t, fraction)
        dt, taus = taus.dtype, taus.to(torch.float64)
        M = taus.sum(1)
        s, V, live = gram_eigh(M)
        inv = torch.where(live[..., :c], 1.0 / torch.where(live[..., :c], s[..., :c], 1.0), 0.0)
        Uc = (M @ V[..., :c]) * inv.unsqueeze(-2)
        if wide:
            Vp = V[..., c:]
            Ut, st, Y = top_triplets(taus @ Vp.unsqueeze(1), sd)
            Vt = Vp.unsqueeze(1) @ Y
        else:
            Ut, st, Vt = top_triplets(taus - Uc.unsqueeze(1) @ (Uc.mT.unsqueeze(1) @ taus), sd)
        Pu = torch.cat(polar_with_frame(Ut.permute(0, 2, 1, 3).reshape(b, m, t * sd), Uc), -1)
        Pv = torch.cat(polar_with_frame(Vt.permute(0, 2, 1, 3).reshape(b, n, t * sd), V[..., :c]), -1)
        mean = (st.sum((1, 2)) + s[..., :c].sum(-1)) / n
        return (Pu * mean[:, None, None]).to(dt) @ Pv.mT.to(dt)

    return batch


@torch.no_grad()
def iso_cts(base, inputs, scaling: float = 1.0, *, common_space_fraction: float = 0.8, exclude_keys=(),
            name: str = "tensor", out_dtype: Optional[torch.dtype] = None, backend: str = "auto"):
    """Iso-CTS of fine-tuned models onto `base` over tensors (matrices), state dicts or modules (the forms of
    `average`): common subspace of the summed task matrix plus each task's leading residual directions,
    orthogonalised, isotropic; every matrix of one shape in one batch; see the module docstring."""
    o = IsoCtsOptions(scaling, common_space_fraction, exclude_keys, name, out_dtype)
    return merge_matrices("iso_cts", base, inputs, iso_cts_batch(o.common_space_fraction), scaling=o.scaling,
                          exclude_keys=o.exclude_keys, name=o.name, out_dtype=o.out_dtype, backend=backend)


# --- peers --------------------------------------------------------------------------------------------------


def _config_iso_cts(call: GroupCall):
    c = ISO_CTS_CONFIG
    return iso_cts(call.base, call.models, call.param("scaling_factor", c),
                   common_space_fraction=call.param("common_space_fraction", c), name=call.name,
                   out_dtype=call.out_dtype, backend=call.backend)


ISO_CTS_CONFIG = ConfigMethod(
    "iso_cts", None, needs_base=True, model_params={},
    global_params={"scaling_factor": Param("number", 1.0, doc="λ, scales the merged task vector"),
                   "common_space_fraction": Param("fraction", 0.8, doc="share of directions in the common subspace")},
    merge=_config_iso_cts, doc="isotropic merge in common and task-specific subspaces (Iso-CTS)")


def _fb_iso_cts(algo, pool):
    return iso_cts(pool.pretrained(), pool.finetuned(), algo.scaling_factor,
                   common_space_fraction=algo.common_space_fraction, exclude_keys=algo.exclude_keys,
                   backend=algo.backend)


ISO_CTS = Method(
    "iso_cts", iso_cts, IsoCtsOptions, iso_cts_reference, ("combine",),
    config=(ISO_CTS_CONFIG,),
    fusionbench=(FusionBenchAlgorithm("FusedIsoCTS", "IsotropicMergingInCommonAndTaskSubspace",
                                      (("scaling_factor", REQUIRED), ("common_space_fraction", REQUIRED),
                                       ("exclude_keys", None)), _fb_iso_cts,
                                      "Iso-CTS through the batched fp64 Gram eigensolver. A new module."),),
    grid=({}, {"scaling": 0.5, "common_space_fraction": 0.5}))
