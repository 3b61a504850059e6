"""fusedmerge's ops as torch custom ops (torch.library), with fake implementations, so that they can be
called inside ``torch.compile(fullgraph=True)`` code and pass ``torch.library.opcheck``.

    torch.ops.fusedmerge.average(inputs, weights)                                   Σ wᵢ·xᵢ, w normalised
    torch.ops.fusedmerge.task_arithmetic(base, inputs, scaling, weights)            θ0 + λ·Σ wᵢ·τᵢ
    torch.ops.fusedmerge.dare(base, inputs, p, scaling, weights, rescale, seed, name)
    torch.ops.fusedmerge.ties(base, inputs, density, scaling, weights, merge, dare_p, seed, name)
    torch.ops.fusedmerge.opcm_project(merged, task, alpha, variant)                 (b, m, n) or (m, n)

Each is the Python op of the same name on tensors (weights None: all 1), so the results are the same bits;
the result has the promoted dtype of the inputs (and base). Merging is not differentiable: no autograd
formula is registered.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .dare import dare as _dare
from .linear import average as _average
from .linear import task_arithmetic as _task_arithmetic
from .opcm.projection import project
from .ties import ties as _ties


def _promoted(tensors) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _like(base: Tensor, tensors) -> Tensor:
    return base.new_empty(base.shape, dtype=_promoted(list(tensors)))


@torch.library.custom_op("fusedmerge::average", mutates_args=())
def average(inputs: List[Tensor], weights: Optional[List[float]] = None) -> Tensor:
    return _average(inputs, weights)


@average.register_fake
def _(inputs, weights=None):
    return _like(inputs[0], inputs)


@torch.library.custom_op("fusedmerge::task_arithmetic", mutates_args=())
def task_arithmetic(base: Tensor, inputs: List[Tensor], scaling: float = 1.0,
                    weights: Optional[List[float]] = None) -> Tensor:
    return _task_arithmetic(base, inputs, scaling, weights=weights)


@task_arithmetic.register_fake
def _(base, inputs, scaling=1.0, weights=None):
    return _like(base, [base, *inputs])


@torch.library.custom_op("fusedmerge::dare", mutates_args=())
def dare(base: Tensor, inputs: List[Tensor], p: float, scaling: float = 1.0, weights: Optional[List[float]] = None,
         rescale: bool = True, seed: int = 0, name: str = "tensor") -> Tensor:
    return _dare(base, inputs, p, weights=weights, scaling=scaling, rescale=rescale, seed=seed, name=name)


@dare.register_fake
def _(base, inputs, p, scaling=1.0, weights=None, rescale=True, seed=0, name="tensor"):
    return _like(base, [base, *inputs])


@torch.library.custom_op("fusedmerge::ties", mutates_args=())
def ties(base: Tensor, inputs: List[Tensor], density: float = 0.2, scaling: float = 1.0,
         weights: Optional[List[float]] = None, merge: str = "sum", dare_p: Optional[float] = None, seed: int = 0,
         name: str = "tensor") -> Tensor:
    return _ties(base, inputs, density=density, scaling=scaling, weights=weights, merge=merge, dare_p=dare_p,
                 seed=seed, name=name)


@ties.register_fake
def _(base, inputs, density=0.2, scaling=1.0, weights=None, merge="sum", dare_p=None, seed=0, name="tensor"):
    return _like(base, [base, *inputs])


@torch.library.custom_op("fusedmerge::opcm_project", mutates_args=())
def opcm_project(merged: Tensor, task: Tensor, alpha: float = 0.5, variant: str = "fusionbench") -> Tensor:
    return project(merged, task, alpha, variant=variant)


@opcm_project.register_fake
def _(merged, task, alpha=0.5, variant="fusionbench"):
    return task.new_empty(task.shape)
