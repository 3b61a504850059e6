"""DARE (drop and rescale), fused into the task-arithmetic launch, with name-keyed reproducible masks.

    out = θ0 + Σ cᵢ · keepᵢ ⊙ (θᵢ − θ0),   cᵢ = λ·wᵢ·r,   r = 1/(1−p) (rescale=True) or 1 (rescale=False)

keepᵢ is drawn from Philox4x32-10 with a key made of (seed, i, tensor name) (fusedmerge/philox.py): the
same seed gives the same masks on every backend and device, in any order of keys, whether a state dict
is merged whole or tensor by tensor. DARE simple average is ``scaling=1/N``. p is the drop probability.
The result is reference.combine_reference (and reference.l1_buckets_reference for ``rescale="l1"``).
Peers: FusionBench's DARE simple average / task arithmetic (p = sparsity_ratio), mergekit's ``dare_linear``
(density = 1 − p, the L1 rescale).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import FrozenSet, List, Optional, Sequence, Tuple, Union

import torch

from .. import dispatch, reference
from .. import options as opt
from .._forms import Slot, Terms, gather, gather_like, merge_linear
from ..opcm import linear_weights
from ..options import ConfigError
from ..philox import GROUP, drop_threshold, mask_key
from ..reference import CombineJob, bucket_value
from ._spec import REQUIRED, BlockPass, ConfigMethod, FusionBenchAlgorithm, GroupCall, Method, Param, RowBlocks, Span
from .task_arithmetic import GTA_PARAMS, mergekit_divisor


@dataclass(frozen=True)
class DareOptions:
    p: float = opt.option(op=float)
    scaling: float = opt.option(1.0, op=float)
    weights: Optional[Tuple[float, ...]] = opt.option(None, op=Optional[List[float]])
    rescale: Union[bool, str] = opt.option(True, op=bool)
    seed: int = opt.option(0, op=int)
    name: str = opt.option("tensor", op=str)
    linear_only: Union[bool, FrozenSet[str]] = opt.option(False, op=bool)
    out_dtype: Optional[torch.dtype] = opt.option(None, op=Optional[torch.dtype])

    def __post_init__(self):
        if self.rescale not in (True, False, "l1") or isinstance(self.rescale, int) and not isinstance(self.rescale, bool):
            raise TypeError(f"rescale must be True, False or 'l1', got {self.rescale!r}")
        linear_only = self.linear_only
        if not isinstance(linear_only, bool):
            if isinstance(linear_only, str) or not isinstance(linear_only, Collection):
                raise TypeError(f"linear_only must be True, False or a collection of keys, got {linear_only!r}")
            linear_only = frozenset(linear_only)
        opt.canonical(self, p=opt.drop_probability(self.p), seed=opt.integer(self.seed, "seed"),
                      name=opt.text(self.name, "name"), linear_only=linear_only,
                      scaling=opt.real(self.scaling, "scaling"), weights=opt.optional_numbers(self.weights, "weights"),
                      out_dtype=opt.out_dtype(self.out_dtype))

    def droppable(self, slot: Slot) -> bool:
        """Whether a tensor is dropped in (else merged by plain task arithmetic)."""
        if isinstance(self.linear_only, bool):
            return not self.linear_only or slot.inputs[0].dim() == 2
        return slot.key in self.linear_only


def dare(base, inputs, p: float, *, weights: Optional[Sequence[float]] = None, scaling: float = 1.0,
         rescale: Union[bool, str] = True, seed: int = 0, linear_only: Union[bool, Collection[str]] = False,
         name: str = "tensor",
         out_dtype: Optional[torch.dtype] = None, out=None, backend: str = "auto"):
    """DARE task arithmetic over tensors, state dicts or modules (the forms of `average`).

    p: drop probability in [0, 1). rescale: True multiplies kept deltas by 1/(1−p) (the paper, FusionBench);
    "l1" by ‖τᵢ‖₁/‖keepᵢ⊙τᵢ‖₁ per tensor and model (mergekit; left at 1 when a norm is below 1e-7 or not
    finite), the norms summed exactly; False keeps them as they are. seed: with the tensor's name (`name`
    for plain tensors) and the model's index, decides every mask. linear_only: True drops only in 2-D
    weights (Linear layers), or give the collection of keys to drop in (e.g. fusedmerge.opcm.linear_weights
    of a module); other tensors are merged by plain task arithmetic.
    """
    return _dare(DareOptions(p, scaling, weights, rescale, seed, name, linear_only, out_dtype), base, inputs, out,
                 backend)


def _dare(o: DareOptions, base, inputs, out=None, backend: str = "auto", first: int = 0, l1=None):
    """`dare` with its options; `first` and `l1` when the inputs are one row block of a tensor: the block's
    first element in the tensor, and the tensor's L1 buckets (summed over its blocks by `l1_block`)."""
    forms = gather(inputs, name=o.name)
    base_dict = gather_like(base, forms, "base")
    plain = [o.scaling * w for w in opt.count_weights(o.weights, len(forms.dicts), normalise=False)]
    threshold = drop_threshold(o.p)

    def terms(slots: List[Slot]) -> List[Terms]:
        out_terms = [Terms(plain) for _ in slots]
        dropped = [k for k, s in enumerate(slots) if threshold and o.droppable(s)]
        for k in dropped:
            keys = [mask_key(o.seed, i, slots[k].key) for i in range(len(plain))]
            coeffs = [c / (1.0 - o.p) for c in plain] if o.rescale is True else plain
            out_terms[k] = Terms(coeffs, threshold, keys, first)
        if o.rescale == "l1" and dropped:
            jobs = [CombineJob(slots[k].out, slots[k].inputs, plain, slots[k].base, threshold, out_terms[k].keys, first)
                    for k in dropped]
            buckets = dispatch.run("l1_buckets", jobs, backend) if l1 is None else [l1]
            for k, b in zip(dropped, buckets):
                out_terms[k].coeffs = [c * l1_factor(b[i]) for i, c in enumerate(plain)]
        return out_terms

    out_dict = gather_like(out, forms, "out") if out is not None else None
    return forms.wrap(merge_linear(forms, terms, base_dict, o.out_dtype, backend, out_dict, "scaling·weights"), out)


