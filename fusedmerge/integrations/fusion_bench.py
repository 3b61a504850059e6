"""fusedmerge as FusionBench algorithms: BaseAlgorithm subclasses taking the constructor arguments of
FusionBench's own, usable through ``_target_`` in a method YAML or directly with a model pool or a dict
``{"_pretrained_": m0, "name": m1, ...}``.

    FusedSimpleAverage(show_pbar=False, inplace=True)                     SimpleAverageAlgorithm
    FusedWeightedAverage(normalize, weights, verbose=True)                WeightedAverageAlgorithm
    FusedTaskArithmetic(scaling_factor, inplace=True)                     TaskArithmeticAlgorithm
    FusedTiesMerging(scaling_factor, threshold, remove_keys, merge_func)  TiesMergingAlgorithm
    FusedDareSimpleAverage(sparsity_ratio, only_on_linear_weights, rescale=True)
    FusedDareTaskArithmetic(scaling_factor, sparsity_ratio, only_on_linear_weights, rescale=True)
    FusedDareTies(sparsity_ratio, only_on_linear_weights, rescale, scaling_factor, threshold, remove_keys, merge_func)
    FusedOPCM(alpha, shuffle_order=True, seed=None, save_on_every_step=True, evaluate_on_every_step=False)

Every class also takes ``backend`` (fusedmerge's), the DARE ones ``seed`` (masks keyed by seed, model
position and parameter name). Results are FusionBench's up to accumulation precision (fusedmerge accumulates
16-bit inputs in fp32 and rounds once); DARE masks differ by construction (same keep rate, reproducible);
OPCM within its stated tolerance. Inputs are not modified, except the model FusionBench's ``inplace=True``
overwrites (the first model for the simple average, the pretrained model for task arithmetic).
Importing this module imports fusion_bench; ``import fusedmerge`` does not.
"""

from __future__ import annotations

import copy
import logging
import random
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from fusion_bench import BaseAlgorithm, BaseModelPool

from .. import average, dare, task_arithmetic, ties
from ..linear import weighted_sum
from ..opcm import ContinualMerger, linear_weights

log = logging.getLogger(__name__)
StateDict = Dict[str, torch.Tensor]


def _pool(modelpool) -> BaseModelPool:
    return modelpool if isinstance(modelpool, BaseModelPool) else BaseModelPool(modelpool)


def _finetuned(pool: BaseModelPool) -> List[nn.Module]:
    return [pool.load_model(name) for name in pool.model_names]


def _with_state(like: nn.Module, state: StateDict) -> nn.Module:
    module = copy.deepcopy(like)
    module.load_state_dict(state, assign=True)
    return module


class _Fused(BaseAlgorithm):
    def __init__(self, backend: str = "auto", **kwargs):
        self.backend = backend
        super().__init__(**kwargs)


class FusedSimpleAverage(_Fused):
    """Mean of the pool's models; `inplace=True` writes it into the first model, as FusionBench does."""

    def __init__(self, show_pbar: bool = False, inplace: bool = True, **kwargs):
        self.show_pbar, self.inplace = show_pbar, inplace
        super().__init__(**kwargs)

    @torch.no_grad()
    def run(self, modelpool) -> nn.Module:
        models = _finetuned(_pool(modelpool))
        return average(models, out=models[0] if self.inplace else None, backend=self.backend)


class FusedWeightedAverage(_Fused):
    """Σ wᵢ·θᵢ, w normalised to sum 1 when `normalize`. A new module (FusionBench overwrites the first model)."""

    def __init__(self, normalize: bool, weights: Sequence[float], verbose: bool = True, **kwargs):
        self.normalize, self.weights, self.verbose = normalize, list(weights), verbose
        super().__init__(**kwargs)

    @torch.no_grad()
    def run(self, modelpool) -> nn.Module:
        models = _finetuned(_pool(modelpool))
        if len(self.weights) != len(models):
            raise ValueError(f"Number of weights must match the number of models, got {len(self.weights)} weights "
                             f"and {len(models)} models")
        w = [float(x) for x in self.weights]
        if self.normalize:
            total = sum(w)
            w = [x / total for x in w]
        return weighted_sum(models, w, backend=self.backend)


