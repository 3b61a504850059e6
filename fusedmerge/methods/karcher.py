"""Karcher mean (mergekit 0.1.5 karcher.py): the Riemannian mean of N models' tensors on the unit sphere,
rescaled to their mean norm, per tensor. There is no base: mergekit averages a configured base_model like
any other model.

    nᵢ = ‖xᵢ‖, uᵢ = xᵢ/nᵢ, αᵢ = 1/N; valid = {i: nᵢ > tol} (none: out = 0), α̂ = α over valid, renormalised
    μ = Σ α̂ᵢuᵢ; μ = first valid u when ‖μ‖ < tol, else μ/‖μ‖
    up to max_iter times:  dᵢ = clamp(⟨μ, uᵢ⟩, −1, 1), θᵢ = acos dᵢ
                           T = Σ_{valid i, θᵢ ≥ tol} α̂ᵢ·θᵢ/sin θᵢ·(uᵢ − dᵢμ);  stop when ‖T‖ < tol
                           μ = cos‖T‖·μ + sin‖T‖·T/‖T‖;  μ = μ/‖μ‖ when ‖μ‖ > tol
    out = (Σᵢ αᵢnᵢ)·μ

μ and T always lie in span{uᵢ}: with μ = Σ cᵢuᵢ every dot product and norm above is a quadratic form of the
Gram matrix Ĝᵢⱼ = ⟨uᵢ, uⱼ⟩ = Gᵢⱼ/(nᵢnⱼ). So a whole group of tensors costs one ``dots`` launch (the Gram
matrices of the xᵢ, fp64 sums of the fp32 products), the iteration on the N coefficients of every tensor
at once (vectorised fp64 torch, each tensor stopping on its own test as mergekit's loop does), and one
fused combination launch out = Σ (scale·cᵢ/nᵢ)·xᵢ — instead of mergekit's N dot products, N axpys and N
host syncs per iteration per tensor. mergekit rounds uᵢ and μ to the inputs' dtype (every iteration for
bf16): the results agree within the bound tests/test_karcher.py states.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import options as opt
from .. import reference
from .._forms import gather, prepare
from ..reductions import DotsJob, DotsSpec, gram_matrix, gram_pairs
from ._reduce import combine_rows, group_sums, reduce_blocks, run_combine
from ._spec import ConfigMethod, GroupCall, Method, Param


@dataclass(frozen=True)
class KarcherOptions:
    max_iter: int = opt.option(10, op=int)
    tol: float = opt.option(1e-5, op=float)
    name: str = opt.option("tensor", op=str)
    out_dtype: Optional[torch.dtype] = opt.option(None, op=Optional[torch.dtype])

    def __post_init__(self):
        max_iter = opt.integer(self.max_iter, "max_iter")
        if max_iter < 0:
            raise ValueError(f"max_iter must be ≥ 0, got {max_iter}")
        opt.canonical(self, max_iter=max_iter, tol=opt.real(self.tol, "tol"), name=opt.text(self.name, "name"),
                      out_dtype=opt.out_dtype(self.out_dtype))


def _quad(a: torch.Tensor, g: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ti,tij,tj->t", a, g, b)


def coefficients(g: torch.Tensor, max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """[tensors, N] fp64 coefficients of the xᵢ from their Gram matrices [tensors, N, N] (module docstring)."""
    count = g.shape[-1]
    n = torch.diagonal(g, dim1=-2, dim2=-1).clamp(min=0).sqrt()
    inv = torch.where(n > 0, 1 / torch.where(n > 0, n, 1), 0)
    gu = g * inv.unsqueeze(-1) * inv.unsqueeze(-2)  # Ĝ; rows and columns of zero inputs are 0
    valid = n > tol
    alpha = valid.double() / valid.sum(-1, keepdim=True).clamp(min=1)
    c = alpha.clone()
    norm = _quad(c, gu, c).clamp(min=0).sqrt()
    first = torch.nn.functional.one_hot(valid.double().argmax(-1), count).double()
    c = torch.where((norm < tol).unsqueeze(-1), first, c / torch.where(norm < tol, 1, norm).unsqueeze(-1))
    running = valid.any(-1)
    eye = torch.eye(count, dtype=torch.float64)
    for _ in range(max_iter):
        d = (gu @ c.unsqueeze(-1)).squeeze(-1).clamp(-1, 1)  # ⟨μ, uᵢ⟩
        theta = torch.acos(d)
        moving = valid & (theta >= tol)
        k = torch.where(moving, alpha * theta / torch.where(moving, torch.sin(theta), 1), 0)
        tangent = (k.unsqueeze(-1) * (eye - d.unsqueeze(-1) * c.unsqueeze(-2))).sum(-2)  # Σ kᵢ(eᵢ − dᵢc)
        t_norm = _quad(tangent, gu, tangent).clamp(min=0).sqrt()
        running = running & (t_norm >= tol)
        if not running.any():
            break
        step = torch.cos(t_norm).unsqueeze(-1) * c + (torch.sin(t_norm) / torch.where(running, t_norm, 1)).unsqueeze(
            -1) * tangent
        norm = _quad(step, gu, step).clamp(min=0).sqrt()
        step = torch.where((norm > tol).unsqueeze(-1), step / torch.where(norm > tol, norm, 1).unsqueeze(-1), step)
        c = torch.where(running.unsqueeze(-1), step, c)
    scale = n.sum(-1, keepdim=True) / count
    return torch.where(valid.any(-1, keepdim=True), scale * c * inv, 0)


@torch.no_grad()
def karcher(inputs, *, max_iter: int = 10, tol: float = 1e-5, name: str = "tensor",
            out_dtype: Optional[torch.dtype] = None, backend: str = "auto"):
    """Karcher mean of `inputs` (tensors, state dicts or modules, the forms of `average`) on the unit
    sphere, rescaled to their mean norm; see the module docstring."""
    return _karcher(inputs, KarcherOptions(max_iter, tol, name, out_dtype), backend)


def _karcher(inputs, o: KarcherOptions, backend: str, sums: Optional[torch.Tensor] = None):
    """karcher; `sums`: the Gram sums of every tensor when already known (a row block's: the whole tensor's)."""
    forms = gather(inputs, name=o.name)
    n = len(forms.dicts)
    merged, slots = prepare(forms, None, o.out_dtype)
    if n == 1:
        c = torch.ones((len(slots), 1), dtype=torch.float64)
    else:
        if sums is None:
            sums = group_sums([DotsJob(s.inputs) for s in slots], DotsSpec(gram_pairs(n)), backend)
        c = coefficients(gram_matrix(sums, n), o.max_iter, o.tol)
    run_combine([j for s, cs in zip(slots, c.split(1)) for j in combine_rows(s.out, s.inputs, None, cs, "inputs", s.key)],
                backend)
    return forms.wrap(merged)


# --- peers --------------------------------------------------------------------------------------------------


def _mergekit_karcher(call: GroupCall, sums: Optional[torch.Tensor] = None):
    models = ([call.base] if call.base is not None else []) + list(call.models)
    o = KarcherOptions(int(call.param("max_iter", MERGEKIT_KARCHER)), call.param("tol", MERGEKIT_KARCHER), call.name,
                       call.out_dtype)
    return _karcher(models, o, call.backend, sums)


def _operands(call: GroupCall):
    """(every input's tensor, no base: a base_model is one more input) of a row block (RowBlocks)."""
    name, base, inputs = call.block()
    return ([base] if base is not None else []) + inputs, None


MERGEKIT_KARCHER = ConfigMethod(
    "karcher", "mergekit", needs_base=False, model_params={},
    global_params={"max_iter": Param("number", 10, doc="iterations at most"),
                   "tol": Param("number", 1e-5, doc="convergence and zero-norm tolerance")},
    merge=_mergekit_karcher,
    blocks=reduce_blocks(lambda n: DotsSpec(gram_pairs(n)), _operands, lambda call: False, _mergekit_karcher),
    doc="Riemannian mean on the unit sphere, rescaled to the mean norm, per tensor", base_use="input")

KARCHER = Method(
    "karcher", karcher, KarcherOptions, reference.combine, ("dots", "combine"), takes_base=False,
    config=(MERGEKIT_KARCHER,),
    grid=({}, {"max_iter": 3, "tol": 1e-3}, {"out_dtype": torch.float32}))