def l1_block(o: DareOptions, key: str, base: torch.Tensor, inputs: Sequence[torch.Tensor], backend: str,
             first: int) -> Optional[torch.Tensor]:
    """The L1 buckets [N, 2, 256] of one row block of tensor `key` starting at element `first` (integer
    sums: the blocks' sum is the whole tensor's exactly), or None when the options need none."""
    threshold = drop_threshold(o.p)
    if o.rescale != "l1" or not threshold:
        return None
    keys = [mask_key(o.seed, i, key) for i in range(len(inputs))]
    return dispatch.run("l1_buckets", [CombineJob(base, inputs, [1.0] * len(inputs), base, threshold, keys, first)],
                        backend)[0]


def l1_factor(buckets: torch.Tensor) -> float:
    """‖τ‖₁ / ‖keep⊙τ‖₁ from exact norm buckets [2, 256]; 1 when a norm is below 1e-7 or not finite."""
    before, after = bucket_value(buckets[0]), bucket_value(buckets[1])
    if not (math.isfinite(before) and math.isfinite(after)) or before < 1e-7 or after < 1e-7:
        return 1.0
    return before / after


# --- peers --------------------------------------------------------------------------------------------------


def one_density(densities: Sequence[Optional[float]], method: str) -> float:
    """The one kept fraction of a DARE merge, whose masks take one drop probability for every model
    (mergekit's default 1.0 where a model gives none)."""
    values = sorted({1.0 if d is None else float(d) for d in densities})
    if len(values) > 1:
        raise ConfigError(f"{method}: per-model densities differ ({values}); fusedmerge's DARE takes one "
                          "density for every model (TIES takes one per model)")
    return values[0]


