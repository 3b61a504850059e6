"""References of TSV-M, Iso-C, Iso-CTS, WUDI and MagMax: FusionBench 0.2.33's algorithms in plain torch,
key by key, one torch.linalg.svd per matrix and task as FusionBench runs them (task_singular_vector/utils/
TSVM_utils.py, isotropic_merging/iso_utils.py, wudi/wudi.py, magmax/magmax.py), on state dicts: base θ0
and fine-tuned models → θ0 + λ·Δ in the models' dtype. Integer entries are the base's. The fused methods
must agree with these within the tolerances of tests/test_svd_methods.py.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Union

import torch

StateDict = Dict[str, torch.Tensor]


def _polar(a: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    return u @ vh


def _mean(tvs: List[torch.Tensor]) -> torch.Tensor:
    out = tvs[0].clone()
    for i, v in enumerate(tvs[1:], 1):
        out += (v - out) / (i + 1)
    return out


def _merge(base: StateDict, models: Sequence[StateDict], matrix, other, scaling: float, exclude,
           weights=None) -> StateDict:
    out = {}
    for key, b in base.items():
        if not b.is_floating_point():
            out[key] = b.clone()
            continue
        tvs = [m[key] - b for m in models]
        tvs = tvs if weights is None else [v * w for v, w in zip(tvs, weights)]
        delta = matrix(tvs) if b.dim() == 2 and key not in set(exclude) else other(tvs)
        out[key] = b + scaling * delta.to(b.dtype)
    return out


@torch.no_grad()
def tsv_m_reference(base: StateDict, models: Sequence[StateDict], alpha: Union[float, Sequence[float]] = 1.0,
                    exclude_keys=()) -> StateDict:
    per_task = not isinstance(alpha, (int, float))

    def matrix(tvs):
        t = len(tvs)
        vecs = [v if v.dtype in (torch.float32, torch.float64) else v.float() for v in tvs]
        u_cat, s_cat, vh_cat = None, None, None
        for i, v in enumerate(vecs):
            u, s, vh = torch.linalg.svd(v, full_matrices=False)
            if i == 0:
                u_cat, s_cat, vh_cat = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(vh)
            r = int(s.shape[0] * (1 / t))
            u_cat[:, i * r:(i + 1) * r] = u[:, :r]
            s_cat[i * r:(i + 1) * r] = s[:r]
            vh_cat[i * r:(i + 1) * r, :] = vh[:r, :]
        uu, _, vhu = torch.linalg.svd(u_cat, full_matrices=False)
        uv, _, vhv = torch.linalg.svd(vh_cat, full_matrices=False)
        return torch.linalg.multi_dot((uu, vhu, torch.diag(s_cat), uv, vhv))

    return _merge(base, models, matrix, _mean, 1.0 if per_task else alpha, exclude_keys,
                  list(alpha) if per_task else None)


@torch.no_grad()
def iso_c_reference(base: StateDict, models: Sequence[StateDict], scaling: float = 1.0, exclude_keys=()) -> StateDict:
    def matrix(tvs):
        u, s, vh = torch.linalg.svd(sum(tvs) / len(tvs) * len(tvs), full_matrices=False)
        return torch.linalg.multi_dot((u, torch.diag(torch.ones_like(s) * s.mean()), vh))

    return _merge(base, models, matrix, lambda tvs: sum(tvs) / len(tvs), scaling, exclude_keys)


def iso_cts_split(k: int, t: int, fraction: float, key: str = "tensor"):
    """FusionBench's dimension split of Iso-CTS: (c, s), c common directions and s per task, c + t·s = k."""
    c0 = int(k * fraction)
    c = k - round((k - c0) / t) * t
    if c < 0:
        raise ValueError(f"common_space_fraction={fraction}: key {key!r} (k = {k}, {t} models) leaves no common "
                         f"subspace (FusionBench's split gives {c} directions); use a larger fraction")
    return c, int((k - c) / t)


@torch.no_grad()
def iso_cts_reference(base: StateDict, models: Sequence[StateDict], scaling: float = 1.0,
                      common_space_fraction: float = 0.8, exclude_keys=()) -> StateDict:
    def matrix(tvs):
        t = len(tvs)
        c, s_dim = iso_cts_split(min(tvs[0].shape), t, common_space_fraction)
        u, s, vh = torch.linalg.svd(sum(tvs), full_matrices=False)
        uc, sc, vc = u[:, :c], s[:c], vh[:c, :]
        U, S, V = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(vh)
        for i, w in enumerate(tvs):
            ui, si, vi = torch.linalg.svd(w - uc @ uc.T @ w, full_matrices=False)
            U[:, i * s_dim:(i + 1) * s_dim], S[i * s_dim:(i + 1) * s_dim] = ui[:, :s_dim], si[:s_dim]
            V[i * s_dim:(i + 1) * s_dim, :] = vi[:s_dim, :]
        U[:, t * s_dim:t * s_dim + c], S[t * s_dim:t * s_dim + c], V[t * s_dim:t * s_dim + c, :] = uc, sc, vc
        return torch.linalg.multi_dot((_polar(U), torch.diag(torch.ones_like(S) * S.mean()), _polar(V)))

    return _merge(base, models, matrix, _mean, scaling, exclude_keys)


def wudi_reference(base: StateDict, models: Sequence[StateDict], iter_num: int = 400, exclude_keys=()) -> StateDict:
    def matrix(tvs):
        tvs = torch.stack(tvs)
        merged = torch.nn.Parameter(tvs.sum(0))
        optimizer = torch.optim.Adam([merged], lr=1e-5, weight_decay=0)
        norms = torch.linalg.vector_norm(tvs.reshape(len(tvs), -1), dim=-1).square()
        for _ in range(iter_num):
            with torch.enable_grad():
                loss = (((merged.unsqueeze(0) - tvs) @ tvs.mT).square() / norms[:, None, None]).sum()
                optimizer.zero_grad()
                loss.backward()
            optimizer.step()
        return merged.detach()

    with torch.no_grad():
        return _merge(base, models, matrix, lambda tvs: sum(tvs) / len(tvs), 1.0, exclude_keys)


@torch.no_grad()
def magmax_reference(base: StateDict, models: Sequence[StateDict], scaling: float = 0.5) -> StateDict:
    def select(tvs):
        out = tvs[0].clone()
        for v in tvs[1:]:
            out = torch.where(v.abs() >= out.abs(), v, out)
        return out

    return _merge(base, models, select, select, scaling, ())
