"""TSV-M, Task Singular Vector merging (arXiv 2412.00081), as FusionBench's TaskSingularVectorMerging
(task_singular_vector/utils/TSVM_utils.py::compute_and_sum_svd_mem_reduction). Per task matrix (m×n,
k = min(m, n), T tasks, r = int(k·(1/T)))::

    τᵢ = Uᵢ Σᵢ Vᵢᵀ (top r triplets)      U_cat = [U₁ … U_T 0] (m×k), V_cat = [V₁ … V_T 0] (n×k), S = [Σ₁ … Σ_T 0]
    Δ = polar(U_cat) · diag(S) · polar(V_catᵀ) = U_cat · (U_catᵀU_cat)^{-1/2} S (V_catᵀV_cat)^{-1/2} · V_catᵀ
    out = θ0 + α·Δ;  other entries θ0 + α·mean(τᵢ)

α a number scales the merged task vector, a list (one per model) each τᵢ before the factorisation. The
polar factors need only the k×k Gram matrices of the concatenations (methods/_svd.py), so per batch there
are three batched eigensolvers: the tasks' n×n Grams and the two k×k ones; Δ is two GEMMs. The result does
not depend on the factorisation's sign choices, so it equals FusionBench's up to rounding wherever that is
defined (top-r subspaces not split inside a repeated singular value, the concatenations of full column rank);
tolerances in tests/test_svd_methods.py and the README.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from .. import options as opt
from ._spec import ConfigMethod, FusionBenchAlgorithm, GroupCall, Method, Param
from ._svd import inv_sqrt, keys_option, merge_matrices, top_triplets
from .svd_reference import tsv_m_reference


@dataclass(frozen=True)
class TsvmOptions:
    alpha: Union[float, Tuple[float, ...]] = opt.option(1.0)
    exclude_keys: Tuple[str, ...] = opt.option(())
    name: str = opt.option("tensor")
    out_dtype: Optional[torch.dtype] = opt.option(None)

    def __post_init__(self):
        alpha = self.alpha
        if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
            alpha = opt.real(alpha, "alpha")
        else:
            alpha = opt.numbers(alpha, "alpha")
            opt.count_weights(alpha, len(alpha), normalise=False, arg="alpha")
        opt.canonical(self, alpha=alpha, exclude_keys=keys_option(self.exclude_keys), name=opt.text(self.name, "name"),
                      out_dtype=opt.out_dtype(self.out_dtype))


def tsvm_batch(taus: torch.Tensor, wide: bool = False) -> torch.Tensor:
    """Δ for a tall batch of task matrices [b, T, m, n] (module docstring): the factors and the k×k core in
    fp64, the last GEMM (well-conditioned factors) in the work dtype."""
    b, t, m, n = taus.shape
    r = int(n * (1 / t))
    U, s, V = top_triplets(taus.to(torch.float64), r)  # [b, T, m, r], [b, T, r], [b, T, n, r]
    pad = n - t * r
    U_cat = torch.cat([U.permute(0, 2, 1, 3).reshape(b, m, t * r), U.new_zeros(b, m, pad)], -1)
    V_cat = torch.cat([V.permute(0, 2, 1, 3).reshape(b, n, t * r), V.new_zeros(b, n, pad)], -1)
    S = torch.cat([s.reshape(b, t * r), s.new_zeros(b, pad)], -1)
    core = (inv_sqrt(U_cat) * S.unsqueeze(-2)) @ inv_sqrt(V_cat)
    return (U_cat @ core).to(taus.dtype) @ V_cat.mT.to(taus.dtype)


@torch.no_grad()
def tsv_m(base, inputs, alpha: Union[float, Tuple[float, ...]] = 1.0, *, exclude_keys=(), name: str = "tensor",
          out_dtype: Optional[torch.dtype] = None, backend: str = "auto"):
    """TSV-M of fine-tuned models onto `base` over tensors (matrices), state dicts or modules (the forms of
    `average`): FusionBench's TaskSingularVectorMerging, every matrix of one shape in one batch; see the
    module docstring. `alpha`: a number scales the merged task vector, a list (one per model) each task
    vector before the factorisation."""
    o = TsvmOptions(alpha, exclude_keys, name, out_dtype)
    per_task = isinstance(o.alpha, tuple)
    if per_task and len(o.alpha) != len(list(inputs)):
        raise ValueError(f"alpha has {len(o.alpha)} entries but there are {len(list(inputs))} models")
    return merge_matrices("tsv_m", base, inputs, tsvm_batch, scaling=1.0 if per_task else o.alpha,
                          weights=o.alpha if per_task else None, exclude_keys=o.exclude_keys, name=o.name,
                          out_dtype=o.out_dtype, backend=backend)


# --- peers --------------------------------------------------------------------------------------------------


def _config_tsv_m(call: GroupCall):
    return tsv_m(call.base, call.models, call.param("alpha", TSVM_CONFIG), name=call.name,
                 out_dtype=call.out_dtype, backend=call.backend)


TSVM_CONFIG = ConfigMethod(
    "tsv_m", None, needs_base=True, model_params={},
    global_params={"alpha": Param("number", 1.0, doc="scales the merged task vector")},
    merge=_config_tsv_m, doc="task singular vectors: each task's top k/T triplets, orthogonalised (TSV-M)")


def _fb_tsv_m(algo, pool):
    """FusionBench's TaskSingularVectorMerging; return_single_task_models=True is refused (not built here)."""
    if algo.return_single_task_models:
        raise ValueError("return_single_task_models=True: fusedmerge returns the merged model only")
    pretrained = pool.pretrained()
    alpha = 1.0 if algo.alpha is None else algo.alpha
    if not isinstance(alpha, (int, float)):
        alpha = list(alpha)
    return tsv_m(pretrained, pool.finetuned(), alpha, exclude_keys=algo.exclude_keys, backend=algo.backend)


TSV_M = Method(
    "tsv_m", tsv_m, TsvmOptions, tsv_m_reference, ("combine",),
    config=(TSVM_CONFIG,),
    fusionbench=(FusionBenchAlgorithm("FusedTaskSingularVectorMerging", "TaskSingularVectorMerging",
                                      (("alpha", None), ("exclude_keys", None), ("return_single_task_models", False)),
                                      _fb_tsv_m, "TSV-M on the batched fp64 Gram eigensolver. A new module."),),
    grid=({"alpha": 0.7, "exclude_keys": ["enc.1.proj.weight"]}, {"alpha": [1.0, 0.5, 2.0]}))
