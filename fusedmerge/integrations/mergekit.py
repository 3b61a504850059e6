"""fusedmerge as mergekit's backend: ``install()`` registers fused implementations of mergekit's ``linear``,
``task_arithmetic``, ``ties``, ``dare_linear`` and ``dare_ties`` — replacing the built-ins (default) or
beside them under ``prefix + name`` — so that ``merge_state_dicts``, ``merge_tensors`` and ``mergekit-yaml``
(run in the same process, e.g. ``python -m fusedmerge.integrations.mergekit CONFIG OUT``) use the kernels.

mergekit's conventions are kept: weights multiply the deltas before the sign vote, votes tied at zero go to
+, ``normalize`` divides by the (agreeing) weights, ``lambda`` scales the merged delta, dare_linear's
``rescale`` keeps each tensor's L1 norm, per-model TIES densities. Differences: arithmetic in fp32 (mergekit
works in the input dtype), ties at the TIES threshold are all kept (mergekit breaks them by sort order), DARE
masks come from (seed, model position, tensor name) — reproducible across runs and devices, which mergekit's
are not — and dare_ties rescales by 1/density. The random methods need one density for every model.
Importing this module imports mergekit; ``import fusedmerge`` does not.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any, Dict, List

import torch
from typing_extensions import Annotated

from mergekit.merge_methods import registry
from mergekit.merge_methods.base import BatchParameter, ParameterScope, TensorBatch, TensorGroup
from mergekit.merge_methods.easy_define import merge_method
from mergekit.merge_methods.generalized_task_arithmetic import ConsensusMethod, GeneralizedTaskArithmeticMerge
from mergekit.sparsify import SparsificationMethod

from .. import dare, task_arithmetic, ties
from .._forms import Terms, gather, merge_linear

GTA_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")
_ORIGINALS: Dict[str, Any] = {}
_INSTALLED: set = set()


def _one_density(densities: List[float], method: str) -> float:
    if len(set(densities)) > 1:
        raise ValueError(f"fused {method}: DARE takes one density for every model, got {densities}")
    return densities[0]


@dataclasses.dataclass(frozen=True)
class FusedGeneralizedTaskArithmetic(GeneralizedTaskArithmeticMerge):
    """mergekit's task_arithmetic / ties / dare_linear / dare_ties on fusedmerge's kernels."""

    seed: int = 0

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        base = group.base.tensor
        entries = [e for e in group.entries if not e.is_base]
        if not entries:
            return base
        xs = [e.tensor for e in entries]
        w = [float(parameters["weight"][e.id]) for e in entries]
        densities = [float(parameters["density"][e.id]) for e in entries]
        lam, name = float(parameters["lambda"]), group.metadata.name or "tensor"
        total = math.fsum(w)
        div = total if parameters["normalize"] and abs(total) >= 1e-8 else 1.0
        random = self.sparsification_method == SparsificationMethod.random
        common = dict(weights=w, out_dtype=base.dtype)
        if self.consensus_method is None and self.sparsification_method is None:
            return task_arithmetic(base, xs, lam / div, **common)
        if self.consensus_method is None and random:
            p = 1.0 - _one_density(densities, self.method_name)
            return dare(base, xs, p, scaling=lam / div, rescale="l1" if parameters["rescale"] else False,
                        seed=self.seed, name=name, **common)
        if self.consensus_method == ConsensusMethod.sum and self.sparsification_method in (
                SparsificationMethod.magnitude, SparsificationMethod.random):
            merge = "mean" if parameters["normalize"] else "sum"
            if random:
                p = 1.0 - _one_density(densities, self.method_name)
                return ties(base, xs, scaling=lam, merge=merge, dare_p=p, rescale=bool(parameters["rescale"]),
                            seed=self.seed, name=name, **common)
            return ties(base, xs, density=densities, scaling=lam, merge=merge, name=name, **common)
        return super().merge_group(group, **parameters)


def _fused_linear(method_name: str):
    @merge_method(name=method_name, pretty_name="Linear (fusedmerge)", reference_url="https://arxiv.org/abs/2203.05482")
    def fused_linear(batch: TensorBatch,
                     weight: Annotated[torch.Tensor, BatchParameter(float, ParameterScope.INPUT)],
                     normalize: bool = True) -> torch.Tensor:
        first = batch.tensors[0]
        if not first.is_floating_point():
            raise TypeError("Linear merging requires floating-point tensors")
        w = weight.double().cpu()
        if normalize:
            w = w / w.sum(dim=1, keepdim=True)
        rows = [str(b) for b in range(first.shape[0])]
        forms = gather([{r: t[b] for b, r in enumerate(rows)} for t in batch.tensors])
        merged = merge_linear(forms, lambda slots: [Terms(w[int(s.key)].tolist()) for s in slots], None,
                              first.dtype, "auto")
        return torch.stack([merged[r] for r in rows])

    return fused_linear


def install(replace: bool = True, *, prefix: str = "fused_", seed: int = 0) -> List[str]:
    """Register the fused methods; returns their names. `replace=True` puts them under mergekit's own
    names (restore with uninstall()); otherwise beside them as `prefix + name`. `seed` keys the DARE masks."""
    names = []
    for name in ("linear", *GTA_METHODS):
        target = name if replace else prefix + name
        if name == "linear":
            fused = _fused_linear(target)
        else:
            original = _ORIGINALS.get(name) or registry.get(name)
            fields = {f.name: getattr(original, f.name) for f in dataclasses.fields(original)}
            fused = FusedGeneralizedTaskArithmetic(**{**fields, "method_name": target, "seed": seed})
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