class FusedTaskArithmetic(_Fused):
    """θ0 + λ·Σ τᵢ; `inplace=True` writes it into the pretrained model, as FusionBench does."""

    def __init__(self, scaling_factor: float, inplace: bool = True, **kwargs):
        self.scaling_factor, self.inplace = scaling_factor, inplace
        super().__init__(**kwargs)

    @torch.no_grad()
    def run(self, modelpool) -> nn.Module:
        pool = _pool(modelpool)
        pretrained = pool.load_model("_pretrained_")
        return task_arithmetic(pretrained, _finetuned(pool), self.scaling_factor,
                               out=pretrained if self.inplace else None, backend=self.backend)


def _ties_options(threshold: float, merge_func: str) -> dict:
    """FusionBench's TIES: global top-k over the whole state dict (threshold in % when > 1), its kthvalue
    count, sign votes tied at zero going to the majority sign."""
    density = threshold / 100 if threshold > 1 else threshold
    return dict(density=density, scope="model", k_rule="fusionbench", vote_tie="majority", merge=merge_func)


def _ties_model(pretrained: nn.Module, finetuned: Sequence[StateDict], scaling: float, threshold: float,
                remove_keys: Sequence[str], merge_func: str, backend: str) -> nn.Module:
    base = pretrained.state_dict()
    keys = [k for k in base if k not in set(remove_keys)]
    pick = lambda sd: {k: sd[k] for k in keys}  # noqa: E731
    merged = ties(pick(base), [pick(sd) for sd in finetuned], scaling=scaling, backend=backend,
                  **_ties_options(threshold, merge_func))
    return _with_state(pretrained, {**{k: v.clone() for k, v in base.items()}, **merged})


class FusedTiesMerging(_Fused):
    """FusionBench's TIES merging (global threshold); removed keys keep the pretrained values. A new module."""

    def __init__(self, scaling_factor: float, threshold: float, remove_keys: Sequence[str] = (),
                 merge_func: str = "sum", **kwargs):
        self.scaling_factor, self.threshold = scaling_factor, threshold
        self.remove_keys, self.merge_func = list(remove_keys or []), merge_func
        super().__init__(**kwargs)

    @torch.no_grad()
    def run(self, modelpool, **kwargs) -> nn.Module:
        pool = _pool(modelpool)
        pretrained = pool.load_model("_pretrained_")
        return _ties_model(pretrained, [m.state_dict() for m in _finetuned(pool)], self.scaling_factor,
                           self.threshold, self.remove_keys, self.merge_func, self.backend)


def _droppable(pretrained: nn.Module, only_on_linear_weights: bool):
    return linear_weights(pretrained) if only_on_linear_weights else False


class FusedDareTaskArithmetic(_Fused):
    """θ0 + λ·Σ keepᵢ⊙τᵢ/(1−p) in one fused launch; p = sparsity_ratio. A new module."""

    def __init__(self, scaling_factor: float, sparsity_ratio: float, only_on_linear_weights: bool,
                 rescale: bool = True, seed: int = 0, **kwargs):
        self.scaling_factor, self.sparsity_ratio = scaling_factor, sparsity_ratio
        self.only_on_linear_weights, self.rescale, self.seed = only_on_linear_weights, rescale, seed
        super().__init__(**kwargs)

    def _scaling(self, n: int) -> float:
        return self.scaling_factor

    @torch.no_grad()
    def run(self, modelpool) -> nn.Module:
        pool = _pool(modelpool)
        pretrained = pool.load_model("_pretrained_")
        models = _finetuned(pool)
        return dare(pretrained, models, self.sparsity_ratio, scaling=self._scaling(len(models)),
                    rescale=bool(self.rescale), seed=self.seed,
                    linear_only=_droppable(pretrained, self.only_on_linear_weights), backend=self.backend)


