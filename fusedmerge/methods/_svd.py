"""What the singular-vector merges (TSV-M, Iso-C, Iso-CTS) and WUDI share: the walk over a model's matrices
in batches of one shape, and the batched factorisations.

Walk (``merge_matrices``): every floating 2-D entry not in ``exclude_keys`` is a task matrix; the others get
θ0 + λ·mean(wᵢτᵢ) in one fused launch (FusionBench's running mean, up to rounding). Matrices of one shape
(across layers) and all their T task vectors τᵢ = wᵢ(xᵢ − θ0), in fp32 (fp64 for fp64 models), form one
batch [b, T, m, n] (chunked to CHUNK_BYTES); a method turns it into merged task matrices Δ [b, m, n], and
θ0 + λ·Δ is one fused launch per batch (``dispatch.run("combine")``). The methods whose result does not
change under transposition get their batches tall (m ≥ n, wide ones transposed), so that every Gram matrix
is n×n on the short side: thin factors only, never an m×m one.

Factorisation (shared with OPCM, fusedmerge.opcm.projection.gram_eigh): σ and V from one batched fp64
symmetric eigensolver of the fp64 Gram matrix XᵀX, then U = X V Σ⁻¹ in fp64 for the columns a method
needs; only the last GEMM of a method, between well-conditioned factors, runs in the work dtype (forming
U or the polar product in fp32 loses up to ε₃₂·κ, ten times FusionBench's own fp32 error on CLIP-like
task vectors). fp64 makes the squared condition number harmless (σᵢ ≥ σ₁·√(m·ε₆₄) are resolved); below that
a direction is numerically null: its singular vectors are arbitrary in every factorisation (LAPACK returns
some completion), so here uᵢ = 0 and it contributes nothing. Polar factors (the orthogonalisation TSV-M and
Iso-CTS apply to concatenated singular vectors) are A·(AᵀA)^{+1/2}, the pseudo-inverse square root from one
more batched fp64 eigensolver of the k×k Gram, directions with σ ≤ σ_max·√(k·ε₆₄) dropped (what the fp64
Gram cannot tell from 0; a rule in ε₃₂ would drop real directions: the concatenated singular vectors of
TSV-M on a square CLIP-ViT matrix, 8 tasks, have condition numbers ~10⁴); where one block is orthonormal
(Iso-CTS), a low-rank update needs only a small eigensolver (``polar_with_frame``). No host
synchronisation inside a batch.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import dispatch
from .._forms import Slot, gather, gather_like, prepare
from ..opcm.projection import eigh, gram_eigh
from ..reference import CombineJob

CHUNK_BYTES = 128 << 20
"""Scratch memory a batch may use; larger groups of one shape run in chunks of this size."""

Batch = Callable[[torch.Tensor, bool], torch.Tensor]


def keys_option(value, arg: str = "exclude_keys") -> Tuple[str, ...]:
    """A sequence of key names (None: none), as a tuple."""
    if value is None:
        return ()
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{arg} must be a sequence of key names, got {value!r}")
    keys = tuple(value)
    bad = [k for k in keys if not isinstance(k, str)]
    if bad:
        raise TypeError(f"{arg} must hold key names (strings), got {bad[:4]!r}")
    return keys


def work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def top_triplets(X: torch.Tensor, r: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The r leading singular triplets of a batch (..., m, n), m ≥ n: U (..., m, r) in X's dtype, σ (..., r)
    and V (..., n, r) in fp64; numerically null directions have u = 0 (their σ is ~0)."""
    s, V, live = gram_eigh(X)
    s, V, live = s[..., :r], V[..., :r], live[..., :r]
    inv = torch.where(live, 1.0 / torch.where(live, s, 1.0), 0.0)
    U = (X @ V.to(X.dtype)) * inv.to(X.dtype).unsqueeze(-2)
    return U, s, V


def _pinv_sqrt(G: torch.Tensor) -> torch.Tensor:
    """G^{+1/2} in fp64 for a batch of symmetric positive semi-definite fp64 matrices (..., k, k): eigenvalues
    at or below λ_max·k·ε₆₄ (what an fp64 Gram matrix cannot resolve from 0) count as 0."""
    lam, W = eigh(G)
    live = lam > lam.amax(-1, keepdim=True).clamp_min(0) * (G.shape[-1] * torch.finfo(torch.float64).eps)
    d = torch.where(live, torch.where(live, lam, 1.0).rsqrt(), 0.0)
    return (W * d.unsqueeze(-2)) @ W.mT


def inv_sqrt(A: torch.Tensor) -> torch.Tensor:
    """(AᵀA)^{+1/2} in fp64 for a batch (..., p, k): A·inv_sqrt(A) is A's polar factor (U Vᵀ of its thin SVD)
    on A's numerically live directions (σᵢ > σ₁·√(k·ε₆₄)), 0 on the rest. FusionBench keeps every direction:
    the two agree wherever its result is defined (a direction below that is rounding in any factorisation)."""
    Ad = A.to(torch.float64)
    return _pinv_sqrt(Ad.mT @ Ad)


