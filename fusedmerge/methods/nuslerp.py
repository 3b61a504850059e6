"""NuSLERP (mergekit 0.1.5 nuslerp.py): SLERP of two models' tensors — or of their task vectors when a base
is given — per tensor, per row or per column, with t from two weights.

    t = w₁/(w₀ + w₁)  (0.5 when |w₀ + w₁| < 1e-6);  vᵢ = xᵢ − θ0 with a base, else vᵢ = xᵢ
    per vector (flatten: the whole tensor; else rows along the last dim; row_wise: along dim 0, i.e. columns):
        n̂ᵢ = max(‖vᵢ‖, 1e-7),  d = clamp(⟨v₀, v₁⟩/(n̂₀n̂₁), −1, 1)
        1 − d² ≤ eps²:  c₀ = 1 − t, c₁ = t                  (colinear; no 0.9995 threshold as in slerp)
        otherwise:      θ = acos d, c₀ = sin((1−t)θ)/sin θ, c₁ = sin(tθ)/sin θ
    out = θ0 + c₀·v₀ + c₁·v₁   (no base: c₀·x₀ + c₁·x₁)

The sums ‖v₀‖², ‖v₁‖², ⟨v₀, v₁⟩ of a whole group of tensors are one ``dots`` launch (fp64 sums of the fp32
vᵢ's products), the coefficients one vectorised fp64 step, and the result one fused combination launch in
fp32 (fp64 for fp64 inputs), rounded once. mergekit computes all of it in the inputs' dtype (bf16 maths for
bf16 models): results agree within the bound tests/test_nuslerp.py states. ``row_wise`` (vectors along dim 0)
works on transposed contiguous copies of the two inputs and the base, then writes the result back.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .. import options as opt
from .. import reference
from .._forms import Slot, gather, gather_like, prepare
from ..reductions import DotsJob, DotsSpec
from ._reduce import combine_rows, group_sums, reduce_blocks, rows_of, run_combine
from ._spec import REQUIRED, ConfigMethod, GroupCall, Method, Param, RowBlocks, Span

SUMS = DotsSpec(((0, 0), (1, 1), (0, 1)))


@dataclass(frozen=True)
class NuslerpOptions:
    weights: Optional[Tuple[float, ...]] = opt.option(None, op=Optional[List[float]])
    flatten: bool = opt.option(True, op=bool)
    row_wise: bool = opt.option(False, op=bool)
    eps: float = opt.option(1e-8, op=float)
    name: str = opt.option("tensor", op=str)
    out_dtype: Optional[torch.dtype] = opt.option(None, op=Optional[torch.dtype])

    def __post_init__(self):
        w = opt.count_weights(self.weights, 2, normalise=False)
        opt.canonical(self, weights=tuple(w), flatten=opt.boolean(self.flatten, "flatten"),
                      row_wise=opt.boolean(self.row_wise, "row_wise"), eps=opt.real(self.eps, "eps"),
                      name=opt.text(self.name, "name"), out_dtype=opt.out_dtype(self.out_dtype))

    @property
    def t(self) -> float:
        total = self.weights[0] + self.weights[1]
        return 0.5 if abs(total) < 1e-6 else self.weights[1] / total


def coefficients(sums: torch.Tensor, t: float, eps: float = 1e-8) -> torch.Tensor:
    """[rows, 2] fp64 (c₀, c₁) from the sums [rows, 3] = (‖v₀‖², ‖v₁‖², ⟨v₀, v₁⟩), as mergekit's nuslerp."""
    n0, n1 = sums[:, 0].sqrt().clamp(min=1e-7), sums[:, 1].sqrt().clamp(min=1e-7)
    cos = (sums[:, 2] / (n0 * n1)).clamp(-1, 1)
    colinear = (1 - cos * cos) <= eps ** 2
    theta = torch.acos(torch.where(colinear, 0, cos))
    sin_theta = torch.sin(theta)
    return torch.stack([torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / sin_theta),
                        torch.where(colinear, t, torch.sin(t * theta) / sin_theta)], 1)


def _columns(slot: Slot) -> Slot:
    """The slot with every tensor transposed (dim 0 ↔ last) into contiguous memory."""
    tr = lambda x: x.transpose(0, -1).contiguous()  # noqa: E731
    return Slot(slot.key, tr(slot.out), [tr(x) for x in slot.inputs], tr(slot.base) if slot.base is not None else None)


@torch.no_grad()
def nuslerp(base, inputs, weights: Optional[Sequence[float]] = None, *, flatten: bool = True, row_wise: bool = False,
            eps: float = 1e-8, name: str = "tensor", out_dtype: Optional[torch.dtype] = None, backend: str = "auto"):
    """NuSLERP of the two models of `inputs` (tensors, state dicts or modules, the forms of `average`), of
    their task vectors when `base` is given (None: of the models themselves); weights default to (1, 1),
    t = 0.5. See the module docstring."""
    return _nuslerp(base, inputs, NuslerpOptions(weights, flatten, row_wise, eps, name, out_dtype), backend)


