"""Model Stock (arXiv 2403.19522): interpolate between the base and the fine-tuned models' average by the
angle between their task vectors, per tensor (or per row).

    per tensor (``filter_wise``: per row along the last dim): τᵢ = xᵢ − θ0, Gram Gᵢⱼ = ⟨τᵢ, τⱼ⟩ (fp64)
    "mergekit":     cosᵢⱼ = Gᵢⱼ / max(‖τᵢ‖‖τⱼ‖, 1e-6) clamped to [−1, 1];  c = mean over i < j
                    t = N·c / (1 + (N−1)·c),  t = 0 where |1 + (N−1)·c| < 1e-6 (keep the base)
    "fusionbench":  cosᵢⱼ = Gᵢⱼ / (‖τᵢ‖‖τⱼ‖ + 1e-8) clamped;  ā = mean of the angles acos(cosᵢⱼ)
                    t = N·cos ā / ((N−1)·cos ā + 1 + 1e-8)
    out = θ0 + (t/N)·Σ τᵢ   ( = t·mean(xᵢ) + (1−t)·θ0 )

The Gram is accumulated in fp64 over column chunks (no N-fold copy of a tensor); the result is one fused
launch of the linear combination (reference.combine_reference) with the coefficient t/N, per row for
``filter_wise``. mergekit's model_stock does all of this in the inputs' dtype (bf16 maths for bf16 models)
and FusionBench its cosines in fp32: results equal theirs up to that rounding. mergekit's mean of cosines is
the paper's rule (its author confirmed it); FusionBench averages the angles, which differs for N > 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional, Sequence

import torch

from .. import dispatch, reference
from .. import options as opt
from .._forms import Slot, gather, gather_like, prepare
from ..reference import CombineJob
from ._spec import BlockPass, ConfigMethod, FusionBenchAlgorithm, GroupCall, Method, Param, RowBlocks

VARIANTS = ("mergekit", "fusionbench")
GRAM_CHUNK = 1 << 22  # elements of N deltas held at once while accumulating a Gram matrix


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


def gram_step(rows: int, n: int) -> int:
    """Columns per chunk of a Gram accumulation over `rows` rows of n models."""
    return max(1, GRAM_CHUNK // max(rows * n, 1))


def gram_chunks(base: torch.Tensor, inputs: Sequence[torch.Tensor], rows: int, step: int) -> Iterator[torch.Tensor]:
    """The Gram matrices [rows, N, N] of each chunk of `step` columns of the tensors seen as [rows, -1]."""
    b = base.reshape(rows, -1)
    xs = [x.reshape(rows, -1) for x in inputs]
    for start in range(0, b.shape[1], step):
        bb = b[:, start:start + step].double()
        d = torch.stack([x[:, start:start + step].double() - bb for x in xs], dim=1)
        yield d @ d.transpose(1, 2)


def fold(chunks: Iterable[torch.Tensor], rows: int, n: int, device) -> torch.Tensor:
    """The chunks' Gram matrices summed in order, from zero (fp64)."""
    g = torch.zeros((rows, n, n), dtype=torch.float64, device=device)
    for c in chunks:
        g += c
    return g


def gram(base: torch.Tensor, inputs: Sequence[torch.Tensor], rows: int, step: Optional[int] = None) -> torch.Tensor:
    """⟨τᵢ, τⱼ⟩ per row of the tensors seen as [rows, -1], in fp64: [rows, N, N], accumulated over column
    chunks of `step` (default gram_step(rows, N))."""
    step = step or gram_step(rows, len(inputs))
    return fold(gram_chunks(base, inputs, rows, step), rows, len(inputs), base.device)


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