class FusedDareSimpleAverage(FusedDareTaskArithmetic):
    """DARE task arithmetic with λ = 1/N, as FusionBench defines the DARE simple average."""

    def __init__(self, sparsity_ratio: float, only_on_linear_weights: bool, rescale: bool = True, seed: int = 0,
                 **kwargs):
        super().__init__(1.0, sparsity_ratio, only_on_linear_weights, rescale, seed, **kwargs)

    def _scaling(self, n: int) -> float:
        return 1.0 / n


class FusedDareTies(_Fused):
    """FusionBench's DARE-TIES: drop and rescale each task vector, then TIES (global trim of the dropped
    vectors, vote, merge). The dropped task vectors are held (N model copies, as FusionBench holds them)."""

    def __init__(self, sparsity_ratio: float, only_on_linear_weights: bool, rescale: bool, scaling_factor: float,
                 threshold: float, remove_keys: Sequence[str] = (), merge_func: str = "sum", seed: int = 0,
                 **kwargs):
        self.sparsity_ratio, self.only_on_linear_weights, self.rescale = sparsity_ratio, only_on_linear_weights, rescale
        self.scaling_factor, self.threshold, self.merge_func = scaling_factor, threshold, merge_func
        self.remove_keys, self.seed = list(remove_keys or []), seed
        super().__init__(**kwargs)

    @torch.no_grad()
    def run(self, modelpool) -> nn.Module:
        pool = _pool(modelpool)
        pretrained = pool.load_model("_pretrained_")
        models = [m.state_dict() for m in _finetuned(pool)]
        base = pretrained.state_dict()
        linear = _droppable(pretrained, self.only_on_linear_weights)
        dropped = []
        for i in range(len(models)):  # model i's mask keyed by its position, as in one fused DARE call
            one_hot = [1.0 if j == i else 0.0 for j in range(len(models))]
            dropped.append(dare(base, models, self.sparsity_ratio, weights=one_hot, rescale=bool(self.rescale),
                                seed=self.seed, linear_only=linear, backend=self.backend))
        return _ties_model(pretrained, dropped, self.scaling_factor, self.threshold, self.remove_keys,
                           self.merge_func, self.backend)


class FusedOPCM(_Fused):
    """FusionBench's OPCMForCLIP merge (diagonal variant, its non-leaf-parameter treatment, its task order
    for a seed) with fusedmerge's batched projection; per-step saving and evaluation need FusionBench's
    program and task pool and are not done here (logged when asked for)."""

    def __init__(self, alpha: float, shuffle_order: bool = True, seed: Optional[int] = None,
                 save_on_every_step: bool = True, evaluate_on_every_step: bool = False, **kwargs):
        self.alpha, self.shuffle_order, self.seed = alpha, shuffle_order, seed
        self.save_on_every_step, self.evaluate_on_every_step = save_on_every_step, evaluate_on_every_step
        super().__init__(**kwargs)

    @torch.no_grad()
    def run(self, modelpool) -> nn.Module:
        pool = _pool(modelpool)
        names = list(pool.model_names)
        if self.seed is not None:
            random.seed(self.seed)  # FusionBench seeds Python's generator (seed_everything) before shuffling
        if self.shuffle_order:
            random.shuffle(names)
        for option in ("save_on_every_step", "evaluate_on_every_step"):
            if getattr(self, option):
                log.info(f"FusedOPCM: {option} needs FusionBench's program (log dir, task pool); not done here")
        self.model_names = names
        merger = ContinualMerger(pool.load_model("_pretrained_"), self.alpha, skip_nonleaf=True,
                                 backend=self.backend)
        for name in names:
            merger.add(pool.load_model(name))
        return merger.merged()
