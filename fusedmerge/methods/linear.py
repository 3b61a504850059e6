"""Averaging and weighted sums: one fused linear combination per state dict.

    average:       out = Σ wᵢ·xᵢ   with w normalised to Σ wᵢ = 1 (default uniform)
    weighted_sum:  out = Σ cᵢ·xᵢ   with the coefficients as given

Coefficients are computed in fp64 on the host and rounded once to the accumulation dtype; the result is
reference.combine_reference, equal on every backend. Peers: FusionBench's simple and weighted averages,
mergekit's ``linear`` (weights normalised when ``normalize``, its default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .. import options as opt
from .. import reference
from .._forms import Terms, gather, gather_like, merge_linear
from ._spec import ELEMENTWISE, REQUIRED, ConfigMethod, FusionBenchAlgorithm, GroupCall, Method, Param


@dataclass(frozen=True)
class LinearOptions:
    weights: Optional[Tuple[float, ...]] = opt.option(None, op=Optional[List[float]])
    out_dtype: Optional[torch.dtype] = opt.option(None, op=Optional[torch.dtype])

    def __post_init__(self):
        opt.canonical(self, weights=opt.optional_numbers(self.weights, "weights"), out_dtype=opt.out_dtype(self.out_dtype))


def average(inputs, weights: Optional[Sequence[float]] = None, *, out_dtype: Optional[torch.dtype] = None,
            out=None, backend: str = "auto"):
    """(Weighted) average of tensors, state dicts or modules: Σ w_i·x_i with weights normalised to sum 1.

    A drop-in for ``torch.stack(ts).mean(0)`` and FusionBench's simple/weighted averages. Returns a tensor,
    a new state dict, or a new module of the first module's class. Inputs are never modified, unless given
    as `out` (a tensor, state dict or module of the inputs' form, written in place and returned).
    """
    o = LinearOptions(weights, out_dtype)
    forms = gather(inputs)
    coeffs = opt.count_weights(o.weights, len(forms.dicts), normalise=True)
    out_dict = gather_like(out, forms, "out") if out is not None else None
    return forms.wrap(merge_linear(forms, coeffs, None, o.out_dtype, backend, out_dict, "weights"), out)


def weighted_sum(inputs, coeffs: Sequence[float], *, out_dtype: Optional[torch.dtype] = None, backend: str = "auto"):
    """Σ cᵢ·xᵢ with the coefficients as given (not normalised), in the forms of `average` (FusionBench's
    weighted average without `normalize`, mergekit's linear without it)."""
    o = LinearOptions(coeffs, out_dtype)
    forms = gather(inputs)
    w = opt.count_weights(o.weights, len(forms.dicts), normalise=False, arg="weights")
    return forms.wrap(merge_linear(forms, w, None, o.out_dtype, backend, arg="coeffs"))


# --- peers --------------------------------------------------------------------------------------------------


def normalised(weights: Sequence[float]) -> List[float]:
    """mergekit linear's Σwᵢ·xᵢ/Σwᵢ coefficients; a zero sum is refused (mergekit divides by it and writes
    inf/NaN)."""
    total = math.fsum(weights)
    if total == 0.0:
        raise ValueError(f"normalize: the model weights sum to zero ({weights}); give weights with a non-zero "
                         "sum or set normalize: false")
    return [w / total for w in weights]


def _mergekit_linear(call: GroupCall):
    normalize = call.param("normalize", MERGEKIT_LINEAR)
    w = normalised(call.weights) if normalize else list(call.weights)
    return weighted_sum(call.models, w, out_dtype=call.out_dtype, backend=call.backend)


def _mergekit_linear_batch(tensors: Sequence[torch.Tensor], base_index, params) -> torch.Tensor:
    """mergekit's batched linear: rows of one shape, weights [rows, N], one fused launch for all rows."""
    first = tensors[0]
    if not first.is_floating_point():
        raise TypeError("Linear merging requires floating-point tensors")
    w = params["weight"].double().cpu().tolist()
    coeffs = [normalised(row) if params.get("normalize", True) else row for row in w]
    rows = [str(b) for b in range(first.shape[0])]
    forms = gather([{r: t[b] for b, r in enumerate(rows)} for t in tensors])
    merged = merge_linear(forms, lambda slots: [Terms(coeffs[int(s.key)]) for s in slots], None, first.dtype, "auto")
    return torch.stack([merged[r] for r in rows])


MERGEKIT_LINEAR = ConfigMethod(
    "linear", "mergekit", needs_base=False, model_params={"weight": Param("number", REQUIRED, doc="wᵢ")},
    global_params={"normalize": Param("bool", True, doc="divide by Σ wᵢ")}, merge=_mergekit_linear,
    batch=_mergekit_linear_batch, doc="Σ wᵢ·θᵢ / Σ wᵢ", blocks=ELEMENTWISE)


def _fb_simple_average(algo, pool):
    models = pool.finetuned()
    return average(models, out=models[0] if algo.inplace else None, backend=algo.backend)


def _fb_weighted_average(algo, pool):
    models = pool.finetuned()
    if len(algo.weights) != len(models):
        raise ValueError(f"Number of weights must match the number of models, got {len(algo.weights)} weights "
                         f"and {len(models)} models")
    w = [float(x) for x in algo.weights]
    if algo.normalize:
        total = sum(w)
        w = [x / total for x in w]
    return weighted_sum(models, w, backend=algo.backend)


AVERAGE = Method(
    "average", average, LinearOptions, reference.combine, ("combine",), takes_base=False,
    config=(MERGEKIT_LINEAR,),
    fusionbench=(FusionBenchAlgorithm("FusedSimpleAverage", "SimpleAverageAlgorithm",
                                      (("show_pbar", False), ("inplace", True)), _fb_simple_average,
                                      "Mean of the pool's models; inplace=True writes it into the first model."),
                 FusionBenchAlgorithm("FusedWeightedAverage", "WeightedAverageAlgorithm",
                                      (("normalize", REQUIRED), ("weights", REQUIRED), ("verbose", True)),
                                      _fb_weighted_average,
                                      "Σ wᵢ·θᵢ, w normalised to sum 1 when `normalize`. A new module.")),
    grid=({}, {"weights": [0.5, 2.0, 1.0]}, {"out_dtype": torch.bfloat16}))

WEIGHTED_SUM = Method(
    "weighted_sum", weighted_sum, LinearOptions, reference.combine, ("combine",), takes_base=False,
    op_call=lambda inputs, weights=None, out_dtype=None: weighted_sum(
        inputs, weights if weights is not None else [1.0] * len(inputs), out_dtype=out_dtype),
    grid=({"coeffs": [0.5, -2.0, 1.0]},))
