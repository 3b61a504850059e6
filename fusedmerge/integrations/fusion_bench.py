"""fusedmerge as FusionBench algorithms: BaseAlgorithm subclasses taking the constructor arguments of
FusionBench's own, usable through ``_target_`` in a method YAML or directly with a model pool or a dict
``{"_pretrained_": m0, "name": m1, ...}``. The classes are generated from the method registry
(``fusedmerge.methods.FUSIONBENCH_ALGORITHMS``: each method module declares its classes' arguments and run):

    FusedSimpleAverage(show_pbar=False, inplace=True)                     SimpleAverageAlgorithm
    FusedWeightedAverage(normalize, weights, verbose=True)                WeightedAverageAlgorithm
    FusedTaskArithmetic(scaling_factor, inplace=True)                     TaskArithmeticAlgorithm
    FusedDareSimpleAverage(sparsity_ratio, only_on_linear_weights, rescale=True)
    FusedDareTaskArithmetic(scaling_factor, sparsity_ratio, only_on_linear_weights, rescale=True)
    FusedTiesMerging(scaling_factor, threshold, remove_keys, merge_func)  TiesMergingAlgorithm
    FusedDareTies(sparsity_ratio, only_on_linear_weights, rescale, scaling_factor, threshold, remove_keys, merge_func)
    FusedSlerpMerge(t, DOT_THRESHOLD=0.9995, epsilon=1e-8)                SlerpMergeAlgorithm
    FusedModelStock(ignore_keys=None, model_save_path=None, model_save_kwargs=None)   ModelStock
    FusedOPCM(alpha, shuffle_order=True, seed=None, save_on_every_step=True, evaluate_on_every_step=False)
    FusedTaskSingularVectorMerging(alpha=None, exclude_keys=None, return_single_task_models=False)
    FusedIsoC(scaling_factor, exclude_keys=None)                          IsotropicMergingInCommonSubspace
    FusedIsoCTS(scaling_factor, common_space_fraction, exclude_keys=None) IsotropicMergingInCommonAndTaskSubspace
    FusedMagMax(scaling_factor=0.5, inplace=True)                         MagMaxAlgorithm
    FusedWUDIMerging(iter_num, exclude_keys=None)                         WUDIMerging

Every class also takes ``backend`` (fusedmerge's), the DARE ones ``seed`` (masks keyed by seed, model
position and parameter name). Results are FusionBench's up to accumulation precision (fusedmerge accumulates
16-bit inputs in fp32 and rounds once); DARE masks differ by construction (same keep rate, reproducible);
OPCM, TSV-M, Iso-C/CTS and WUDI within their stated tolerances, MagMax equal (fp32). Inputs are not
modified, except the model FusionBench's ``inplace=True`` overwrites (the first model for the simple
average, the pretrained model for task arithmetic and MagMax).
Importing this module imports fusion_bench; ``import fusedmerge`` does not.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Dict, List

import torch
from fusion_bench import BaseAlgorithm, BaseModelPool
from torch import nn

from .._forms import module_with_state
from ..methods import FUSIONBENCH_ALGORITHMS, REQUIRED, FusionBenchAlgorithm

StateDict = Dict[str, torch.Tensor]


class Pool:
    """What a method's FusionBench run needs of a model pool (or of a dict of models)."""

    def __init__(self, modelpool):
        self.pool = modelpool if isinstance(modelpool, BaseModelPool) else BaseModelPool(modelpool)
        self.names = list(self.pool.model_names)  # the fine-tuned models
        self.all_names = list(self.pool.all_model_names)  # with _pretrained_ where the pool has it

    def pretrained(self) -> nn.Module:
        return self.pool.load_model("_pretrained_")

    def load(self, name: str) -> nn.Module:
        return self.pool.load_model(name)

    def finetuned(self) -> List[nn.Module]:
        return [self.load(name) for name in self.names]

    @staticmethod
    def with_state(like: nn.Module, state: StateDict) -> nn.Module:
        return module_with_state(like, state)


def _algorithm_class(spec: FusionBenchAlgorithm) -> type:
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                default=inspect.Parameter.empty if d is REQUIRED else d) for n, d in spec.args]
    params += [inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default="auto"),
               inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]
    signature = inspect.Signature(params)

    def __init__(self, *args, **kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{spec.name}: {e}") from None
        bound.apply_defaults()
        values = dict(bound.arguments)
        rest = values.pop("kwargs")
        for name, value in values.items():
            setattr(self, name, list(value) if name in ("weights", "remove_keys") and value is not None else value)
        BaseAlgorithm.__init__(self, **rest)

    @torch.no_grad()
    def run(self, modelpool, **kwargs) -> nn.Module:
        return spec.run(self, Pool(modelpool))

    __init__.__signature__ = inspect.Signature([inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY), *params])
    doc = f"{spec.doc}\n\nfusedmerge's counterpart of FusionBench's {spec.peer}{signature}."
    return type(spec.name, (BaseAlgorithm,), {"__init__": __init__, "run": run, "__doc__": doc,
                                              "__module__": __name__, "__qualname__": spec.name})


globals().update({name: _algorithm_class(spec) for name, spec in FUSIONBENCH_ALGORITHMS.items()})


@contextlib.contextmanager
def fused_adamerging(backend: str = "auto"):
    """Within the block, FusionBench's AdaMerging algorithms (``fusion_bench.method.adamerging``'s
    task-wise and layer-wise modules, which the CLIP, GPT-2, Flan-T5 and Llama variants build on) construct
    fusedmerge's FusedTaskWiseMergedModel / FusedLayerWiseMergedModel instead of their own: FusionBench's
    AdaMerging code, run on the fused merge. The names are restored on exit."""
    from functools import partial

    from fusion_bench.method.adamerging import layer_wise_adamerging, task_wise_adamerging

    from ..adamerging import FusedLayerWiseMergedModel, FusedTaskWiseMergedModel

    swaps = [(layer_wise_adamerging, "LayerWiseMergedModel", FusedLayerWiseMergedModel),
             (task_wise_adamerging, "TaskWiseMergedModel", FusedTaskWiseMergedModel)]
    saved = [(module, name, getattr(module, name)) for module, name, _ in swaps]
    for module, name, cls in swaps:
        setattr(module, name, partial(cls, backend=backend))
    try:
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


__all__ = ["Pool", "fused_adamerging", *FUSIONBENCH_ALGORITHMS]
