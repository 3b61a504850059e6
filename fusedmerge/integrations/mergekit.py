"""fusedmerge as mergekit's backend: ``install()`` registers a fused implementation of every mergekit method
that fusedmerge carries out (``fusedmerge.methods.CONFIG_METHODS`` with ``peer="mergekit"``: linear,
task_arithmetic, ties, dare_linear, dare_ties, slerp, nuslerp, multislerp, karcher, model_stock, passthrough,
della(_linear), breadcrumbs(_ties), sce, nearswap, arcee_fusion) — replacing the built-ins (default) or
beside them under ``prefix + name`` — so that ``merge_state_dicts``, ``merge_tensors`` and ``mergekit-yaml``
(run in the same process, e.g. ``python -m fusedmerge.integrations.mergekit CONFIG OUT``) use the kernels.

Each method's translation of mergekit's parameters is the one its module declares (the same as
``fusedmerge merge``'s): weights multiply the deltas before the sign vote, votes tied at zero go to +,
``normalize`` divides by the (agreeing) weights, ``lambda`` scales the merged delta, dare_linear's
``rescale`` keeps each tensor's L1 norm, per-model TIES densities. Differences: arithmetic in fp32 (mergekit
works in the input dtype), ties at the TIES threshold are all kept (mergekit breaks them by sort order), DARE
masks come from (seed, model position, tensor name) — reproducible across runs and devices, which mergekit's
are not — and dare_ties rescales by 1/density. The random methods need one density for every model.
Importing this module imports mergekit; ``import fusedmerge`` does not.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Dict, List

import torch
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import BatchedMergeMethod, FunctionalGroupMergeMethod, TensorBatch, TensorGroup
from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge

from ..methods import CONFIG_METHODS, GroupCall

MERGEKIT_METHODS = [c for c in CONFIG_METHODS.values() if c.peer == "mergekit"]
_ORIGINALS: Dict[str, Any] = {}
_INSTALLED: set = set()


@dataclasses.dataclass(frozen=True)
class FusedGeneralizedTaskArithmetic(GeneralizedTaskArithmeticMerge):
    """One of mergekit's generalized-task-arithmetic methods (its own parameters and defaults) carried out by
    the ConfigMethod of the same name."""

    seed: int = 0
    fused: str = ""

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        base = group.base.tensor
        entries = [e for e in group.entries if not e.is_base]
        if not entries:
            return base
        method = CONFIG_METHODS[self.fused]
        params = {k: parameters[k] for k in method.global_params if k in parameters}
        densities = [min(float(parameters["density"][e.id]), 1.0) for e in entries] \
            if "density" in method.model_params else []  # ≥ 1 keeps every entry (mergekit's sparsify)
        per_model = tuple({k: parameters[k][e.id] for k in method.model_params if k in parameters} for e in entries)
        call = GroupCall(base, [e.tensor for e in entries], [float(parameters["weight"][e.id]) for e in entries],
                         densities, params, self.seed, base.dtype, "auto", group.metadata.name or "tensor", per_model)
        return method.merge(call)


def _fused_batched(original: BatchedMergeMethod, target: str, method) -> BatchedMergeMethod:
    """mergekit's batched method (its parameters, contract and policies) carried out by `method.batch`."""

    def fused(batch: TensorBatch, **parameters: Any) -> torch.Tensor:
        return method.batch(batch.tensors, batch.base_index, parameters)

    return BatchedMergeMethod(dataclasses.replace(original.spec, name=target), fused)


def _fused_group(original: FunctionalGroupMergeMethod, target: str, method, seed: int) -> FunctionalGroupMergeMethod:
    """mergekit's one-group-at-a-time method (its parameters, contract and policies) carried out by
    `method.merge` on the group's tensors."""

    def fused(group: TensorGroup, **parameters: Any) -> torch.Tensor:
        base = group.base.tensor if group.base is not None else None
        entries = [e for e in group.entries if not e.is_base]
        weight = parameters.get("weight")  # mergekit's PerNonBase values, when the method has weights
        weights = [float(w) for w in weight.values_for(entries)] if hasattr(weight, "values_for") else []
        per_model = tuple({k: parameters[k][e.id] for k in method.model_params if k in parameters} for e in entries)
        params = {k: v for k, v in parameters.items() if k != "weight"}
        call = GroupCall(base, [e.tensor for e in entries], weights, [], params, seed,
                         (base if base is not None else entries[0].tensor).dtype, "auto",
                         group.metadata.name or "tensor", per_model)
        return method.merge(call)

    return FunctionalGroupMergeMethod(dataclasses.replace(original.spec, name=target), fused)


def install(replace: bool = True, *, prefix: str = "fused_", seed: int = 0) -> List[str]:
    """Register the fused methods; returns their names. `replace=True` puts them under mergekit's own
    names (restore with uninstall()); otherwise beside them as `prefix + name`. `seed` keys the DARE masks."""
    names = []
    for method in MERGEKIT_METHODS:
        name = method.name
        target = name if replace else prefix + name
        original = _ORIGINALS.get(name) or registry.get(name)
        if isinstance(original, GeneralizedTaskArithmeticMerge):
            fields = {f.name: getattr(original, f.name) for f in dataclasses.fields(original)}
            fused = FusedGeneralizedTaskArithmetic(**{**fields, "method_name": target, "seed": seed, "fused": name})
        elif isinstance(original, BatchedMergeMethod) and method.batch is not None:
            fused = _fused_batched(original, target, method)
        elif isinstance(original, FunctionalGroupMergeMethod):
            fused = _fused_group(original, target, method, seed)
        else:
            raise TypeError(f"mergekit's {name} is a {type(original).__name__}; fusedmerge has no adapter for it")
        if target in registry._METHODS and target not in _ORIGINALS and target not in _INSTALLED:
            _ORIGINALS[target] = registry._METHODS[target]
        registry._METHODS[target] = fused
        _INSTALLED.add(target)
        names.append(target)
    return names


def uninstall() -> None:
    """Put mergekit's own methods back (and drop the prefixed ones)."""
    for name in _INSTALLED:
        registry._METHODS.pop(name, None)
    registry._METHODS.update(_ORIGINALS)
    _ORIGINALS.clear()
    _INSTALLED.clear()


def main(argv=None) -> int:
    """``mergekit-yaml`` with the fused methods installed: python -m fusedmerge.integrations.mergekit ..."""
    from mergekit.scripts.run_yaml import main as run_yaml

    install()
    return run_yaml.main(args=list(sys.argv[1:] if argv is None else argv), prog_name="mergekit-yaml")


if __name__ == "__main__":
    sys.exit(main())
