"""The OPCM reference: FusionBench's OPCMForCLIP loop in plain torch, one full SVD per matrix per step.

Per step t ≥ 2, with λ_{t−1} the previous scale (1 after step 1) and norms ‖τ_i‖ (L2 over every floating
entry of the state dict)::

    projectable W:  D = W_merged − W0, τ = W_t − W0, U,σ,V = svd(D, full_matrices=True)
                    P = Uᵀ τ V, zero P's diagonal ("fusionbench" variant) and its k×k block, W' = W0 + λ_{t−1}·D + U P Vᵀ
    other entries:  W' = W0 + λ_{t−1}·(W_merged − W0) + τ
    λ_t = ‖W' − W0‖ / mean‖τ_i‖;   W_merged = W0 + (W' − W0)·(mean‖τ_i‖ / ‖W' − W0‖)

which keeps the merged task vector's norm at the mean of the task vectors' norms. The fused merger
(merger.py) computes the same thing as θ0 + S·mean‖τ_i‖/‖S‖ with S the running sum of projected task
vectors, and must agree within the tolerance stated in the tests. Everything here runs in the models'
dtype, as FusionBench does.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Iterator

import torch

from .projection import check_alpha, check_variant, split_rank

StateDict = Dict[str, torch.Tensor]


def project_reference(D: torch.Tensor, tau: torch.Tensor, alpha: float, variant: str = "fusionbench") -> torch.Tensor:
    """FusionBench's merge_linear_weights projection of one matrix (full SVD, its order of operations)."""
    u, s, vh = torch.linalg.svd(D, full_matrices=True, driver="gesvd" if D.is_cuda else None)
    v = vh.T
    k = int(split_rank(s, alpha))
    P = u.T @ tau @ v
    if variant == "fusionbench":
        P.diagonal().fill_(0)
    P[:k, :k] = 0
    return u @ P @ v.T


def _norm(base: StateDict, model: StateDict) -> float:
    """‖model − base‖ over every floating entry, as one flattened vector (FusionBench's task-vector norm)."""
    diffs = [(model[k] - base[k]).reshape(-1) for k in base if base[k].is_floating_point()]
    return float(torch.linalg.vector_norm(torch.cat(diffs)))


@torch.no_grad()
def opcm_reference(base: StateDict, models: Iterable[StateDict], alpha: float = 0.5, *,
                   variant: str = "fusionbench", projectable: Callable[[str], bool],
                   frozen: Callable[[str], bool] = lambda key: False) -> Iterator[StateDict]:
    """Yields the merged state dict after each model. `projectable(key)` selects the matrices to project;
    `frozen(key)` the entries never updated after step 1 (FusionBench's non-leaf-module quirk)."""
    alpha, variant = check_alpha(alpha), check_variant(variant)
    models = iter(models)
    merged = {k: v.clone() for k, v in next(models).items()}
    norms = [_norm(base, merged)]
    yield dict(merged)
    lam_prev = 1.0
    for model in models:
        norms.append(_norm(base, model))
        mean = sum(norms) / len(norms)
        for key, w0 in base.items():
            if not w0.is_floating_point() or frozen(key):
                continue
            prev = merged[key] - w0
            tau = model[key] - w0
            update = project_reference(prev, tau, alpha, variant) if projectable(key) else tau
            merged[key] = w0 + (lam_prev * prev + update)
        norm = _norm(base, merged)
        for key, w0 in base.items():
            if w0.is_floating_point():
                merged[key] = w0 + (merged[key] - w0) * (mean / norm)
        lam_prev = norm / mean
        yield dict(merged)  # entries are replaced, never written in place: earlier results stay valid