def _jobs(slot: Slot, o: ModelStockOptions, block=None) -> List[CombineJob]:
    """One combination job per tensor, or per row (filter_wise), with the coefficient t/N for every input.
    block: (Span, the tensor's Gram or None) when the slot is a row block of a tensor (RowBlocks)."""
    n = len(slot.inputs)
    shape = block[0].shape if block else slot.out.shape
    per_row = o.filter_wise and len(shape) > 1
    rows = max(slot.out.numel() // shape[-1], 1) if per_row else 1
    if block and not per_row:
        g = block[1]
    else:  # per row: block-local rows, chunked as the whole tensor's rows are
        g = gram(slot.base, slot.inputs, rows, gram_step(math.prod(shape) // shape[-1] if per_row else 1, n))
    t = ratios(g, o.variant).tolist()
    if rows == 1:
        return [CombineJob(slot.out, slot.inputs, [t[0] / n] * n, slot.base)]
    view = lambda x: x.reshape(rows, -1)  # noqa: E731
    out, base, xs = view(slot.out), view(slot.base), [view(x) for x in slot.inputs]
    return [CombineJob(out[r], [x[r] for x in xs], [t[r] / n] * n, base[r]) for r in range(rows)]


@torch.no_grad()
def model_stock(base, inputs, *, filter_wise: bool = False, variant: str = "mergekit", name: str = "tensor",
                out_dtype: Optional[torch.dtype] = None, backend: str = "auto"):
    """Model Stock of two or more fine-tuned models onto `base`, over tensors, state dicts or modules (the
    forms of `average`); see the module docstring for the formula and the variants."""
    return _model_stock(ModelStockOptions(filter_wise, variant, name, out_dtype), base, inputs, backend)


def _model_stock(o: ModelStockOptions, base, inputs, backend: str, block=None):
    """`model_stock` with its options; `block` as in _jobs."""
    forms = gather(inputs, name=o.name)
    if len(forms.dicts) < 2:
        raise ValueError(f"model_stock needs at least two fine-tuned models besides the base; inputs has "
                         f"{len(forms.dicts)}")
    base_dict = gather_like(base, forms, "base")
    merged, slots = prepare(forms, base_dict, o.out_dtype)
    jobs = {}
    for slot in slots:
        if slot.out.numel():
            jobs.setdefault(slot.out.device, []).extend(_jobs(slot, o, block))
    for device_jobs in jobs.values():
        dispatch.run("combine", device_jobs, backend)
    return forms.wrap(merged)


# --- peers --------------------------------------------------------------------------------------------------


def _check_count(models) -> None:
    if len(models) < 2:
        raise opt.ConfigError(f"model_stock needs at least two models besides base_model, got {len(models)}")


def _mergekit_options(call: GroupCall) -> ModelStockOptions:
    return ModelStockOptions(call.param("filter_wise", MERGEKIT_MODEL_STOCK), name=call.name, out_dtype=call.out_dtype)


def _per_row(shape, call: GroupCall) -> bool:
    return _mergekit_options(call).filter_wise and len(shape) > 1


def _gram_partial(call: GroupCall, span, stats) -> Optional[List[torch.Tensor]]:
    """The block's chunk Grams (per-tensor ratio; whole chunks: align below), None for per-row ratios."""
    _, base, inputs = call.block()
    if _per_row(span.shape, call) or not base.is_floating_point():
        return None
    return list(gram_chunks(base, inputs, 1, gram_step(1, len(inputs))))


# Per tensor: the Gram's chunks block by block, summed in the whole tensor's order; per row: block-local.
MODEL_STOCK_BLOCKS = RowBlocks(
    passes=(BlockPass(_gram_partial, lambda a, b: None if a is None else a + b,
                      lambda chunks, _: None if chunks is None else fold(chunks, 1, chunks[0].shape[-1],
                                                                         chunks[0].device)),),
    merge=lambda call, span, g: _model_stock(_mergekit_options(call), call.base, call.models, call.backend,
                                             (span, g)),
    align=lambda shape, call: shape[-1] if _per_row(shape, call) else gram_step(1, len(call.weights)))


MERGEKIT_MODEL_STOCK = ConfigMethod(
    "model_stock", "mergekit", needs_base=True, model_params={},
    global_params={"filter_wise": Param("bool", False, doc="one ratio per row instead of per tensor")},
    merge=lambda call: _model_stock(_mergekit_options(call), call.base, call.models, call.backend),
    check=_check_count, blocks=MODEL_STOCK_BLOCKS,
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
    "model_stock", model_stock, ModelStockOptions, reference.combine, ("combine",),
    config=(MERGEKIT_MODEL_STOCK,),
    fusionbench=(FusionBenchAlgorithm("FusedModelStock", "ModelStock",
                                      (("ignore_keys", None), ("model_save_path", None), ("model_save_kwargs", None)),
                                      _fb_model_stock, "Model Stock with FusionBench's mean of angles. A new module."),),
    grid=({}, {"filter_wise": True}, {"variant": "fusionbench", "out_dtype": torch.float32}))
