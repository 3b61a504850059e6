"""Model Stock (arXiv 2403.19522): interpolate between the base and the fine-tuned models' average by the
angle between their task vectors, per tensor (or per row).

    per tensor (``filter_wise``: per row along the last dim): τᵢ = xᵢ − θ0, Gram Gᵢⱼ = ⟨τᵢ, τⱼ⟩ (fp64)
    "mergekit":     cosᵢⱼ = Gᵢⱼ / max(‖τᵢ‖‖τⱼ‖, 1e-6) clamped to [−1, 1];  c = mean over i < j
                    t = N·c / (1 + (N−1)·c),  t = 0 where |1 + (N−1)·c| < 1e-6 (keep the base)
    "fusionbench":  cosᵢⱼ = Gᵢⱼ / (‖τᵢ‖‖τⱼ‖ + 1e-8) clamped;  ā = mean of the angles acos(cosᵢⱼ)
                    t = N·cos ā / ((N−1)·cos ā + 1 + 1e-8)
    out = θ0 + (t/N)·Σ τᵢ   ( = t·mean(xᵢ) + (1−t)·θ0 )

The Gram matrices of a whole group of tensors are one launch of the ``dots`` primitive (fp64 sums of the
fp32 task vectors' products, fusedmerge/reductions.py; no N-fold copy), the ratios one vectorised fp64 step
over all rows, and the result one fused launch of the linear combination (reference.combine_reference)
with the coefficient t/N, per row for ``filter_wise``. mergekit's model_stock does all of this in the
inputs' dtype (bf16 maths for bf16 models) and FusionBench its cosines in fp32: results equal theirs up to
that rounding. mergekit's mean of cosines is
the paper's rule (its author confirmed it); FusionBench averages the angles, which differs for N > 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .. import options as opt
from .. import reference
from .._forms import gather, gather_like, prepare
from ..reductions import DotsJob, DotsSpec, dots, gram_matrix, gram_pairs
from ._reduce import combine_rows, group_sums, reduce_blocks, rows_of, run_combine
from ._spec import ConfigMethod, FusionBenchAlgorithm, GroupCall, Method, Param

VARIANTS = ("mergekit", "fusionbench")


@dataclass(frozen=True)
class ModelStockOptions:
    filter_wise: bool = opt.option(False, op=bool)
    variant: str = opt.option("mergekit", op=str)
    name: str = opt.option("tensor", op=str)
    out_dtype: Optional[torch.dtype] = opt.option(None, op=Optional[torch.dtype])

    def __post_init__(self):
        opt.canonical(self, filter_wise=opt.boolean(self.filter_wise, "filter_wise"),
                      variant=opt.choice(self.variant, "variant", VARIANTS), name=opt.text(self.name, "name"),
                      out_dtype=opt.out_dtype(self.out_dtype))
        if self.filter_wise and self.variant == "fusionbench":
            raise ValueError("filter_wise: FusionBench's ModelStock works per tensor only; use variant='mergekit'")


def gram(base: torch.Tensor, inputs: Sequence[torch.Tensor], rows: int, backend: str = "auto") -> torch.Tensor:
    """⟨τᵢ, τⱼ⟩ per row of the tensors seen as [rows, -1], in fp64 (the dots primitive): [rows, N, N]."""
    sums = dots([DotsJob(inputs, base, rows)], DotsSpec(gram_pairs(len(inputs))), backend)[0]
    return gram_matrix(sums, len(inputs))


def ratios(g: torch.Tensor, variant: str) -> torch.Tensor:
    """t per row from the Gram matrices [rows, N, N] (fp64)."""
    n = g.shape[-1]
    norms = torch.diagonal(g, dim1=-2, dim2=-1).clamp(min=0).sqrt()
    i, j = torch.triu_indices(n, n, 1)
    products = norms[:, i] * norms[:, j]
    if variant == "mergekit":
        c = (g[:, i, j] / products.clamp(min=1e-6)).clamp(-1, 1).mean(dim=1)
        den = 1 + (n - 1) * c
        singular = den.abs() < 1e-6
        return torch.where(singular, torch.zeros_like(c), n * c / torch.where(singular, torch.ones_like(den), den))
    cos = (g[:, i, j] / (products + 1e-8)).clamp(-1, 1)
    mean_cos = torch.cos(torch.acos(cos).mean(dim=1))
    return n * mean_cos / ((n - 1) * mean_cos + 1 + 1e-8)


@torch.no_grad()
def model_stock(base, inputs, *, filter_wise: bool = False, variant: str = "mergekit", name: str = "tensor",
                out_dtype: Optional[torch.dtype] = None, backend: str = "auto"):
    """Model Stock of two or more fine-tuned models onto `base`, over tensors, state dicts or modules (the
    forms of `average`); see the module docstring for the formula and the variants."""
    return _model_stock(base, inputs, ModelStockOptions(filter_wise, variant, name, out_dtype), backend)


def _model_stock(base, inputs, o: ModelStockOptions, backend: str, sums: Optional[torch.Tensor] = None):
    """model_stock; `sums`: the Gram sums of every row when already known (a row block's: the whole tensor's)."""
    forms = gather(inputs, name=o.name)
    if len(forms.dicts) < 2:
        raise ValueError(f"model_stock needs at least two fine-tuned models besides the base; inputs has "
                         f"{len(forms.dicts)}")
    base_dict = gather_like(base, forms, "base")
    merged, slots = prepare(forms, base_dict, o.out_dtype)
    n = len(forms.dicts)
    jobs = [DotsJob(s.inputs, s.base, rows_of(s.out, o.filter_wise)) for s in slots]
    if sums is None:
        sums = group_sums(jobs, DotsSpec(gram_pairs(n)), backend)
    t = ratios(gram_matrix(sums, n), o.variant)
    per_slot = torch.split((t / n).unsqueeze(1).expand(-1, n), [j.rows for j in jobs])
    run_combine([c for s, ts in zip(slots, per_slot) for c in combine_rows(s.out, s.inputs, s.base, ts, "inputs", s.key)],
                backend)
    return forms.wrap(merged)


# --- peers --------------------------------------------------------------------------------------------------


def _check_count(models) -> None:
    if len(models) < 2:
        raise opt.ConfigError(f"model_stock needs at least two models besides base_model, got {len(models)}")


def _mergekit_model_stock(call: GroupCall, sums: Optional[torch.Tensor] = None):
    o = ModelStockOptions(_filter_wise(call), name=call.name, out_dtype=call.out_dtype)
    return _model_stock(call.base, call.models, o, call.backend, sums)


def _filter_wise(call: GroupCall) -> bool:
    return call.param("filter_wise", MERGEKIT_MODEL_STOCK)


def _operands(call: GroupCall):
    """(the models' tensors, the base's) of a row block (RowBlocks)."""
    name, base, inputs = call.block()
    return inputs, base


MERGEKIT_MODEL_STOCK = ConfigMethod(
    "model_stock", "mergekit", needs_base=True, model_params={},
    global_params={"filter_wise": Param("bool", False, doc="one ratio per row instead of per tensor")},
    merge=_mergekit_model_stock, check=_check_count,
    blocks=reduce_blocks(lambda n: DotsSpec(gram_pairs(n)), _operands, _filter_wise, _mergekit_model_stock),
    doc="θ0 + t·mean(τᵢ), t from the mean cosine of the task vectors")


def _fb_model_stock(algo, pool):
    """FusionBench's ModelStock: keys in ignore_keys get the plain average of the fine-tuned models."""
    pretrained = pool.pretrained()
    finetuned = [m.state_dict() for m in pool.finetuned()]
    if len(finetuned) < 2:
        raise ValueError("ModelStock requires at least 2 fine-tuned models")
    base = pretrained.state_dict()
    ignored = [k for k in base if k in set(algo.ignore_keys or ())]
    kept = [k for k in base if k not in set(ignored)]
    pick = lambda sd, keys: {k: sd[k] for k in keys}  # noqa: E731
    merged = model_stock(pick(base, kept), [pick(sd, kept) for sd in finetuned], variant="fusionbench",
                         backend=algo.backend)
    if ignored:
        from .linear import average

        merged.update(average([pick(sd, ignored) for sd in finetuned], backend=algo.backend))
    model = pool.with_state(pretrained, {k: merged[k] for k in base})
    if algo.model_save_path:
        if not hasattr(model, "save_pretrained"):
            raise ValueError(f"model_save_path: a {type(model).__name__} has no save_pretrained")
        model.save_pretrained(algo.model_save_path, **dict(algo.model_save_kwargs or {}))
    return model


MODEL_STOCK = Method(
    "model_stock", model_stock, ModelStockOptions, reference.combine, ("dots", "combine"),
    config=(MERGEKIT_MODEL_STOCK,),
    fusionbench=(FusionBenchAlgorithm("FusedModelStock", "ModelStock",
                                      (("ignore_keys", None), ("model_save_path", None), ("model_save_kwargs", None)),
                                      _fb_model_stock, "Model Stock with FusionBench's mean of angles. A new module."),),
    grid=({}, {"filter_wise": True}, {"variant": "fusionbench", "out_dtype": torch.float32}))
