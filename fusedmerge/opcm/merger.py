"""ContinualMerger: OPCM with constant memory, one batched projection and two fused launches per model.

State: the base θ0 (held, not copied), the running sum S of (projected) task vectors in fp32 (fp64 for an
fp64 base), the list of task-vector norms. Adding model t (τ_t = θ_t − θ0)::

    S_W += project(S_W, τ_W)   for every projectable matrix W (all of one shape in one batched call)
    S_x += τ_x                 for every other floating entry (one multi-tensor launch, τ never stored)
    merged = θ0 + S · mean_i‖τ_i‖ / ‖S‖

The reference's projection against W_merged − θ0 equals the one against S (the projection is scale
invariant), and its λ_t recursion reduces to this closed form; reference.py has the loop itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Callable, Collection, Dict, List, Optional, Union

import torch
from torch import nn

from .. import dispatch, options
from .._forms import check_key, check_keys, module_with_state
from ..reference import CombineJob
from .projection import check_alpha, check_variant, project

StateDict = Dict[str, torch.Tensor]
Projectable = Union[None, Callable[[str, torch.Tensor], bool], Collection[str]]


def linear_weights(module: nn.Module) -> List[str]:
    """State-dict names of the weights of the module's nn.Linear layers (the reference's default)."""
    return [f"{name}.weight" if name else "weight" for name, m in module.named_modules() if isinstance(m, nn.Linear)]


def looks_linear(key: str, tensor: torch.Tensor) -> bool:
    """Default for state dicts, which carry no layer types: a 2-D ``*.weight`` whose layer name does not
    contain "embed" (CLIP's position_embedding, LLMs' embed_tokens). Give a module or a predicate where
    this guess is wrong."""
    layer, _, leaf = key.rpartition(".")
    return leaf == "weight" and tensor.dim() == 2 and "embed" not in layer.rpartition(".")[2]


def nonleaf_params(keys: Collection[str], module: Optional[nn.Module] = None) -> List[str]:
    """Entries owned directly by a module that has submodules (CLIP's embeddings.class_embedding). With a
    module the tree decides; with a state dict, the key names (an owner prefix that other keys extend)."""
    if module is not None:
        return [f"{name}.{p}" if name else p for name, m in module.named_modules() if next(m.children(), None)
                for p, _ in m.named_parameters(recurse=False)]
    owners = {k.rpartition(".")[0] for k in keys}  # "" is the root module (e.g. CLIPModel's logit_scale)
    nonleaf = {o for o in owners if any(p != o and (o == "" or p.startswith(o + ".")) for p in owners)}
    return [k for k in keys if k.rpartition(".")[0] in nonleaf]


def _state_dict(model, arg: str) -> StateDict:
    if isinstance(model, nn.Module):
        return model.state_dict()
    if isinstance(model, Mapping) and all(isinstance(v, torch.Tensor) for v in model.values()):
        return dict(model)
    raise TypeError(f"{arg} must be an nn.Module or a state dict of tensors, got {type(model).__name__}")


def _norm(tensors) -> float:
    """L2 norm of tensors taken as one vector, accumulated in fp64."""
    return math.sqrt(math.fsum(float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2 for t in tensors))


class ContinualMerger:
    """OPCM continual merging (arXiv 2501.09522) of models given one at a time.

    `base` is the pretrained model (module or state dict); `alpha` in (0, 1] the share of singular-value
    mass that decides the k×k block removed from each new task vector; `variant` "fusionbench" (also zero
    the diagonal of Uᵀ τ V, FusionBench since 2025-03) or "paper" (only the block).

    `projectable` picks the matrices that are projected: None for the reference's default (the weights of
    nn.Linear layers when `base` is a module; for a state dict, see looks_linear), a predicate
    (key, tensor) → bool, or a collection of keys. Every other floating entry is added unprojected.

    `skip_nonleaf=True` reproduces FusionBench's treatment of parameters owned directly by a non-leaf
    module (CLIP's class_embedding): they are never updated after the first model and only follow the
    rescaling. The default (False) merges them like any other parameter: that quirk makes them depend on
    which model came first, which no method intends.

    `backend` selects the fused kernels of the elementwise steps (fusedmerge.backends()); the projection
    runs in torch on the tensors' device. The base must not be modified while the merger holds it.
    """

    def __init__(self, base, alpha: float = 0.5, *, variant: str = "fusionbench", projectable: Projectable = None,
                 skip_nonleaf: bool = False, backend: str = "auto"):
        self.alpha, self.variant = check_alpha(alpha), check_variant(variant)
        self.backend = backend
        self._module = base if isinstance(base, nn.Module) else None
        self._base = _state_dict(base, "base")
        floating = [k for k, v in self._base.items() if v.is_floating_point()]
        devices = {self._base[k].device for k in floating}
        if len(devices) > 1:
            raise ValueError(f"base has floating tensors on several devices: {sorted(map(str, devices))}")
        self._projected = self._select(projectable, floating)
        if not self._projected:
            raise ValueError("base has no projectable parameter (2-D weights of Linear layers): nothing for OPCM to "
                             "project; pass projectable= to choose them, or use task arithmetic")
        self._frozen = set(nonleaf_params(floating, self._module)) - set(self._projected) if skip_nonleaf else set()
        self._others = [k for k in floating if k not in self._projected and k not in self._frozen]
        self._acc = torch.float64 if any(self._base[k].dtype == torch.float64 for k in floating) else torch.float32
        self._sum: StateDict = {}
        self._norms: List[float] = []
        self._scale = 1.0

    def _select(self, projectable: Projectable, floating: List[str]) -> List[str]:
        if projectable is None:
            if self._module is not None:
                chosen = set(linear_weights(self._module))
                keys = [k for k in floating if k in chosen]
            else:
                keys = [k for k in floating if looks_linear(k, self._base[k])]
        elif callable(projectable):
            keys = [k for k in floating if projectable(k, self._base[k])]
        else:
            if isinstance(projectable, str):
                raise TypeError("projectable must be a predicate or a collection of keys, not a string")
            unknown = sorted(set(projectable) - set(floating))
            if unknown:
                raise ValueError(f"projectable names keys that are not floating entries of base: {unknown[:8]}")
            keys = [k for k in floating if k in set(projectable)]
        not_2d = [k for k in keys if self._base[k].dim() != 2]
        if not_2d:
            raise ValueError(f"projectable entries must be matrices; these are not 2-D: {not_2d[:8]}")
        return keys

    @property
    def steps(self) -> int:
        """Models added so far."""
        return len(self._norms)

    @property
    def task_vector_norms(self) -> List[float]:
        """‖θ_i − θ0‖ of every model added, in order (L2 over all floating entries)."""
        return list(self._norms)

    def _check(self, model: StateDict, arg: str) -> None:
        check_keys(self._base, [(arg, model)], "the base")
        for key, b in self._base.items():
            t = model[key]
            check_key(key, [b, t], ["the base", arg])
            if t.dtype != b.dtype:
                raise TypeError(f"{arg}: key {key!r} is {t.dtype}, the base is {b.dtype}")
            if not b.is_floating_point() and not torch.equal(t, b):
                raise ValueError(f"{arg}: key {key!r} ({b.dtype}, not merged) differs from the base's")

    @torch.no_grad()
    def add(self, model) -> "ContinualMerger":
        """Merge the next model (module or state dict). A model that does not match the base is refused
        before anything changes; the merger's state only changes once the whole step has been computed."""
        arg = f"model {self.steps + 1}"
        sd = _state_dict(model, arg)
        self._check(sd, arg)
        tau = lambda k: sd[k].to(self._acc) - self._base[k].to(self._acc)  # noqa: E731
        taus = [tau(k) for k in self._projected]
        rest = [k for k in self._base if self._base[k].is_floating_point() and k not in self._projected]
        if not self._norms:  # the first model is the merge: S = τ₁, kept whole
            self._sum = {**dict(zip(self._projected, taus)), **{k: tau(k) for k in rest}}
            self._norms.append(_norm(self._sum.values()))
            self._scale = 1.0
            return self
        norm = math.sqrt(_norm(taus) ** 2 + _norm(tau(k) for k in rest) ** 2)  # the other τ are never stored
        projected = project([self._sum[k] for k in self._projected], taus, self.alpha, variant=self.variant)
        del taus
        jobs = [CombineJob(self._sum[k], [self._sum[k], p], [1.0, 1.0]) for k, p in zip(self._projected, projected)]
        jobs += [CombineJob(self._sum[k], [sd[k], self._base[k], self._sum[k]], [1.0, -1.0, 1.0]) for k in self._others]
        dispatch.run("combine", jobs, self.backend)
        self._norms.append(norm)
        mean = math.fsum(self._norms) / len(self._norms)
        total = _norm(self._sum.values())
        self._scale = mean / total if total > 0 else 0.0
        for k in self._frozen:
            self._sum[k].mul_(self._scale)
        return self

    @torch.no_grad()
    def merged(self, *, out_dtype: Optional[torch.dtype] = None):
        """The current merged model θ0 + S·mean‖τ_i‖/‖S‖: a new state dict, or a new module of the base's
        class when the base was a module. Dtypes are the base's unless `out_dtype` is given."""
        if not self._norms:
            raise RuntimeError("no model has been added yet: call add() first")
        options.out_dtype(out_dtype)
        out: StateDict = {}
        jobs = []
        for key, b in self._base.items():
            if not b.is_floating_point():
                out[key] = b.clone()
                continue
            out[key] = torch.empty(b.shape, dtype=out_dtype or b.dtype, device=b.device)
            coeff = 1.0 if key in self._frozen else self._scale
            jobs.append(CombineJob(out[key], [b, self._sum[key]], [1.0, coeff]))
        dispatch.run("combine", jobs, self.backend)
        return out if self._module is None else module_with_state(self._module, out)


def continual_merge(base, models, alpha: float = 0.5, **options):
    """Merge `models` in order with a ContinualMerger(base, alpha, **options) and return the result."""
    merger = ContinualMerger(base, alpha, **options)
    for model in models:
        merger.add(model)
    return merger.merged()
