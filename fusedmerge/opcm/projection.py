"""Batched OPCM projection: a new task vector τ projected away from a merged task vector D's singular
subspace, for a batch of matrices at once.

With D = U Σ Vᵀ (thin: r = min(m, n) singular triplets, σ descending) and P = Uᵀ τ V (r×r)::

    k         = first 0-based i with cumsum(σ)_i / Σσ > α      (0 when there is none, or D = 0)
    M         = diagonal ∪ top-left k×k block  (variant "fusionbench")   |   k×k block only  ("paper")
    projected = τ − U (M ⊙ P) Vᵀ

which is FusionBench's ``u @ P_masked @ v.T`` with full U and V: the entries of P it zeroes all lie in the
thin r×r corner, so the thin factorisation gives the same matrix.

Factorisation: a matrix and a transposed one share a batch (taken as m ≥ n). The Gram matrix G = DᵀD
is formed in fp64 and split by one batched symmetric eigensolver, G = V Σ² Vᵀ; then U = D V Σ⁻¹ in D's dtype.
Squaring the condition number costs nothing in fp64 while σ_i > σ₁·√(m·ε₆₄); singular directions below that
(rank-deficient or zero D) are numerically null: their u_i are undefined in any factorisation, so they get
u_i = 0 and no diagonal removal, and a zero D leaves τ unchanged (the full-SVD reference picks an
arbitrary basis there). Repeated singular values give some orthonormal basis of their subspace, never NaN.

The projection is two batched GEMMs in the task vectors' dtype, with the mask applied in between:
T = τ V; the kept entries of P (its diagonal, u_iᵀ T_i, and its k×k block, U_kᵀ T_k) are gathered into
X = U (M ⊙ P); projected = τ − X Vᵀ. One host sync per chunk (the largest k, to size the block).
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple, Union

import torch

VARIANTS = ("fusionbench", "paper")
CHUNK_BYTES = 512 << 20
"""Scratch memory a batch may use; larger groups of one shape run in chunks of this size."""


def check_alpha(alpha) -> float:
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise TypeError(f"alpha must be a real number in (0, 1], got {alpha!r}") from None
    if not 0.0 < value <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {value}")
    return value


def check_variant(variant) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return variant


def split_rank(s: torch.Tensor, alpha: float) -> torch.Tensor:
    """k per matrix: the first index where the cumulative share of the singular values (descending, last
    dimension) exceeds alpha; 0 when none does (alpha = 1, or all σ = 0). The total is the last cumulative
    sum itself, so a share never rounds above 1 (FusionBench divides by s.sum(), which can)."""
    cumulative = s.cumsum(-1)
    ratio = cumulative / cumulative[..., -1:]
    return (ratio > alpha).to(torch.uint8).argmax(-1)


def eigh(G: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """torch.linalg.eigh of a batch of symmetric matrices; on the CPU one LAPACK call per matrix, since
    torch's batched CPU eigh runs its batch loop's threads around LAPACK's own (measured 2× slower on two
    cores). No host synchronisation either way."""
    if G.device.type != "cpu" or G.dim() == 2 or not G.numel():
        return torch.linalg.eigh(G)
    pairs = [torch.linalg.eigh(g) for g in G.reshape(-1, *G.shape[-2:])]
    return (torch.stack([p[0] for p in pairs]).reshape(G.shape[:-1]),
            torch.stack([p[1] for p in pairs]).reshape(G.shape))


def gram_eigh(D: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Singular values and right singular vectors of a batch (b, m, n), m ≥ n, from the fp64 Gram matrix DᵀD
    and one batched symmetric eigensolver: σ (b, n) descending and V (b, n, n), both fp64, and the mask of
    the directions that are not numerically null (σ_i > σ₁·√(m·ε₆₄), module docstring)."""
    Dd = D.to(torch.float64)
    lam, V = eigh(Dd.mT @ Dd)
    lam, V = lam.flip(-1), V.flip(-1)
    s = lam.clamp_min(0).sqrt()
    live = s > s[..., :1] * (D.shape[-2] * torch.finfo(torch.float64).eps) ** 0.5
    return s, V, live