def _nuslerp(base, inputs, o: NuslerpOptions, backend: str, sums: Optional[torch.Tensor] = None):
    """nuslerp; `sums`: the sums of every vector when already known (a row block's: the whole tensor's)."""
    forms = gather(inputs, name=o.name)
    if len(forms.dicts) != 2:
        raise ValueError(f"nuslerp interpolates exactly two models; inputs has {len(forms.dicts)}")
    base_dict = gather_like(base, forms, "base") if base is not None else None
    merged, slots = prepare(forms, base_dict, o.out_dtype)
    columns = not o.flatten and o.row_wise
    work = [_columns(s) if columns and s.out.dim() >= 2 else s for s in slots]
    rows = [rows_of(s.out, not o.flatten) for s in work]
    if sums is None:
        sums = group_sums([DotsJob(s.inputs, s.base, r) for s, r in zip(work, rows)], SUMS, backend)
    c = coefficients(sums, o.t, o.eps)
    run_combine([j for s, r, cs in zip(work, rows, torch.split(c, rows))
                 for j in combine_rows(s.out, s.inputs, s.base, cs, "weights", s.key)], backend)
    for s, w in zip(slots, work):
        if w is not s:
            s.out.copy_(w.out.transpose(0, -1))
    return forms.wrap(merged)


# --- peers --------------------------------------------------------------------------------------------------


def _mergekit_nuslerp(call: GroupCall, sums: Optional[torch.Tensor] = None):
    if len(call.models) != 2:
        raise ValueError(f"nuslerp needs exactly two models besides the base, got {len(call.models)}")
    o = NuslerpOptions(call.weights, call.param("nuslerp_flatten", MERGEKIT_NUSLERP),
                       call.param("nuslerp_row_wise", MERGEKIT_NUSLERP), name=call.name, out_dtype=call.out_dtype)
    return _nuslerp(call.base, call.models, o, call.backend, sums)


def _operands(call: GroupCall):
    """(the two models' tensors, the base's or None) of a row block (RowBlocks)."""
    name, base, inputs = call.block()
    return inputs, base


def _columns_wise(call: GroupCall) -> bool:
    return not call.param("nuslerp_flatten", MERGEKIT_NUSLERP) and call.param("nuslerp_row_wise", MERGEKIT_NUSLERP)


def _blocks() -> RowBlocks:
    """reduce_blocks' per tensor (flatten) or per row; vectors along dim 0 (columns) span every row block,
    so such a tensor is one block, merged whole (its sums then come from the whole merge itself)."""
    rows = reduce_blocks(lambda n: SUMS, _operands, lambda call: not call.param("nuslerp_flatten", MERGEKIT_NUSLERP),
                         _mergekit_nuslerp)

    def merge(call: GroupCall, span: Span, sums):
        if not _columns_wise(call):
            return rows.merge(call, span, sums)
        shaped = lambda sd: None if sd is None else {k: t.reshape(span.shape) for k, t in sd.items()}  # noqa: E731
        whole = dataclasses.replace(call, base=shaped(call.base), models=[shaped(m) for m in call.models])
        return {k: t.reshape(-1) for k, t in _mergekit_nuslerp(whole).items()}

    return RowBlocks(rows.passes, merge,
                     lambda shape, call: math.prod(shape) if _columns_wise(call) else rows.align(shape, call))


def _check_two(models) -> None:
    if len(models) != 2:
        raise opt.ConfigError(f"nuslerp merges exactly two models besides base_model; models lists {len(models)}")


MERGEKIT_NUSLERP = ConfigMethod(
    "nuslerp", "mergekit", needs_base=False, model_params={"weight": Param("number", REQUIRED, doc="t = w₁/(w₀+w₁)")},
    global_params={"nuslerp_flatten": Param("bool", True, doc="one vector per tensor"),
                   "nuslerp_row_wise": Param("bool", False, doc="vectors along dim 0 (columns) when not flattened")},
    merge=_mergekit_nuslerp, check=_check_two, blocks=_blocks(),
    doc="SLERP of two models (of their task vectors with a base_model), per tensor, row or column", base_use="optional")

NUSLERP = Method(
    "nuslerp", nuslerp, NuslerpOptions, reference.combine, ("dots", "combine"), n_inputs=2,
    config=(MERGEKIT_NUSLERP,),
    grid=({"weights": [1.0, 1.0]}, {"weights": [0.3, 0.7], "flatten": False},
          {"weights": [2.0, 1.0], "flatten": False, "row_wise": True, "out_dtype": torch.float32}))
