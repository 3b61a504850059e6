"""AdaMerging on the fused differentiable merge: FusionBench's TaskWiseMergedModel and LayerWiseMergedModel
as drop-ins (same constructor arguments, `merge_weights()`, `forward`, `merge_and_unload`), and the loop.

    FusedTaskWiseMergedModel(task_wise_weight, pretrained_model, finetuned_models, clamp_weights=True,
                             tie_weights=False, strict=True, task_vector_dtype=None, backend="auto")
    FusedLayerWiseMergedModel(layer_wise_weight, pretrained_model, finetuned_models, clamp_weights=True,
                              tie_weights=False, strict=True, sparsity_ratio=None,
                              normalized_merging_weights=False, backend="auto")

As FusionBench's, the constructors turn the fine-tuned models into task vectors in place (τ = θ − θ0;
parameters that do not require grad in the pretrained model are deleted from them and taken from θ0), and
L is the number of trainable parameter tensors. Merged weights equal FusionBench's bit for bit (same
operations in the same order, see fusedmerge/learned.py; with a 16-bit `task_vector_dtype` FusionBench
rounds τ·λ to 16 bits, fusedmerge does not); coefficient gradients are fp64 sums rounded to
λ's dtype (FusionBench's are fp32 sums). `sparsity_ratio` (FusionBench stores pruned task vectors as sparse
tensors) is refused. Does not import fusion_bench.
"""

from __future__ import annotations

import itertools
from copy import deepcopy
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .learned import MergedModel, entropy_loss, progress

StateDict = Dict[str, torch.Tensor]


def _task_vectors_in_place(pretrained: nn.Module, finetuned: Sequence[nn.Module]) -> List[StateDict]:
    """FusionBench's construction: τ = θ − θ0 in the fine-tuned models' own tensors (same bits as its
    out-of-place subtraction), frozen parameters deleted from them."""
    for name, param in pretrained.named_parameters():
        path = name.split(".")
        for m in finetuned:
            owner = m.get_submodule(".".join(path[:-1]))
            if not param.requires_grad:
                delattr(owner, path[-1])
            else:
                getattr(owner, path[-1]).data.sub_(param.data)
    for m in finetuned:
        m.requires_grad_(False)
    return [dict(m.named_parameters()) for m in finetuned]


class _FusionBenchMerged(MergedModel):
    def __init__(self, weight, pretrained_model, finetuned_models, *, clamp_weights, tie_weights, strict,
                 softmax=False, backend="auto"):
        vectors = _task_vectors_in_place(pretrained_model, finetuned_models)
        super().__init__(weight, pretrained_model, vectors, clamp_weights=clamp_weights, softmax=softmax,
                         tie_weights=tie_weights, strict=strict, backend=backend)
        self.task_vectors = nn.ModuleList(finetuned_models)

    def vector_dicts(self) -> List[StateDict]:
        """Read from the task-vector modules at each merge, so that `.to(device)` of the wrapper moves them."""
        return [dict(m.named_parameters()) for m in self.task_vectors]

    @property
    def pretrained_model(self) -> nn.Module:
        return self.module

    def merge_weights(self, task_vector_mask: Optional[StateDict] = None) -> StateDict:
        """θ0 + Σᵢ λᵢ·τᵢ as FusionBench builds it; with `task_vector_mask` (λ·mask per name), FusionBench's own
        plain-torch merge (masks are tensors: no fused kernel for them)."""
        if task_vector_mask is None:
            return super().merge_weights()
        lam = self.coefficients()
        lam = lam[:, None].expand(-1, len(self.merged_names)) if lam.dim() == 1 else lam
        state = self.module.state_dict(keep_vars=True)
        for row, vector in zip(lam, self.vector_dicts()):
            for w, (name, tau) in zip(row, vector.items()):
                state[name] = state[name] + tau * (w * task_vector_mask[name])
        self._merged_state_dict = state
        return state

    def merge_and_unload(self, task_vector_mask: Optional[StateDict] = None, copy: bool = False) -> nn.Module:
        """The merge loaded into the pretrained model (a deep copy of it with `copy`)."""
        self.merge_weights(task_vector_mask=task_vector_mask)
        model = deepcopy(self.module) if copy else self.module
        model.load_state_dict(self._merged_state_dict)
        return model