def factor(D: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of a batch (b, m, n), m ≥ n, through the fp64 Gram matrix: U (b, m, n) and V (b, n, n) in
    D's dtype, σ (b, n) descending in fp64. Numerically null directions have u_i = 0 (module docstring)."""
    s, V, live = gram_eigh(D)
    inv = torch.where(live, 1.0 / torch.where(live, s, 1.0), 0.0)
    V = V.to(D.dtype)
    U = (D @ V) * inv.to(D.dtype).unsqueeze(-2)
    return U, s, V


def _project_chunk(D: torch.Tensor, tau: torch.Tensor, alpha: float, variant: str) -> torch.Tensor:
    """Projection of a batch (b, m, n), m ≥ n, in tau's dtype (fp32 or fp64)."""
    U, s, V = factor(D)
    k = split_rank(s, alpha)
    T = tau @ V
    n = V.shape[-1]
    idx = torch.arange(n, device=tau.device)
    diag = (U * T).sum(-2) if variant == "fusionbench" else torch.zeros_like(s, dtype=tau.dtype)
    in_block = idx < k.unsqueeze(-1)
    X = U * torch.where(in_block, 0.0, diag).unsqueeze(-2)
    kmax = int(k.max()) if k.numel() else 0
    if kmax:
        Uk = U[..., :kmax]
        keep = in_block[..., :kmax]
        block = (Uk.mT @ T[..., :kmax]) * (keep.unsqueeze(-1) & keep.unsqueeze(-2))
        X[..., :kmax] += Uk @ block
    return torch.baddbmm(tau, X, V.mT, alpha=-1)


def _chunks(members: List[int], m: int, n: int) -> List[List[int]]:
    """Split a group so that one chunk's scratch (≈ 40 bytes per element of a matrix) stays in CHUNK_BYTES."""
    step = max(1, CHUNK_BYTES // (40 * m * n))
    return [members[i:i + step] for i in range(0, len(members), step)]


Matrices = Union[torch.Tensor, Sequence[torch.Tensor]]


@torch.no_grad()
def project(merged: Matrices, task: Matrices, alpha: float = 0.5, *, variant: str = "fusionbench"
            ) -> Union[torch.Tensor, List[torch.Tensor]]:
    """OPCM projection of new task vectors `task` against merged task vectors `merged` (module docstring).

    Either two tensors (m, n) or (b, m, n), or two equal-length sequences of 2-D tensors of any shapes
    (pairs of one shape, in either orientation, are batched together). D may be any positive multiple of
    the merged task vector: the projection does not depend on its scale. Returns the projected task
    vectors in the same form, in τ's dtype (fp32 or fp64 arithmetic; 16-bit inputs are computed in fp32).
    """
    alpha, variant = check_alpha(alpha), check_variant(variant)
    if isinstance(merged, torch.Tensor) or isinstance(task, torch.Tensor):
        if not (isinstance(merged, torch.Tensor) and isinstance(task, torch.Tensor)):
            raise TypeError("merged and task must both be tensors or both be sequences of tensors")
        if merged.dim() not in (2, 3):
            raise ValueError(f"merged must be (m, n) or (b, m, n), got shape {tuple(merged.shape)}")
        if merged.dim() == 2:
            return project([merged], [task], alpha, variant=variant)[0]
        return torch.stack(project(list(merged.unbind(0)), list(task.unbind(0)), alpha, variant=variant))
    merged, task = list(merged), list(task)
    if len(merged) != len(task):
        raise ValueError(f"merged has {len(merged)} matrices but task has {len(task)}")
    groups: Dict[tuple, List[int]] = {}
    for i, (d, t) in enumerate(zip(merged, task)):
        check_pair(d, t, f"matrix {i}")
        rows, cols = d.shape
        groups.setdefault((max(rows, cols), min(rows, cols), d.device, work_dtype(t)), []).append(i)
    out: List[torch.Tensor] = [None] * len(task)
    for (_, _, _, dtype), members in groups.items():
        m, n = _tall(task[members[0]]).shape
        for chunk in _chunks(members, m, n):
            D = torch.stack([_tall(merged[i]).to(dtype) for i in chunk])
            tau = torch.stack([_tall(task[i]).to(dtype) for i in chunk])
            result = _project_chunk(D, tau, alpha, variant)
            for j, i in enumerate(chunk):
                p = result[j] if task[i].shape[0] >= task[i].shape[1] else result[j].mT
                out[i] = p.to(task[i].dtype).contiguous()
    return out


def _tall(x: torch.Tensor) -> torch.Tensor:
    return x if x.shape[0] >= x.shape[1] else x.mT


def work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def check_pair(d: torch.Tensor, t: torch.Tensor, label: str) -> None:
    if not (isinstance(d, torch.Tensor) and isinstance(t, torch.Tensor)):
        raise TypeError(f"{label}: expected tensors, got {type(d).__name__} and {type(t).__name__}")
    if d.dim() != 2 or d.shape != t.shape:
        raise ValueError(f"{label}: merged {tuple(d.shape)} and task {tuple(t.shape)} must be matrices of one shape")
    if d.device != t.device:
        raise ValueError(f"{label}: merged is on {d.device}, task on {t.device}")
    if not (d.is_floating_point() and t.is_floating_point()):
        raise TypeError(f"{label}: floating tensors expected, got {d.dtype} and {t.dtype}")
