"""Multi-SLERP (mergekit 0.1.5 multislerp.py): the weighted mean direction of N ≥ 1 models' tensors (of their
task vectors with a base) on the unit sphere, rescaled to their weighted mean norm, per tensor.

    Xᵢ = xᵢ − θ0 (with a base), w ← w/Σw (normalize_weights), nᵢ = ‖Xᵢ‖, uᵢ = Xᵢ/(nᵢ + eps), M = Σ wᵢuᵢ
    ‖M‖ < eps:  N = 2: out = θ0 + Σ wᵢXᵢ;  N > 2: an error (antipodal inputs that cancel)
    otherwise:  out = θ0 + (Σⱼ wⱼnⱼ)·M/‖M‖ = θ0 + Σ cᵢXᵢ,  cᵢ = (Σⱼ wⱼnⱼ)·wᵢ/((nᵢ + eps)·‖M‖)
    N = 1: out = x₀

mergekit's tangent-space step adds T = Σ wᵢ(uᵢ − (uᵢ·m)m) = M − ‖M‖m = 0 (algebraically; only its rounding
noise remains, and exp(T) at |T| ≈ eps is the identity), so the closed form above is its result without the
noise. ‖M‖² = Σᵢⱼ wᵢwⱼGᵢⱼ/((nᵢ+eps)(nⱼ+eps)) comes from the Gram matrix G of the Xᵢ: one ``dots`` launch for
a whole group of tensors (fp64 sums of the fp32 Xᵢ's products; mergekit stacks N copies), one vectorised
fp64 step, one fused combination launch (fp32, fp64 for fp64 inputs, rounded once). mergekit computes in
the inputs' dtype: the results agree within the bound tests/test_multislerp.py states.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .. import options as opt
from .. import reference
from .._forms import gather, gather_like, prepare
from ..reductions import DotsJob, DotsSpec, gram_matrix, gram_pairs
from ._reduce import combine_rows, group_sums, reduce_blocks, run_combine
from ._spec import REQUIRED, ConfigMethod, GroupCall, Method, Param


@dataclass(frozen=True)
class MultislerpOptions:
    weights: Optional[Tuple[float, ...]] = opt.option(None, op=Optional[List[float]])
    normalize_weights: bool = opt.option(True, op=bool)
    eps: float = opt.option(1e-8, op=float)
    name: str = opt.option("tensor", op=str)
    out_dtype: Optional[torch.dtype] = opt.option(None, op=Optional[torch.dtype])

    def __post_init__(self):
        opt.canonical(self, weights=opt.optional_numbers(self.weights, "weights"),
                      normalize_weights=opt.boolean(self.normalize_weights, "normalize_weights"),
                      eps=opt.real(self.eps, "eps"), name=opt.text(self.name, "name"),
                      out_dtype=opt.out_dtype(self.out_dtype))


def coefficients(g: torch.Tensor, w: torch.Tensor, eps: float, names: Sequence[str]) -> torch.Tensor:
    """[tensors, N] fp64 cᵢ from the Gram matrices [tensors, N, N] of the Xᵢ and the weights w [N]."""
    n = torch.diagonal(g, dim1=-2, dim2=-1).clamp(min=0).sqrt()
    a = w / (n + eps)
    mean_norm = torch.einsum("ti,tij,tj->t", a, g, a).clamp(min=0).sqrt()
    small = mean_norm < eps
    if small.any() and g.shape[-1] != 2:
        raise ValueError(f"multislerp: the weighted sum of the unit inputs of {names[int(small.nonzero()[0])]!r} is "
                         "zero (antipodal inputs whose weights balance out); use other weights")
    scale = (w * n).sum(-1, keepdim=True) / torch.where(small, 1, mean_norm).unsqueeze(-1)
    return torch.where(small.unsqueeze(-1), w.expand_as(a), scale * a)


@torch.no_grad()
def multislerp(base, inputs, weights: Optional[Sequence[float]] = None, *, normalize_weights: bool = True,
               eps: float = 1e-8, name: str = "tensor", out_dtype: Optional[torch.dtype] = None,
               backend: str = "auto"):
    """Multi-SLERP of `inputs` (tensors, state dicts or modules), of their task vectors when `base` is given
    (None: of the models themselves); weights default to 1 each. See the module docstring."""
    return _multislerp(base, inputs, MultislerpOptions(weights, normalize_weights, eps, name, out_dtype), backend)


def _multislerp(base, inputs, o: MultislerpOptions, backend: str, sums: Optional[torch.Tensor] = None):
    """multislerp; `sums`: the Gram sums of every tensor when already known (a row block's: the whole
    tensor's)."""
    forms = gather(inputs, name=o.name)
    n = len(forms.dicts)
    w = torch.tensor(opt.count_weights(o.weights, n, normalise=False), dtype=torch.float64)
    if o.normalize_weights:
        w = w / w.sum()
    base_dict = gather_like(base, forms, "base") if base is not None else None
    merged, slots = prepare(forms, base_dict, o.out_dtype)
    if n == 1:
        run_combine([j for s in slots for j in combine_rows(s.out, s.inputs, None, torch.ones((1, 1)), "weights", s.key)],
                    backend)
        return forms.wrap(merged)
    if sums is None:
        sums = group_sums([DotsJob(s.inputs, s.base) for s in slots], DotsSpec(gram_pairs(n)), backend)
    c = coefficients(gram_matrix(sums, n), w, o.eps, [s.key for s in slots])
    run_combine([j for s, cs in zip(slots, c.split(1)) for j in combine_rows(s.out, s.inputs, s.base, cs, "weights", s.key)],
                backend)
    return forms.wrap(merged)


# --- peers --------------------------------------------------------------------------------------------------


def _mergekit_multislerp(call: GroupCall, sums: Optional[torch.Tensor] = None):
    o = MultislerpOptions(call.weights, call.param("normalize_weights", MERGEKIT_MULTISLERP),
                          call.param("eps", MERGEKIT_MULTISLERP), call.name, call.out_dtype)
    return _multislerp(call.base, call.models, o, call.backend, sums)


def _operands(call: GroupCall):
    """(the models' tensors, the base's or None) of a row block (RowBlocks)."""
    name, base, inputs = call.block()
    return inputs, base


MERGEKIT_MULTISLERP = ConfigMethod(
    "multislerp", "mergekit", needs_base=False, model_params={"weight": Param("number", REQUIRED, doc="wᵢ")},
    global_params={"normalize_weights": Param("bool", True, doc="w ← w/Σw"),
                   "eps": Param("number", 1e-8, doc="uᵢ = Xᵢ/(‖Xᵢ‖ + eps)")},
    merge=_mergekit_multislerp,
    blocks=reduce_blocks(lambda n: DotsSpec(gram_pairs(n)), _operands, lambda call: False, _mergekit_multislerp),
    doc="weighted mean direction on the sphere, rescaled to the weighted mean norm, per tensor", base_use="optional")

MULTISLERP = Method(
    "multislerp", multislerp, MultislerpOptions, reference.combine, ("dots", "combine"),
    config=(MERGEKIT_MULTISLERP,),
    grid=({}, {"weights": [0.2, 0.5, 0.3], "normalize_weights": False},
          {"weights": [1.0, 2.0, 1.0], "out_dtype": torch.float32}))