class FusedTaskWiseMergedModel(_FusionBenchMerged):
    """FusionBench's TaskWiseMergedModel on the fused merge: λ of shape [N]."""

    def __init__(self, task_wise_weight: torch.Tensor, pretrained_model: nn.Module, finetuned_models: List[nn.Module],
                 clamp_weights: bool = True, tie_weights: bool = False, strict: bool = True,
                 task_vector_dtype: Optional[torch.dtype] = None, backend: str = "auto"):
        if task_wise_weight.dim() != 1 or task_wise_weight.shape[0] != len(finetuned_models):
            raise ValueError(f"task_wise_weight must have shape [{len(finetuned_models)}] (one per fine-tuned model), "
                             f"got {list(task_wise_weight.shape)}")
        super().__init__(task_wise_weight, pretrained_model, finetuned_models, clamp_weights=clamp_weights,
                         tie_weights=tie_weights, strict=strict, backend=backend)
        self.task_vector_dtype = task_vector_dtype
        if task_vector_dtype is not None:
            self.task_vectors.to(task_vector_dtype)


class FusedLayerWiseMergedModel(_FusionBenchMerged):
    """FusionBench's LayerWiseMergedModel on the fused merge: λ of shape [N, L]; `normalized_merging_weights`
    is the softmax over models (after the clamp, as in FusionBench)."""

    def __init__(self, layer_wise_weight: torch.Tensor, pretrained_model: nn.Module,
                 finetuned_models: List[nn.Module], clamp_weights: bool = True, tie_weights: bool = False,
                 strict: bool = True, sparsity_ratio: Optional[float] = None,
                 normalized_merging_weights: bool = False, backend: str = "auto"):
        if sparsity_ratio is not None:
            raise NotImplementedError("sparsity_ratio: pruned (sparse) task vectors are not supported by the fused "
                                      "merge; use FusionBench's LayerWiseMergedModel or prune the models beforehand")
        layers = sum(p.requires_grad for p in pretrained_model.parameters())
        if tuple(layer_wise_weight.shape) != (len(finetuned_models), layers):
            raise ValueError(f"layer_wise_weight must have shape [{len(finetuned_models)}, {layers}] (models × "
                             f"trainable parameter tensors), got {list(layer_wise_weight.shape)}")
        super().__init__(layer_wise_weight, pretrained_model, finetuned_models, clamp_weights=clamp_weights,
                         tie_weights=tie_weights, strict=strict, softmax=normalized_merging_weights, backend=backend)
        self.sparsity_ratio = sparsity_ratio


def adamerging(model: MergedModel, tasks: Sequence[Tuple[Iterable, Optional[Callable]]], steps: int, *,
               lr: float = 1e-3, show_progress: bool = True) -> MergedModel:
    """AdaMerging: `steps` Adam steps on the model's merge coefficients minimising Σ_tasks entropy_loss of
    head(model(x)) over unlabeled batches, one batch per task per step (`tasks`: (batches, head or None)
    pairs; batches are cycled). One merge and one coefficient backward per step. Returns `model`, merged."""
    optimizer = torch.optim.Adam([model.merge_weight], lr=lr)
    streams = [itertools.cycle(batches) for batches, _ in tasks]
    for _ in progress(range(steps), "adamerging", show_progress):
        model.merge_weights()
        loss = 0.0
        for stream, (_, head) in zip(streams, tasks):
            out = model(next(stream))
            loss = loss + entropy_loss(head(out) if head is not None else out)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.merge_weights()
    return model