def polar_with_frame(B: torch.Tensor, F: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The polar factor of [B F] (B (..., p, t) any, F (..., p, c) orthonormal columns or zero ones), split as
    (its first t columns, its last c), in fp64, on the live directions as ``inv_sqrt``. Its Gram matrix is
    I + P Z Pᵀ with P = diag(I_t, Q) orthonormal, FᵀB = Q R (thin QR) and Z = [[BᵀB − I, Rᵀ], [R, 0]], so
    (Gram)^{+1/2} = I + P((I + Z)^{+1/2} − I)Pᵀ: one eigensolver of size t + min(c, t) instead of t + c.
    (A zero column of F adds a zero row and column to the true Gram matrix where this one has 1: the polar
    factor is the same, zero on it.)"""
    B, F = B.to(torch.float64), F.to(torch.float64)
    t = B.shape[-1]
    Q, R = torch.linalg.qr(F.mT @ B)
    q = R.shape[-2]
    Z = B.new_zeros(*B.shape[:-2], t + q, t + q)
    Z[..., :t, :t] = B.mT @ B
    Z[..., t:, :t] = R
    Z[..., :t, t:] = R.mT
    Z[..., t:, t:] = torch.eye(q, dtype=B.dtype, device=B.device)
    Y = torch.cat([B, F @ Q], -1) @ (_pinv_sqrt(Z) - torch.eye(t + q, dtype=B.dtype, device=B.device))
    return B + Y[..., :t], F + Y[..., t:] @ Q.mT


def check_matrix_inputs(method: str, forms, exclude: Sequence[str]) -> None:
    """A tensor given alone must be a matrix (these methods factorise matrices); excluded keys must exist."""
    if forms.kind == "tensor" and forms.dicts[0][forms.name].dim() != 2:
        raise ValueError(f"{method} on tensors needs matrices (2-D), got shape "
                         f"{tuple(forms.dicts[0][forms.name].shape)}; pass state dicts to merge other entries "
                         "(they get the mean task vector, as in FusionBench)")
    unknown = [k for k in exclude if k not in forms.dicts[0]]
    if unknown:
        raise ValueError(f"exclude_keys names keys the models do not have: {unknown[:8]}")


def _chunks(members: List[Slot], per_layer: int) -> List[List[Slot]]:
    step = max(1, CHUNK_BYTES // max(per_layer, 1))
    return [members[i:i + step] for i in range(0, len(members), step)]


@torch.no_grad()
def merge_matrices(method: str, base, inputs, batch: Batch, *, scaling: float = 1.0,
                   weights: Optional[Sequence[float]] = None, exclude_keys: Sequence[str] = (),
                   name: str = "tensor", out_dtype=None, backend: str = "auto", tall: bool = True,
                   min_inputs: int = 1):
    """θ0 + scaling·Δ for every task matrix, Δ = batch(τ [b, T, m, n], wide) per group of one shape (tall:
    wide matrices transposed first, `wide` tells the method which ones it got), and θ0 + scaling·mean(wᵢτᵢ)
    for every other floating entry. `weights` wᵢ scale each task vector first (default 1)."""
    forms = gather(inputs, name=name)
    if len(forms.dicts) < min_inputs:
        raise ValueError(f"{method} needs at least {min_inputs} fine-tuned models besides the base; inputs has "
                         f"{len(forms.dicts)}")
    check_matrix_inputs(method, forms, exclude_keys)
    base_dict = gather_like(base, forms, "base")
    merged, slots = prepare(forms, base_dict, out_dtype)
    n = len(forms.dicts)
    w = [1.0] * n if weights is None else list(weights)
    if len(w) != n:
        raise ValueError(f"{method}: {len(w)} task weights for {n} models")
    skip = set(exclude_keys)
    groups: Dict[tuple, List[Slot]] = {}
    others: Dict[torch.device, List[CombineJob]] = {}
    for slot in slots:
        if not slot.out.numel():
            continue
        if slot.out.dim() == 2 and slot.key not in skip:
            rows, cols = slot.out.shape
            groups.setdefault((rows, cols, slot.out.device, work_dtype(slot.base, *slot.inputs)), []).append(slot)
        else:
            job = CombineJob(slot.out, slot.inputs, [scaling * wi / n for wi in w], slot.base)
            others.setdefault(slot.out.device, []).append(job)
    for jobs in others.values():
        dispatch.run("combine", jobs, backend)
    for (rows, cols, _, dtype), members in groups.items():
        wide = tall and rows < cols
        m, k = max(rows, cols), min(rows, cols)
        per_layer = 4 * (4 * n + 8) * m * k * (dtype.itemsize // 4) + 8 * 8 * max(k, cols) ** 2
        for chunk in _chunks(members, per_layer):
            taus = torch.stack([torch.stack([(x.to(dtype) - s.base.to(dtype)) * wi for x, wi in zip(s.inputs, w)])
                                for s in chunk])
            delta = batch(taus.mT if wide else taus, wide)
            del taus
            if wide:
                delta = delta.mT
            jobs = [CombineJob(s.out, [d, s.base], [scaling, 1.0]) for s, d in zip(chunk, delta.unbind(0))]
            dispatch.run("combine", jobs, backend)
    return forms.wrap(merged)