DARE_MODEL_PARAMS = {"weight": Param("number", REQUIRED, doc="wᵢ"),
                     "density": Param("kept", 1.0, doc="kept fraction, one for every model")}


def _dare_linear_options(call: GroupCall) -> DareOptions:
    method = MERGEKIT_DARE_LINEAR
    lam = call.param("lambda", method) / mergekit_divisor(call.weights, call.param("normalize", method))
    return DareOptions(1.0 - one_density(call.densities, method.name), lam, tuple(call.weights),
                       "l1" if call.param("rescale", method) else False, call.seed, call.name, False, call.out_dtype)


def _l1_pass(call: GroupCall, span: Span, stats) -> Optional[torch.Tensor]:
    key, base, inputs = call.block()
    return l1_block(_dare_linear_options(call), key, base, inputs, call.backend, span.first)


MERGEKIT_DARE_LINEAR = ConfigMethod(
    "dare_linear", "mergekit", needs_base=True, model_params=DARE_MODEL_PARAMS,
    global_params={**GTA_PARAMS, "rescale": Param("bool", True, doc="keep each tensor's L1 norm")},
    merge=lambda call: _dare(_dare_linear_options(call), call.base, call.models, backend=call.backend),
    check=lambda models: one_density([m.get("density") for m in models], "dare_linear"),
    doc="θ0 + λ·Σ wᵢ·rᵢ·keepᵢ⊙τᵢ, keep = density",
    blocks=RowBlocks(passes=(BlockPass(_l1_pass, lambda total, b: None if b is None else total + b),),
                     merge=lambda call, span, l1: _dare(_dare_linear_options(call), call.base, call.models,
                                                        backend=call.backend, first=span.first, l1=l1),
                     align=lambda shape, call: GROUP))


def _fb_dare(algo, pool, scaling=None):
    pretrained = pool.pretrained()
    models = pool.finetuned()
    linear = linear_weights(pretrained) if algo.only_on_linear_weights else False
    return dare(pretrained, models, algo.sparsity_ratio, scaling=algo.scaling_factor if scaling is None else scaling,
                rescale=bool(algo.rescale), seed=algo.seed, linear_only=linear, backend=algo.backend)


def _fb_dare_simple_average(algo, pool):
    return _fb_dare(algo, pool, scaling=1.0 / len(pool.names))


FB_DARE_ARGS = (("sparsity_ratio", REQUIRED), ("only_on_linear_weights", REQUIRED), ("rescale", True), ("seed", 0))

DARE = Method(
    "dare", dare, DareOptions, reference.combine, ("combine", "l1_buckets"),
    config=(MERGEKIT_DARE_LINEAR,),
    fusionbench=(
        FusionBenchAlgorithm("FusedDareSimpleAverage", "DareSimpleAverage", FB_DARE_ARGS, _fb_dare_simple_average,
                             "DARE task arithmetic with λ = 1/N, as FusionBench defines the DARE simple average."),
        FusionBenchAlgorithm("FusedDareTaskArithmetic", "DareTaskArithmetic", (("scaling_factor", REQUIRED),
                             *FB_DARE_ARGS), _fb_dare,
                             "θ0 + λ·Σ keepᵢ⊙τᵢ/(1−p) in one fused launch; p = sparsity_ratio. A new module.")),
    op_extras=(("l1_rescale", bool, False),),
    op_call=lambda base, inputs, p, l1_rescale=False, rescale=True, **kw: dare(
        base, inputs, p, rescale="l1" if l1_rescale else rescale, **kw),
    grid=({"p": 0.5, "seed": 1}, {"p": 0.9, "scaling": 0.5, "rescale": False, "weights": [1.0, 2.0, -1.0]},
          {"p": 0.7, "rescale": "l1", "seed": 3}, {"p": 0.3, "linear_only": True}))
