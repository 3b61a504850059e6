"""mergekit's methods on fusedmerge's ops, for one group of tensors (state dicts holding the same keys).

Every method works key by key (TIES per tensor, DARE masks keyed by seed, model index and the tensor's
name), so the result of a key does not depend on which other keys share its group — the streaming merge and
every torchrun world size give the same bytes.

    linear           Σ wᵢ·θᵢ / Σ wᵢ                      (without normalize: Σ wᵢ·θᵢ)
    task_arithmetic  θ0 + λ·Σ wᵢ·τᵢ                       (normalize: divided by Σ wᵢ)
    ties             θ0 + λ·Σ wᵢ·τ̂ᵢ·agreeᵢ / Σ wᵢ·agreeᵢ   per-tensor top-density trim, weighted vote, ties to +
    dare_linear      θ0 + λ·Σ wᵢ·rᵢ·keepᵢ⊙τᵢ              keep = density, r keeps each tensor's L1 norm (rescale)
    dare_ties        TIES with DARE's random keep instead of the trim, rescaled by 1/density
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch

from .. import dare, task_arithmetic, ties
from ..linear import weighted_sum
from .config import MergeConfig

StateDict = Dict[str, torch.Tensor]


def merge_group(cfg: MergeConfig, base: Optional[StateDict], models: List[StateDict],
                out_dtype: Optional[torch.dtype], backend: str = "auto") -> StateDict:
    w = [m.weight for m in cfg.models]
    total = math.fsum(w)
    if cfg.normalize and total == 0:
        raise ValueError("normalize: the model weights sum to zero")
    norm = total if cfg.normalize else 1.0
    lam = cfg.params.get("lambda", 1.0)
    if cfg.method == "linear":
        return weighted_sum(models, [x / norm for x in w], out_dtype=out_dtype, backend=backend)
    if cfg.method == "task_arithmetic":
        return task_arithmetic(base, models, lam / norm, weights=w, out_dtype=out_dtype, backend=backend)
    merge = "mean" if cfg.normalize else "sum"
    rescale = cfg.params.get("rescale", True)
    if cfg.method == "ties":
        return ties(base, models, density=cfg.densities, weights=w, scaling=lam, merge=merge,
                    out_dtype=out_dtype, backend=backend)
    if cfg.method == "dare_linear":
        return dare(base, models, 1.0 - cfg.density, weights=w, scaling=lam / norm, rescale="l1" if rescale else False,
                    seed=cfg.seed, out_dtype=out_dtype, backend=backend)
    if cfg.method == "dare_ties":
        return ties(base, models, weights=w, scaling=lam, merge=merge, dare_p=1.0 - cfg.density, rescale=bool(rescale),
                    seed=cfg.seed, out_dtype=out_dtype, backend=backend)
    raise ValueError(f"{cfg.method} does not merge tensor by tensor")
