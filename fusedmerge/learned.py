"""A merge whose coefficients are learned: θ_l = θ0_l + Σᵢ λᵢ,l·τᵢ,l, differentiable in λ, fused both ways.

    forward   one multi-tensor linear combination (the ``combine`` primitive), inputs [θ0_l, τ₁,l..τ_N,l]
              with coefficients [1, λ₁,l..λ_N,l]: the left fold θ0 + λ₁τ₁ + λ₂τ₂ + … (each product and sum
              rounded, no FMA), which is also FusionBench's order of operations, so its bits.
    backward  ∂L/∂λᵢ,l = ⟨∂L/∂θ_l, τᵢ,l⟩ for every i and l from one launch of the ``dots`` reduction over
              [g_l, τ₁,l..τ_N,l] (``coefficient_dots``): fp64, the same bits on every backend, returned in
              λ's dtype.

Nothing of size N·P is held for the backward: the Function keeps references to the inputs it was given.
Without a base (θ0 = None) the merge is Σᵢ λᵢ,l·xᵢ,l, the learned soup's. Clamping, softmax and
task-wise → layer-wise broadcasting are ordinary torch operations on the small λ tensor before the Function,
so autograd applies their chain rule. ``MergedModel`` wraps it for ``torch.func.functional_call``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call

from . import dispatch, options
from .reductions import DotsJob, DotsSpec
from .reference import CombineJob

StateDict = Dict[str, torch.Tensor]


def coefficient_dots(grads: Sequence[Optional[torch.Tensor]], vectors: Sequence[Sequence[torch.Tensor]],
                     backend: str = "auto") -> torch.Tensor:
    """G[i, l] = Σₖ g_l[k]·vectors[i][l][k] in fp64, shape [N, L]; a missing g_l gives zeros. One launch of
    the ``dots`` primitive (inputs [g_l, τ₁,l..τ_N,l], pairs (0, i), per tensor): fp32 products exact in fp64,
    summed by a fixed pairwise tree, so the same bits on every backend and in any job order."""
    n, layers = len(vectors), len(grads)
    live = [lay for lay, g in enumerate(grads) if g is not None and g.numel()]
    device = next((grads[lay].device for lay in live), torch.device("cpu"))
    out = torch.zeros((n, layers), dtype=torch.float64, device=device)
    if live:
        jobs = [DotsJob([grads[lay].detach().contiguous()] + [v[lay].detach().contiguous() for v in vectors])
                for lay in live]
        sums = dispatch.run("dots", jobs, backend, DotsSpec(tuple((0, i) for i in range(1, n + 1))))
        out[:, live] = torch.cat(sums, 0).T
    return out


class FusedMerge(torch.autograd.Function):
    """merged_l = base_l + Σᵢ coeffs[i, l]·vectors[i][l] (no base: Σᵢ coeffs[i, l]·vectors[i][l]); the
    outputs are the L merged tensors, differentiable in `coeffs` [N, L] only."""

    @staticmethod
    def forward(ctx, coeffs, base, vectors, backend):
        lam = coeffs.detach().to(torch.float64).cpu().tolist()
        outs, jobs = [], []
        for lay in range(coeffs.shape[1]):
            xs = [v[lay].detach() for v in vectors]
            c = [row[lay] for row in lam]
            if base is not None:
                xs, c = [base[lay].detach()] + xs, [1.0] + c
            out = torch.empty(xs[0].shape, dtype=_result_dtype(xs), device=xs[0].device)
            job = CombineJob(out, [x.contiguous() for x in xs], c)
            options.finite_coefficients(job.coeffs, job.acc_dtype, "merge coefficients")
            jobs.append(job)
            outs.append(out)
        for device in {j.out.device for j in jobs}:
            dispatch.run("combine", [j for j in jobs if j.out.device == device], backend)
        ctx.vectors, ctx.backend = vectors, backend
        ctx.coeff_dtype, ctx.coeff_device = coeffs.dtype, coeffs.device
        ctx.set_materialize_grads(False)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        g = coefficient_dots(grads, ctx.vectors, ctx.backend)
        return g.to(ctx.coeff_device, ctx.coeff_dtype), None, None, None


def _result_dtype(xs: Sequence[torch.Tensor]) -> torch.dtype:
    dtype = xs[0].dtype
    for x in xs[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def differentiable_merge(base: Optional[StateDict], vectors: Sequence[StateDict], coeffs: torch.Tensor, *,
                         backend: str = "auto") -> StateDict:
    """θ_l = θ0_l + Σᵢ λᵢ,l·τᵢ,l for every key l of the task vectors (no base: Σᵢ λᵢ,l·xᵢ,l), differentiable
    in `coeffs`: shape [N] (task-wise, one λ per vector) or [N, L] (layer-wise, L = the number of keys, in
    the vectors' key order). Forward: one fused launch; backward: one fused reduction (module docstring)."""
    if not isinstance(coeffs, torch.Tensor) or not coeffs.is_floating_point():
        raise TypeError(f"coeffs must be a floating tensor, got {type(coeffs).__name__}")
    if not vectors:
        raise ValueError("vectors is empty: give at least one task vector")
    keys = list(vectors[0])
    for i, v in enumerate(vectors[1:], 1):
        if list(v) != keys:
            raise ValueError(f"vectors[{i}] does not have the keys of vectors[0] in the same order")
    if base is not None and any(k not in base for k in keys):
        raise ValueError(f"base lacks keys of the vectors: {[k for k in keys if k not in base][:8]}")
    n, layers = len(vectors), len(keys)
    if coeffs.dim() == 1 and coeffs.shape[0] == n:
        coeffs = coeffs[:, None].expand(n, layers)
    elif tuple(coeffs.shape) != (n, layers):
        raise ValueError(f"coeffs must have shape [{n}] (task-wise) or [{n}, {layers}] (layer-wise: vectors × keys), "
                         f"got {list(coeffs.shape)}")
    per_key = [[v[k] for k in keys] for v in vectors]
    base_list = [base[k] for k in keys] if base is not None else None
    return dict(zip(keys, FusedMerge.apply(coeffs, base_list, per_key, backend)))


def progress(iterable, desc: str, enabled: bool = True):
    """`iterable` with a tqdm progress bar when tqdm is installed and `enabled` (tqdm is optional)."""
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return iterable
        return tqdm(iterable, desc=desc, leave=False)
    return iterable


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """AdaMerging's loss: mean over the batch of −Σ p·log(p + 1e-8), p = softmax(logits)."""
    p = logits.softmax(dim=-1)
    return -(p * (p + 1e-8).log()).sum(dim=-1).mean()


class MergedModel(nn.Module):
    """`module` run (``functional_call``) on θ0 + Σᵢ λᵢ·τᵢ over the names in `vectors`, the other
    parameters and buffers taken from `module`. `merge_weight` (the raw λ, [N] or [N, L]) is the only
    parameter; λ = clamp(raw, 0, 1) if `clamp_weights`, then softmax over the vectors if `softmax`.
    `base=False` merges without θ0 (Σᵢ λᵢ·xᵢ). As in FusionBench, `forward` merges only when nothing is
    merged yet: call `merge_weights()` after each optimiser step."""

    def __init__(self, merge_weight: torch.Tensor, module: nn.Module, vectors: Sequence[StateDict], *,
                 base: bool = True, clamp_weights: bool = False, softmax: bool = False, tie_weights: bool = False,
                 strict: bool = True, backend: str = "auto"):
        super().__init__()
        self.merge_weight = nn.Parameter(merge_weight, requires_grad=True)
        self.module = module.requires_grad_(False)
        self.vectors: List[StateDict] = [{k: t.detach() for k, t in v.items()} for v in vectors]
        self.merged_names = list(self.vectors[0]) if self.vectors else []
        self.with_base = base
        self.clamp_weights, self.softmax = clamp_weights, softmax
        self.tie_weights, self.strict, self.backend = tie_weights, strict, backend
        self._merged_state_dict: Optional[StateDict] = None

    def vector_dicts(self) -> List[StateDict]:
        """The task vectors (or models, without a base) as name → tensor dicts, in merge order."""
        return self.vectors

    def coefficients(self) -> torch.Tensor:
        """λ after the clamp and the softmax."""
        lam = self.merge_weight.clamp(0, 1) if self.clamp_weights else self.merge_weight
        return lam.softmax(dim=0) if self.softmax else lam

    def merge_weights(self) -> StateDict:
        state = self.module.state_dict(keep_vars=True)
        base = {k: state[k] for k in self.merged_names} if self.with_base else None
        state.update(differentiable_merge(base, self.vector_dicts(), self.coefficients(), backend=self.backend))
        self._merged_state_dict = state
        return state

    def forward(self, *args, **kwargs):
        if self._merged_state_dict is None:
            self.merge_weights()
        return functional_call(self.module, self._merged_state_dict, args, kwargs, tie_weights=self.tie_weights,
                               strict=self.strict)

    def merged_state_dict(self) -> StateDict:
        """The current merge as plain tensors (no autograd), e.g. to load into a model for evaluation."""
        with torch.no_grad():
            return {k: v.detach() for k, v in self.merge_weights().items()}
